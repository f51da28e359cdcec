#!/usr/bin/env bash
# Serves every bundle in a real MONAI Label 0.8.5 server and checks /info/, /infer and /train
# over REST (scripts/check_monailabel.py). Run from anywhere, e.g. the repository root:
#   bash scripts/check_monailabel.sh [WORK_DIR] [ARGS]   the whole check (ARGS go to check_monailabel.py,
#                                                    e.g. --names "[cardiac_qc_refinement]" --train_bundle "")
#   bash scripts/check_monailabel.sh --guard-only    only check that MONAI Label's environment
#                                                    does not see this repository's shared_transforms
#
# MONAI Label 0.8.5 pins numpy < 2 and jsonschema < 4, so it lives in its own virtual
# environment (cached: MONAILABEL_VENV, default ~/.cache/medseg-bundles/monailabel-0.8.5).
# Its server runs there WITHOUT this repository: the bundles come from their archives, and the
# packages they need are the ones their metadata.json lists (as the Model Zoo installs them).
# The MONAI Label pins below are the set that starts offline (see the README's MONAI Label section).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${MONAILABEL_VENV:-$HOME/.cache/medseg-bundles/monailabel-0.8.5}"
GUARD_ONLY=0
if [[ "${1:-}" == "--guard-only" ]]; then
    GUARD_ONLY=1
    shift
fi
WORK="${1:-monailabel_check}"
shift || true  # the rest goes to check_monailabel.py, e.g. --names "[cardiac_qc_refinement]" --train_bundle ""

# Isolated mode (-I): no working directory or PYTHONPATH on sys.path, so run from the repository
# root the check sees only what is installed in MONAI Label's environment.
guard() {
    if "$VENV/bin/python" -I -c "import shared_transforms" >/dev/null 2>&1; then
        echo "[monailabel] shared_transforms must not be installed in $VENV: the bundles carry it" >&2
        exit 1
    fi
    echo "[monailabel] guard passed: $VENV does not provide shared_transforms"
}

if [[ -x "$VENV/bin/python" ]]; then
    guard
fi
if [[ $GUARD_ONLY -eq 1 ]]; then
    [[ -x "$VENV/bin/python" ]] || echo "[monailabel] $VENV does not exist yet: nothing to guard"
    exit 0
fi

source "$REPO/scripts/env.sh"
medseg_env
bash "$REPO/scripts/install.sh"
# every package a bundle's metadata.json lists (optional_packages_version): what the served bundles import
mapfile -t BUNDLE_PACKAGES < <("$PYTHON" -I - "$REPO/bundles" <<'EOF'
import json, pathlib, sys
names = set()
for meta in sorted(pathlib.Path(sys.argv[1]).glob("*/configs/metadata.json")):
    data = json.loads(meta.read_text())
    names.update(data.get("optional_packages_version") or data.get("required_packages_version") or {})
print("\n".join(sorted(names)))
EOF
)
STAMP="$VENV/.medseg-bundle-packages"
if [[ ! -x "$VENV/bin/python" ]] || [[ "$(cat "$STAMP" 2>/dev/null)" != "${BUNDLE_PACKAGES[*]}" ]]; then
    echo "[monailabel] building $VENV (several minutes, several GB): MONAI Label 0.8.5 + ${BUNDLE_PACKAGES[*]}"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        "torch==2.14.1" "torchvision==0.29.1" "monailabel==0.8.5" "pydicom==2.4.4" \
        "dicomweb-client==0.59.1" "pynetdicom==2.0.2" "fire>=0.5" "${BUNDLE_PACKAGES[@]}"
    echo "${BUNDLE_PACKAGES[*]}" > "$STAMP"
    guard
fi
echo "[monailabel] virtual environment: $VENV ($("$VENV/bin/python" -I -c 'import monailabel, monai, numpy; print("monailabel", monailabel.__version__, "monai", monai.__version__, "numpy", numpy.__version__)'))"
"$PYTHON" "$REPO/scripts/check_monailabel.py" --monailabel "$VENV/bin/monailabel" --work_dir "$WORK" "$@"
