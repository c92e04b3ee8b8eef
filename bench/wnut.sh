#!/usr/bin/env bash
# WNUT-17 named-entity recognition on all-MiniLM-L6-v2, method by method,
# with the budget of examples/jobs/wnut17-p-tuning-v2.toml (3 epochs over the
# 3,394 training sentences, batch 32, 64 tokens) for every row: P-tuning v2,
# prompt tuning, LoRA and full fine-tuning. Reports dev entity precision,
# recall and F1 (exact span and type, as seqeval), tag accuracy and wall time
# of `ptune-worker train` (model load to export).
#
#   bench/wnut.sh
#   METHODS="p_tuning_v2 lora" bench/wnut.sh
#
# Writes the table to target/bench/wnut.md; specs, logs and outputs under
# target/bench/wnut/. PTUNE_BENCH_BIN: folder with ptune-worker (default
# target/release).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$PTUNE_ROOT"

methods="${METHODS:-p_tuning_v2 prompt_tuning lora full}"
bin="${PTUNE_BENCH_BIN:-target/release}"
[ -x "$bin/ptune-worker" ] || { echo "$bin/ptune-worker not found: cargo build --release --bins" >&2; exit 1; }
work=target/bench/wnut
rm -rf "$work"
mkdir -p "$work"
results="$work/results.jsonl"
: >"$results"

for m in $methods; do
  spec="$work/wnut17-$m.toml"
  # The example spec with this method and its settings; data paths made absolute.
  python3 - examples/jobs/wnut17-p-tuning-v2.toml "$m" "$spec" <<'PY'
import sys, tomllib, pathlib, json
src, method, out = sys.argv[1], sys.argv[2], sys.argv[3]
spec = tomllib.loads(pathlib.Path(src).read_text())
base = pathlib.Path(src).resolve().parent
for key in ("train", "eval"):
    spec["data"][key] = str((base / spec["data"][key]).resolve())
spec["name"] = f"wnut17-{method}"
spec["method"] = method
# Per-method settings and learning rates (the head's rate stays as in the
# example for the adapter methods; full fine-tuning uses one rate).
settings = {
    "p_tuning_v2": ({"num_virtual_tokens": 20, "prefix_dropout": 0.1}, 2e-2, 5e-2),
    "prompt_tuning": ({"num_virtual_tokens": 20, "init": "vocab"}, 3e-2, 5e-2),
    "lora": ({"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["query", "value"]}, 1e-3, 5e-2),
    "full": ({}, 5e-5, None),
}[method]
spec["peft"], spec["training"]["learning_rate"] = settings[0], settings[1]
if settings[2] is None:
    spec["training"].pop("head_learning_rate", None)
else:
    spec["training"]["head_learning_rate"] = settings[2]

def toml_value(v):
    if isinstance(v, bool): return "true" if v else "false"
    if isinstance(v, str): return json.dumps(v)
    if isinstance(v, list): return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)
lines = []
for key, value in spec.items():
    if not isinstance(value, dict):
        lines.append(f"{key} = {toml_value(value)}")
for key, value in spec.items():
    if isinstance(value, dict):
        lines.append(f"\n[{key}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in value.items()]
pathlib.Path(out).write_text("\n".join(lines) + "\n")
PY
  echo "bench: wnut $m" >&2
  start=$(date +%s.%N)
  if "$bin/ptune-worker" --models-dir models train --spec "$spec" --out "$work/$m" >"$work/$m.stdout" 2>"$work/$m.log"; then
    end=$(date +%s.%N)
    python3 - "$work/$m/metrics.jsonl" "$m" "$start" "$end" >>"$results" <<'PY'
import json, sys
metrics = [json.loads(l) for l in open(sys.argv[1])]
last = max(m["step"] for m in metrics if m["kind"] == "eval")
final = {m["name"]: m["value"] for m in metrics if m["kind"] == "eval" and m["step"] == last}
rates = [m["value"] for m in metrics if m["kind"] == "train" and m["name"] == "examples_per_second"]
print(json.dumps({"method": sys.argv[2], "step": last, **final,
                  "seconds": round(float(sys.argv[4]) - float(sys.argv[3]), 1),
                  "median_examples_per_second": sorted(rates)[len(rates) // 2]}))
PY
  else
    echo "bench: wnut $m failed; see $work/$m.log" >&2
  fi
done

python3 - "$results" >target/bench/wnut.md <<'PY'
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"WNUT-17 dev (1,009 sentences), all-MiniLM-L6-v2, 3 epochs of batch 32, {os.cpu_count()} cores.")
print()
print("| method | entity F1 | precision | recall | tag accuracy | steps | wall time | median ex/s |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['method']} | {r['f1']:.4f} | {r['precision']:.4f} | {r['recall']:.4f} | {r['accuracy']:.4f} "
          f"| {r['step']} | {r['seconds']:.1f} s | {r['median_examples_per_second']:.1f} |")
PY
cat target/bench/wnut.md
