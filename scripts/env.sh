# Sourced by install.sh, test.sh and quickstart.sh: chooses the Python environment, puts it
# first on PATH and exports PYTHON. In order of precedence:
#   PYTHON=/path/to/python      that interpreter (its environment must accept pip installs)
#   an active virtual env       $VIRTUAL_ENV (python -m venv, virtualenv, uv venv) or $CONDA_PREFIX
#   otherwise                   ./.venv in the repository, created with `python3 -m venv` when
#                               missing (stock Debian/Ubuntu Pythons refuse pip outside a venv, PEP 668)
# MEDSEG_BASE_PYTHON names the interpreter that creates ./.venv (default python3, >= 3.10).

medseg_env() {
    local repo where
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    if [[ -n "${MEDSEG_ENV:-}" && "${PYTHON:-}" == "$MEDSEG_ENV" ]]; then
        return 0  # chosen and reported by the calling script
    elif [[ -n "${PYTHON:-}" ]]; then
        where="PYTHON=$PYTHON"
    elif [[ -n "${VIRTUAL_ENV:-}" ]]; then
        PYTHON="$VIRTUAL_ENV/bin/python"
        where="the active virtual environment $VIRTUAL_ENV"
    elif [[ -n "${CONDA_PREFIX:-}" ]]; then
        PYTHON="$CONDA_PREFIX/bin/python"
        where="the active conda environment $CONDA_PREFIX"
    else
        local venv="$repo/.venv" base="${MEDSEG_BASE_PYTHON:-python3}"
        if [[ ! -x "$venv/bin/python" ]]; then
            if ! "$base" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
                echo "[env] $base is missing or older than Python 3.10; set MEDSEG_BASE_PYTHON to a Python >= 3.10" >&2
                return 1
            fi
            echo "[env] no virtual environment is active: creating $venv with $base"
            if ! "$base" -m venv "$venv"; then
                rm -rf "$venv"
                echo "[env] '$base -m venv' failed (on Debian/Ubuntu: apt install python3-venv), or activate an environment first" >&2
                return 1
            fi
            where="the new virtual environment $venv"
        else
            where="the repository's virtual environment $venv"
        fi
        PYTHON="$venv/bin/python"
    fi
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        echo "[env] $PYTHON is missing or older than Python 3.10" >&2
        return 1
    fi
    PATH="$(dirname "$PYTHON"):$PATH"
    MEDSEG_ENV="$PYTHON"
    export PYTHON PATH MEDSEG_ENV
    echo "[env] using $where ($("$PYTHON" -c 'import sys; print(sys.executable, "Python", sys.version.split()[0])'))"
}
