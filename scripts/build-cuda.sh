#!/usr/bin/env bash
# Builds the CUDA binary of sdpipe on a machine with no GPU and no CUDA toolkit.
#
#     scripts/build-cuda.sh [--tests]
#
# Downloads (once) CUDA 13.0 from PyPI into ~/.cache/cuda13-pypi (about 1 GB, see
# scripts/cuda-toolchain.sh; CUDA_TOOLCHAIN_DIR overrides the folder), then runs
# `cargo build --release --features cuda`. The binary is target/release/sdpipe. With --tests it
# also builds the test binaries (`cargo test --release --features cuda --no-run`).
# Run it on a GPU machine with scripts/device-pack.sh + scripts/device-run.sh
# (scripts/device-check.sh shows the whole round trip).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo fetch --quiet   # the libcuda link stub is generated from cudarc's sources
# shellcheck source=scripts/cuda-toolchain.sh
source scripts/cuda-toolchain.sh "${CUDA_TOOLCHAIN_DIR:-$HOME/.cache/cuda13-pypi}"
cargo build --release --features cuda
if [ "${1:-}" = "--tests" ]; then
  cargo test --release --features cuda --no-run
fi
echo "built target/release/sdpipe with CUDA (compute capability $CUDA_COMPUTE_CAP)" >&2
