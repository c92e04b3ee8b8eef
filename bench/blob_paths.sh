#!/usr/bin/env bash
# Through the coordinator or straight to the object store: a file of MB
# megabytes moved between a worker and an S3-compatible server (moto_server
# on 127.0.0.1, installed into .venv-s3) both ways, with the seconds and the
# CPU time of the coordinator and the store server for each. Prints the
# Markdown table of docs/benchmarks.md ("Files: through the coordinator or
# presigned URLs").
#
#   bench/blob_paths.sh [MB]      (default 500)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$PTUNE_ROOT"
scripts/postgres.sh
scripts/tool-venv.sh .venv-s3 requirements-s3-test.txt
export PTUNE_MOTO_SERVER="$PTUNE_ROOT/.venv-s3/bin/moto_server"
PTUNE_BENCH_BLOB_MB="${1:-500}" cargo bench -p ptune-coordinator --bench blob_paths
