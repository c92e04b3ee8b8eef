#!/usr/bin/env bash
# Times the job list (first page and a deep page by keyset cursor, over gRPC
# and on the dashboard), the overview and /metrics over a large database,
# against the OFFSET page and count(*) they replaced, in one run. Fills a
# separate database (ptune_bench_large) on the test server in SQL and drops
# it afterwards. Prints a Markdown table (the one in docs/benchmarks.md).
#
#   bench/large_tables.sh [JOBS [METRIC_ROWS [ROUNDS]]]
#   (default 1000000 jobs, 50000000 metric rows, 50 rounds per read;
#    LARGE_TABLES_JOBS, LARGE_TABLES_METRICS and LARGE_TABLES_ROUNDS set them too)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$PTUNE_ROOT"
scripts/postgres.sh
jobs="${1:-${LARGE_TABLES_JOBS:-1000000}}"
metrics="${2:-${LARGE_TABLES_METRICS:-50000000}}"
rounds="${3:-${LARGE_TABLES_ROUNDS:-50}}"
# The dev profile (dependencies at opt-level 2), as the other benchmarks.
cargo test -p ptune-coordinator --bench large_tables -- "$jobs" "$metrics" "$rounds"
