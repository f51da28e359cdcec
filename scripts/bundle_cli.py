"""Running bundles through the MONAI CLI from the repository's tools (quick start, grids, benches)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
PHANTOMS = REPO / "scripts" / "phantoms.py"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for local servers and process groups)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bundle_cmd(bundle: str, configs: list[str], run_id: str = "run", **overrides) -> list[str]:
    """``python -m monai.bundle run <run_id> --config_file ... --key value``; values given as Python literals."""
    files = [str(BUNDLES / bundle / "configs" / c) for c in configs]
    config_arg = files[0] if len(files) == 1 else json.dumps(files)
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_arg]
    for key, value in overrides.items():
        cmd += [f"--{key}", value if isinstance(value, str) else repr(value)]
    return cmd


def run_logged(cmd: list[str], log_file: Path, echo: bool = True) -> None:
    """Run ``cmd`` from the log's folder, appending all output to ``log_file``.

    With ``echo`` the epoch summaries and warnings are shown on the console as progress.
    Raises ``SystemExit`` naming the log when the command fails.
    """
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(cmd), flush=True)
    with open(log_file, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=log_file.parent)
        for line in proc.stdout:
            log.write(line)
            if echo and _is_progress(line):
                sys.stdout.write("    " + line)
                sys.stdout.flush()
        if proc.wait() != 0:
            tail = "".join(open(log_file).readlines()[-30:])
            raise SystemExit(f"{tail}\ncommand failed ({proc.returncode}); full log: {log_file}")


def _is_progress(line: str) -> bool:
    """Epoch summaries, results and problems; not per-iteration logs or library warnings."""
    return (
        ("Epoch[" in line and "Metrics" in line)
        or "Dice" in line
        or " - WARNING - " in line
        or " - ERROR - " in line
        or line.startswith(("wrote", "[", "==>"))
    )


def make_phantoms(kind: str, out_dir: Path, log_file: Path, **options) -> Path:
    cmd = [sys.executable, str(PHANTOMS), kind, str(out_dir)]
    for key, value in options.items():
        cmd += [f"--{key}", str(value)]
    run_logged(cmd, log_file)
    return Path(out_dir)
