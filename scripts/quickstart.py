"""Quick start: phantom data -> brief training -> evaluation -> inference, for every bundle.

Generates small synthetic datasets in each method's real layout, runs each bundle in
``bundles/`` through the documented ``python -m monai.bundle run ...`` commands with small
sizes, and prints a table of test Dice per bundle with where its outputs were written.

    python scripts/quickstart.py                       # every bundle, outputs in ./quickstart_outputs
    python scripts/quickstart.py --names "[prostate_mri_transfer]" --out_dir /tmp/qs
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import fire
from bundle_cli import BUNDLES, bundle_cmd, make_phantoms, run_logged


def _result(bundle: str, root: Path, masks: Path, overrides: dict | None = None, **more_outputs: Path) -> dict:
    """A bundle's test Dice (from its evaluation), where its outputs are and the size overrides it ran with
    (network and image sizes: its weights fit the bundle's configs with these values)."""
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    outputs = {
        "metrics": root / "eval" / "metrics.csv",
        "overlays": root / "eval" / "overlays",
        "masks": masks,
        "tensorboard": root / "eval" / "tensorboard",
        "learning curves": root / "eval" / "learning_curves.png",
        **more_outputs,
    }
    return {"bundle": bundle, "dice": metrics["mean_dice"], "outputs": outputs, "overrides": overrides or {}}


def prostate_mri_transfer(out: Path, epochs: int) -> dict:
    """Train on phantom RUNMC (site A), evaluate on its held-out cases, segment the BMC volumes."""
    bundle = "prostate_mri_transfer"
    root = out / bundle
    root.mkdir(parents=True, exist_ok=True)
    log = root / "quickstart.log"
    data = out / "data" / "prostate"
    make_phantoms("prostate", data, log, cases_per_site=8, shape="(64,64,12)")
    small = dict(bundle_root=str(root), dataset_dir=str(data), image_size=64, encoder="efficientnet-b0", batch_size=8)
    run_logged(bundle_cmd(bundle, ["train.json"], "training", sites=["RUNMC"], epochs=epochs, resume=False, **small), log)
    run_logged(bundle_cmd(bundle, ["train.json", "evaluate.json"], "evaluating", sites=["RUNMC"], **small), log)
    infer_out = root / "eval" / "inference"
    run_logged(
        bundle_cmd(
            bundle, ["inference.json"], "run", bundle_root=str(root), dataset_dir=str(data / "BMC"),
            output_dir=str(infer_out), image_size=64, encoder="efficientnet-b0",
        ),
        log,
    )
    return _result(bundle, root, infer_out, overrides={"image_size": 64, "encoder": "efficientnet-b0"})


def liver_ct_mri_transfer(out: Path, epochs: int) -> dict:
    """Pre-train on phantom LiTS CT, fine-tune on phantom MRI (model B), evaluate, segment the test volumes."""
    bundle = "liver_ct_mri_transfer"
    root = out / bundle
    root.mkdir(parents=True, exist_ok=True)
    log = root / "quickstart.log"
    ct = make_phantoms("liver_ct", out / "data" / "liver_ct", log, cases=4, shape="(64,64,24)")
    mri = make_phantoms("liver_mri", out / "data" / "liver_mri", log, cases=10, shape="(64,52,16)")
    small = dict(bundle_root=str(root), image_size=64, channels=[16, 32, 64, 128])
    run_logged(bundle_cmd(bundle, ["train.json", "pretrain_ct.json"], "training", dataset_dir=str(ct), epochs=max(1, epochs // 4),
                          val_fraction=0.25, resume=False, **small), log)
    run_logged(bundle_cmd(bundle, ["train.json"], "training", dataset_dir=str(mri), transfer="finetune",
                          source_ckpt=str(root / "models" / "ct" / "model.pt"), epochs=epochs, batch_size=8, resume=False, **small), log)
    run_logged(bundle_cmd(bundle, ["train.json", "evaluate.json"], "evaluating", dataset_dir=str(mri), **small), log)
    infer_out = root / "eval" / "inference"
    run_logged(bundle_cmd(bundle, ["inference.json"], "run", dataset_dir=str(mri / "case_009"), output_dir=str(infer_out),
                          datalist=[{"image": str(mri / "case_009" / "artery.nii.gz")}], **small), log)
    return _result(bundle, root, infer_out, overrides={"image_size": 64, "channels": [16, 32, 64, 128]},
                   **{"dropped cases": root / "eval" / "bad_cases.json"})


def polyp_kdas_student(out: Path, epochs: int) -> dict:
    """Train the B2 teacher, distil the B0 student from it, evaluate on the five test sets, segment Kvasir frames."""
    bundle = "polyp_kdas_student"
    root = out / bundle
    root.mkdir(parents=True, exist_ok=True)
    log = root / "quickstart.log"
    data = make_phantoms("polyp", out / "data" / "polyp", log, train=24, per_test_set=4, size=64)
    small = dict(bundle_root=str(root), dataset_dir=str(data), image_size=64, size_multiple=16)
    run_logged(bundle_cmd(bundle, ["train_teacher.json"], "training", epochs=max(1, epochs // 2), batch_size=8,
                          resume=False, **small), log)
    run_logged(bundle_cmd(bundle, ["train.json"], "training", epochs=epochs, batch_size=8, resume=False,
                          teacher_ckpt=str(root / "models" / "teacher" / "model.pt"), **small), log)
    run_logged(bundle_cmd(bundle, ["train.json", "evaluate.json"], "evaluating", **small), log)
    infer_out = root / "eval" / "inference"
    run_logged(bundle_cmd(bundle, ["inference.json"], "run", bundle_root=str(root), image_size=64, output_dir=str(infer_out),
                          dataset_dir=str(data / "TestDataset" / "Kvasir" / "images")), log)
    test = root / "eval" / "test"
    metrics = json.loads((test / "metrics.json").read_text())  # mean over test images of the threshold-averaged Dice, %
    outputs = {"metrics": test / "metrics.csv", "overlays": test / "overlays", "masks": infer_out,
               "tensorboard": root / "eval" / "tensorboard", "learning curves": root / "eval" / "learning_curves.png",
               "teacher": root / "models" / "teacher" / "model.pt", "dropped cases": root / "eval" / "bad_cases.json"}
    return {"bundle": bundle, "dice": metrics["mean_dice"], "outputs": outputs, "overrides": {"image_size": 64}}


def cardiac_qc_refinement(out: Path, epochs: int) -> dict:
    """SA view: train segmenter M and QC module R, refine on the unlabelled OoD vendor, evaluate (QC selection), segment the OoD volumes."""
    bundle = "cardiac_qc_refinement"
    root = out / bundle
    root.mkdir(parents=True, exist_ok=True)
    log = root / "quickstart.log"
    data = make_phantoms("cardiac", out / "data" / "cardiac", log, subjects=10, ood_subjects=3, sa_shape="(64,64,6)")
    sizes = {"image_size": 64, "filters": [16, 32, 64, 128], "deep_supr_num": 2}
    # clean phantoms, a short run: no augmentation (on by default for real data)
    small = dict(bundle_root=str(root), dataset_dir=str(data), augment=False, **sizes)
    adam = "$torch.optim.Adam(@network.parameters(), lr=0.001)"
    run_logged(bundle_cmd(bundle, ["train.json"], "training", epochs=epochs, batch_size=8, resume=False,
                          optimizer=adam, **small), log)
    run_logged(bundle_cmd(bundle, ["train.json", "train_qc.json"], "training", epochs=epochs, batch_size=8,
                          learning_rate=0.002, resume=False, **small), log)
    run_logged(bundle_cmd(bundle, ["train.json", "refine.json"], "refining", K_semi=3, batch_size=8,  # M's optimiser goes on
                          threshold_source="calibration", optimizer=adam, refine_learning_rate=0.001, **small), log)
    run_logged(bundle_cmd(bundle, ["train.json", "evaluate.json"], "evaluating", **small), log)
    infer_out = root / "eval" / "inference"
    run_logged(bundle_cmd(bundle, ["inference.json"], "run", bundle_root=str(root), dataset_dir=str(data / "011"),
                          output_dir=str(infer_out), threshold_source="calibration", **sizes), log)
    metrics = json.loads((root / "eval" / "metrics.json").read_text())  # RV Dice (the challenge's class), 0-1
    outputs = {"metrics": root / "eval" / "metrics.csv", "QC reports": root / "eval" / "qc_reports", "masks": infer_out,
               "refinement log": root / "eval" / "refine" / "refine_log.json",
               "tensorboard": root / "eval" / "tensorboard", "learning curves": root / "eval" / "learning_curves.png"}
    return {"bundle": bundle, "dice": 100 * metrics["mean_dice_RV"], "outputs": outputs, "overrides": sizes}


#: one recipe per bundle; a bundle added to bundles/ adds its recipe here
RECIPES = {"prostate_mri_transfer": prostate_mri_transfer, "liver_ct_mri_transfer": liver_ct_mri_transfer,
           "polyp_kdas_student": polyp_kdas_student, "cardiac_qc_refinement": cardiac_qc_refinement}


def main(out_dir: str = "quickstart_outputs", names: list[str] | None = None, epochs: int = 20) -> None:
    """Run every bundle (or ``names``) on phantoms and print the Dice table.

    Args:
        out_dir: folder for phantom data, checkpoints and all outputs.
        names: bundle names to run (default: every bundle in bundles/ that has a recipe).
        epochs: training epochs per bundle.
    """
    out = Path(out_dir).resolve()
    available = sorted(p.name for p in BUNDLES.iterdir() if (p / "configs" / "metadata.json").is_file())
    names = list(names) if names else available
    missing = [n for n in names if n not in RECIPES]
    if missing:
        raise SystemExit(f"no quick-start recipe for {missing}; known: {sorted(RECIPES)}")
    results = []
    for name in names:
        start = time.perf_counter()
        print(f"\n=== {name} ===", flush=True)
        result = RECIPES[name](out, epochs)
        result["minutes"] = (time.perf_counter() - start) / 60
        results.append(result)
    (out / "quickstart_results.json").write_text(json.dumps(results, indent=4, default=str) + "\n")
    print("\n| bundle | test Dice % (phantoms) | minutes |\n|---|---:|---:|")
    for r in results:
        print(f"| {r['bundle']} | {r['dice']:.2f} | {r['minutes']:.1f} |")
    for r in results:
        print(f"\n{r['bundle']} outputs:")
        for what, path in r["outputs"].items():
            print(f"  {what:<16} {path}")


if __name__ == "__main__":
    fire.Fire(main)
