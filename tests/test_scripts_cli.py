"""Every repository tool is a fire CLI with a working --help, runnable from any directory."""

import os
import subprocess
import sys

import pytest
from helpers import REPO, run

LIBRARIES = {"bundle_cli.py", "tables.py", "bench_utils.py", "bundle_archive.py"}  # helpers imported by the tools, not CLIs
TOOLS = sorted(p for p in (REPO / "scripts").glob("*.py") if p.name not in LIBRARIES)


@pytest.mark.parametrize("tool", TOOLS, ids=[t.name for t in TOOLS])
def test_help(tool, tmp_path):
    proc = run([sys.executable, str(tool), "--help"], cwd=tmp_path, env={"PAGER": "cat"})
    text = proc.stdout + proc.stderr
    assert "NAME" in text or "Usage" in text or "usage" in text
    assert "Traceback" not in text


def test_check_monailabel_guard_as_documented(tmp_path):
    """`bash scripts/check_monailabel.sh` from the repository root: its guard looks only at MONAI Label's
    environment (the repository's own shared_transforms is importable from the working directory)."""
    venv = tmp_path / "monailabel_venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    env = {**os.environ, "MONAILABEL_VENV": str(venv)}
    cmd = ["bash", "scripts/check_monailabel.sh", "--guard-only"]
    ok = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "guard passed" in ok.stdout, ok.stdout + ok.stderr
    # an environment that does provide the package (here through a .pth file) is refused
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "medseg_repo.pth").write_text(f"{REPO}\n")
    bad = subprocess.run(["bash", str(REPO / "scripts" / "check_monailabel.sh"), "--guard-only"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "shared_transforms must not be installed" in bad.stderr, bad.stdout + bad.stderr
