#!/usr/bin/env bash
# ptune's engine against Hugging Face PEFT, method by method, on SST-2 with
# all-MiniLM-L6-v2: for each example spec examples/jobs/sst2-<method>.toml,
#   accuracy    dev accuracy (and wall seconds) after the spec's training
#               budget: `ptune-worker train --spec ...` against
#               bench/hf_methods.py --mode accuracy;
#   throughput  training examples/second at batch 32, 64-token rows and 20
#               virtual tokens (prompt and prefix methods), over 20 steps
#               after 2 warm-up steps: ptune-worker on a copy of the spec
#               written by `bench/hf_methods.py --mode prepare` (its
#               `examples_per_second` step metrics from metrics.jsonl) against
#               bench/hf_methods.py --mode throughput on the same rows.
# Prints a markdown table and writes it to target/bench/methods.md; every
# result as a JSON line to target/bench/methods.jsonl; logs, specs and
# outputs under target/bench/methods/.
#
#   bench/methods.sh
#   METHODS="lora full" MODE=throughput bench/methods.sh
#
# Environment:
#   METHODS   subset and order of prompt-tuning p-tuning-mlp p-tuning-lstm
#             prefix-tuning p-tuning-v2 lora full (default: all of them)
#   MODE      accuracy, throughput or both (default both)
#   STEPS     timed steps of the throughput runs (default 20)
#   MAX_TRAIN_EXAMPLES, MAX_EVAL_EXAMPLES
#             override the specs' data budget on both sides (a quick check
#             of the accuracy runs; the default is the specs' own)
#   PTUNE_BENCH_BIN     folder with ptune-worker (default target/release)
#   PTUNE_BENCH_MODELS  models folder of ptune-worker (default models/, made
#                       by scripts/setup.sh)
# Prefix tuning and P-tuning v2 do not run on BERT in transformers 5.x; their
# HF side runs in .venv-ref4 (transformers 4.46.3, peft 0.12.0 over .venv's
# torch), created here when missing as scripts/reference/peft_methods.py
# describes. Both sides use all cores (libtorch's and torch's default).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$PTUNE_ROOT"

methods="${METHODS:-prompt-tuning p-tuning-mlp p-tuning-lstm prefix-tuning p-tuning-v2 lora full}"
mode="${MODE:-both}"
steps="${STEPS:-20}"
bin="${PTUNE_BENCH_BIN:-target/release}"
models="${PTUNE_BENCH_MODELS:-models}"
batch_size=32
seq_len=64
virtual_tokens=20
case "$mode" in accuracy | throughput | both) ;; *) echo "MODE must be accuracy, throughput or both" >&2; exit 2 ;; esac
for m in $methods; do
  [ -f "examples/jobs/sst2-$m.toml" ] || { echo "no spec examples/jobs/sst2-$m.toml" >&2; exit 2; }
done
[ -x "$bin/ptune-worker" ] || { echo "$bin/ptune-worker not found: cargo build --release --bins, or set PTUNE_BENCH_BIN" >&2; exit 1; }
[ -e "$models/all-MiniLM-L6-v2" ] || { echo "$models/all-MiniLM-L6-v2 not found: run scripts/setup.sh" >&2; exit 1; }

ref4_python() {
  if [ ! -x .venv-ref4/bin/python ]; then
    echo "bench: creating .venv-ref4 (transformers 4.46.3, peft 0.12.0) for the prefix methods" >&2
    python3 -m venv .venv-ref4
    .venv-ref4/bin/pip install --no-deps transformers==4.46.3 peft==0.12.0 tokenizers==0.20.3 \
        huggingface-hub==0.26.5 requests urllib3 charset-normalizer certifi >&2
    echo "$PWD/.venv/lib/python3.11/site-packages" > .venv-ref4/lib/python3.11/site-packages/zz-main-venv.pth
  fi
  echo .venv-ref4/bin/python
}

python_for() {
  case "$1" in
    prefix-tuning | p-tuning-v2) ref4_python ;;
    *) echo .venv/bin/python ;;
  esac
}

work=target/bench/methods
rm -rf "$work"
mkdir -p "$work"
results=target/bench/methods.jsonl
: >"$results"

overrides=()
[ -n "${MAX_TRAIN_EXAMPLES:-}" ] && overrides+=(--max-train-examples "$MAX_TRAIN_EXAMPLES")
[ -n "${MAX_EVAL_EXAMPLES:-}" ] && overrides+=(--max-eval-examples "$MAX_EVAL_EXAMPLES")

# Appends one JSON line to the results: side, method, mode and the fields of $4 (JSON).
record() {
  python3 -c 'import json, sys; print(json.dumps({"side": sys.argv[1], "method": sys.argv[2], "mode": sys.argv[3], **json.loads(sys.argv[4])}))' \
    "$1" "$2" "$3" "$4" >>"$results"
}

# Runs ptune-worker train on spec $2 into $work/$1; prints elapsed seconds.
ptune_train() {
  local out="$work/$1" start end
  start=$(date +%s.%N)
  "$bin/ptune-worker" --models-dir "$models" train --spec "$2" --out "$out" >"$out.stdout" 2>"$out.log" || return 1
  end=$(date +%s.%N)
  python3 -c 'import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))' "$start" "$end"
}

for m in $methods; do
  spec="examples/jobs/sst2-$m.toml"
  py=$(python_for "$m")
  echo "bench: $m: preparing" >&2
  .venv/bin/python bench/hf_methods.py --spec "$spec" --mode prepare --out "$work/specs" \
    --steps "$steps" --batch-size "$batch_size" --seq-len "$seq_len" --num-virtual-tokens "$virtual_tokens" \
    "${overrides[@]}" 2>>"$work/prepare.log"

  if [ "$mode" != throughput ]; then
    ptune_spec="$spec"
    [ ${#overrides[@]} -gt 0 ] && ptune_spec="$work/specs/sst2-$m-accuracy.toml"
    echo "bench: $m: ptune accuracy" >&2
    if seconds=$(ptune_train "$m-accuracy" "$ptune_spec"); then
      accuracy=$(sed -n 's/^eval accuracy = \([0-9.]*\) .*/\1/p' "$work/$m-accuracy.stdout" | tail -n 1)
      record ptune "$m" accuracy "{\"accuracy\": ${accuracy:-null}, \"seconds\": $seconds}"
    else
      echo "bench: $m: ptune accuracy failed; see $work/$m-accuracy.log" >&2
    fi
    echo "bench: $m: HF accuracy ($py)" >&2
    if "$py" bench/hf_methods.py --spec "$spec" --mode accuracy "${overrides[@]}" \
        >"$work/$m-hf-accuracy.json" 2>"$work/$m-hf-accuracy.log"; then
      record hf "$m" accuracy "$(tail -n 1 "$work/$m-hf-accuracy.json")"
    else
      echo "bench: $m: HF accuracy failed; see $work/$m-hf-accuracy.log" >&2
    fi
  fi

  if [ "$mode" != accuracy ]; then
    echo "bench: $m: ptune throughput" >&2
    if seconds=$(ptune_train "$m-throughput" "$work/specs/sst2-$m-throughput.toml"); then
      # Each step's examples_per_second is its batch over its seconds; all
      # batches are full, so the rate over the timed steps is their count
      # times the batch over the sum of batch / rate.
      eps=$(python3 - "$work/$m-throughput/metrics.jsonl" "$batch_size" <<'PY'
import json, sys
rates = [m["value"] for m in map(json.loads, open(sys.argv[1]))
         if m["kind"] == "train" and m["name"] == "examples_per_second" and m["step"] > 2]
batch = int(sys.argv[2])
print(round(len(rates) * batch / sum(batch / r for r in rates), 2) if rates else "null")
PY
)
      record ptune "$m" throughput "{\"examples_per_second\": $eps, \"steps\": $steps, \"batch_size\": $batch_size, \"seq_len\": $seq_len, \"seconds\": $seconds}"
    else
      echo "bench: $m: ptune throughput failed; see $work/$m-throughput.log" >&2
    fi
    echo "bench: $m: HF throughput ($py)" >&2
    if "$py" bench/hf_methods.py --spec "$spec" --mode throughput --train-file "$work/specs/train-$seq_len.jsonl" \
        --steps "$steps" --batch-size "$batch_size" --seq-len "$seq_len" --num-virtual-tokens "$virtual_tokens" \
        >"$work/$m-hf-throughput.json" 2>"$work/$m-hf-throughput.log"; then
      record hf "$m" throughput "$(tail -n 1 "$work/$m-hf-throughput.json")"
    else
      echo "bench: $m: HF throughput failed; see $work/$m-hf-throughput.log" >&2
    fi
  fi
done

python3 - "$results" "$methods" "$mode" >target/bench/methods.md <<'PY'
import json, os, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
methods, mode = sys.argv[2].split(), sys.argv[3]
get = lambda side, m, mode, key: next((r.get(key) for r in rows if (r["side"], r["method"], r["mode"]) == (side, m, mode)), None)
fmt = lambda v, spec: "–" if v is None else format(v, spec)
print(f"ptune engine against Hugging Face PEFT on SST-2, all-MiniLM-L6-v2, {os.cpu_count()} cores.")
print("Accuracy: dev accuracy after each example spec's budget (seconds: wall time, model load to final evaluation).")
print("Throughput: training examples/s at batch 32, 64-token rows, 20 virtual tokens (prompt and prefix methods).")
overrides = [f"{k.lower()} = {os.environ[k]}" for k in ("MAX_TRAIN_EXAMPLES", "MAX_EVAL_EXAMPLES") if os.environ.get(k)]
if overrides:
    print(f"Accuracy budget overridden on both sides: {', '.join(overrides)} (not the specs' budget).")
print()
print("| method | ptune accuracy | HF accuracy | ptune s | HF s | ptune ex/s | HF ex/s | ratio ptune/HF |")
print("|---|---|---|---|---|---|---|---|")
for m in methods:
    p_eps, h_eps = get("ptune", m, "throughput", "examples_per_second"), get("hf", m, "throughput", "examples_per_second")
    ratio = p_eps / h_eps if p_eps and h_eps else None
    print(f"| {m} | {fmt(get('ptune', m, 'accuracy', 'accuracy'), '.4f')} | {fmt(get('hf', m, 'accuracy', 'accuracy'), '.4f')} "
          f"| {fmt(get('ptune', m, 'accuracy', 'seconds'), '.1f')} | {fmt(get('hf', m, 'accuracy', 'seconds'), '.1f')} "
          f"| {fmt(p_eps, '.1f')} | {fmt(h_eps, '.1f')} | {fmt(ratio, '.2f')} |")
hf = [r for r in rows if r["side"] == "hf"]
print()
versions = {}
for r in hf:
    versions.setdefault((r["torch"], r["transformers"], r["peft"], r["threads"]), []).append(r["method"])
for (torch_v, tf, peft_v, threads), used in versions.items():
    print(f"- HF side for {', '.join(dict.fromkeys(used))}: torch {torch_v}, transformers {tf}, peft {peft_v}, {threads} threads")
for note in sorted({n for r in hf for n in r.get("notes", [])}):
    print(f"- note: {note}")
PY
cat target/bench/methods.md
