#!/usr/bin/env bash
# Installs this repository (the shared_transforms package and every dependency) into the
# current Python environment. Usage: bash scripts/install.sh [--test]
#
# torch is installed only when it is missing: the pinned pair below is the one whose files
# already lie on our machines; an unpinned `pip install torch` would download several GB.
# A machine that already has torch keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"

if ! "$PYTHON" -c "import torch, torchvision" >/dev/null 2>&1; then
    echo "[install] torch/torchvision not importable: installing torch==2.14.1 torchvision==0.29.1"
    "$PYTHON" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
else
    echo "[install] using the installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
fi
echo "[install] installing the repository (pip install -e .${extras})"
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".${extras}"
