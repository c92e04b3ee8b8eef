# Sourced by the bench scripts that need a coordinator: `start_coordinator
# BIN WORK GRPC_PORT HTTP_PORT` starts ptune-coordinator (with its own
# PostgreSQL under WORK/coordinator, logging to WORK/coordinator.log) and
# waits until it answers. It exports PTUNE_TOKEN (the admin token the
# coordinator bootstraps) for the CLI and WORKER_TOKEN_FILE for workers
# (`--token-file "$WORKER_TOKEN_FILE"`). Every process whose pid is added
# to `pids` is stopped when the script exits.
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

start_coordinator() {
  local bin="$1" work="$2" grpc_port="$3" http_port="$4"
  "$bin/ptune-coordinator" --grpc-addr "127.0.0.1:$grpc_port" --http-addr "127.0.0.1:$http_port" \
    --data-dir "$work/coordinator" >"$work/coordinator.log" 2>&1 &
  pids+=($!)
  export WORKER_TOKEN_FILE="$work/coordinator/worker.token"
  for _ in $(seq 1 120); do
    [ -s "$work/coordinator/admin.token" ] && export PTUNE_TOKEN="$(cat "$work/coordinator/admin.token")"
    PTUNE_COORDINATOR="http://127.0.0.1:$grpc_port" "$bin/ptune" jobs list --limit 1 >/dev/null 2>&1 && return 0
    kill -0 "${pids[-1]}" 2>/dev/null || { cat "$work/coordinator.log" >&2; exit 1; }
    sleep 0.5
  done
  echo "bench: the coordinator did not answer; see $work/coordinator.log" >&2
  exit 1
}
