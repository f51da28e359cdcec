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

    With ``echo`` the output is also passed to the console as it comes, byte for byte, so the
    bundles' progress bars (training epochs, evaluation, inference, volume preparation) show
    their ETA in place. Raises ``SystemExit`` naming the log when the command fails.
    """
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(cmd), flush=True)
    console = getattr(sys.stdout, "buffer", None)
    with open(log_file, "ab") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=log_file.parent)
        while chunk := proc.stdout.read1(1 << 16):
            log.write(chunk)
            if echo:
                if console is not None:
                    console.write(chunk)
                else:
                    sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
        if proc.wait() != 0:
            log.flush()
            tail = "".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-30:])
            raise SystemExit(f"{tail}\ncommand failed ({proc.returncode}); full log: {log_file}")


def make_phantoms(kind: str, out_dir: Path, log_file: Path, echo: bool = True, **options) -> Path:
    """``scripts/phantoms.py <kind> <out_dir> --option value ...``, logged by :func:`run_logged`."""
    cmd = [sys.executable, str(PHANTOMS), kind, str(out_dir)]
    for key, value in options.items():
        cmd += [f"--{key}", str(value)]
    run_logged(cmd, log_file, echo=echo)
    return Path(out_dir)


def torchrun_cmd(cmd: list[str], nproc: int, log_dir: Path) -> list[str]:
    """A ``python -m ...`` command (e.g. :func:`bundle_cmd`'s) under ``torchrun --nproc_per_node=<nproc>`` on a
    free local port, each rank's output in its own file under ``log_dir``."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
            "--log-dir", str(log_dir), "--redirects", "3", *cmd[1:]]
