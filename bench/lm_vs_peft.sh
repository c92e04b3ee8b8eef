#!/usr/bin/env bash
# Causal-LM training throughput, ptune's engine against Hugging Face PEFT,
# on the same machine, model and rows: `ptune-worker train` against
# bench/hf_lm_throughput.py, alternated over ROUNDS rounds, for LoRA (r 8,
# alpha 16, dropout 0.05 on q_proj and v_proj) and prompt tuning (20 virtual
# tokens). The model is the randomly initialised 56M-parameter Llama-shaped
# decoder of bench/random_decoder.py (no pretrained decoder is available
# offline; throughput depends on the shape, not the weights); the rows are
# the first E2E training pairs, batch 8, at most 64 tokens, padded to each
# batch's longest. Both sides time 20 steps after 2 warm-up steps, each
# from taking its batch to reading its loss, and use all cores. LoRA on
# PEFT also runs with its LM head on target positions only (ptune's way;
# transformers computes logits at every position), to show what the gap is.
#
#   bench/lm_vs_peft.sh    # ROUNDS (default 2), STEPS (default 20); PTUNE_BENCH_BIN (default target/release)
#
# Writes target/bench/lm_vs_peft.md; specs and logs under target/bench/lm_vs_peft/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$PTUNE_ROOT"
bin="${PTUNE_BENCH_BIN:-target/release}"
rounds="${ROUNDS:-2}"
steps="${STEPS:-20}"
batch=8
work=target/bench/lm_vs_peft
model=target/bench-models/bench-llama
train="$PTUNE_ROOT/../shared/data/e2e/train.jsonl"
rm -rf "$work"
mkdir -p "$work/models"
[ -f "$model/model.safetensors" ] || python bench/random_decoder.py "$model"
ln -sfn "$PTUNE_ROOT/$model" "$work/models/bench-llama"

# ptune's spec for METHOD (lora or prompt_tuning).
write_spec() {
  local peft
  if [ "$1" = lora ]; then
    peft=$'r = 8\nlora_alpha = 16\nlora_dropout = 0.05\ntarget_modules = ["q_proj", "v_proj"]'
  else
    peft=$'num_virtual_tokens = 20\ninit = "random"'
  fi
  cat >"$work/$1.toml" <<TOML
name = "lm-vs-peft-$1"
base_model = "bench-llama"
task = "causal_lm"
method = "$1"
[peft]
$peft
[data]
train = "$train"
eval = "$PTUNE_ROOT/../shared/data/e2e/dev.jsonl"
text_field = "source"
label_field = "target"
references_field = "references"
max_seq_len = 64
max_train_examples = $(( (steps + 2) * batch ))
max_eval_examples = 2
[generation]
max_new_tokens = 4
num_beams = 1
[training]
learning_rate = 2e-4
batch_size = $batch
max_steps = $(( steps + 2 ))
warmup_ratio = 0.0
eval_every = 1000
seed = 1
TOML
}

: >"$work/results.tsv"
for method in lora prompt_tuning; do
  write_spec "$method"
  for round in $(seq 1 "$rounds"); do
    out="$work/$method-$round"
    "$bin/ptune-worker" --models-dir "$work/models" train --spec "$work/$method.toml" --out "$out" >"$out.log" 2>&1
    eps=$(python3 - "$out/metrics.jsonl" "$batch" <<'PY'
import json, sys
# Each step's examples_per_second is its batch over its seconds: the timed
# steps' examples over the sum of their seconds.
rates = [m["value"] for m in map(json.loads, open(sys.argv[1]))
         if m["kind"] == "train" and m["name"] == "examples_per_second" and m["step"] > 2]
batch = int(sys.argv[2])
print(round(len(rates) * batch / sum(batch / r for r in rates), 2))
PY
)
    printf '%s\tptune\t%s\t%s\n' "$method" "$round" "$eps" >>"$work/results.tsv"
    hf=$(python bench/hf_lm_throughput.py --model "$model" --train "$train" --method "$method" --steps "$steps" \
      --batch-size "$batch" --max-seq-len 64 2>"$work/hf-$method-$round.log")
    printf '%s\thf\t%s\t%s\n' "$method" "$round" "$(echo "$hf" | python3 -c 'import json,sys; print(json.load(sys.stdin)["examples_per_second"])')" >>"$work/results.tsv"
    echo "$hf" >"$work/hf-$method-$round.json"
    if [ "$method" = lora ]; then
      # PEFT again with the LM head on target positions only, as ptune runs it.
      hf=$(python bench/hf_lm_throughput.py --model "$model" --train "$train" --method lora --steps "$steps" \
        --batch-size "$batch" --max-seq-len 64 --head-on-targets 2>"$work/hf-targets-$round.log")
      printf '%s\thf-targets\t%s\t%s\n' "$method" "$round" "$(echo "$hf" | python3 -c 'import json,sys; print(json.load(sys.stdin)["examples_per_second"])')" >>"$work/results.tsv"
    fi
  done
done

python3 - "$work" "$rounds" <<'PY' | tee target/bench/lm_vs_peft.md
import json, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
results = {}
for line in open(f"{work}/results.tsv"):
    method, side, _, eps = line.split("\t")
    results.setdefault((method, side), []).append(float(eps))
versions = json.load(open(f"{work}/hf-lora-1.json"))["versions"]
print(f"Causal-LM training throughput, batch 8, E2E rows of at most 64 tokens, 56M-parameter Llama-shaped decoder; "
      f"{rounds} alternating rounds, median; PEFT {versions['peft']}, transformers {versions['transformers']}, "
      f"torch {versions['torch']}. Examples per second.")
print()
print("| method | ptune (each round) | PEFT (each round) | ptune / PEFT |")
print("|---|---|---|---:|")
each = lambda xs: ", ".join(f"{x:.1f}" for x in xs)
rows = [("lora", "hf", "LoRA r 8 (q_proj, v_proj)"),
        ("lora", "hf-targets", "LoRA r 8, PEFT with the LM head on target positions only (as ptune)"),
        ("prompt_tuning", "hf", "prompt tuning, 20 virtual tokens")]
for method, side, label in rows:
    ours, theirs = results[(method, "ptune")], results[(method, side)]
    print(f"| {label} | {each(ours)} | {each(theirs)} | {statistics.median(ours) / statistics.median(theirs):.2f}x |")
PY
