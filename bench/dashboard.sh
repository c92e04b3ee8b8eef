#!/usr/bin/env bash
# Times the dashboard over 10,000 jobs: the main page and the API calls its
# pages make, on a fresh database of the test server. Prints a Markdown table
# (the one in docs/benchmarks.md).
#
#   bench/dashboard.sh [JOBS [ROUNDS]]      (default 10000 jobs, 30 rounds per call)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$PTUNE_ROOT"
scripts/postgres.sh
# The dev profile (dependencies at opt-level 2) builds far faster than a release
# build and gives the figures in docs/benchmarks.md; `cargo bench` works too.
cargo test -p ptune-coordinator --bench dashboard -- "${1:-10000}" "${2:-30}"
