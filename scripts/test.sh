#!/usr/bin/env bash
# Runs the whole test suite: sets up what is missing, makes sure PostgreSQL
# is up, then runs every crate's tests against real Postgres and libtorch,
# and last the fault-injection suite (real processes killed, signalled,
# partitioned and starved of their database; see docs/reliability.md),
# which needs the worker built with its test-only fault hooks.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$PTUNE_ROOT"
scripts/setup.sh
scripts/postgres.sh

tier() {
  local name=$1
  shift
  local start=$SECONDS
  echo "== $name"
  "$@"
  echo "== $name: $((SECONDS - start)) s"
}

tier "build" cargo build --workspace --bins --tests --benches --profile dev
tier "workspace tests" cargo test --workspace --no-fail-fast -- --test-threads 2
# Last: it rebuilds ptune-worker with the fault hooks compiled in.
# --nocapture shows each scenario's RELIABILITY row (docs/reliability.md).
tier "fault-injection suite" cargo test -p ptune-worker --features fault-injection --test faults -- --test-threads 1 --nocapture
