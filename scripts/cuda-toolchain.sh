#!/usr/bin/env bash
# Sets up what `cargo build --features cuda` needs on a machine with no GPU and no CUDA toolkit,
# from PyPI only. Source it (it exports variables):
#
#     source scripts/cuda-toolchain.sh [DIR]     # DIR defaults to ~/.cache/cuda13-pypi
#
# What it does, once (about 1 GB into DIR; later calls only re-export):
#   1. pip-installs CUDA 13.0 nvcc, headers, NVRTC, cuBLAS, cuRAND and the runtime into DIR/py.
#   2. makes DIR/root, a CUDA_ROOT layout (include/, lib64/ with the unversioned .so names the
#      linker asks for), and points the fixed path /tmp/cuda13 at it.
#   3. compiles a link-time stub of libcuda.so (the driver library; the GPU machine has the real
#      one) from the driver symbols cudarc 0.9 declares; every stub returns CUDA_ERROR_NO_DEVICE.
#   4. where no working `nvidia-smi` exists, puts a stub on PATH that answers compute
#      capability 9.0 (the H200), which dfdx's build script asks for.
#   5. exports CUDA_ROOT=/tmp/cuda13, CUDA_COMPUTE_CAP=90 and PATH (nvcc, the stub).
#
# Why CUDA 13.0 exactly: the lent H200 runs driver 580 (CUDA 13.0) and a driver rejects PTX from
# a newer nvcc. Why /tmp/cuda13: dfdx bakes CUDA_ROOT/include into the binary for the kernels it
# compiles at run time with NVRTC; the GPU machine recreates that same path (device-run.sh).
# Set CUDA_COMPUTE_CAP before sourcing to build for another GPU generation (e.g. 80 for A100).

_sdpipe_cuda_setup() {
  local dir=${1:-$HOME/.cache/cuda13-pypi}
  local py=${PYTHON:-python3}
  local cap=${CUDA_COMPUTE_CAP:-90}
  mkdir -p "$dir" || return 1

  # 1. The CUDA 13.0 wheels (all merge into nvidia/cu13/{bin,include,lib,nvvm}).
  local cu="$dir/py/nvidia/cu13"
  if [ ! -x "$cu/bin/nvcc" ]; then
    echo "installing CUDA 13.0 from PyPI into $dir/py (about 1 GB)" >&2
    "$py" -m pip install --quiet --no-deps --target "$dir/py" \
      nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 \
      nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 \
      nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88 || return 1
  fi

  # 2. CUDA_ROOT layout.
  local root="$dir/root"
  mkdir -p "$root/lib64" "$dir/bin" || return 1
  ln -sfn "$cu/include" "$root/include"
  local lib
  for lib in nvrtc cublas cublasLt cudart; do
    ln -sfn "$cu/lib/lib$lib.so.13" "$root/lib64/lib$lib.so"
  done
  ln -sfn "$cu/lib/libcurand.so.10" "$root/lib64/libcurand.so"

  # 3. libcuda.so link stub, generated from cudarc's own list of driver functions.
  local stub="$dir/stub"
  if [ ! -f "$stub/libcuda.so.1" ]; then
    mkdir -p "$stub"
    local sys
    sys=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.9.*/src/driver/sys.rs 2>/dev/null | head -1)
    if [ -z "$sys" ]; then
      echo "cudarc 0.9 sources not found: run 'cargo fetch' first" >&2
      return 1
    fi
    {
      echo '/* Link-time stand-in for libcuda.so.1; the GPU driver provides the real library. */'
      grep -o 'pub fn cu[A-Za-z0-9_]*' "$sys" | awk '{print $3}' | sort -u \
        | grep -v -x -e cuGetErrorString -e cuGetErrorName \
        | sed 's/.*/int &(void) { return 100; \/* CUDA_ERROR_NO_DEVICE *\/ }/'
      echo 'int cuGetErrorString(int e, const char **s) { (void)e; if (s) *s = "no CUDA driver (link stub)"; return 0; }'
      echo 'int cuGetErrorName(int e, const char **s) { (void)e; if (s) *s = "CUDA_ERROR_NO_DEVICE"; return 0; }'
    } > "$stub/libcuda_stub.c"
    gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$stub/libcuda.so.1" "$stub/libcuda_stub.c" \
      || return 1
  fi
  ln -sfn "$stub/libcuda.so.1" "$root/lib64/libcuda.so"

  # 4. nvidia-smi stub (only when there is no working nvidia-smi).
  if ! nvidia-smi >/dev/null 2>&1; then
    printf '#!/bin/sh\n# stub: answers dfdx build.rs (compute_cap query) on a machine without a GPU\necho compute_cap\necho %s\n' \
      "${cap:0:1}.${cap:1}" > "$dir/bin/nvidia-smi"
    chmod +x "$dir/bin/nvidia-smi"
  else
    rm -f "$dir/bin/nvidia-smi"
  fi

  # 5. Fixed path and environment.
  ln -sfn "$root" /tmp/cuda13
  export PATH="$dir/bin:$cu/bin:$PATH"
  export CUDA_ROOT=/tmp/cuda13 CUDA_PATH=/tmp/cuda13 CUDA_COMPUTE_CAP=$cap
  echo "CUDA toolchain ready: CUDA_ROOT=/tmp/cuda13 -> $root, compute capability $cap," \
    "$(nvcc --version | tail -1)" >&2
}

_sdpipe_cuda_setup "$@"
_sdpipe_cuda_status=$?
unset -f _sdpipe_cuda_setup
if [ "$_sdpipe_cuda_status" -ne 0 ]; then
  unset _sdpipe_cuda_status
  return 1 2>/dev/null || exit 1
fi
unset _sdpipe_cuda_status
