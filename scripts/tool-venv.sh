#!/usr/bin/env bash
# Installs the pinned Python tools of REQUIREMENTS into the virtual
# environment VENV, once, and again whenever that file changes.
#
#   scripts/tool-venv.sh VENV REQUIREMENTS
set -euo pipefail
VENV=$1
REQUIREMENTS=$2
wanted="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$wanted" ]; then
  echo "tool-venv: installing $REQUIREMENTS into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQUIREMENTS"
  echo "$wanted" > "$VENV/.requirements.sha256"
fi
