#!/usr/bin/env bash
# Coordinator memory while files arrive: a ptune-coordinator process on a
# fresh database of the test server receives one dataset upload, then four
# at once, and an adapter upload whose header announces 1 GB and then sends
# nothing. Prints a Markdown table of peak resident memory (the one in
# docs/benchmarks.md).
#
#   bench/uploads.sh [MB]      (default 250 MB per upload)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$PTUNE_ROOT"
scripts/postgres.sh
# The dev profile (dependencies at opt-level 2) builds far faster than a
# release build; `cargo bench -p ptune-coordinator --bench uploads` works too.
PTUNE_BENCH_UPLOAD_MB="${1:-250}" cargo test -p ptune-coordinator --bench uploads
