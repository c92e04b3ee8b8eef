#!/usr/bin/env bash
# Packed causal-LM training against one job at a time, in the engine alone
# (no coordinator or worker): 8 jobs of batch 8 on E2E NLG, on a randomly
# initialised Llama-shaped decoder of 56M parameters (hidden 512, 8 layers,
# 8 query and 4 key/value heads, vocabulary 32,000; bench/random_decoder.py
# writes it, since no pretrained decoder is available offline; a step's
# time depends on the shape, not on the weights). Each kind of job (LoRA
# r 8 on q_proj and v_proj; prompt tuning, 20 virtual tokens) trains one
# job after another and then as one pack, alternated over ROUNDS rounds in
# one process (worker/examples/pack_bench.rs); the table gives training
# examples per second (evaluation and setup excluded).
#
#   bench/lm_packing.sh    # STEPS (default 16), ROUNDS (default 2), TOKENS (default "8192 2048")
#
# Needs a release build of the example (`cargo build --release -p
# ptune-worker --example pack_bench`; the script builds it if missing).
# Writes target/bench/lm_packing.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$PTUNE_ROOT"
steps="${STEPS:-16}"
rounds="${ROUNDS:-2}"
read -r -a tokens <<<"${TOKENS:-8192 2048}"
model=target/bench-models/bench-llama
mkdir -p target/bench
if [ ! -f "$model/model.safetensors" ]; then
  python bench/random_decoder.py "$model"
fi
if [ ! -x target/release/examples/pack_bench ]; then
  cargo build --release -p ptune-worker --example pack_bench
fi
out=target/bench/lm_packing.md
{
  echo "# Packed causal-LM training ($(date -u +%F), $(nproc) cores)"
  for kind in e2e-lora e2e-prompt; do
    echo
    target/release/examples/pack_bench --kind "$kind" "$model" ../shared/data/e2e 8 "$steps" "$rounds" "${tokens[@]}"
  done
} | tee "$out"
