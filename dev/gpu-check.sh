#!/usr/bin/env bash
# The GPU checks, in one command on a lent GPU machine (no Rust there): tests/cuda.rs and the
# 2B-4T benchmark on GPU 0, then a memcheck pass over the kernel tests. Takes the binaries that
# `dev/gpu-check.sh pack` built here (xz, in .dev/); logs and the bench JSON go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = pack ]; then
  set -e
  target=${CARGO_TARGET_DIR:-target/cuda}
  . scripts/cuda-env.sh
  CARGO_TARGET_DIR=$target cargo build --release --features cuda --bin bitnet
  # The executable cargo builds for target $1 (`cargo test` also builds the `bitnet` binary).
  executable() {
    local name=$1
    shift
    CARGO_TARGET_DIR=$target cargo "$@" --features cuda --no-run --message-format=json |
      python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1] and m.get("executable"):
        print(m["executable"])' "$name"
  }
  mkdir -p .dev
  xz -T2 -6 -c "$target/release/bitnet" >.dev/bitnet.xz
  xz -T2 -6 -c "$(executable cuda test --release --test cuda)" >.dev/cuda-tests.xz
  xz -T2 -6 -c "$(executable decode_step bench --bench decode_step)" >.dev/decode-step.xz
  ls -l .dev
  exit
fi
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$out/gpu.txt"
# The CUDA 13 libraries (cuBLAS, cuRAND, cudart) come with the machine's Python wheels.
libs=$(find / -xdev \( -name libcublas.so.13 -o -name libcurand.so.10 -o -name libcudart.so.13 \) 2>/dev/null |
  xargs -rn1 dirname | sort -u | paste -sd:)
export LD_LIBRARY_PATH=$libs:${LD_LIBRARY_PATH:-}
for f in bitnet cuda-tests decode-step; do xz -dc ".dev/$f.xz" >"/tmp/$f" && chmod +x "/tmp/$f"; done
ldd /tmp/bitnet | grep 'not found' && echo "MISSING LIBRARIES (searched: $libs)"
# Each part can be skipped: TESTS=0, GENERATE=0, STEP=0, BENCH=0, SANITIZE=0.
if [ "${TESTS:-1}" = 1 ]; then
  echo "== tests/cuda.rs"
  CARGO_MANIFEST_DIR=$PWD timeout 200 /tmp/cuda-tests --nocapture 2>&1 | tee "$out/cuda-tests.log"
fi
if [ "${GENERATE:-1}" = 1 ]; then
  # The CLI on the GPU computes in bf16, on the CPU in f32: the ids are printed, not compared
  # (the tests compare each dtype with its own CPU run).
  echo "== bitnet generate on the fixture, GPU then CPU"
  for dev in "--device 0" --cpu; do
    /tmp/bitnet generate --model tests/fixtures/tiny-bitnet $dev --prompt "The capital of France" \
      --max-tokens 32 --ignore-eos --output-json "$out/generate${dev// /}.json" >/dev/null &&
      python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["generated_ids"])' "$out/generate${dev// /}.json"
  done
fi
if [ "${STEP:-1}" = 1 ]; then
  echo "== decode step: eager against one CUDA graph"
  timeout 120 /tmp/decode-step --device 0 2>&1 | tee "$out/decode-step.log"
fi
if [ "${BENCH:-1}" = 1 ]; then
  echo "== bitnet bench"
  timeout 240 /tmp/bitnet bench --device 0 --batch 1,4,16,64 --json "$out/bench-cuda.json" 2>&1 |
    grep -v '^\s*$' | tee "$out/bench.log"
  echo "== bitnet bench, decode launch by launch (CANDLE_BITNET_CUDA_GRAPH=0)"
  CANDLE_BITNET_CUDA_GRAPH=0 timeout 120 /tmp/bitnet bench --device 0 --no-dense --prompt-lens 128 \
    --json "$out/bench-cuda-eager.json" 2>&1 | grep -v '^\s*$' | tee "$out/bench-eager.log"
fi
if [ "${SANITIZE:-1}" = 1 ]; then
  echo "== memcheck"
  CARGO_MANIFEST_DIR=$PWD timeout 90 compute-sanitizer --tool memcheck --print-limit 20 \
    /tmp/cuda-tests --test-threads=1 --skip model --skip batch match empty 2>&1 | tail -60 | tee "$out/memcheck.log"
  echo "== racecheck"
  CARGO_MANIFEST_DIR=$PWD timeout 60 compute-sanitizer --tool racecheck --print-limit 20 \
    /tmp/cuda-tests --test-threads=1 rms_norm rope_kv argmax 2>&1 | tail -40 | tee "$out/racecheck.log"
fi
echo "== done"
