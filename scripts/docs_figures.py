"""The learning-curve and overlay PNGs in each bundle's docs/, from a short run on PHANTOM data.

For every bundle: phantoms in the published layout (scripts/phantoms.py), a short CPU
training with the bundle's own configs (small sizes), its evaluation, and then
``docs/learning_curves.png`` (the run's learning curves) and ``docs/overlay.png`` (the first
evaluation overlay), each with a banner and a PNG text field saying it is phantom data.
``docs/phantom_run.json`` keeps the commands' settings and the measured test metric: what
the bundle's ``eval_metrics`` may quote as ``phantom_*`` (never a result on real scans).

    python scripts/docs_figures.py                      # all four bundles, about 10 minutes on 2 CPU cores
    python scripts/docs_figures.py --bundles "['prostate_mri_transfer']" --work_dir /tmp/figs
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import fire
from bundle_cli import BUNDLES, bundle_cmd, make_phantoms, run_logged

BANNER = "PHANTOM DATA (scripts/phantoms.py): shows the bundle's outputs, not a result on real scans"
ADAM = "$torch.optim.Adam(@network.parameters(), lr=0.002)"


def _prostate(work: Path, log: Path) -> dict:
    data = make_phantoms("prostate", work / "data", log, cases_per_site=8, shape="(64,64,12)", seed=1)
    args = dict(bundle_root=str(work / "run"), dataset_dir=str(data), sites=["RUNMC"], image_size=64,
                encoder="efficientnet-b0", batch_size=8)
    train = dict(epochs=20)
    run_logged(bundle_cmd("prostate_mri_transfer", ["train.json"], "training", **args, **train), log)
    run_logged(bundle_cmd("prostate_mri_transfer", ["train.json", "evaluate.json"], "evaluating", **args), log)
    metrics = json.loads((work / "run" / "eval" / "metrics.json").read_text())
    return {"settings": {**args, **train}, "eval_dir": work / "run" / "eval", "overlays": "overlays",
            "metric": ("phantom_test_mean_case_dice", metrics["mean_dice"] / 100)}


def _liver(work: Path, log: Path) -> dict:
    ct = make_phantoms("liver_ct", work / "lits", log, cases=4, shape="(64,64,24)")
    mri = make_phantoms("liver_mri", work / "mri", log, cases=10, shape="(64,52,16)")
    small = dict(image_size=64, channels=[8, 16, 32, 64])
    run_logged(bundle_cmd("liver_ct_mri_transfer", ["train.json", "pretrain_ct.json"], "training",
                          bundle_root=str(work / "ct"), dataset_dir=str(ct), epochs=2, val_fraction=0.25,
                          n_liver_slices=10, n_background_slices=6, **small), log)
    args = dict(bundle_root=str(work / "run"), dataset_dir=str(mri), **small)
    train = dict(transfer="finetune", source_ckpt=str(work / "ct" / "models" / "ct" / "model.pt"), epochs=8,
                 batch_size=8)
    run_logged(bundle_cmd("liver_ct_mri_transfer", ["train.json"], "training", **args, **train), log)
    run_logged(bundle_cmd("liver_ct_mri_transfer", ["train.json", "evaluate.json"], "evaluating", **args), log)
    metrics = json.loads((work / "run" / "eval" / "metrics.json").read_text())
    return {"settings": {**args, **train, "ct_pretraining_epochs": 2}, "eval_dir": work / "run" / "eval",
            "overlays": "overlays", "metric": ("phantom_test_mean_case_dice", metrics["mean_dice"] / 100)}


def _polyp(work: Path, log: Path) -> dict:
    data = make_phantoms("polyp", work / "polyp", log, train=12, per_test_set=2, size=64)
    args = dict(bundle_root=str(work / "run"), dataset_dir=str(data), image_size=64, size_multiple=16, batch_size=4)
    run_logged(bundle_cmd("polyp_kdas_student", ["train_teacher.json"], "training", epochs=4, **args), log)
    run_logged(bundle_cmd("polyp_kdas_student", ["train.json"], "training", epochs=4, **args), log)
    run_logged(bundle_cmd("polyp_kdas_student", ["train.json", "evaluate.json"], "evaluating", **args), log)
    metrics = json.loads((work / "run" / "eval" / "test" / "metrics.json").read_text())
    return {"settings": {**args, "teacher_epochs": 4, "student_epochs": 4}, "eval_dir": work / "run" / "eval",
            "overlays": "test/overlays", "metric": ("phantom_test_mean_mdice", metrics["mean_dice"] / 100)}


def _cardiac(work: Path, log: Path) -> dict:
    data = make_phantoms("cardiac", work / "mnm2", log, subjects=8, ood_subjects=3, sa_shape="(64,64,4)")
    args = dict(bundle_root=str(work / "run"), dataset_dir=str(data), image_size=64, filters=[8, 16, 32, 64],
                deep_supr_num=2)
    run_logged(bundle_cmd("cardiac_qc_refinement", ["train.json"], "training", epochs=10, batch_size=4, m_best=3,
                          optimizer=ADAM, augment=False, **args), log)
    run_logged(bundle_cmd("cardiac_qc_refinement", ["train.json", "train_qc.json"], "training", epochs=6,
                          batch_size=4, learning_rate=0.002, **args), log)
    run_logged(bundle_cmd("cardiac_qc_refinement", ["train.json", "evaluate.json"], "evaluating", **args), log)
    metrics = json.loads((work / "run" / "eval" / "metrics.json").read_text())
    return {"settings": {**args, "segmenter_epochs": 10, "optimizer": "Adam lr 0.002", "qc_epochs": 6},
            "eval_dir": work / "run" / "eval", "overlays": "overlays",
            "metric": ("phantom_test_mean_dice_rv", metrics["mean_dice_RV"])}


RECIPES = {"prostate_mri_transfer": _prostate, "liver_ct_mri_transfer": _liver, "polyp_kdas_student": _polyp,
           "cardiac_qc_refinement": _cardiac}


def label_png(src: Path, dst: Path, text: str = BANNER) -> None:
    """``src`` with a banner above it saying ``text``, and ``text`` in the PNG's ``Source`` field, as ``dst``."""
    from PIL import Image, ImageDraw, ImageFont
    from PIL.PngImagePlugin import PngInfo

    with Image.open(src) as im:
        image = im.convert("RGB")
    try:
        font = ImageFont.load_default(size=max(10, image.width // 55))
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    lines, words = [""], text.split()
    for word in words:  # wrapped to the image's width
        trial = f"{lines[-1]} {word}".strip()
        if lines[-1] and font.getbbox(trial)[2] > image.width - 12:
            lines.append(word)
        else:
            lines[-1] = trial
    step = int(font.getbbox(text)[3] * 1.4) + 2
    height = step * len(lines) + 6
    out = Image.new("RGB", (image.width, image.height + height), (255, 236, 179))
    out.paste(image, (0, height))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((6, 3 + i * step), line, fill=(120, 40, 0), font=font)
    info = PngInfo()
    info.add_text("Source", text)
    dst.parent.mkdir(parents=True, exist_ok=True)
    out.save(dst, pnginfo=info)


def main(bundles: list[str] | None = None, work_dir: str | None = None, keep: bool = False) -> dict:
    """Run each bundle on phantoms and write its docs/learning_curves.png, docs/overlay.png, docs/phantom_run.json.

    Args:
        bundles: bundle names (default: all four).
        work_dir: where the runs go (default: a temporary folder, removed at the end unless ``keep``).
        keep: keep the runs.
    """
    names = list(bundles or RECIPES)
    root = Path(work_dir or tempfile.mkdtemp(prefix="docs_figures_")).resolve()
    results = {}
    for name in names:
        work = root / name
        work.mkdir(parents=True, exist_ok=True)
        print(f"\n=== {name} (phantoms, CPU-sized run) ===", flush=True)
        run = RECIPES[name](work, work / "run.log")
        docs = BUNDLES / name / "docs"
        label_png(run["eval_dir"] / "learning_curves.png", docs / "learning_curves.png")
        overlay = sorted((run["eval_dir"] / run["overlays"]).glob("*.png"))[0]
        label_png(overlay, docs / "overlay.png")
        key, value = run["metric"]
        settings = {k: v for k, v in run["settings"].items() if k not in ("bundle_root", "dataset_dir", "source_ckpt")}
        record = {"data": "phantoms (scripts/phantoms.py), not real scans", "settings": settings,
                  "overlay_of": overlay.name, "eval_metrics": {key: round(float(value), 4)}}
        (docs / "phantom_run.json").write_text(json.dumps(record, indent=4) + "\n")
        results[name] = record["eval_metrics"]
        print(f"{name}: {key} = {value:.4f} -> {docs}", flush=True)
    if not (keep or work_dir):
        shutil.rmtree(root, ignore_errors=True)
    return results


if __name__ == "__main__":
    fire.Fire(main)
