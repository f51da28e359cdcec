"""Table II of the prostate in-domain transfer paper: architecture × encoder on one site.

Trains the prostate_mri_transfer bundle for every (architecture, encoder) pair and fold on one
site and reports the validation Dice (mean ± std over the folds) beside the paper's numbers.
Writes ``table2.csv``, ``table2.md`` and ``table2_heatmap.png`` into OUT_DIR.

    python scripts/prostate_backbone_grid.py DATA_ROOT OUT_DIR --site A --epochs 200
    python scripts/prostate_backbone_grid.py DATA_ROOT OUT_DIR --epochs 2 --folds "[0,1]" \
        --archs "[Unet]" --encoders "[resnet18]" --overrides "{'image_size': 64}"
"""

from __future__ import annotations

from pathlib import Path

import fire
import numpy as np
from bundle_cli import bundle_cmd, run_logged
from shared_transforms.datalist import PROSTATE_SITES
from tables import best_val_dice, heatmap, write_csv

BUNDLE = "prostate_mri_transfer"
SITE_FOLDERS = PROSTATE_SITES
ARCHS = ("Unet", "UnetPlusPlus", "MAnet", "DeepLabV3")
ENCODERS = ("efficientnet-b0", "efficientnet-b1", "efficientnet-b2", "efficientnet-b3", "resnet18", "resnet34", "resnet50")

#: Table II (validation Dice %, mean ± std over 5 folds, site A)
PAPER = {
    "efficientnet-b0": {"Unet": (87.79, 0.37), "UnetPlusPlus": (88.31, 1.37), "MAnet": (87.38, 2.14), "DeepLabV3": (88.07, 0.42)},
    "efficientnet-b1": {"Unet": (88.57, 2.33), "UnetPlusPlus": (88.18, 0.76), "MAnet": (88.06, 1.1), "DeepLabV3": (87.85, 1.5)},
    "efficientnet-b2": {"Unet": (89.09, 0.46), "UnetPlusPlus": (88.79, 0.05), "MAnet": (88.25, 0.35), "DeepLabV3": (87.59, 0.71)},
    "efficientnet-b3": {"Unet": (88.84, 1.76), "UnetPlusPlus": (89.27, 1.62), "MAnet": (88.71, 0.74), "DeepLabV3": (87.95, 1.21)},
    "resnet18": {"Unet": (86.72, 0.99), "UnetPlusPlus": (88.61, 0.64), "MAnet": (86.16, 1.5), "DeepLabV3": (87.5, 0.21)},
    "resnet34": {"Unet": (87.29, 1.03), "UnetPlusPlus": (87.81, 0.87), "MAnet": (88.17, 0.79), "DeepLabV3": (89.04, 0.13)},
    "resnet50": {"Unet": (87.14, 0.97), "UnetPlusPlus": (86.22, 2.99), "MAnet": (85.26, 0.43), "DeepLabV3": (88.93, 1.24)},
}


def main(
    data_root: str,
    out_dir: str,
    site: str = "A",
    epochs: int = 200,
    folds: list[int] = (0, 1, 2, 3, 4),
    archs: list[str] = ARCHS,
    encoders: list[str] = ENCODERS,
    seed: int = 0,
    pretrained: bool = False,
    overrides: dict | None = None,
) -> None:
    """Train every architecture × encoder × fold on one site; tabulate validation Dice.

    Args:
        data_root: the multi-site layout (RUNMC/, BMC/, I2CVB/).
        out_dir: runs, logs and tables.
        site: A, B or C (the paper used A).
        epochs: training epochs per run (paper: 200).
        folds: folds to run; mean ± std is over these.
        archs: smp architectures.
        encoders: smp encoders.
        seed: split and training seed.
        pretrained: ImageNet encoder weights (the paper's setting; needs them available).
        overrides: further bundle overrides, e.g. ``{'image_size': 64}``.
    """
    out = Path(out_dir).resolve()
    common = {"dataset_dir": str(Path(data_root).resolve()), "sites": [SITE_FOLDERS[site]], "epochs": epochs,
              "seed": seed, "pretrained": pretrained, "cache_dir": str(out / "cache"), **(overrides or {})}
    rows = []
    for encoder in encoders:
        for arch in archs:
            scores = []
            for fold in folds:
                root = out / "runs" / f"{arch}_{encoder}_fold{fold}"
                if not (root / "done").is_file():
                    print(f"\n--- {arch} / {encoder} / fold {fold} ---", flush=True)
                    cmd = bundle_cmd(BUNDLE, ["train.json"], "training", bundle_root=str(root), arch=arch,
                                     encoder=encoder, fold=fold, **common)
                    run_logged(cmd, root / "train.log")
                    (root / "done").write_text("ok\n")
                scores.append(100 * best_val_dice(root / "eval" / "learning_curves.csv"))
            paper = PAPER.get(encoder, {}).get(arch, (None, None))
            rows.append({"encoder": encoder, "arch": arch, "val_dice_mean": round(float(np.mean(scores)), 2),
                         "val_dice_std": round(float(np.std(scores)), 2), "folds": len(scores),
                         "paper_mean": paper[0], "paper_std": paper[1]})
    write_tables(rows, out, site, epochs, pretrained or bool(common.get("pretrained_path")))


def write_tables(rows: list[dict], out: Path, site: str, epochs: int, imagenet: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "table2.csv")
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    encoders = list(dict.fromkeys(r["encoder"] for r in rows))
    cell = {(r["encoder"], r["arch"]): r for r in rows}
    start = "ImageNet encoder weights" if imagenet else "randomly initialised encoders (scratch; the paper used ImageNet weights)"
    lines = [f"Validation Dice % on site {site}, mean ± std over folds ({epochs} epochs, {start}); paper in brackets.", "",
             "| encoder | " + " | ".join(archs) + " |", "|---|" + "---:|" * len(archs)]
    for enc in encoders:
        cells = []
        for arch in archs:
            r = cell.get((enc, arch))
            paper = f" ({r['paper_mean']} ± {r['paper_std']})" if r and r["paper_mean"] is not None else ""
            cells.append(f"{r['val_dice_mean']:.2f} ± {r['val_dice_std']:.2f}{paper}" if r else "-")
        lines.append(f"| {enc} | " + " | ".join(cells) + " |")
    (out / "table2.md").write_text("\n".join(lines) + "\n")

    grid = np.array([[cell[(e, a)]["val_dice_mean"] if (e, a) in cell else np.nan for a in archs] for e in encoders])
    heatmap(grid, encoders, archs, out / "table2_heatmap.png", f"validation Dice on site {site}", "validation Dice %")
    print(f"\nwrote {out / 'table2.csv'}, {out / 'table2.md'}, {out / 'table2_heatmap.png'}")
    print("\n".join(lines))


if __name__ == "__main__":
    fire.Fire(main)
