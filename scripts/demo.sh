#!/usr/bin/env bash
# The main job, end to end on this machine: installs what is missing, builds,
# starts a coordinator (with its own private PostgreSQL) and a worker serving
# MiniLM, submits prompt tuning on SST-2, follows it live, and prints the dev
# accuracy and where the adapter was written. Then it runs a real sweep:
# ASHA over prompt length x learning rate (examples/sweeps/sst2-asha.toml),
# whose concurrent trials the worker trains as packs through one copy of
# MiniLM (PTUNE_DEMO_SLOTS, default 4, the sweep's max_concurrent_trials),
# prints its leaderboard and downloads the best trial's adapter.
# PTUNE_DEMO_SWEEP=0 skips the sweep.
#
#   scripts/demo.sh [SPEC]     (default: examples/jobs/sst2-prompt-tuning.toml)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$PTUNE_ROOT"
spec="${1:-examples/jobs/sst2-prompt-tuning.toml}"
demo=".ptune/demo"
grpc_port="${PTUNE_DEMO_GRPC_PORT:-50151}"
http_port="${PTUNE_DEMO_HTTP_PORT:-8180}"
export PTUNE_COORDINATOR="http://127.0.0.1:$grpc_port"

scripts/setup.sh
echo "demo: building (release)"
cargo build --release --bins --quiet
bin=target/release
mkdir -p "$demo"

pids=()
# The worker first: it hands its running jobs back to the coordinator
# (checkpointed) before the coordinator stops.
cleanup() {
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
}
trap cleanup EXIT

echo "demo: starting coordinator on 127.0.0.1:$grpc_port (logs: $demo/coordinator.log)"
"$bin/ptune-coordinator" --grpc-addr "127.0.0.1:$grpc_port" --http-addr "127.0.0.1:$http_port" \
  --data-dir "$demo/coordinator" >"$demo/coordinator.log" 2>&1 &
pids+=($!)
# On its first start the coordinator writes an admin token and a worker
# token into its data directory (mode 0600): the CLI uses the first, the
# worker the second.
for _ in $(seq 1 120); do
  if [ -s "$demo/coordinator/admin.token" ]; then
    export PTUNE_TOKEN="$(cat "$demo/coordinator/admin.token")"
    "$bin/ptune" jobs list --limit 1 >/dev/null 2>&1 && break
  fi
  kill -0 "${pids[0]}" 2>/dev/null || { cat "$demo/coordinator.log"; exit 1; }
  sleep 0.5
done

slots="${PTUNE_DEMO_SLOTS:-4}"
echo "demo: starting worker serving models/ with $slots slots (logs: $demo/worker.log)"
"$bin/ptune-worker" --models-dir models --work-dir "$demo/worker" --slots "$slots" \
  --token-file "$demo/coordinator/worker.token" >"$demo/worker.log" 2>&1 &
pids+=($!)

start=$(date +%s.%N)
job=$("$bin/ptune" submit "$spec" | tail -n 1)
echo "demo: job $job submitted; following it"
status=0
"$bin/ptune" jobs watch "$job" || status=$?
end=$(date +%s.%N)
if [ "$status" -ne 0 ]; then
  "$bin/ptune" jobs get "$job"
  echo "demo: the job did not succeed; see $demo/worker.log" >&2
  exit "$status"
fi
out="$demo/adapters/$job"
"$bin/ptune" adapter get "$job" -o "$out" >/dev/null
accuracy=$("$bin/ptune" --output json jobs get "$job" | python3 -c \
  'import json,sys; j=json.load(sys.stdin); print(next(m["value"] for m in j["metrics"] if m["kind"]=="eval" and m["name"]=="accuracy"))')
python3 -c "print('demo: dev accuracy %.4f, submit to finish %.1f s' % ($accuracy, $end - $start))"
echo "demo: adapter (Hugging Face PEFT format; ptune.json records the head's pooling) written to $out"
echo "demo: evaluate it with: target/release/ptune-worker --models-dir models eval --adapter $out --data ../shared/data/sst2/dev.jsonl"
ls -l "$out"

if [ "${PTUNE_DEMO_SWEEP:-1}" = 1 ]; then
  echo
  echo "demo: ASHA sweep over prompt length x learning rate (examples/sweeps/sst2-asha.toml)"
  echo "demo: follow it live at http://127.0.0.1:$http_port/login?token=\$(cat $demo/coordinator/admin.token) (dashboard) or with: ptune sweep status ID"
  start=$(date +%s.%N)
  sweep=$("$bin/ptune" sweep create examples/sweeps/sst2-asha.toml | tail -n 1)
  status=0
  "$bin/ptune" sweep wait "$sweep" || status=$?
  end=$(date +%s.%N)
  "$bin/ptune" sweep status "$sweep" --top 8
  if [ "$status" -ne 0 ]; then
    echo "demo: the sweep did not complete; see $demo/coordinator.log and $demo/worker.log" >&2
    exit "$status"
  fi
  "$bin/ptune" sweep best "$sweep" --download "$demo/best-adapter"
  python3 -c "print('demo: sweep finished in %.1f min' % (($end - $start) / 60))"
  echo "demo: best trial's adapter written to $demo/best-adapter"
fi
