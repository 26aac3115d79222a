#!/usr/bin/env bash
# Link-time stand-ins for libcuda, libnvrtc, libcurand, libcublas and libcublasLt, so that the
# cuda build links on a machine without a driver or those libraries. Every symbol returns 100
# (CUDA_ERROR_NO_DEVICE for the driver API). The symbol lists come from cudarc's own bindings.
# Never put this directory on LD_LIBRARY_PATH of a GPU machine: it would hide the real driver.
# Usage: gen-cuda-stubs.sh <cudarc-src-dir> <out-lib-dir> <cuda-major>
set -euo pipefail
CUDARC=$1; OUT=$2; MAJ=${3:-13}; mkdir -p "$OUT"; tmp=$(mktemp -d)
gen() { # name soname sys-file versioned
  grep -ohP '^pub unsafe fn \K\w+(?=\()' "$CUDARC/src/$3" | sort -u | awk '{print "int "$1"(void){return 100;}"}' > "$tmp/$1.c"
  local v=(); if [ "$4" = 1 ]; then echo "$2 { global: *; };" > "$tmp/$1.map"; v=(-Wl,--version-script="$tmp/$1.map"); fi
  gcc -shared -fPIC -o "$OUT/lib$1.so" -Wl,-soname,"$2" "${v[@]}" "$tmp/$1.c"
  ln -sf "lib$1.so" "$OUT/$2"   # by soname too: lets the cuda build's tests start (and skip) here
}
gen cuda     libcuda.so.1        driver/sys/mod.rs   0   # the real libcuda has unversioned symbols
gen nvrtc    libnvrtc.so.$MAJ    nvrtc/sys/mod.rs    1   # the others version them, e.g. cublasCreate_v2@@libcublas.so.13
gen curand   libcurand.so.10     curand/sys/mod.rs   1
gen cublas   libcublas.so.$MAJ   cublas/sys/mod.rs   1
gen cublasLt libcublasLt.so.$MAJ cublaslt/sys/mod.rs 1
rm -rf "$tmp"
