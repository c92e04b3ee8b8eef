#!/usr/bin/env bash
# Peak resident memory of training many jobs on one frozen MiniLM:
#   1. one worker process (coordinator + worker, --slots 16) running 16
#      prompt-tuning jobs at once as one pack: every job reads the worker's
#      one copy of the model, and activations exist for one pass of at most
#      --pack-tokens positions (4096, then PACK_TOKENS_SMALL: the default 1024);
#   2. the same with packing off (--pack-jobs 1): 16 jobs stepping at once,
#      each with its own activations;
#   3. the same worker setup running 1 job (--slots 1);
#   4. 16 separate `ptune-worker train` processes at once, each with its own
#      copy (the one-adapter-per-process way): the sum of their peaks.
# Jobs: prompt tuning, 20 virtual tokens, batch 8, 64 tokens, 24 steps,
# evaluation at the end on 64 dev examples. Peaks are VmHWM of the worker
# (/proc) and GNU time's maximum RSS of each train process.
#
#   bench/memory.sh        # PTUNE_BENCH_BIN: prebuilt binaries (default target/release)
#
# Writes target/bench/memory.md; logs under .ptune/bench-memory/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$PTUNE_ROOT"
bin="${PTUNE_BENCH_BIN:-target/release}"
jobs="${JOBS:-16}"
work=.ptune/bench-memory
grpc_port=50171
http_port=8191
export PTUNE_COORDINATOR="http://127.0.0.1:$grpc_port"
rm -rf "$work"
mkdir -p "$work" target/bench

spec="$work/job.toml"
cat >"$spec" <<TOML
name = "memory"
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
max_train_examples = 192
max_eval_examples = 64
[training]
learning_rate = 3e-2
batch_size = 8
max_steps = 24
seed = 1
TOML

source bench/coordinator.sh
start_coordinator "$bin" "$work" "$grpc_port" "$http_port"

# Runs N jobs on a fresh worker with N slots (and the worker flags that
# follow); prints its peak RSS in KiB.
worker_peak() {
  local n="$1" ids=() wpid
  shift
  local name
  name="$n$(printf '%s' "$@")"
  "$bin/ptune-worker" --token-file "$WORKER_TOKEN_FILE" --models-dir models --work-dir "$work/worker-$name" --slots "$n" --threads 1 "$@" \
    >"$work/worker-$name.log" 2>&1 &
  wpid=$!
  for i in $(seq 1 "$n"); do
    ids+=("$("$bin/ptune" submit "$spec" | tail -n 1)")
  done
  for id in "${ids[@]}"; do "$bin/ptune" jobs wait "$id" --timeout 1800 >/dev/null; done
  sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$wpid/status"
  kill -TERM "$wpid"; wait "$wpid" 2>/dev/null || true
}

small_tokens="${PACK_TOKENS_SMALL:-1024}"
echo "bench: $jobs jobs on one worker, packed" >&2
many=$(worker_peak "$jobs" --pack-tokens 4096)
echo "bench: $jobs jobs on one worker, packed, $small_tokens tokens per pass" >&2
many_small=$(worker_peak "$jobs" --pack-tokens "$small_tokens")
echo "bench: $jobs jobs on one worker, not packed" >&2
unpacked=$(worker_peak "$jobs" --pack-jobs 1)
echo "bench: 1 job on one worker" >&2
one=$(worker_peak 1)

echo "bench: $jobs separate processes" >&2
trainers=()
for i in $(seq 1 "$jobs"); do
  /usr/bin/time -f "%M" -o "$work/process-$i.rss" "$bin/ptune-worker" --models-dir models --threads 1 \
    train --spec "$spec" --out "$work/process-$i" >/dev/null 2>"$work/process-$i.log" &
  trainers+=($!)
done
for pid in "${trainers[@]}"; do wait "$pid" || true; done
separate=$(cat "$work"/process-*.rss | awk '{ s += $1 } END { print s }')
single=$(head -n 1 "$work/process-1.rss")

python3 - "$jobs" "$small_tokens" "$many" "$many_small" "$unpacked" "$one" "$separate" "$single" <<'PY' | tee target/bench/memory.md
import sys
n, small_tokens = sys.argv[1:3]
many, many_small, unpacked, one, separate, single = map(int, sys.argv[3:])
mib = lambda kib: f"{kib / 1024:.0f} MiB"
print(f"Peak resident memory, prompt tuning on all-MiniLM-L6-v2 (batch 8, 64 tokens, 20 virtual tokens).")
print()
print("| setup | peak RSS | vs one job on one worker |")
print("|---|---|---|")
print(f"| one worker, 1 job | {mib(one)} | 1.00x |")
print(f"| one worker, {n} jobs at once, one pack, 4096 tokens per pass | {mib(many)} | {many / one:.2f}x |")
print(f"| one worker, {n} jobs at once, one pack, {small_tokens} tokens per pass | {mib(many_small)} | {many_small / one:.2f}x |")
print(f"| one worker, {n} jobs at once, not packed (`--pack-jobs 1`) | {mib(unpacked)} | {unpacked / one:.2f}x |")
print(f"| {n} separate train processes at once (sum) | {mib(separate)} | {separate / one:.2f}x |")
print(f"| one train process (for scale) | {mib(single)} | {single / one:.2f}x |")
PY
