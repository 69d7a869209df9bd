#!/usr/bin/env bash
# The GPU correctness check in one device call: build and pack here, run there.
#
# Here (no GPU needed):
#     scripts/device-check.sh            # = build-cuda.sh + device-pack.sh into gpu-carry/
# It builds target/release/sdpipe with CUDA and packs it with the fixture model
# (tests/fixtures/tiny-sd) and the run-time files into gpu-carry/ (git-ignored, a few MB).
#
# There (the device tool's `run`, carry ["gpu-carry"], timeout_s 300 leaves room for a rerun):
#     bash gpu-carry/device-run.sh gpu-carry/sdpipe device-check --model gpu-carry/tiny-sd \
#       | tee $OUT/device-check.txt
# It prints one table row per op / model part (max abs err, max rel err = max|gpu − cpu| /
# max|cpu|, ok when ≤ 1e-4) and exits 0 when every row is ok, 1 when some is not, 4 when no GPU
# could be opened. It takes a few seconds on the GPU (the tiny model; the CPU reference runs on
# the same machine). Add --json for a machine-readable report.
#
# Without a GPU the same comparison runs between the fused CPU kernels and dfdx's generic op
# path (what CUDA runs):  cargo run --release -- device-check --cpu-only
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/build-cuda.sh
source scripts/cuda-toolchain.sh "${CUDA_TOOLCHAIN_DIR:-$HOME/.cache/cuda13-pypi}" 2>/dev/null
scripts/device-pack.sh gpu-carry target/release/sdpipe -- tests/fixtures/tiny-sd
cat <<'MSG'
packed gpu-carry/. Device call (carry ["gpu-carry"]):
  bash gpu-carry/device-run.sh gpu-carry/sdpipe device-check --model gpu-carry/tiny-sd | tee $OUT/device-check.txt
MSG
