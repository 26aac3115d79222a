# Source me (bash): installs, if missing, a pinned CUDA 13.0 nvcc from PyPI wheels and
# link-time stub libraries, then exports what candle/cudarc/cudaforge read.
# Needs no GPU, driver or CUDA toolkit. Does not change the caller's shell options.
# Recipe and measurements: ../shared/cuda-build.md (pin all five wheels: a lone nvcc wheel
# pulls mismatched 13.5 parts and no cccl; 13.0 writes the PTX ISA that driver 580 loads).
_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_tools=${CUDA_TOOLS_DIR:-$_repo/.cuda}                 # kept out of git by .gitignore
if ! ls "$_tools"/venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc >/dev/null 2>&1; then
  python3 -m venv "$_tools/venv" &&
  "$_tools/venv/bin/pip" install -q --disable-pip-version-check \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 || return 1
fi
export CUDA_HOME=$(echo "$_tools"/venv/lib/python3*/site-packages/nvidia/cu13)
export PATH=$CUDA_HOME/bin:$PATH                       # cudarc reads `nvcc --version` for its API version
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}        # H100/H200 (sm_90a); there is no nvidia-smi here
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
if [ ! -e "$_tools/stubs/lib/libcuda.so" ]; then
  _cudarc=$(cd "$_repo" && cargo metadata --format-version 1 --features cuda 2>/dev/null | python3 -c \
    'import json,sys,os; m=json.load(sys.stdin); print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"]=="cudarc"))') &&
  bash "$_repo/scripts/gen-cuda-stubs.sh" "$_cudarc" "$_tools/stubs/lib" 13 &&
  ln -sf "$CUDA_HOME/lib/libcudart.so.13" "$_tools/stubs/lib/libcudart.so" || return 1
fi
export CUDA_ROOT=$_tools/stubs                          # cudarc also searches $CUDA_ROOT/lib when linking
unset _repo _tools _cudarc
