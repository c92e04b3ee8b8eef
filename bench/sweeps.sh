#!/usr/bin/env bash
# ASHA against grid search on the same space, measured end to end: starts a
# coordinator (with its own private PostgreSQL) and one worker serving
# MiniLM, runs examples/sweeps/sst2-grid.toml and then sst2-asha.toml, and
# prints a markdown table: trial-steps spent (steps trained, summed over
# trials), wall time from create to finish, and the best dev accuracy.
#
#   bench/sweeps.sh [GRID_TOML ASHA_TOML]
#
# Environment: PTUNE_BENCH_BIN (a folder with prebuilt ptune, ptune-coordinator
# and ptune-worker; default: build them), PTUNE_BENCH_MODELS (default models/),
# PTUNE_THREADS (libtorch threads of the worker; default all cores).
# Logs and results: .ptune/bench-sweeps/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$PTUNE_ROOT"
grid="${1:-examples/sweeps/sst2-grid.toml}"
asha="${2:-examples/sweeps/sst2-asha.toml}"
work=".ptune/bench-sweeps"
grpc_port="${PTUNE_BENCH_GRPC_PORT:-50161}"
http_port="${PTUNE_BENCH_HTTP_PORT:-8190}"
models="${PTUNE_BENCH_MODELS:-models}"
export PTUNE_COORDINATOR="http://127.0.0.1:$grpc_port"

bin="${PTUNE_BENCH_BIN:-}"
if [ -z "$bin" ]; then
  scripts/setup.sh >&2
  echo "bench: building (release)" >&2
  cargo build --release --bins --quiet
  bin=target/release
fi
rm -rf "$work"
mkdir -p "$work"

source bench/coordinator.sh
start_coordinator "$bin" "$work" "$grpc_port" "$http_port"
"$bin/ptune-worker" --token-file "$WORKER_TOKEN_FILE" --models-dir "$models" --work-dir "$work/worker" --slots 1 >"$work/worker.log" 2>&1 &
pids+=($!)

# Runs one sweep to its end; writes its leaderboard and timing under $work.
run_sweep() {
  local file="$1" name="$2" id start end
  start=$(date +%s.%N)
  id=$("$bin/ptune" sweep create "$file" | tail -n 1)
  echo "bench: $name sweep $id created; waiting" >&2
  "$bin/ptune" sweep wait "$id" >&2 || true
  end=$(date +%s.%N)
  "$bin/ptune" --output json sweep status "$id" >"$work/$name.json"
  "$bin/ptune" sweep status "$id" >"$work/$name.txt"
  echo "$start $end" >"$work/$name.time"
}
run_sweep "$grid" grid
run_sweep "$asha" asha

python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
rows = {}
for name in ("grid", "asha"):
    sweep = json.load(open(f"{work}/{name}.json"))
    start, end = map(float, open(f"{work}/{name}.time").read().split())
    trials = sweep["leaderboard"]
    best = sweep.get("best_trial") or {}
    rows[name] = {
        "state": sweep["state"],
        "trials": len(trials),
        "full": sum(1 for t in trials if t["state"] == "succeeded"),
        "stopped": sum(1 for t in trials if t["state"] == "early_stopped"),
        "steps": sum(t["step"] for t in trials),
        "wall": end - start,
        "best": best.get("objective"),
        "params": best.get("params"),
    }
g, a = rows["grid"], rows["asha"]
def acc(x):
    return "-" if x is None else f"{100 * x:.2f}"
print("| sweep | state | trials (run to the end / stopped early) | trial-steps | wall time | best dev accuracy (%) | best trial |")
print("|---|---|---|---|---|---|---|")
for name, r in rows.items():
    params = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in (r["params"] or {}).items())
    print(f"| {name} | {r['state']} | {r['trials']} ({r['full']} / {r['stopped']}) | {r['steps']} | "
          f"{r['wall'] / 60:.1f} min | {acc(r['best'])} | {params} |")
ratio = a["steps"] / g["steps"] if g["steps"] else float("nan")
gap = None if g["best"] is None or a["best"] is None else 100 * (g["best"] - a["best"])
print()
print(f"ASHA / grid: {100 * ratio:.1f}% of the trial-steps (goal: at most 40%), "
      f"{100 * a['wall'] / g['wall']:.1f}% of the wall time; "
      f"best accuracy {'-' if gap is None else f'{gap:+.2f}'} points behind the grid's (goal: within 1).")
PY
