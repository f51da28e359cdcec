"""Table III of the prostate in-domain transfer paper, through the prostate_mri_transfer bundle.

For every target site T in {A, B, C} (A = RUNMC, B = BMC, C = I2CVB), with INIT the first
stage's encoder initialisation ("ImageNet" with ``--pretrained True`` or a ``pretrained_path``
override, as in the paper; otherwise "scratch", and the rows say so):
  - baseline:             ImageNet -> T
  - single-source chains: ImageNet -> S -> T        for each other site S
  - double chains:        ImageNet -> S1 -> S2 -> T for both orders of the two other sites
  - All_Data:             ImageNet -> (A + B + C merged), tested on T's test cases
Each stage is one ``python -m monai.bundle run`` (train.json, then train.json + finetune.json
from the previous stage's best checkpoint). Stages shared by several chains are trained once.
Per chain the fold with the best validation Dice of the last stage is reported, as in the
paper. Writes ``table3.csv``, ``table3.md`` (ours beside the paper's numbers) and
``table3_heatmap.png`` into OUT_DIR.

    python scripts/prostate_transfer_grid.py DATA_ROOT OUT_DIR --epochs 200 --folds "[0,1,2,3,4]"
    python scripts/prostate_transfer_grid.py DATA_ROOT OUT_DIR --epochs 3 --folds "[0]" \
        --overrides "{'image_size': 64, 'encoder': 'efficientnet-b0'}"      # a quick smoke run
"""

from __future__ import annotations

import json
from pathlib import Path

import fire
import numpy as np
from bundle_cli import bundle_cmd, run_logged
from shared_transforms.datalist import PROSTATE_SITES
from tables import best_val_dice, heatmap, write_csv

BUNDLE = "prostate_mri_transfer"
SITE_FOLDERS = PROSTATE_SITES
ALL = "All_Data"

#: Table III of the paper: (source chain, target) -> (Dice %, IoU %); the baseline is the chain ()
PAPER = {
    ((), "A"): (89.09, 82.52), ((), "B"): (88.68, 81.41), ((), "C"): (87.11, 80.26),
    (("B",), "A"): (90.90, 84.34), (("C",), "A"): (92.34, 86.75),
    (("A",), "B"): (91.42, 84.89), (("C",), "B"): (91.22, 84.74),
    (("A",), "C"): (90.48, 83.34), (("B",), "C"): (88.27, 80.41),
    (("B", "C"), "A"): (91.65, 85.53), (("C", "B"), "A"): (91.48, 85.07),
    (("A", "C"), "B"): (91.62, 85.36), (("C", "A"), "B"): (90.89, 84.13),
    (("A", "B"), "C"): (89.36, 81.92), (("B", "A"), "C"): (89.94, 82.44),
    ((ALL,), "A"): (91.13, 84.83), ((ALL,), "B"): (90.83, 84.07), ((ALL,), "C"): (87.68, 80.48),
}


def chains_for(target: str) -> list[tuple[str, ...]]:
    """Source chains of Table III for one target, baseline first."""
    others = [s for s in "ABC" if s != target]
    return [(), *[(s,) for s in others], (others[0], others[1]), (others[1], others[0]), (ALL,)]


def init_name(pretrained: bool, overrides: dict | None = None) -> str:
    """The first stage's initialisation as the tables name it: ImageNet weights only when they are really loaded."""
    return "ImageNet" if pretrained or (overrides or {}).get("pretrained_path") else "scratch"


def chain_name(chain: tuple[str, ...], init: str = "ImageNet") -> str:
    return init if not chain else " → ".join(f"Site {s}" if s != ALL else ALL for s in chain)


class Grid:
    def __init__(self, data_root: str, out_dir: str, epochs: int, seed: int, overrides: dict, pretrained: bool):
        self.data_root = str(Path(data_root).resolve())
        self.out = Path(out_dir).resolve()
        self.common = {"dataset_dir": self.data_root, "epochs": epochs, "seed": seed, **overrides}
        self.common.setdefault("cache_dir", str(self.out / "cache"))
        self.pretrained = pretrained
        self.init = init_name(pretrained, overrides)

    def stage_dir(self, stages: tuple[str, ...], fold: int) -> Path:
        return self.out / "runs" / f"fold{fold}" / (f"{self.init}_" + "_".join(stages))

    def train(self, stages: tuple[str, ...], fold: int) -> Path:
        """Train the chain INIT -> stages[0] -> ... (each stage trained once); return its folder."""
        root = self.stage_dir(stages, fold)
        if (root / "models" / "model.pt").is_file() and (root / "done").is_file():
            return root
        sites = list(SITE_FOLDERS.values()) if stages[-1] == ALL else [SITE_FOLDERS[stages[-1]]]
        args = dict(self.common, bundle_root=str(root), sites=sites, fold=fold)
        if len(stages) == 1:
            cmd = bundle_cmd(BUNDLE, ["train.json"], "training", pretrained=self.pretrained, **args)
        else:
            source = self.train(stages[:-1], fold) / "models" / "model.pt"
            cmd = bundle_cmd(BUNDLE, ["train.json", "finetune.json"], "training", source_ckpt=str(source), **args)
        print(f"\n--- fold {fold}: train {self.init} → {' → '.join(stages)} ---", flush=True)
        run_logged(cmd, root / "train.log")
        (root / "done").write_text("ok\n")
        return root

    def test(self, root: Path, target: str, fold: int) -> dict:
        """Evaluate a trained model on the target site's held-out test cases."""
        out = root / "test" / target
        args = dict(self.common, bundle_root=str(root), sites=[SITE_FOLDERS[target]], fold=fold, output_dir=str(out))
        args.pop("epochs")
        run_logged(bundle_cmd(BUNDLE, ["train.json", "evaluate.json"], "evaluating", **args), root / "test.log")
        return json.loads((out / "metrics.json").read_text())


def main(
    data_root: str,
    out_dir: str,
    epochs: int = 200,
    folds: list[int] = (0, 1, 2, 3, 4),
    targets: list[str] = ("A", "B", "C"),
    seed: int = 0,
    pretrained: bool = False,
    overrides: dict | None = None,
) -> None:
    """Run Table III's protocol and write CSV/Markdown tables and a heatmap.

    Args:
        data_root: the multi-site layout (RUNMC/, BMC/, I2CVB/ with CaseNN[_segmentation].nii.gz).
        out_dir: where every run, log and table goes.
        epochs: epochs of every stage (paper: 200).
        folds: cross-validation folds to run; the best by validation Dice is reported.
        targets: target sites among A, B, C.
        seed: split and training seed.
        pretrained: start the first stage from ImageNet weights (needs them downloadable or
            a ``pretrained_path`` in ``overrides``).
        overrides: further bundle overrides, e.g. ``{'image_size': 64, 'encoder': 'efficientnet-b0'}``.
    """
    grid = Grid(data_root, out_dir, epochs, seed, dict(overrides or {}), pretrained)
    rows = []
    for target in targets:
        for chain in chains_for(target):
            stages = (*chain, target) if chain != (ALL,) else (ALL,)
            candidates = []
            for fold in folds:
                root = grid.train(stages, fold)
                candidates.append((best_val_dice(root / "eval" / "learning_curves.csv"), fold, root))
            val_dice, fold, root = max(candidates)
            metrics = grid.test(root, target, fold)
            paper = PAPER.get((chain, target), (None, None))
            rows.append({
                "source": chain_name(chain, grid.init), "target": f"Site {target}", "fold": fold,
                "val_dice": round(100 * val_dice, 2), "test_dice": round(metrics["mean_dice"], 2),
                "test_iou": round(metrics["mean_iou"], 2), "paper_dice": paper[0], "paper_iou": paper[1],
            })
            print(f"==> {chain_name(chain, grid.init)} → Site {target}: test Dice {metrics['mean_dice']:.2f} (paper {paper[0]})", flush=True)
    write_tables(rows, Path(out_dir).resolve(), epochs, folds, grid.init)


def write_tables(rows: list[dict], out: Path, epochs: int, folds, init: str = "ImageNet") -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "table3.csv")
    start = ("ImageNet encoder weights" if init == "ImageNet"
             else "a randomly initialised encoder (scratch; the paper started from ImageNet weights)")
    lines = [
        f"Test Dice/IoU (%) per target site; {epochs} epochs per stage, best of folds {list(folds)} by validation Dice;"
        f" every chain starts from {start}.",
        "",
        "| source weights | target | fold | Dice % | IoU % | paper Dice % | paper IoU % |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['source']} | {r['target']} | {r['fold']} | {r['test_dice']:.2f} | {r['test_iou']:.2f} | "
            f"{r['paper_dice'] if r['paper_dice'] is not None else '-'} | {r['paper_iou'] if r['paper_iou'] is not None else '-'} |"
        )
    (out / "table3.md").write_text("\n".join(lines) + "\n")
    sources = list(dict.fromkeys(r["source"] for r in rows))
    targets = list(dict.fromkeys(r["target"] for r in rows))
    grid = np.full((len(sources), len(targets)), np.nan)
    for r in rows:
        grid[sources.index(r["source"]), targets.index(r["target"])] = r["test_dice"]
    heatmap(grid, sources, [f"→ {t}" for t in targets], out / "table3_heatmap.png",
            "in-domain transfer: test Dice per target site", "test Dice %")
    print(f"\nwrote {out / 'table3.csv'}, {out / 'table3.md'}, {out / 'table3_heatmap.png'}")
    print("\n".join(lines))


if __name__ == "__main__":
    fire.Fire(main)
