#!/usr/bin/env bash
# Makes sure the PostgreSQL server the tests use is up (the machine's cluster
# on 127.0.0.1:5432, or $PTUNE_TEST_DATABASE_URL if set).
set -euo pipefail
url="${PTUNE_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
if psql "$url" -qtAc 'select 1' >/dev/null 2>&1; then
  exit 0
fi
if [ -z "${PTUNE_TEST_DATABASE_URL:-}" ] && ls /etc/postgresql >/dev/null 2>&1; then
  echo "postgres: starting the local cluster"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start || true
fi
for _ in $(seq 1 30); do
  psql "$url" -qtAc 'select 1' >/dev/null 2>&1 && exit 0
  sleep 1
done
echo "postgres: no server answers at $url; install PostgreSQL or set PTUNE_TEST_DATABASE_URL" >&2
exit 1
