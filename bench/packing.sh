#!/usr/bin/env bash
# Packed training against one job at a time, on the same worker:
#   8 prompt-tuning jobs (batch 8, all-MiniLM-L6-v2, SST-2, different
#   learning rates and seeds) submitted together to one worker with 8 slots,
#   which trains them as one pack (shared forward and backward passes),
#   versus the same 8 jobs submitted one after another to that worker, each
#   waiting for the one before. Both phases run in the same process, with
#   the same settings; wall time runs from the first submission to the last
#   completion. A third phase packs with a small token budget
#   (PACK_TOKENS_SMALL), so each step runs as several passes.
#
#   bench/packing.sh        # PTUNE_BENCH_BIN: prebuilt binaries (default target/release)
#
# STEPS (default 60) sets each job's steps. Writes target/bench/packing.md;
# logs under .ptune/bench-packing/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$PTUNE_ROOT"
bin="${PTUNE_BENCH_BIN:-target/release}"
jobs=8
steps="${STEPS:-60}"
batch=8
small_tokens="${PACK_TOKENS_SMALL:-1024}"
work=.ptune/bench-packing
grpc_port=50181
http_port=8192
export PTUNE_COORDINATOR="http://127.0.0.1:$grpc_port"
rm -rf "$work"
mkdir -p "$work" target/bench

lrs=(3e-2 1e-2 3e-3 5e-2 2e-2 8e-3 4e-2 1.5e-2)
for i in $(seq 0 $((jobs - 1))); do
  cat >"$work/job-$i.toml" <<TOML
name = "pack-$i"
base_model = "all-MiniLM-L6-v2"
task = "sequence_classification"
method = "prompt_tuning"
[peft]
num_virtual_tokens = 20
init = "vocab"
[data]
train = "$PTUNE_ROOT/../shared/data/sst2/train.jsonl"
eval = "$PTUNE_ROOT/../shared/data/sst2/dev.jsonl"
labels = [0, 1]
max_seq_len = 64
max_train_examples = 2000
max_eval_examples = 128
[training]
learning_rate = ${lrs[$i]}
head_learning_rate = 3e-2
batch_size = $batch
max_steps = $steps
warmup_ratio = 0.0
seed = $((i + 1))
TOML
done

source bench/coordinator.sh
start_coordinator "$bin" "$work" "$grpc_port" "$http_port"

# Starts a worker with 8 slots and the given pack token budget; sets $wpid.
start_worker() {
  local name="$1" tokens="$2"
  "$bin/ptune-worker" --token-file "$WORKER_TOKEN_FILE" --models-dir models --work-dir "$work/worker-$name" --slots "$jobs" --threads 0 \
    --pack-tokens "$tokens" >"$work/worker-$name.log" 2>&1 &
  wpid=$!
  pids+=("$wpid")
}

stop_worker() {
  kill -TERM "$wpid"; wait "$wpid" 2>/dev/null || true
}

now() { date +%s.%N; }

# Warms the worker up (model load, dataset fetch) with a one-step job.
warm_up() {
  sed "s/^max_steps = .*/max_steps = 1/; s/^name = .*/name = \"warm-up\"/" "$work/job-0.toml" >"$work/warm.toml"
  "$bin/ptune" jobs wait "$("$bin/ptune" submit "$work/warm.toml" | tail -n 1)" --timeout 600 >/dev/null
}

# Prints the best dev accuracy of the given job ids.
best_accuracy() {
  local best=0
  for id in "$@"; do
    acc=$("$bin/ptune" --output json jobs get "$id" | python3 -c '
import json, sys
job = json.load(sys.stdin)
print(next((m["value"] for m in job["metrics"] if m["kind"] == "eval" and m["name"] == "accuracy"), 0))')
    best=$(python3 -c "print(max($best, $acc))")
  done
  echo "$best"
}

# Seconds spent in training steps by the given jobs: each step's batch over
# its examples_per_second, divided among the jobs that shared the step
# (pack_jobs), so a packed step is counted once.
train_seconds() {
  for id in "$@"; do "$bin/ptune" --output json jobs metrics "$id" --kind train; done | python3 -c '
import json, sys
from collections import defaultdict
text, decoder, at, total = sys.stdin.read(), json.JSONDecoder(), 0, 0.0
batch = int(sys.argv[1])
while text[at:].strip():
    rows, end = decoder.raw_decode(text[at:].lstrip())
    at += len(text[at:]) - len(text[at:].lstrip()) + end
    steps = defaultdict(dict)
    for m in rows:
        steps[m["step"]][m["name"]] = m["value"]
    for m in steps.values():
        total += batch / m["examples_per_second"] / m.get("pack_jobs", 1)
print(total)' "$batch"
}

echo "bench: $jobs jobs one after another" >&2
start_worker sequential 4096
warm_up
t0=$(now)
seq_ids=()
for i in $(seq 0 $((jobs - 1))); do
  id=$("$bin/ptune" submit "$work/job-$i.toml" | tail -n 1)
  seq_ids+=("$id")
  "$bin/ptune" jobs wait "$id" --timeout 3600 >/dev/null
done
t1=$(now)
sequential=$(python3 -c "print($t1 - $t0)")
seq_best=$(best_accuracy "${seq_ids[@]}")
# Seconds the jobs themselves ran (started to finished), without the gaps
# between one job's end and the next one's lease.
seq_busy=$(for id in "${seq_ids[@]}"; do "$bin/ptune" --output json jobs get "$id"; done | python3 -c '
import json, sys
from datetime import datetime
text, decoder, at, total = sys.stdin.read(), json.JSONDecoder(), 0, 0.0
t = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))
while text[at:].strip():
    job, end = decoder.raw_decode(text[at:].lstrip())
    at += len(text[at:]) - len(text[at:].lstrip()) + end
    total += (t(job["finished_at"]) - t(job["started_at"])).total_seconds()
print(total)')
seq_train=$(train_seconds "${seq_ids[@]}")
stop_worker

run_packed() {
  local name="$1" tokens="$2" ids=()
  start_worker "$name" "$tokens"
  warm_up
  local start end
  start=$(now)
  for i in $(seq 0 $((jobs - 1))); do
    ids+=("$("$bin/ptune" submit "$work/job-$i.toml" | tail -n 1)")
  done
  for id in "${ids[@]}"; do "$bin/ptune" jobs wait "$id" --timeout 3600 >/dev/null; done
  end=$(now)
  stop_worker
  grep -c "joined the pack" "$work/worker-$name.log" >"$work/$name.joined" || true
  python3 -c "print($end - $start)"
  best_accuracy "${ids[@]}" >"$work/$name.best"
  train_seconds "${ids[@]}" >"$work/$name.train"
}

echo "bench: $jobs jobs packed" >&2
packed=$(run_packed packed 4096)
echo "bench: $jobs jobs packed, $small_tokens tokens per pass" >&2
packed_small=$(run_packed packed-small "$small_tokens")

python3 - "$jobs" "$steps" "$batch" "$sequential" "$packed" "$packed_small" "$small_tokens" "$seq_busy" \
  "$seq_best" "$(cat "$work/packed.best")" "$(cat "$work/packed-small.best")" \
  "$(cat "$work/packed.joined")" "$seq_train" "$(cat "$work/packed.train")" "$(cat "$work/packed-small.train")" \
  <<'PY' | tee target/bench/packing.md
import sys
jobs, steps, batch = map(int, sys.argv[1:4])
sequential, packed, packed_small = map(float, sys.argv[4:7])
small_tokens = sys.argv[7]
seq_busy = float(sys.argv[8])
seq_best, packed_best, small_best = map(float, sys.argv[9:12])
joined = sys.argv[12]
seq_train, packed_train, small_train = map(float, sys.argv[13:16])
examples = jobs * steps * batch
print(f"{jobs} prompt-tuning jobs on all-MiniLM-L6-v2, batch {batch}, {steps} steps each, "
      f"20 virtual tokens, SST-2 (evaluation on 128 dev sentences at the end); one worker, 8 slots.")
print()
print("| run | wall time | train examples/s | vs one after another | best dev accuracy |")
print("|---|---|---|---|---|")
print(f"| one after another | {sequential:.1f} s | {examples / sequential:.1f} | 1.00x | {seq_best:.4f} |")
print(f"| one after another, time inside the jobs only (started to finished, summed) | {seq_busy:.1f} s | "
      f"{examples / seq_busy:.1f} | {sequential / seq_busy:.2f}x | |")
print(f"| packed (4096 tokens per pass) | {packed:.1f} s | {examples / packed:.1f} | {sequential / packed:.2f}x | {packed_best:.4f} |")
print(f"| packed ({small_tokens} tokens per pass) | {packed_small:.1f} s | {examples / packed_small:.1f} | "
      f"{sequential / packed_small:.2f}x | {small_best:.4f} |")
print()
print("Training steps only (each step's time from its examples_per_second, a packed step counted once):")
print()
print("| run | seconds in steps | train examples/s | vs one after another |")
print("|---|---|---|---|")
print(f"| one after another | {seq_train:.1f} s | {examples / seq_train:.1f} | 1.00x |")
print(f"| packed (4096 tokens per pass) | {packed_train:.1f} s | {examples / packed_train:.1f} | {seq_train / packed_train:.2f}x |")
print(f"| packed ({small_tokens} tokens per pass) | {small_train:.1f} s | {examples / small_train:.1f} | {seq_train / small_train:.2f}x |")
print()
print(f"{int(joined) - 1} of the {jobs} jobs joined the 4096-token pack (the warm-up job left it before they came).")
PY
