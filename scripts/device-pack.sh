#!/usr/bin/env bash
# Packs CUDA binaries built on this machine (scripts/build-cuda.sh) into one folder to carry to
# a GPU machine, together with what dfdx needs there at run time.
#
#     scripts/device-pack.sh OUT_DIR BINARY... [-- EXTRA_PATH...]
#
#   OUT_DIR     folder to (re)create, e.g. gpu-carry (ignored by git; the device call carries it)
#   BINARY      executables to carry (stripped copies; the line tables stay on this machine)
#   EXTRA_PATH  files or folders copied into OUT_DIR as they are (e.g. tests/fixtures/tiny-sd)
#
# What else goes in, and why: dfdx compiles some kernels at run time with NVRTC, and the include
# paths it gives NVRTC were fixed at build time: CUDA_ROOT/include (= /tmp/cuda13/include, see
# scripts/cuda-toolchain.sh) and dfdx's build-script output folder (its *.cuh headers). Both are
# packed as tarballs and listed in OUT_DIR/baked-paths.txt; OUT_DIR/device-run.sh recreates
# them on the GPU machine. CARGO_TARGET_DIR (default: target) is where the dfdx build output is
# looked for.
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,16p' "$0" >&2; exit 2; }
out=$1; shift
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
target=${CARGO_TARGET_DIR:-$here/../target}
[ -d /tmp/cuda13/include ] || { echo "no /tmp/cuda13/include: source scripts/cuda-toolchain.sh first" >&2; exit 1; }

rm -rf "$out"
mkdir -p "$out"
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  strip -o "$out/$(basename "$1")" "$1" 2>/dev/null || cp "$1" "$out/"
  shift
done
[ "${1:-}" = "--" ] && shift
for extra in "$@"; do cp -r "$extra" "$out/"; done
cp "$here/device-run.sh" "$out/"

: > "$out/baked-paths.txt"
tar czhf "$out/cuda-include.tgz" -C /tmp/cuda13 include
echo "include /tmp/cuda13/include cuda-include.tgz" >> "$out/baked-paths.txt"
i=0
for d in $(find "$(cd "$target" && pwd)" -type d -path '*/build/dfdx-*/out' 2>/dev/null); do
  ls "$d"/*.cuh >/dev/null 2>&1 || continue   # only the CUDA build's output has headers
  tar czf "$out/dfdx-out-$i.tgz" -C "$d" .
  echo "outdir $d dfdx-out-$i.tgz" >> "$out/baked-paths.txt"
  i=$((i + 1))
done
[ "$i" -gt 0 ] || { echo "no dfdx CUDA build output under $target: build with --features cuda first" >&2; exit 1; }
du -sh "$out"
