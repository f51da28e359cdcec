#!/usr/bin/env bash
# Installs this repository (the shared_transforms package and every dependency) into the
# environment that scripts/env.sh chooses: the active virtual environment, or ./.venv
# (created when missing). Usage: bash scripts/install.sh [--test] [--extras test,mlflow]
#
# torch: the pinned pair torch==2.14.1 torchvision==0.29.1 is installed when torch is not
# importable yet (an unpinned `pip install torch` downloads several GB). An environment that
# already has torch keeps it. To choose another build, set TORCH_SPEC to the pip arguments
# for it; it is then always installed, e.g.
#   TORCH_SPEC="torch==2.9.1 torchvision==0.24.1" bash scripts/install.sh
#   TORCH_SPEC="torch==2.14.1 torchvision==0.29.1 --index-url <your wheel index>" bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
medseg_env

extras=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --test) extras+=(test) ;;
        --extras) shift; IFS=',' read -r -a more <<< "${1:-}"; extras+=("${more[@]}") ;;
        *) echo "[install] unknown argument '$1' (use --test or --extras a,b)" >&2; exit 2 ;;
    esac
    shift
done
spec="."
if [[ ${#extras[@]} -gt 0 ]]; then
    spec=".[$(IFS=','; echo "${extras[*]}")]"
fi

pip_install() { "$PYTHON" -m pip install --quiet --disable-pip-version-check "$@"; }

if [[ -n "${TORCH_SPEC:-}" ]]; then
    echo "[install] TORCH_SPEC: pip install $TORCH_SPEC"
    # shellcheck disable=SC2086  # TORCH_SPEC is a list of pip arguments
    pip_install $TORCH_SPEC
elif ! "$PYTHON" -I -c "import torch, torchvision" >/dev/null 2>&1; then
    echo "[install] torch/torchvision not importable: installing torch==2.14.1 torchvision==0.29.1"
    pip_install "torch==2.14.1" "torchvision==0.29.1"
else
    echo "[install] keeping the installed torch $("$PYTHON" -I -c 'import torch; print(torch.__version__)')"
fi
echo "[install] pip install -e '$spec'"
pip_install -e "$spec"
"$PYTHON" -I -c 'import monai, shared_transforms, torch; print(f"[install] done: torch {torch.__version__}, monai {monai.__version__}, shared_transforms {shared_transforms.__version__}")'
