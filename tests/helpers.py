"""Helpers shared by the tests: paths, phantom generation and running the MONAI CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bundle_cli import BUNDLES, PHANTOMS, REPO, bundle_cmd  # scripts/ is on the path (conftest.py)

__all__ = ["REPO", "BUNDLES", "PHANTOMS", "run", "bundle_run", "make_phantoms"]


def run(cmd: list[str], cwd: Path, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` from ``cwd`` (never the repository, so imports are proven); fail with its output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


def bundle_run(bundle: str, configs: list[str], cwd: Path, run_id: str = "run", **overrides) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run <run_id> --config_file ... --key value ...`` in a subprocess."""
    return run(bundle_cmd(bundle, configs, run_id, **overrides), cwd=cwd)


def make_phantoms(kind: str, out_dir: Path, cwd: Path, **options) -> Path:
    cmd = [sys.executable, str(PHANTOMS), kind, str(out_dir)]
    for key, value in options.items():
        cmd += [f"--{key}", str(value)]
    run(cmd, cwd=cwd)
    return out_dir
