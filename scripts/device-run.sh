#!/usr/bin/env bash
# Runs a command on the GPU machine with what a dfdx CUDA binary built elsewhere needs; packed
# next to the binaries by scripts/device-pack.sh and run from there:
#
#     bash gpu-carry/device-run.sh gpu-carry/sdpipe ARGS...
#
# 1. LD_LIBRARY_PATH gets libcuda.so.1 (the driver's) and the CUDA 13 libraries the binary links
#    (libcublas/libcublasLt/libnvrtc .so.13, libcurand .so.10), found on that machine (e.g. under
#    its PyTorch install); a missing one is named on stderr.
# 2. The include paths dfdx baked into the binary for NVRTC are recreated from the tarballs
#    listed in baked-paths.txt.
# 3. The GPU is described in one line (nvidia-smi), then the command replaces this shell.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
wanted="libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libnvrtc.so.13 libcurand.so.10"
found=$(find /usr/lib /usr/lib64 /usr/local /opt /lib /lib64 /root 2>/dev/null \
  \( -name 'libcuda.so.1' -o -name 'libcublas.so.13' -o -name 'libcublasLt.so.13' \
     -o -name 'libnvrtc.so.13' -o -name 'libcurand.so.10' \) \
  -not -path '*/compat/*' -not -path '*/stubs/*' -not -path '*/gpu-carry/*')
dirs=""
for lib in $wanted; do
  f=""
  [ "$lib" = libcuda.so.1 ] && f=$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 .*x86-64/ {print $NF; exit}')
  [ -n "$f" ] || f=$(echo "$found" | awk -F/ -v n="$lib" '$NF == n' | head -1)
  if [ -z "$f" ]; then echo "device-run: $lib not found on this machine" >&2; continue; fi
  d=$(dirname "$f")
  case ":$dirs:" in *":$d:"*) ;; *) dirs="$dirs:$d" ;; esac
done
export LD_LIBRARY_PATH="${dirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
while read -r kind path tgz; do
  [ -n "$path" ] || continue
  mkdir -p "$path"
  if [ "$kind" = include ]; then
    tar xzf "$here/$tgz" -C "$path" --strip-components=1
  else
    tar xzf "$here/$tgz" -C "$path"
  fi
done < "$here/baked-paths.txt"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader 2>&1 | head -2
exec "$@"
