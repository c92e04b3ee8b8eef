#!/usr/bin/env bash
# Tests the Python client (python/) against a real cluster: builds the
# binaries (the build tier's features, so after `scripts/test.sh`'s build
# tier nothing is rebuilt; PTUNE_BIN_DIR=DIR uses binaries built elsewhere),
# builds the package's wheel (stubs generated from proto/), installs it
# into target/python/site, and runs pytest on python/tests: a coordinator
# on a fresh database of the PostgreSQL server, a worker serving MiniLM and
# the tiny GPT-2 fixture, every method and task submitted, watched,
# downloaded, loaded with ptune.hf.load and scored against ptune-worker
# eval; sweeps; the demo job (PTUNE_PYTHON_DEMO=0 skips it, about 5 minutes
# on 2 cores). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$PTUNE_ROOT"
scripts/postgres.sh

if ! python -c "import grpc, grpc_tools, google.protobuf, pytest, pandas, matplotlib, tqdm" 2>/dev/null; then
  echo "test-python: installing requirements-python.txt into .venv"
  python -m pip install --quiet --disable-pip-version-check -r requirements-python.txt
fi

if [ -z "${PTUNE_BIN_DIR:-}" ]; then
  integration="ptune-coordinator/integration,ptune-worker/integration,ptune-cli/integration"
  cargo build --workspace --bins --profile dev --features "$integration"
  export PTUNE_BIN_DIR="$PTUNE_ROOT/target/debug"
fi

out="$PTUNE_ROOT/target/python"
rm -rf "$out" python/build
python -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation ./python -w "$out/wheel"
python -m pip install --quiet --disable-pip-version-check --no-deps --target "$out/site" "$out"/wheel/ptune-*.whl
echo "test-python: built $(basename "$out"/wheel/ptune-*.whl)"

# The installed wheel, not the source tree, is what the tests import.
cd "$out"
PYTHONPATH="$out/site:$PTUNE_ROOT/python/tests" python -m pytest "$PTUNE_ROOT/python/tests" -p no:cacheprovider -q -rs "$@"
