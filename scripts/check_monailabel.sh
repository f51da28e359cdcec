#!/usr/bin/env bash
# Serves every bundle in a real MONAI Label 0.8.5 server and checks /info/, /infer and /train
# over REST (scripts/check_monailabel.py). Usage: bash scripts/check_monailabel.sh [WORK_DIR]
#
# MONAI Label 0.8.5 pins numpy < 2 and jsonschema < 4, so it lives in its own virtual
# environment (cached: MONAILABEL_VENV, default ~/.cache/medseg-bundles/monailabel-0.8.5).
# Its server runs there WITHOUT this repository: the bundles come from their archives.
# The pins below are the set that starts offline (see the README's MONAI Label section).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${MONAILABEL_VENV:-$HOME/.cache/medseg-bundles/monailabel-0.8.5}"
WORK="${1:-monailabel_check}"

if ! "$VENV/bin/python" -c "import monailabel, segmentation_models_pytorch, timm, SimpleITK" >/dev/null 2>&1; then
    echo "[monailabel] building $VENV (several minutes, several GB)"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        "torch==2.14.1" "torchvision==0.29.1" "monailabel==0.8.5" "pydicom==2.4.4" \
        "dicomweb-client==0.59.1" "pynetdicom==2.0.2" \
        "segmentation-models-pytorch>=0.4" "timm>=1.0" "SimpleITK>=2.2" "nibabel>=5.0" "fire>=0.5" \
        "pytorch-ignite>=0.4.11" "tensorboard>=2.12" "matplotlib>=3.7"
fi
echo "[monailabel] virtual environment: $VENV ($("$VENV/bin/python" -c 'import monailabel, monai, numpy; print("monailabel", monailabel.__version__, "monai", monai.__version__, "numpy", numpy.__version__)'))"
if "$VENV/bin/python" -c "import shared_transforms" >/dev/null 2>&1; then
    echo "[monailabel] shared_transforms must not be installed in $VENV: the bundles carry it" >&2
    exit 1
fi
"$PYTHON" "$REPO/scripts/check_monailabel.py" --monailabel "$VENV/bin/monailabel" --work_dir "$WORK"
