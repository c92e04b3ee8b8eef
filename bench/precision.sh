#!/usr/bin/env bash
# Training precision on the CPU: a float32 frozen base against a bf16 one
# (training.precision), all-MiniLM-L6-v2 on SST-2 prompt tuning.
#   throughput  training examples/second of fp32 and bf16 side by side in
#               one process (worker/examples/precision_bench.rs): one job
#               of batch 32 alone (the demo's setting) and JOBS jobs of
#               batch 8 as one pack, in alternating rounds; next to them
#               Hugging Face PEFT (bench/hf_prompt_tuning.py, same settings,
#               float32 and under CPU bf16 autocast) for STEPS steps.
#   accuracy    dev accuracy of the SST-2 demo (examples/jobs/sst2-prompt-tuning.toml,
#               4,000 examples, one epoch) trained with `ptune-worker train`
#               in fp32 and in bf16.
# Prints markdown tables and writes them to target/bench/precision.md; logs
# and outputs under target/bench/precision/.
#
#   bench/precision.sh
#   MODE=throughput STEPS=20 bench/precision.sh
#   MODE=throughput TASK=causal_lm bench/precision.sh   # the decoder: ptune, then Hugging Face
#
# Environment:
#   MODE      throughput, accuracy or both (default both)
#   STEPS     timed steps per job of the throughput runs (default 30)
#   JOBS      jobs in the pack (default 8)
#   ROUNDS    alternating rounds of the throughput runs (default 2)
#   LOWER     the precision compared with fp32: bf16 (default) or fp16
#   TASK      sequence_classification (default: MiniLM on SST-2) or causal_lm
#             (throughput only: E2E on the 56M-parameter Llama-shaped decoder
#             of bench/random_decoder.py, written under target/bench-models/;
#             ptune's rows, then Hugging Face PEFT prompt tuning on the same
#             decoder and E2E train file with bench/hf_lm_throughput.py: 20
#             virtual tokens, batch 32, 64-token rows, STEPS steps, float32
#             and --bf16 (CPU autocast) alternating over ROUNDS rounds, the
#             round taken as ptune's median takes it)
#   PTUNE_BENCH_BIN     folder with ptune-worker and examples/precision_bench
#                       (default target/release, built when missing)
#   PTUNE_BENCH_MODELS  models folder of ptune-worker (default models/, made
#                       by scripts/setup.sh; else a folder linking MiniLM)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$PTUNE_ROOT"

mode="${MODE:-both}"
steps="${STEPS:-30}"
jobs="${JOBS:-8}"
rounds="${ROUNDS:-2}"
lower="${LOWER:-bf16}"
task="${TASK:-sequence_classification}"
bin="${PTUNE_BENCH_BIN:-target/release}"
work=target/bench/precision
data="$PTUNE_ROOT/../shared/data/sst2"
mkdir -p "$work" target/bench
report=target/bench/precision.md
[ "$mode" = accuracy ] || : >"$report"

models="${PTUNE_BENCH_MODELS:-models}"
if [ ! -d "$models/all-MiniLM-L6-v2" ]; then
  models="$work/models"
  mkdir -p "$models"
  ln -sfn "$PTUNE_MINILM_DIR" "$models/all-MiniLM-L6-v2"
fi

if [ "$bin" = target/release ]; then
  [ -x target/release/examples/precision_bench ] || cargo build --release -p ptune-worker --example precision_bench
  [ -x target/release/ptune-worker ] || cargo build --release -p ptune-worker --bin ptune-worker
fi

echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores;" \
  "avx512_bf16: $(grep -qw avx512_bf16 /proc/cpuinfo && echo yes || echo no)" | tee -a "$report"
echo | tee -a "$report"

if [ "$task" = causal_lm ]; then
  [ "$mode" = throughput ] || { echo "TASK=causal_lm measures throughput only: set MODE=throughput" >&2; exit 2; }
  decoder=target/bench-models/bench-llama
  [ -f "$decoder/model.safetensors" ] || python bench/random_decoder.py "$decoder"
  echo "bench: ptune fp32 against $lower on the decoder, alone and packed ($steps steps, $rounds rounds)" >&2
  "$bin/examples/precision_bench" "$decoder" "$PTUNE_ROOT/../shared/data/e2e" "$steps" "$jobs" "$rounds" "$lower" causal_lm \
    2>"$work/ptune-decoder.log" | tee "$work/ptune-decoder.md"
  [ "$lower" = bf16 ] || { cat "$work/ptune-decoder.md" >>"$report"; exit 0; }  # autocast compares bf16 only
  hf_lm() {
    .venv/bin/python bench/hf_lm_throughput.py --model "$decoder" --train "$PTUNE_ROOT/../shared/data/e2e/train.jsonl" \
      --method prompt_tuning --num-virtual-tokens 20 --batch-size 32 --max-seq-len 64 --steps "$steps" "$@" \
      2>>"$work/hf-decoder.log" | tee -a "$work/hf-decoder.jsonl" | python3 -c 'import json, sys; print(json.load(sys.stdin)["examples_per_second"])'
  }
  : >"$work/hf-decoder.log"
  : >"$work/hf-decoder.jsonl"
  echo "bench: Hugging Face PEFT fp32 and bf16 autocast on the decoder ($steps steps, $rounds rounds)" >&2
  hf_fp32=() hf_bf16=()
  for _ in $(seq 1 "$rounds"); do
    hf_fp32+=("$(hf_lm)")
    hf_bf16+=("$(hf_lm --bf16)")
  done
  {
    cat "$work/ptune-decoder.md"
    # As precision_bench: the median round by seconds (of two, the slower).
    python3 -c "
import sys
fp32, bf16 = (sorted(map(float, s.split()), reverse=True) for s in sys.argv[1:])
a, b = fp32[len(fp32) // 2], bf16[len(bf16) // 2]
print(f'| Hugging Face PEFT, one job, batch 32, $steps steps (bf16: CPU autocast) | {a:.1f} | {b:.1f} | {b / a:.2f}x |')" \
      "${hf_fp32[*]}" "${hf_bf16[*]}"
    echo
  } >>"$report"
  tail -n 2 "$report" | head -n 1
  exit 0
fi

if [ "$mode" = throughput ] || [ "$mode" = both ]; then
  echo "bench: ptune fp32 against $lower, alone and packed ($steps steps, $rounds rounds)" >&2
  "$bin/examples/precision_bench" "$models/all-MiniLM-L6-v2" "$data" "$steps" "$jobs" "$rounds" "$lower" \
    2>"$work/ptune.log" | tee "$work/ptune.md"
  hf() {
    .venv/bin/python bench/hf_prompt_tuning.py --model "$PTUNE_MINILM_DIR" --data "$data" --pooling mean \
      --init SAMPLE_VOCAB --virtual-tokens 20 --lr 3e-2 --head-lr 1e-1 --batch-size 32 --max-seq-len 64 \
      --max-steps "$steps" "$@" 2>&1 | tee -a "$work/hf.log" | sed -n 's/^train examples\/s //p'
  }
  : >"$work/hf.log"
  echo "bench: Hugging Face PEFT fp32 and bf16 autocast ($steps steps)" >&2
  hf_fp32=$(hf)
  hf_bf16=$(hf --bf16)
  {
    cat "$work/ptune.md"
    python3 -c "import sys; a, b = map(float, sys.argv[1:]); print(f'| Hugging Face PEFT, one job, batch 32, $steps steps (bf16: CPU autocast) | {a:.1f} | {b:.1f} | {b / a:.2f}x |')" \
      "$hf_fp32" "$hf_bf16"
    echo
  } >>"$report"
  tail -n 2 "$report" | head -n 1
fi

if [ "$mode" = accuracy ] || [ "$mode" = both ]; then
  rows=()
  for precision in fp32 "$lower"; do
    spec="$work/sst2-$precision.toml"
    sed "s|\.\./\.\./\.\./shared/data/sst2|$data|" examples/jobs/sst2-prompt-tuning.toml >"$spec"
    echo "precision = \"$precision\"" >>"$spec"
    echo "bench: the SST-2 demo in $precision" >&2
    started=$(date +%s.%N)
    "$bin/ptune-worker" --models-dir "$models" train --spec "$spec" --out "$work/demo-$precision" \
      >"$work/demo-$precision.out" 2>"$work/demo-$precision.log"
    seconds=$(python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.0f}')" "$started")
    accuracy=$(python3 -c '
import json, sys
last = [m for m in map(json.loads, open(sys.argv[1])) if m["kind"] == "eval" and m["name"] == "accuracy"][-1]
print(format(last["value"], ".4f"))' "$work/demo-$precision/metrics.jsonl")
    rows+=("| $precision | $accuracy | $seconds |")
  done
  {
    echo "SST-2 demo (examples/jobs/sst2-prompt-tuning.toml: 4,000 examples, one epoch, batch 32), dev accuracy at the end:"
    echo
    echo "| precision | dev accuracy (872 examples) | wall seconds |"
    echo "|---|---|---|"
    printf '%s\n' "${rows[@]}"
  } | tee -a "$report"
fi
