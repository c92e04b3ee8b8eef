#!/usr/bin/env bash
# Submissions per second of the SST-2 demo job, with the dataset facts kept
# at upload and, as the baseline in the same run, with every submission
# reading both datasets again. Prints a Markdown table (docs/benchmarks.md).
#
#   bench/submit.sh [JOBS [ROUNDS]]      (default 200 jobs per round, 3 rounds)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$PTUNE_ROOT"
scripts/postgres.sh
# The dev profile (dependencies, serde_json included, at opt-level 2) as the
# other coordinator benchmarks; both variants run the same build.
cargo test -p ptune-coordinator --bench submit -- "${1:-200}" "${2:-3}" "${3:-5000}"
