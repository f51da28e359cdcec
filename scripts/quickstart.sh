#!/usr/bin/env bash
# First quick-start command: install, then run every bundle on freshly generated phantoms.
# Extra arguments go to scripts/quickstart.py (see `python scripts/quickstart.py --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
bash scripts/install.sh
"$PYTHON" scripts/quickstart.py "$@"
