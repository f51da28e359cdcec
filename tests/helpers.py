"""Helpers shared by the tests: paths, phantom generation and running the MONAI CLI."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from bundle_cli import BUNDLES, PHANTOMS, REPO, bundle_cmd, torchrun_cmd  # scripts/ is on the path (conftest.py)

__all__ = ["REPO", "BUNDLES", "PHANTOMS", "run", "bundle_run", "make_phantoms", "assert_progress_eta", "torchrun_bundle",
           "assert_same_results", "assert_ddp_evaluation_matches"]


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


def assert_progress_eta(stdout: str, desc: str) -> None:
    """``stdout`` shows a finished progress bar labelled ``desc`` with its ``[elapsed<remaining]`` (the ETA)."""
    assert re.search(rf"{re.escape(desc)}: \[\d+/\d+\] +100%.*\[\d\d:\d\d<00:00", stdout), \
        f"no finished '{desc}' progress bar with an ETA on stdout:\n{stdout[-3000:]}"


def torchrun_bundle(bundle: str, configs: list[str], cwd: Path, run_id: str, nproc: int = 2,
                    **overrides) -> dict[int, str]:
    """``torchrun --nproc_per_node=<nproc> -m monai.bundle run ...`` on CPU (gloo); each rank's stdout, by rank."""
    logs = Path(cwd) / "torchrun_logs"
    cmd = torchrun_cmd(bundle_cmd(bundle, configs, run_id, **overrides), nproc, logs)
    try:
        run(cmd, cwd=cwd, env={"OMP_NUM_THREADS": "1"})
    except AssertionError as e:  # the ranks' own output is in their log files
        tails = "".join(f"\n--- {p} ---\n{p.read_text()[-4000:]}" for p in sorted(logs.rglob("*.log")))
        raise AssertionError(f"{e}{tails}") from None
    return {int(p.parent.name): p.read_text() for p in logs.rglob("stdout.log")}


def assert_same_results(a, b, rel: float = 1e-4, where: str = "") -> None:
    """Two JSON-like results agree: numbers to ``rel`` (NaN equals NaN), everything else exactly."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert sorted(a) == sorted(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same_results(a[k], b[k], rel, f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{where}: {len(a)} != {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_results(x, y, rel, f"{where}[{i}]")
    elif isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=1e-9), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_ddp_evaluation_matches(bundle: str, one_process_dir: Path, cwd: Path, files: list[str],
                                  overlays: str = "overlays", **overrides) -> dict[int, str]:
    """``multi_gpu_evaluate.json`` in 2 CPU processes writes the same tables as one process did into
    ``one_process_dir`` (``files``: JSON files compared by value) and the same overlay files (folder
    ``overlays``), and only rank 0 logs at INFO."""
    out = Path(cwd) / "ddp_eval"
    logs = torchrun_bundle(bundle, ["train.json", "evaluate.json", "multi_gpu_evaluate.json"], cwd, "evaluating",
                           output_dir=str(out), **overrides)
    for name in files:
        assert_same_results(json.loads((Path(one_process_dir) / name).read_text()),
                            json.loads((out / name).read_text()), where=name)
    names = sorted(p.name for p in (Path(one_process_dir) / overlays).glob("*.png"))
    assert names and names == sorted(p.name for p in (out / overlays).glob("*.png"))
    assert "Engine run finished" in logs[0], logs[0][-3000:]
    # rank 1: no INFO once initialize ran (before it, monai.bundle reports the logging config and the overrides)
    late_info = [line for line in logs[1].splitlines() if " - INFO - " in line
                 and not re.search(r" - INFO - (Setting logging properties|> |---)", line)]
    assert not late_info, "rank 1 logs at WARNING only:\n" + logs[1][-3000:]
    return logs
