#!/usr/bin/env bash
# Second quick-start command: install (with the test extra) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
bash scripts/install.sh --test
"$PYTHON" -m pytest tests "$@"
