"""Models A, B and C of the liver CT -> MRI transfer report, side by side.

Pre-trains the liver_ct_mri_transfer bundle on CT once, then trains on MRI
A from scratch (Xavier normal), B initialised from the CT model, C as B with the first two
levels frozen, and evaluates each on the MRI test cases. Writes into OUT_DIR:
``learning_curves.png`` (training loss and validation Dice of all three), ``comparison.csv`` /
``comparison.md`` (time per epoch, test Dice) and every run's own outputs under ``runs/``.

    python scripts/liver_transfer_compare.py CT_ROOT MRI_ROOT OUT_DIR
    python scripts/liver_transfer_compare.py CT_ROOT MRI_ROOT OUT_DIR --ct_epochs 1 --epochs 2 \
        --overrides "{'image_size': 64, 'channels': [16, 32, 64, 128]}"
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import fire
import numpy as np
from bundle_cli import bundle_cmd, run_logged
from tables import write_csv

BUNDLE = "liver_ct_mri_transfer"
MODELS = {"A": "scratch", "B": "finetune", "C": "finetune_freeze"}


def main(ct_root: str, mri_root: str, out_dir: str, ct_epochs: int = 5, epochs: int = 8, overrides: dict | None = None) -> None:
    """Pre-train on CT, train models A, B, C on MRI, and compare them.

    Args:
        ct_root: LiTS layout (volume-N / segmentation-N, optionally in 'Training Batch *').
        mri_root: MRI layout (<case>/artery + label).
        out_dir: runs, logs, plot and tables.
        ct_epochs: CT pre-training epochs (report: 5).
        epochs: MRI epochs per model (report: 8).
        overrides: further bundle overrides for every run, e.g. ``{'image_size': 64}``.
    """
    out = Path(out_dir).resolve()
    extra = dict(overrides or {})
    ct_run = out / "runs" / "ct"
    if not (ct_run / "done").is_file():
        print("\n--- CT pre-training ---", flush=True)
        run_logged(bundle_cmd(BUNDLE, ["train.json", "pretrain_ct.json"], "training", bundle_root=str(ct_run),
                              dataset_dir=str(Path(ct_root).resolve()), epochs=ct_epochs, **extra), ct_run / "train.log")
        (ct_run / "done").write_text("ok\n")
    source = ct_run / "models" / "ct" / "model.pt"
    rows, curves = [], {}
    for name, transfer in MODELS.items():
        root = out / "runs" / f"model_{name}_{transfer}"
        common = dict(bundle_root=str(root), dataset_dir=str(Path(mri_root).resolve()), **extra)
        if not (root / "done").is_file():
            print(f"\n--- model {name}: {transfer} ---", flush=True)
            run_logged(bundle_cmd(BUNDLE, ["train.json"], "training", transfer=transfer, source_ckpt=str(source),
                                  epochs=epochs, **common), root / "train.log")
            (root / "done").write_text("ok\n")
        run_logged(bundle_cmd(BUNDLE, ["train.json", "evaluate.json"], "evaluating", **common), root / "test.log")
        metrics = json.loads((root / "eval" / "metrics.json").read_text())
        curve = list(csv.DictReader(open(root / "eval" / "learning_curves.csv")))
        curves[name] = curve
        seconds = [float(r["epoch_seconds"]) for r in curve]
        rows.append({"model": name, "transfer": transfer, "epochs": len(curve),
                     "mean_epoch_seconds": round(float(np.mean(seconds)), 2),
                     "epoch_seconds": " ".join(f"{s:.1f}" for s in seconds),
                     "total_seconds": round(float(np.sum(seconds)), 1),
                     "test_dice": round(metrics["mean_dice"], 2), "test_dice_std": round(metrics["std_dice"], 2)})
    write_csv(rows, out / "comparison.csv")
    lines = ["| model | transfer | s / epoch (mean) | per epoch (s) | test Dice % |", "|---|---|---:|---|---:|"]
    lines += [f"| {r['model']} | {r['transfer']} | {r['mean_epoch_seconds']:.2f} | {r['epoch_seconds']} | "
              f"{r['test_dice']:.2f} ± {r['test_dice_std']:.2f} |" for r in rows]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    plot_curves(curves, out / "learning_curves.png")
    print("\n".join(lines))
    print(f"\nwrote {out / 'learning_curves.png'}, {out / 'comparison.csv'}, {out / 'comparison.md'}")


def plot_curves(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    for name, curve in curves.items():
        epochs = [int(r["epoch"]) for r in curve]
        label = f"{name} ({MODELS[name]})"
        ax_loss.plot(epochs, [float(r["train_loss"]) for r in curve], "o-", label=label)
        ax_dice.plot(epochs, [float(r["val_mean_dice"]) for r in curve], "s-", label=label)
    ax_loss.set(xlabel="epoch", ylabel="training BCE", title="training loss")
    ax_dice.set(xlabel="epoch", ylabel="validation Dice", title="validation Dice")
    ax_loss.legend()
    ax_dice.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    fire.Fire(main)
