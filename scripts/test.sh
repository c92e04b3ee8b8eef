#!/usr/bin/env bash
# Runs the whole test suite: sets up what is missing, makes sure PostgreSQL
# is up, then runs every crate's tests against real Postgres and libtorch.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$PTUNE_ROOT"
scripts/setup.sh
scripts/postgres.sh
cargo build --workspace --bins --tests
cargo test --workspace -- --test-threads 2
