"""Shipping: archives for every bundle, HTTP download, and running a downloaded bundle where
this repository (and so ``shared_transforms``) is not installed, from the CLI and from Python."""

from __future__ import annotations

import hashlib
import json
import re
import site
import subprocess
import sys
import textwrap
import time
import urllib.request
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bundle_archive import bundle_names, read_metadata, uses_shared_transforms
from bundle_cli import free_port
from helpers import BUNDLES, REPO, run

SHIPPED = "liver_ct_mri_transfer"  # the bundle downloaded and run (small weights, fast inference)
PACKAGE = REPO / "scripts" / "package_bundles.py"
DOWNLOAD = REPO / "scripts" / "download_bundle.py"


@pytest.fixture(scope="module")
def isolated_python(tmp_path_factory) -> Path:
    """A virtual environment that sees the installed libraries (torch, monai, ...) but not this
    repository: the site-packages folder is added as a plain path, so the editable install's
    import hook (a .pth file there) never runs."""
    env = tmp_path_factory.mktemp("isolated") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "system_libraries.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    probe = subprocess.run([str(python), "-c", "import monai, torch; import shared_transforms"],
                           capture_output=True, text=True, cwd=env)
    assert "No module named 'shared_transforms'" in probe.stderr, probe.stderr
    return python


def fresh_weights(bundle: str, models_dir: Path) -> Path:
    """A models/model.pt for ``network_def`` of the bundle's inference.json (stands in for trained weights)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    code = textwrap.dedent(
        f"""
        import sys, torch
        from pathlib import Path
        sys.path[:0] = [{str(BUNDLES / bundle)!r}, {str(REPO / "scripts")!r}]
        from check_bundles import fresh_network
        torch.manual_seed(0)
        torch.save(fresh_network(Path({str(BUNDLES / bundle)!r})).state_dict(), {str(models_dir / "model.pt")!r})
        """
    )
    run([sys.executable, "-c", code], cwd=models_dir)
    return models_dir / "model.pt"


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """Every bundle packaged without weights (``plain``); SHIPPED packaged with weights and served over HTTP."""
    root = tmp_path_factory.mktemp("dist")
    run([sys.executable, str(PACKAGE), str(root / "plain")], cwd=root)
    weights = root / "weights"
    fresh_weights(SHIPPED, weights / SHIPPED / "models")
    run([sys.executable, str(PACKAGE), str(root / "served"), "--names", f"[{SHIPPED}]", "--weights_dir", str(weights)],
        cwd=root)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(root / "served")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{base_url}/index.json").read()
            break
        except OSError:
            time.sleep(0.1)
    yield {"root": root, "plain": root / "plain", "served": root / "served", "base_url": base_url,
           "weights": weights / SHIPPED / "models" / "model.pt"}
    server.terminate()
    server.wait(timeout=10)


def test_every_bundle_is_archived_in_model_zoo_shape(dist):
    index = json.loads((dist["plain"] / "index.json").read_text())
    entries = {e["name"]: e for e in index["bundles"]}
    assert sorted(entries) == bundle_names()
    assert index["url_template"] == "{base_url}/{name}_v{version}.zip"
    for name, entry in entries.items():
        version = read_metadata(BUNDLES / name)["version"]
        archive = dist["plain"] / f"{name}_v{version}.zip"
        assert entry["file"] == archive.name and entry["version"] == version
        assert entry["url"].format(base_url="http://h") == f"http://h/{name}_v{version}.zip"
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        assert entry["sha256"] == digest and entry["size"] == archive.stat().st_size
        assert (dist["plain"] / f"{archive.name}.sha256").read_text().split() == [digest, archive.name]
        with zipfile.ZipFile(archive) as zf:
            members = zf.namelist()
            readme = zf.read(f"{name}/docs/README.md").decode()
        assert {m.split("/")[0] for m in members} == {name}
        for required in ("LICENSE", "configs/metadata.json", "configs/inference.json", "configs/train.json",
                         "docs/README.md", "models/"):
            assert f"{name}/{required}" in members, (name, required)
        assert not [m for m in members if m.endswith((".pt", ".ts", ".pyc")) or "/eval/" in m or "__pycache__" in m]
        assert "carries no trained weights" in readme and "run training" in readme
        assert (f"{name}/shared_transforms/__init__.py" in members) == uses_shared_transforms(BUNDLES / name)
    # the same inputs give the same bytes
    again = dist["root"] / "again"
    run([sys.executable, str(PACKAGE), str(again), "--names", f"[{SHIPPED}]"], cwd=dist["root"])
    assert (again / f"{SHIPPED}_v{entries[SHIPPED]['version']}.zip").read_bytes() == \
        (dist["plain"] / f"{SHIPPED}_v{entries[SHIPPED]['version']}.zip").read_bytes()


def test_download_and_run_where_the_repository_is_not_installed(dist, isolated_python, tmp_path):
    index = json.loads(urllib.request.urlopen(f"{dist['base_url']}/index.json").read())
    entry = index["bundles"][0]
    assert entry["name"] == SHIPPED and entry["weights"] == [f"{SHIPPED}/models/model.pt"]
    url = entry["url"].format(base_url=dist["base_url"])
    served_bytes = urllib.request.urlopen(url).read()
    assert hashlib.sha256(served_bytes).hexdigest() == entry["sha256"]

    work = tmp_path / "user"
    work.mkdir()
    run([str(isolated_python), "-m", "monai.bundle", "download", "--name", SHIPPED, "--url", url,
         "--bundle_dir", "downloaded"], cwd=work)
    root = work / "downloaded" / SHIPPED
    assert (root / "configs" / "inference.json").is_file() and (root / "shared_transforms" / "__init__.py").is_file()
    assert (root / "models" / "model.pt").read_bytes() == dist["weights"].read_bytes()
    kept = list((work / "downloaded").glob("*.zip"))  # monai keeps the downloaded archive: check it too
    for archive in kept:
        assert hashlib.sha256(archive.read_bytes()).hexdigest() == entry["sha256"]

    # 1. the documented CLI command, in a process where shared_transforms can only come from the bundle
    cases = work / "cases"
    cases.mkdir()
    volume = np.random.default_rng(0).random((48, 40, 6)).astype(np.float32)
    affine = np.diag([1.4, 1.6, 4.0, 1.0])
    nib.save(nib.Nifti1Image(volume, affine), cases / "patient7.nii.gz")
    cli = textwrap.dedent(
        f"""
        import runpy, sys
        sys.argv = ["monai.bundle", "run", "--config_file", "{root}/configs/inference.json", "--bundle_root", "{root}",
                    "--dataset_dir", "{cases}", "--output_dir", "{work / 'cli_masks'}"]
        try:
            runpy.run_module("monai.bundle", run_name="__main__")
        except SystemExit as e:
            assert not e.code, e.code
        print("SHARED_TRANSFORMS_FROM", sys.modules["shared_transforms"].__file__)
        """
    )
    proc = run([str(isolated_python), "-c", cli], cwd=work)
    origin = re.search(r"SHARED_TRANSFORMS_FROM (\S+)", proc.stdout).group(1)
    assert Path(origin).resolve().is_relative_to(root.resolve()), origin
    mask = nib.load(work / "cli_masks" / "patient7_seg.nii.gz")
    assert mask.shape == volume.shape and np.allclose(mask.affine, affine)

    # 2. the README's Python example (load + ConfigWorkflow on a NumPy volume), verbatim
    readme = (REPO / "README.md").read_text()
    example = re.search(r"<!-- python-example.*?```python\n(.*?)```", readme, re.S).group(1)
    example += textwrap.dedent(
        """
        state = torch.load(f"{root}/models/model.pt", map_location="cpu", weights_only=True)
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items()), "load() must return the shipped weights"
        assert mask.shape == volume.shape and np.allclose(mask.affine, np.diag([1.5, 1.5, 5.0, 1.0]))
        import shared_transforms  # the only copy this process can see is the bundle's
        print("SHARED_TRANSFORMS_FROM", shared_transforms.__file__)
        """
    )
    proc = run([str(isolated_python), "-c", example], cwd=work)
    origin = re.search(r"SHARED_TRANSFORMS_FROM (\S+)", proc.stdout).group(1)
    assert Path(origin).resolve().is_relative_to(root.resolve()), origin
    assert "mask (64, 52, 8)" in proc.stdout


def test_download_helper_checks_sha256_and_member_paths(dist, tmp_path):
    base, served = dist["base_url"], dist["served"]
    entry = json.loads((served / "index.json").read_text())["bundles"][0]
    url = entry["url"].format(base_url=base)

    # through the index: verified and extracted
    ok = run([sys.executable, str(DOWNLOAD), SHIPPED, "--index", f"{base}/index.json", "--bundle_dir", str(tmp_path / "ok")],
             cwd=tmp_path)
    assert (tmp_path / "ok" / SHIPPED / "models" / "model.pt").is_file(), ok.stdout

    # a wrong sha256: refused, nothing extracted
    bad = subprocess.run([sys.executable, str(DOWNLOAD), SHIPPED, "--url", url, "--sha256", "0" * 64,
                          "--bundle_dir", str(tmp_path / "bad")], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode != 0 and "does not match" in bad.stderr
    assert not (tmp_path / "bad" / SHIPPED).exists()

    # members escaping the target folder: refused before anything is written
    for i, member in enumerate(["../escaped.txt", "/tmp/absolute_escape.txt", "evil/../../escaped.txt"]):
        evil = served / f"evil{i}.zip"
        with zipfile.ZipFile(evil, "w") as zf:
            zf.writestr("evil/configs/metadata.json", "{}")
            zf.writestr(member, "outside")
        target = tmp_path / f"target{i}" / "inner"
        proc = subprocess.run([sys.executable, str(DOWNLOAD), "evil", "--url", f"{base}/{evil.name}",
                               "--sha256", hashlib.sha256(evil.read_bytes()).hexdigest(), "--bundle_dir", str(target)],
                              cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode != 0 and "outside the target folder" in proc.stderr, proc.stderr
        assert not (target / "evil").exists() and not (target.parent / "escaped.txt").exists()
