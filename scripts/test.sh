#!/usr/bin/env bash
# Runs the whole test suite: sets up what is missing, makes sure PostgreSQL
# is up, then runs the fast tier (what a plain `cargo test` runs: unit tests
# and engine tests on tiny fixtures, no database, datasets, MiniLM or
# reference Python), every crate's tests with the `integration` feature
# (real PostgreSQL, MiniLM, ../shared/data, Hugging Face references), and
# last the fault-injection suite (real processes killed, signalled,
# partitioned and starved of their database; see docs/reliability.md),
# which needs the worker built with its test-only fault hooks. Between them:
# offline checks of the deploy files and the CUDA-linked worker binary, the
# worker built with its NCCL collective, the Python client's tests, and
# gigabyte files through every blob store.
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

integration="ptune-coordinator/integration,ptune-worker/integration,ptune-cli/integration"
tier "fast tier" cargo test --workspace --no-fail-fast -- --test-threads 2
# Offline checks of the deploy files (images, Kubernetes, YAML) and of the
# CUDA-linked worker binary an image ships; the build tier then relinks the
# plain worker that the tests start.
tier "deploy files" scripts/check-deploy.sh
tier "worker binary" scripts/check-worker-binary.sh
# The worker with the NCCL collective compiles without CUDA (cudarc loads
# NCCL at run time); built before the plain worker the tests start.
tier "nccl build" cargo build -p ptune-worker --features nccl
tier "build" cargo build --workspace --bins --tests --benches --profile dev --features "$integration"
tier "integration tests" cargo test --workspace --no-fail-fast --features "$integration" -- --test-threads 2
# The Python client against a real coordinator and worker (the binaries the
# build tier made), before the fault suite rebuilds the worker with its hooks.
tier "python client" scripts/test-python.sh
# Files in each blob store (PostgreSQL, a folder, an S3 server): 1.5 GB
# round trips, cut-off uploads, moves between stores.
tier "blob stores" scripts/test-blob-stores.sh
# Last: it rebuilds ptune-worker with the fault hooks compiled in.
# --nocapture shows each scenario's RELIABILITY row (docs/reliability.md).
tier "fault-injection suite" cargo test -p ptune-worker --features fault-injection,integration --test faults --test engine_data_parallel_faults -- --test-threads 1 --nocapture
