"""Every repository tool is a fire CLI with a working --help, runnable from any directory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, run

LIBRARIES = {"bundle_cli.py", "tables.py", "bench_utils.py", "bundle_archive.py", "fl_prostate.py"}  # helpers imported by the tools, not CLIs
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


def _choose_env(repo: Path, env: dict) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHON", "MEDSEG_ENV")}
    return subprocess.run(["bash", "-c", 'source scripts/env.sh && medseg_env && echo "CHOSEN $PYTHON"'], cwd=repo,
                          env={**clean, **env}, capture_output=True, text=True, timeout=300)


def test_install_environment_choice(tmp_path):
    """scripts/env.sh (used by install.sh, test.sh, quickstart.sh): the active venv, else ./.venv, created once."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "scripts" / "env.sh").write_text((REPO / "scripts" / "env.sh").read_text())
    active = tmp_path / "active"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(active)], check=True)
    proc = _choose_env(repo, {"VIRTUAL_ENV": str(active)})
    assert proc.returncode == 0 and f"CHOSEN {active}/bin/python" in proc.stdout, proc.stdout + proc.stderr
    assert "the active virtual environment" in proc.stdout and not (repo / ".venv").exists()
    base = {"MEDSEG_BASE_PYTHON": sys.executable}
    first = _choose_env(repo, base)
    assert first.returncode == 0 and f"CHOSEN {repo}/.venv/bin/python" in first.stdout, first.stdout + first.stderr
    assert "creating" in first.stdout and (repo / ".venv" / "bin" / "python").exists()
    again = _choose_env(repo, base)
    assert "creating" not in again.stdout and "the repository's virtual environment" in again.stdout
    too_old = _choose_env(tmp_path / "repo", {"PYTHON": "/nonexistent/python"})
    assert too_old.returncode != 0 and "missing or older than Python 3.10" in too_old.stderr


def test_check_monailabel_reads_the_multipart_infer_answer():
    """/infer?output=all answers multipart (MONAI Label's MultipartEncoder): the result JSON and the label."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from check_monailabel import split_infer_response
    finally:
        sys.path.remove(str(REPO / "scripts"))
    label = bytes(range(256)) * 4  # binary, with CR/LF inside
    params = {"label_names": {"rv": 3}, "qc": {"ood": True, "th_up": "inf"}}
    body = (b'--xyz\r\nContent-Disposition: form-data; name="params"\r\nContent-Type: application/json\r\n\r\n'
            + json.dumps(params).encode() + b'\r\n--xyz\r\nContent-Disposition: form-data; name="image"; '
            b'filename="lab.nii.gz"\r\nContent-Type: application/gzip\r\n\r\n' + label + b"\r\n--xyz--\r\n")
    assert split_infer_response(body, "multipart/form-data; boundary=xyz") == (params, "lab.nii.gz", label)
    assert split_infer_response(json.dumps(params).encode(), "application/json") == (params, "", b"")


def test_run_logged_passes_progress_bars_through_and_names_the_log(tmp_path, capfd):
    """The tools' runner echoes a child's output byte for byte (a tqdm bar's carriage returns keep it in place)
    and logs all of it; a failure ends with the log's tail and its path."""
    sys.path.insert(0, str(REPO / "scripts"))
    from bundle_cli import run_logged

    bar = "import sys,time\nfor i in range(3): sys.stdout.write(f'\\rstep [{i+1}/3] [00:0{i}<00:0{2-i}]'); sys.stdout.flush()\nprint()"
    run_logged([sys.executable, "-c", bar], tmp_path / "ok.log")
    out = capfd.readouterr().out
    assert "\rstep [1/3] [00:00<00:02]\rstep [2/3]" in out
    assert b"\rstep [3/3] [00:02<00:00]\n" in (tmp_path / "ok.log").read_bytes()
    with pytest.raises(SystemExit, match=r"(?s)boom.*command failed \(3\); full log: .*bad\.log"):
        run_logged([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], tmp_path / "bad.log", echo=False)
    assert "boom\n" not in capfd.readouterr().out  # echo=False: only the command line
