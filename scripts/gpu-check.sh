#!/usr/bin/env bash
# GPU checks and benchmarks, for any machine with an NVIDIA GPU and this
# repository (scripts/setup.sh installs the pinned torch wheel, whose CUDA
# libraries libtorch uses). Nothing here runs on a machine without a GPU:
# the script says so and exits 2.
#
#   scripts/gpu-check.sh            # checks, then the benchmark table
#   CHECKS_ONLY=1 scripts/gpu-check.sh
#
# 1. Builds ptune-worker and the engine benchmark with `--features cuda`
#    (libtorch_cuda linked, see worker/build.rs) and checks the binary lists
#    libtorch_cuda.so among its needed libraries.
# 2. Tests on cuda:0 (PTUNE_TEST_DEVICE): packed jobs train as they do alone
#    (engine_pack, within 1e-4 of the exports), bf16 against fp32
#    (engine_precision); with two GPUs or more, data-parallel training on
#    cuda:0 and cuda:1 against one device (engine_data_parallel,
#    PTUNE_TEST_DEVICES).
# 3. Benchmarks on cuda:0, training examples per second at batch 8 and rows
#    of 64 tokens: one job alone (N jobs one after another), 8 packed and 16
#    packed (worker/examples/pack_bench.rs), and Hugging Face PEFT running
#    one job of the same method on the same rows and device
#    (bench/hf_methods.py, bench/hf_lm_throughput.py); for prompt tuning,
#    P-tuning v2 and LoRA on all-MiniLM-L6-v2 (SST-2) and on the 56M
#    Llama-shaped decoder of bench/random_decoder.py (E2E). Goals checked:
#    8 packed at least 4x one after another, and ptune's best at least 1.5x
#    PEFT's examples per second.
#
# Writes target/bench/gpu-check.md; logs under target/bench/gpu-check/.
#
# Environment:
#   STEPS     timed steps per job (default 30)
#   KINDS     subset of sst2-prompt sst2-p-tuning-v2 sst2-lora e2e-prompt
#             e2e-p-tuning-v2 e2e-lora (default all)
#   CHECKS_ONLY=1  build and test, no benchmark
#   LIBTORCH_BYPASS_VERSION_CHECK=1  build against a torch other than the
#             pinned 2.13 already installed (tch-rs refuses others); the
#             result is untested and reported as such
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu-check: no NVIDIA GPU here (nvidia-smi lists none); nothing to check" >&2
  exit 2
fi
[ -x .venv/bin/python ] || scripts/setup.sh
source scripts/env.sh

steps="${STEPS:-30}"
kinds="${KINDS:-sst2-prompt sst2-p-tuning-v2 sst2-lora e2e-prompt e2e-p-tuning-v2 e2e-lora}"
work=target/bench/gpu-check
out=target/bench/gpu-check.md
rm -rf "$work"
mkdir -p "$work"

gpus=$(python -c 'import torch; print(torch.cuda.device_count())')
echo "== torch $(python -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)'), $gpus GPU(s):"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
[ "$gpus" -ge 1 ] || { echo "gpu-check: torch sees no CUDA device" >&2; exit 1; }

echo "== build (--features cuda)"
cargo build --release -p ptune-worker --features cuda --bin ptune-worker --example pack_bench
if ! readelf -d target/release/ptune-worker | grep -q 'libtorch_cuda.so'; then
  echo "gpu-check: target/release/ptune-worker does not link libtorch_cuda.so" >&2
  exit 1
fi
target/release/ptune-worker --version

echo "== tests on cuda:0"
export PTUNE_TEST_DEVICE=cuda:0
cargo test --release -p ptune-worker --features integration,cuda --test engine_pack --test engine_precision \
  -- --test-threads 1
if [ "$gpus" -ge 2 ]; then
  echo "== data parallel on cuda:0 and cuda:1"
  PTUNE_TEST_DEVICES=cuda:0,cuda:1 cargo test --release -p ptune-worker --features integration,cuda \
    --test engine_data_parallel -- --test-threads 1
else
  echo "== data parallel skipped: one GPU"
fi
unset PTUNE_TEST_DEVICE
[ "${CHECKS_ONLY:-0}" = 1 ] && exit 0

decoder=target/bench-models/bench-llama
[ -f "$decoder/model.safetensors" ] || python bench/random_decoder.py "$decoder"

# Rows of 64 tokens for the encoder, from SST-2, as bench/methods.sh makes them.
sst2_data() {
  local dir="$work/sst2-rows"
  if [ ! -f "$dir/train.jsonl" ]; then
    python bench/hf_methods.py --mode prepare --spec examples/jobs/sst2-prompt-tuning.toml --out "$dir/prepared" \
      --steps "$steps" --batch-size 8 --seq-len 64 >/dev/null
    cp "$dir/prepared/train-64.jsonl" "$dir/train.jsonl"
    cp ../shared/data/sst2/dev.jsonl "$dir/dev.jsonl"
  fi
  echo "$dir"
}

# examples/s of a pack_bench table row whose name starts with $2.
row() { awk -F'|' -v name="$2" 'index($2, " " name) == 1 { gsub(/ /, "", $4); print $4 }' "$1"; }

{
  echo "Training examples per second on $(nvidia-smi --query-gpu=name --format=csv,noheader -i 0), batch 8,"
  echo "rows of 64 tokens, $steps timed steps per job (scripts/gpu-check.sh)."
  echo
  echo "| kind | one job alone | 8 packed | 16 packed | 8 packed / alone | PEFT, one job | best / PEFT |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
} >"$out"
failed=0
for kind in $kinds; do
  echo "== benchmark $kind"
  case "$kind" in
    sst2-*) model="$PTUNE_MINILM_DIR"; data=$(sst2_data) ;;
    e2e-*) model="$decoder"; data=../shared/data/e2e ;;
  esac
  target/release/examples/pack_bench --kind "$kind" --device cuda:0 "$model" "$data" 8 "$steps" 1 16384 \
    | tee "$work/$kind-8.md"
  target/release/examples/pack_bench --kind "$kind" --device cuda:0 "$model" "$data" 16 "$steps" 1 32768 \
    | tee "$work/$kind-16.md"
  alone=$(row "$work/$kind-8.md" "one after another")
  packed8=$(row "$work/$kind-8.md" "one pack")
  packed16=$(row "$work/$kind-16.md" "one pack")
  case "$kind" in
    sst2-prompt) spec=examples/jobs/sst2-prompt-tuning.toml ;;
    sst2-p-tuning-v2) spec=examples/jobs/sst2-p-tuning-v2.toml ;;
    sst2-lora) spec=examples/jobs/sst2-lora.toml ;;
  esac
  case "$kind" in
    sst2-*) python bench/hf_methods.py --mode throughput --spec "$spec" --train-file "$data/train.jsonl" \
              --steps "$steps" --batch-size 8 --seq-len 64 --device cuda:0 >"$work/$kind-peft.json" ;;
    e2e-*) method=${kind#e2e-}; method=${method//-/_}; [ "$method" = prompt ] && method=prompt_tuning
           python bench/hf_lm_throughput.py --model "$decoder" --train ../shared/data/e2e/train.jsonl \
             --method "$method" --steps "$steps" --batch-size 8 --max-seq-len 64 --device cuda:0 \
             >"$work/$kind-peft.json" ;;
  esac
  peft=$(python -c 'import json, sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])["examples_per_second"])' \
    "$work/$kind-peft.json")
  read -r ratio best_ratio < <(python -c 'import sys; a, p8, p16, hf = map(float, sys.argv[1:]); print(f"{p8 / a:.2f} {max(a, p8, p16) / hf:.2f}")' \
    "$alone" "$packed8" "$packed16" "$peft")
  echo "| $kind | $alone | $packed8 | $packed16 | ${ratio}x | $peft | ${best_ratio}x |" >>"$out"
  python -c 'import sys; sys.exit(0 if float(sys.argv[1]) >= 4 else 1)' "$ratio" \
    || { echo "goal missed: $kind 8 packed is ${ratio}x one after another (goal 4x)"; failed=1; }
  python -c 'import sys; sys.exit(0 if float(sys.argv[1]) >= 1.5 else 1)' "$best_ratio" \
    || { echo "goal missed: $kind is ${best_ratio}x PEFT (goal 1.5x)"; failed=1; }
done
echo
cat "$out"
exit "$failed"
