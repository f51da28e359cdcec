#!/usr/bin/env bash
# Second quick-start command: install (with the test, mlflow and fl extras) into the environment
# scripts/env.sh chooses, then run the whole test suite there. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
medseg_env
bash scripts/install.sh --extras test,mlflow,fl
echo "[test] $PYTHON -m pytest tests $*"
"$PYTHON" -m pytest tests "$@"
