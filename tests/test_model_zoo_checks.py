"""What the Model Zoo's CI runs, for every bundle in bundles/ (a new bundle is covered without new code)."""

import json
import re
import shutil
import subprocess
import sys

import pytest
from bundle_archive import bundle_names
from helpers import BUNDLES, REPO

CHECKER = REPO / "scripts" / "check_bundles.py"
EXPECTED = (
    "required files", "version in changelog", "verify_metadata (vendored schema)", "verify_net_in_out (inference.json)",
    "ckpt_export -> TorchScript equals eager", "onnx_export -> onnxruntime equals eager",
)
# the Model Zoo's CI exports by scripting; only smp's UNet++ cannot be scripted (CONVENTIONS: traced, documented)
TRACED = {"prostate_mri_transfer"}


def check(names, tmp_path, bundles_dir=BUNDLES):
    cmd = [sys.executable, str(CHECKER), "--names", f"[{','.join(names)}]", "--work_dir", str(tmp_path / "work"),
           "--bundles_dir", str(bundles_dir)]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("name", bundle_names())
def test_bundle_passes_model_zoo_checks(name, tmp_path):
    proc = check([name], tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-5000:]
    for label in EXPECTED:
        assert f"PASS {name}: {label}" in out, out
    configs = sorted(p.name for p in (BUNDLES / name / "configs").glob("*.json") if p.name != "metadata.json")
    for config in configs:  # one ConfigWorkflow per config
        assert f"PASS {name}: ConfigWorkflow check_properties {config}" in out, out
    scripted = f"PASS {name}: ckpt_export -> TorchScript equals eager (scripted)" in out
    assert scripted == (name not in TRACED), out
    assert (tmp_path / "work" / name / "model.ts").is_file() and (tmp_path / "work" / name / "model.onnx").is_file()


def test_checker_reports_broken_bundles(tmp_path):
    """The checks can fail: a bundle copy without LICENSE, its version missing from the changelog and no trainer."""
    name = "liver_ct_mri_transfer"
    broken = tmp_path / "bundles"
    shutil.copytree(BUNDLES / name, broken / name, ignore=shutil.ignore_patterns("models", "eval", "__pycache__"))
    (broken / name / "LICENSE").unlink()
    meta_file = broken / name / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta["version"] = "9.9.9"
    meta_file.write_text(json.dumps(meta, indent=4))
    train_file = broken / name / "configs" / "train.json"
    train = json.loads(train_file.read_text())
    del train["train"]["trainer"]
    train_file.write_text(json.dumps(train, indent=4))
    proc = check([name], tmp_path, broken)
    assert proc.returncode == 1
    assert f"FAIL {name}: required files" in proc.stdout and "LICENSE" in proc.stdout
    assert f"FAIL {name}: version in changelog" in proc.stdout and "9.9.9" in proc.stdout
    assert f"FAIL {name}: ConfigWorkflow check_properties train.json" in proc.stdout
    assert f"PASS {name}: verify_net_in_out (inference.json)" in proc.stdout  # the rest is still checked


@pytest.mark.parametrize("name", bundle_names())
def test_bundle_code_is_named_only_through_target(name):
    """`imports` and `$` expressions are evaluated before MONAI puts the bundle folder on sys.path, so the
    bundle's `scripts` and its vendored `shared_transforms` (archives) are reachable only via `_target_`."""
    for config in sorted((BUNDLES / name / "configs").glob("*.json")):
        def walk(node, where):
            if isinstance(node, dict):
                for key, value in node.items():
                    walk(value, f"{where}#{key}")
            elif isinstance(node, list):
                for i, value in enumerate(node):
                    walk(value, f"{where}#{i}")
            elif isinstance(node, str) and node.startswith("$"):
                assert not re.search(r"\b(shared_transforms|scripts)\b", node), f"{config.name} {where}: {node}"
        walk(json.loads(config.read_text()), config.stem)


def _png_source(path) -> str:
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 200, path
        return im.text.get("Source", "")


@pytest.mark.parametrize("name", bundle_names())
def test_metadata_and_docs_review_items(name):
    """The Model Zoo review items of issue 15: data sources with URLs and their terms, value_range where known,
    eval_metrics only measured (each key in the README, the phantom figure equal to the run that made the
    docs' PNGs), README License and TensorRT sections, the phantom PNGs labelled as phantom."""
    bundle = BUNDLES / name
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    readme = (bundle / "docs" / "README.md").read_text()
    urls = re.findall(r"https?://[^\s;,)]+", meta["data_source"])
    assert urls, meta["data_source"]
    terms = (bundle / "docs" / "data_license.txt").read_text()
    assert all(u in terms for u in urls), (urls, terms)
    for part in ("inputs", "outputs"):
        for key, fmt in meta["network_data_format"][part].items():
            vr = fmt["value_range"]
            assert vr == [] or (len(vr) == 2 and all(isinstance(v, (int, float)) for v in vr) and vr[0] < vr[1]), vr
    metrics = meta["eval_metrics"]
    assert metrics and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()), metrics
    assert not any("paper" in k for k in metrics), "paper numbers belong in the README"
    run = json.loads((bundle / "docs" / "phantom_run.json").read_text())
    phantom = {k: v for k, v in metrics.items() if k.startswith("phantom_")}
    assert phantom and phantom == run["eval_metrics"], (phantom, run)  # measured by scripts/docs_figures.py
    for key in set(metrics) - set(phantom):  # a real-data figure: named by its data, explained in the README
        assert key.startswith("real_") and f"`{key}`" in readme, key
    for png in ("learning_curves.png", "overlay.png"):
        assert "PHANTOM DATA" in _png_source(bundle / "docs" / png) and f"]({png})" in readme
    assert "\n## License\n" in readme and "data_license.txt" in readme
    assert "### TensorRT" in readme
    has_trt = (bundle / "configs" / "inference_trt.json").is_file()
    assert has_trt or "Not supported/tested" in readme


def test_value_range_of_the_known_inputs():
    """Liver: percentile scaling clipped to [0, 1]; polyp: [0, 1] RGB after ImageNet normalisation (computed here)."""
    liver = json.loads((BUNDLES / "liver_ct_mri_transfer" / "configs" / "metadata.json").read_text())
    assert liver["network_data_format"]["inputs"]["image"]["value_range"] == [0.0, 1.0]
    polyp = json.loads((BUNDLES / "polyp_kdas_student" / "configs" / "metadata.json").read_text())
    inference = json.loads((BUNDLES / "polyp_kdas_student" / "configs" / "inference.json").read_text())
    mean, std = inference["imagenet_mean"], inference["imagenet_std"]
    low, high = min(-m / s for m, s in zip(mean, std)), max((1 - m) / s for m, s in zip(mean, std))
    assert polyp["network_data_format"]["inputs"]["image"]["value_range"] == pytest.approx([low, high], abs=1e-4)


def test_bundle_scripts_follow_the_model_zoo_code_format():
    """black/isort/flake8 at 120 columns, as ruff (pyproject.toml [tool.ruff]), on every bundle's scripts/."""
    folders = [str(p) for p in sorted(BUNDLES.glob("*/scripts"))]
    for cmd in (["format", "--check", "--diff"], ["check"]):
        proc = subprocess.run([sys.executable, "-m", "ruff", *cmd, *folders], cwd=REPO, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
