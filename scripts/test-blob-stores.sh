#!/usr/bin/env bash
# The blob store tier: for PostgreSQL (the default), a local folder and a
# real S3-compatible server (moto_server on 127.0.0.1), a 1.5 GB dataset and
# a 1.5 GB export round-trip through a ptune-coordinator process with their
# sha256 checked and its peak memory under 300 MB; identical uploads are
# stored once; a cut-off upload leaves nothing behind; every file moves to
# another store and back. Each store prints a BLOB-STORE row.
#
#   scripts/test-blob-stores.sh            (PTUNE_BLOB_TEST_MB=1500 by default)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$PTUNE_ROOT"
scripts/postgres.sh

VENV=.venv-s3
scripts/tool-venv.sh "$VENV" requirements-s3-test.txt
export PTUNE_MOTO_SERVER="$PTUNE_ROOT/$VENV/bin/moto_server"
cargo test -p ptune-coordinator --features integration --test blob_stores -- --ignored --test-threads 1 --nocapture
