#!/usr/bin/env bash
# First quick-start command: install into the environment scripts/env.sh chooses (the active
# virtual environment, or ./.venv), then run every bundle on freshly generated phantoms.
# Extra arguments go to scripts/quickstart.py (see `python scripts/quickstart.py --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
medseg_env
bash scripts/install.sh
"$PYTHON" scripts/quickstart.py "$@"
echo "[quickstart] ran in $(dirname "$(dirname "$PYTHON")"); to use it: source $(dirname "$PYTHON")/activate"
