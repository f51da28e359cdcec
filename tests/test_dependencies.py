"""Every imported package is declared: in pyproject.toml (deptry) and in each bundle's metadata.json.

A package installed by hand on one machine must never stand in for a missing declaration:
deptry reads the code and pyproject.toml, so these tests fail wherever that happens, not only
on a fresh machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_archive import bundle_names
from bundle_requirements import canonical, missing_from_metadata, required_distributions
from helpers import BUNDLES, REPO, run

BUNDLE_NAMES = bundle_names()


def deptry(root: Path, *args: str) -> tuple[int, str]:
    """deptry's exit code and its report (stdout and stderr, colours stripped)."""
    # "." from the root: deptry matches its exclude patterns (.venv, ...) against paths relative to the scanned folder
    proc = subprocess.run([sys.executable, "-m", "deptry", ".", *args], cwd=root, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "NO_COLOR": "1"})
    return proc.returncode, re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)


def test_deptry_finds_every_import_declared():
    code, out = deptry(REPO)
    assert code == 0, f"deptry found undeclared or unused dependencies:\n{out}"
    assert 50 < int(re.search(r"Scanning (\d+) files", out).group(1)) < 500, out  # the code, never a .venv inside


@pytest.mark.parametrize("package, importer", [("SimpleITK", "n4.py"), ("nibabel", "datalist.py")])
def test_deptry_fails_when_an_imported_package_is_not_declared(tmp_path, package, importer):
    """The defect that reached a fresh machine (an imported package missing from pyproject), on the real tree."""
    text = (REPO / "pyproject.toml").read_text()
    assert f'"{package}' in text
    config = tmp_path / "pyproject.toml"
    config.write_text(re.sub(rf'\n\s*"{package}[^"]*",', "", text))
    code, out = deptry(REPO, "--config", str(config))
    assert code != 0
    assert importer in out and f"'{package}'" in out, out


def _declared(pyproject_text: str) -> set[str]:
    """Canonical names in pyproject's [project] dependencies and every extra."""
    tomllib = pytest.importorskip("tomllib", reason="needs Python >= 3.11 (tomllib)")
    project = tomllib.loads(pyproject_text)["project"]
    specs = project["dependencies"] + [s for extra in project.get("optional-dependencies", {}).values() for s in extra]
    return {canonical(re.match(r"[A-Za-z0-9_.-]+", s).group(0)) for s in specs}


def _undeclared_bundle_needs(pyproject_text: str) -> dict[str, dict[str, set[str]]]:
    declared = _declared(pyproject_text)
    out = {}
    for bundle in BUNDLE_NAMES:
        missing = {d: f for d, f in required_distributions(BUNDLES / bundle).items() if d not in declared}
        if missing:
            out[bundle] = missing
    return out


def test_pyproject_declares_every_package_a_bundle_needs():
    """Packages MONAI imports for a bundle (scipy for the Hausdorff distance, tensorboard, ...) are invisible to
    deptry; the bundles' derived requirements are checked against pyproject instead."""
    text = (REPO / "pyproject.toml").read_text()
    assert not _undeclared_bundle_needs(text)
    # the regression of the fresh-machine issue: without scipy declared, cardiac's needs are not met
    without_scipy = _undeclared_bundle_needs(re.sub(r'\n\s*"scipy[^"]*",', "", text))
    assert without_scipy.get("cardiac_qc_refinement", {}).get("scipy") == {"scripts/qc.py"}, without_scipy


def test_deptry_fails_on_an_undeclared_import(tmp_path):
    """A copy of the repository's code with one new import of an installed but undeclared package fails."""
    copy = tmp_path / "repo"
    ignore = shutil.ignore_patterns(".venv", "__pycache__", "models", "eval", "*.pt", "quickstart_outputs", ".git")
    for part in ("shared_transforms", "bundles", "scripts", "tests"):
        shutil.copytree(REPO / part, copy / part, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", copy)
    assert deptry(copy)[0] == 0
    probe = copy / "bundles" / "cardiac_qc_refinement" / "scripts" / "probe.py"
    probe.write_text("def version():\n    import packaging.version  # installed (a dependency of dependencies), never declared\n")
    code, out = deptry(copy)
    assert code != 0
    assert "probe.py" in out and "'packaging'" in out, out


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_metadata_lists_every_package_the_bundle_imports(bundle):
    missing = missing_from_metadata(BUNDLES / bundle)
    assert not missing, (
        f"{bundle}/configs/metadata.json lacks (package: files that need it) {missing}; "
        f"`python scripts/bundle_requirements.py --names [{bundle}]` shows the installed versions"
    )


def _toy_bundle(root: Path, targets: list[str], module: str) -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "scripts").mkdir()
    config = {
        "imports": ["$import torch"],
        "handlers": [{"_target_": "TensorBoardStatsHandler"}],
        "transforms": [{"_target_": t} for t in targets],
    }
    (root / "configs" / "train.json").write_text(json.dumps(config, indent=4))
    (root / "configs" / "metadata.json").write_text(json.dumps({"version": "0.1.0"}))
    (root / "scripts" / "__init__.py").write_text("")
    (root / "scripts" / "net.py").write_text(module)
    return root


def test_required_distributions_known_answer(tmp_path):
    """Nested and relative imports, config targets, lazy shared_transforms parts and MONAI's optional packages."""
    module = "from . import other\n\n\ndef smooth(x):\n    from scipy import ndimage\n    return ndimage.gaussian_filter(x, 1)\n"
    labels_only = required_distributions(_toy_bundle(tmp_path / "a", ["shared_transforms.MergeLabelsd"], module))
    assert set(labels_only) == {"torch", "monai", "scipy", "tensorboard", "pytorch-ignite"}, labels_only
    assert labels_only["scipy"] == {"scripts/net.py"}
    assert "shared_transforms/labels.py" in labels_only["monai"]

    with_n4 = required_distributions(_toy_bundle(tmp_path / "b", ["shared_transforms.N4BiasFieldCorrectiond"], ""))
    assert "simpleitk" in with_n4 and "scipy" not in with_n4

    datalist = required_distributions(_toy_bundle(tmp_path / "c", ["shared_transforms.datalist.list_images"], ""))
    assert {"nibabel", "numpy"} <= set(datalist) and "simpleitk" not in datalist

    unknown = required_distributions(_toy_bundle(tmp_path / "d", [], "import not_a_real_package_xyz\n"))
    assert "?not_a_real_package_xyz" in unknown
    assert missing_from_metadata(tmp_path / "d").keys() >= {"?not_a_real_package_xyz", "torch", "tensorboard"}


def test_shared_transforms_loads_imaging_libraries_only_when_used(tmp_path):
    """`import shared_transforms` (and its JSON/label parts) must not pull in SimpleITK or nibabel."""
    check = (
        "import sys\n"
        "import shared_transforms\n"
        "assert 'SimpleITK' not in sys.modules and 'nibabel' not in sys.modules, 'import pulled imaging libraries'\n"
        "from shared_transforms.files import write_json\n"
        "assert 'nibabel' not in sys.modules and 'torch' not in sys.modules\n"
        "shared_transforms.MergeLabelsd(keys='label', mapping={1: 1})\n"
        "assert 'SimpleITK' not in sys.modules\n"
        "assert shared_transforms.N4BiasFieldCorrectiond.__module__ == 'shared_transforms.n4'\n"
        "assert 'SimpleITK' in sys.modules\n"
        "assert set(shared_transforms.__all__) <= set(dir(shared_transforms))\n"
        "print('LAZY_OK')\n"
    )
    assert "LAZY_OK" in run([sys.executable, "-c", check], cwd=tmp_path).stdout
