#!/usr/bin/env bash
# Fleet load: simulated workers over real gRPC lease, report and complete
# jobs across one or more ptune-coordinator processes on a fresh database of
# the test server. Prints a Markdown table per coordinator count and one side
# by side with ratios against the first (docs/benchmarks.md). Exits non-zero
# when a job was not leased and completed exactly once or a call failed.
#
#   bench/fleet.sh [COORDINATORS [WORKERS [JOBS]]]   (default 1,2,3 50 2000)
#
# Further settings, as environment variables:
#   PTUNE_FLEET_STEPS               steps reported per job (default 1)
#   PTUNE_FLEET_PACK                jobs a worker leases and trains together (default 1)
#   PTUNE_FLEET_PROGRESS            single and/or batch, one run each (default single)
#   PTUNE_FLEET_NEXT_LEASE          separate and/or completion, one run each (default completion: each
#                                   completion asks for the worker's next job, as the agent does)
#   PTUNE_FLEET_RATE                jobs per second the fleet asks for, one run each (default 0:
#                                   unpaced); e.g. 0,2000: the most cycles/s, then latencies at 2,000/s
#   PTUNE_FLEET_IDLE                idle workers measured afterwards, long-polling, then polling, then
#                                   long-polling with a job queued every second (default 0)
#   PTUNE_FLEET_IDLE_S              seconds each idle mode is measured (default 60)
#   PTUNE_FLEET_ADAPTER_BYTES       adapter size per CompleteJob (default 1024)
#   PTUNE_FLEET_SUBMIT_CONCURRENCY  SubmitJob calls in flight (default 8)
#   PTUNE_FLEET_TIMEOUT_S           longest work phase (default 900)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$PTUNE_ROOT"
scripts/postgres.sh
export PTUNE_FLEET_COORDINATORS="${1:-${PTUNE_FLEET_COORDINATORS:-1,2,3}}"
export PTUNE_FLEET_WORKERS="${2:-${PTUNE_FLEET_WORKERS:-50}}"
export PTUNE_FLEET_JOBS="${3:-${PTUNE_FLEET_JOBS:-2000}}"
# The dev profile (dependencies at opt-level 2) as the other coordinator
# benchmarks; `cargo bench -p ptune-coordinator --bench fleet` works too.
cargo test -p ptune-coordinator --bench fleet
