#!/usr/bin/env bash
# The scheduler's memory estimate (`ptune-worker estimate`) against the
# measured peak resident memory of training the same spec, for a few job
# shapes on all-MiniLM-L6-v2 (sequence classification) and on a 56M-parameter
# Llama-shaped decoder (causal LM; bench/random_decoder.py writes it under
# target/bench-models/ if it is missing). Each shape trains 20 steps in its
# own `ptune-worker train` process (--threads 1) under GNU time (maximum
# RSS), evaluating once at the end on 64 dev examples (16 for causal LM,
# decoding 8 tokens).
#
# The training sets join consecutive SST-2 sentences (E2E targets) so that
# every example fills max_seq_len: the estimate assumes full sequences, and
# short ones would make any estimate look generous. One more run trains the
# demo spec as it ships (real SST-2, evaluations of the whole dev set, the
# export), the job a new user starts with.
#
# A process's peak also holds what the estimate leaves out (the libtorch
# runtime, the tokenizer, the datasets). The baseline run (prompt tuning, 1
# virtual token, batch 1, 8 tokens, 1 step: the same process with next to no
# training) measures that: its resident memory once the model is loaded,
# sampled from /proc every 20 ms (the highest sample after the loading peak,
# which maps the weights file while it copies it and then lets go). The
# table compares each peak minus that baseline with the estimate's job +
# activations, and the baseline with the estimate's weights.
#
#   bench/memory_estimate.sh   # PTUNE_BENCH_BIN: prebuilt binaries (default target/release)
#
# Writes target/bench/memory_estimate.md; specs and logs under .ptune/bench-memory-estimate/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$PTUNE_ROOT"
bin="${PTUNE_BENCH_BIN:-target/release}"
work=.ptune/bench-memory-estimate
steps="${STEPS:-20}"
rm -rf "$work"
mkdir -p "$work" target/bench

# Every example: 24 consecutive SST-2 sentences (well over 128 tokens), the
# first one's label; for causal LM, one E2E source and 8 consecutive targets.
python3 - "$PTUNE_ROOT/../shared/data" "$work" <<'PY'
import json, sys
data, work = sys.argv[1:]
rows = [json.loads(line) for line in open(f"{data}/sst2/train.jsonl") if line.strip()]
with open(f"{work}/train-long.jsonl", "w") as out:
    for i in range(0, 24 * 800, 24):
        chunk = rows[i:i + 24]
        out.write(json.dumps({"text": " . ".join(r["text"] for r in chunk), "label": chunk[0]["label"]}) + "\n")
rows = [json.loads(line) for line in open(f"{data}/e2e/train.jsonl") if line.strip()]
with open(f"{work}/e2e-long.jsonl", "w") as out:
    for i in range(0, 8 * 800, 8):
        chunk = rows[i:i + 8]
        out.write(json.dumps({"source": chunk[0]["source"], "target": " ".join(r["target"] for r in chunk)}) + "\n")
PY

decoder=target/bench-models/bench-llama
[ -f "$decoder/model.safetensors" ] || python bench/random_decoder.py "$decoder"
mkdir -p "$work/models"
ln -sfn "$PTUNE_ROOT/models/all-MiniLM-L6-v2" "$work/models/all-MiniLM-L6-v2"
ln -sfn "$PTUNE_ROOT/$decoder" "$work/models/bench-llama"

# write_spec NAME METHOD BATCH SEQ STEPS PEFT_LINES (classification on MiniLM,
# or causal LM on the decoder for names starting with lm-)
write_spec() {
  if [[ $1 == lm-* ]]; then
    cat >"$work/$1.toml" <<TOML
name = "$1"
base_model = "bench-llama"
task = "causal_lm"
method = "$2"
[peft]
$6
[data]
train = "$PTUNE_ROOT/$work/e2e-long.jsonl"
eval = "$PTUNE_ROOT/../shared/data/e2e/dev.jsonl"
text_field = "source"
label_field = "target"
references_field = "references"
max_seq_len = $4
max_train_examples = $(( $3 * $5 ))
max_eval_examples = 16
[generation]
max_new_tokens = 8
num_beams = 1
TOML
  else
    cat >"$work/$1.toml" <<TOML
name = "$1"
base_model = "all-MiniLM-L6-v2"
task = "sequence_classification"
method = "$2"
[peft]
$6
[data]
train = "$PTUNE_ROOT/$work/train-long.jsonl"
eval = "$PTUNE_ROOT/../shared/data/sst2/dev.jsonl"
labels = [0, 1]
max_seq_len = $4
max_train_examples = $(( $3 * $5 ))
max_eval_examples = 64
TOML
  fi
  cat >>"$work/$1.toml" <<TOML
[training]
learning_rate = 1e-3
batch_size = $3
max_steps = $5
seed = 1
TOML
}

# name | label | method | batch | seq | peft lines. Each model's shapes
# follow its own baseline.
shapes=(
  "baseline|baseline: prompt tuning, 1 virtual token, batch 1, 8 tokens, 1 step|prompt_tuning|1|8|num_virtual_tokens = 1"
  "pt-b8-s64|prompt tuning, 20 virtual tokens, batch 8, 64 tokens|prompt_tuning|8|64|num_virtual_tokens = 20"
  "pt-b32-s128|prompt tuning, 100 virtual tokens, batch 32, 128 tokens|prompt_tuning|32|128|num_virtual_tokens = 100"
  "ptv2-b16-s128|P-tuning v2, 20 virtual tokens, batch 16, 128 tokens|p_tuning_v2|16|128|num_virtual_tokens = 20"
  "lora-b16-s128|LoRA r 8 (query, value), batch 16, 128 tokens|lora|16|128|"
  "full-b16-s64|full fine-tuning, batch 16, 64 tokens|full|16|64|"
  "demo|the demo job as it ships (examples/jobs/sst2-prompt-tuning.toml: real SST-2, 125 steps, 3 evaluations of the 872 dev sentences, export)|demo|||"
  "lm-baseline|baseline: prompt tuning, 1 virtual token, batch 1, 8 tokens, 1 step|prompt_tuning|1|8|num_virtual_tokens = 1"
  "lm-pt-b8-s64|prompt tuning, 20 virtual tokens, batch 8, 64 tokens|prompt_tuning|8|64|num_virtual_tokens = 20"
  "lm-ptv2-b8-s128|P-tuning v2, 20 virtual tokens, batch 8, 128 tokens|p_tuning_v2|8|128|num_virtual_tokens = 20"
  "lm-lora-b8-s128|LoRA r 8 (q_proj, v_proj), batch 8, 128 tokens|lora|8|128|"
  "lm-lora-all-b16-s128|LoRA r 16 (all 7 projections), batch 16, 128 tokens|lora|16|128|r = 16;target_modules = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \"up_proj\", \"down_proj\"]"
)

# sample PID FILE: appends "VmHWM VmRSS" (KiB) of PID every 20 ms until it exits.
sample() {
  while [ -r "/proc/$1/status" ]; do
    awk '/^VmHWM|^VmRSS/ { printf "%s ", $2 } END { print "" }' "/proc/$1/status" >>"$2" 2>/dev/null || true
    sleep 0.02
  done
}

for shape in "${shapes[@]}"; do
  IFS='|' read -r name label method batch seq peft <<<"$shape"
  peft="${peft//;/$'\n'}"
  n="$steps"
  [[ $name == *baseline ]] && n=1
  if [ "$method" = demo ]; then
    sed "s#\"\.\./\.\./\.\./shared/#\"$PTUNE_ROOT/../shared/#" examples/jobs/sst2-prompt-tuning.toml >"$work/$name.toml"
  else
    write_spec "$name" "$method" "$batch" "$seq" "$n" "$peft"
  fi
  "$bin/ptune-worker" --models-dir "$work/models" estimate --spec "$work/$name.toml" --json >"$work/$name.estimate.json"
  echo "bench: $label" >&2
  /usr/bin/time -f "%M %e" -o "$work/$name.time" "$bin/ptune-worker" --models-dir "$work/models" --threads 1 \
    train --spec "$work/$name.toml" --out "$work/$name" >"$work/$name.log" 2>&1 &
  timer=$!
  sleep 0.05
  trainer=$(pgrep -P "$timer" || true)
  [ -n "$trainer" ] && sample "$trainer" "$work/$name.rss"
  wait "$timer"
  printf '%s\t%s\t%s\n' "$name" "$label" "$(tail -n 1 "$work/$name.time")" >>"$work/runs.tsv"
done

python3 - "$work" <<'PY' | tee target/bench/memory_estimate.md
import json, sys
work = sys.argv[1]
mib = lambda b: b / 2**20
runs = []
for line in open(f"{work}/runs.tsv"):
    name, label, measured = line.rstrip("\n").split("\t")
    peak_kib, seconds = measured.split()
    estimate = json.load(open(f"{work}/{name}.estimate.json"))
    runs.append((name, label, int(peak_kib) * 1024, float(seconds), estimate))
sets = [
    ("all-MiniLM-L6-v2, sequence classification, every example filling max_seq_len, 20 steps and an "
     "evaluation of 64 dev examples", [r for r in runs if not r[0].startswith("lm-")]),
    ("the 56M-parameter Llama-shaped decoder of bench/random_decoder.py, E2E causal LM, every example "
     "filling max_seq_len, 20 steps and an evaluation of 16 dev inputs decoding 8 tokens (the estimate's "
     "sequence counts them too)", [r for r in runs if r[0].startswith("lm-")]),
]
for what, ((base_name, base_label, load_peak, _, base_estimate), *shapes) in sets:
    samples = [tuple(map(int, l.split())) for l in open(f"{work}/{base_name}.rss") if len(l.split()) == 2]
    after_load = [rss for i, (hwm, rss) in enumerate(samples) if any(r < h for h, r in samples[: i + 1])]
    baseline = max(after_load) * 1024
    print("Memory estimate (`ptune-worker estimate`) against the measured peak resident memory of "
          f"`ptune-worker train --threads 1` (CPU, GNU time's maximum RSS), {what}. "
          f"Baseline: {mib(baseline):.0f} MiB resident once the model is loaded, in a run with next to no "
          f"training ({base_label}; the estimate's weights are {mib(base_estimate['weights_bytes']):.0f} MiB of it, "
          f"the rest is the libtorch runtime, the tokenizer and the datasets). Loading peaks at {mib(load_peak):.0f} MiB. MiB.")
    print()
    print("| job | estimate: weights / job / activations | estimate total | measured peak RSS | "
          "peak - baseline | estimate job + activations | measured / estimated |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, label, peak, seconds, e in shapes:
        parts = f"{mib(e['weights_bytes']):.0f} / {mib(e['job_bytes']):.1f} / {mib(e['activation_bytes']):.0f}"
        training = e["job_bytes"] + e["activation_bytes"]
        above = peak - baseline
        flag = "" if peak > load_peak * 1.01 else " (the loading peak)"
        print(f"| {label} | {parts} | {mib(e['total_bytes']):.0f} | {mib(peak):.0f}{flag} | {mib(above):.0f} | "
              f"{mib(training):.0f} | {above / training:.2f} |")
    print()
PY
