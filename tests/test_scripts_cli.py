"""Every repository tool is a fire CLI with a working --help, runnable from any directory."""

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
