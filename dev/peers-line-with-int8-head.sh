#!/usr/bin/env bash
# Our lines for the peer kit (../shared/peers/cpu_peers.sh, EXTRA_ENGINE_CMD), like its ours.sh,
# plus the opt-in int8 head from the same `bitnet bench` run:
#   EXTRA_ENGINE_CMD="dev/peers-line-with-int8-head.sh $PWD" bash ../shared/peers/cpu_peers.sh
# Prints "name pp128 pp512 tg128 bytes" twice (the prefill numbers are the default head's).
# Decode starts after a 1-token prompt (bench decodes after the shortest one), as llama-bench's
# tg128 decodes from an empty context: after 128 tokens each step would pay ~3 ms more attention.
set -eu
cd "${1:-.}"
out=$(mktemp -d)/b.json
"${BITNET_EXE:-target/release/bitnet}" bench --preset 2b-4t --cpu --no-dense --prompt-lens 1,128,512 --head int8 --json "$out" >/dev/null
python3 - "$out" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
pp, size = j["prefill_tokens_per_s"], j.get("weight_bytes", 0)
print(f"candle-bitnet {pp['128']:.2f} {pp['512']:.2f} {j['decode_tokens_per_s']:.2f} {size}")
print(f"candle-bitnet-int8-head {pp['128']:.2f} {pp['512']:.2f} {j['int8_head_decode_tokens_per_s']:.2f} {size}")
PY
