"""Eval-mode against batch-statistics Dice of a short prostate training run, per BatchNorm momentum.

A model whose BatchNorm running statistics lag its weights predicts well in train mode (batch
statistics) and badly in eval mode (running statistics), which is what evaluation, inference
and MONAI Label use. For each ``bn_momentum`` this trains the prostate bundle (train.json
through the MONAI CLI, the given overrides), then scores ``models/model.pt`` on every case
of the split (training, validation and test) both ways: eval mode, and BatchNorm in train mode
with one case's slices as the batch (on a copy of the network, everything else in eval mode).
Writes ``bn_check.csv`` and ``bn_check.md`` into OUT.

    python scripts/prostate_bn_check.py compare DATA OUT --sites "['RUNMC']" --epochs 25 --image_size 160
    python scripts/prostate_bn_check.py compare DATA OUT --momenta "[0.01,0.1]" --encoder efficientnet-b0
    python scripts/prostate_bn_check.py score RUN_ROOT --overrides "{'image_size': 128}"   # one trained run
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import fire
import numpy as np
import torch
from bundle_cli import BUNDLES, bundle_cmd, run_logged
from tables import write_csv

BUNDLE = "prostate_mri_transfer"


def _case_dice(network, slices: list[dict], batch_statistics: bool) -> float:
    """Dice (%) of one case, pooled over its slices, with BatchNorm's running or batch statistics.

    Batch statistics are taken on a copy of the network with only its BatchNorm layers in train
    mode (dropout and drop-connect stay off), so scoring one case never moves the running
    statistics that the next case is scored with; eval mode changes no state.
    """
    net = copy.deepcopy(network).eval() if batch_statistics else network.eval()
    if batch_statistics:
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.train()
    images = torch.stack([torch.as_tensor(s["image"]) for s in slices]).float()
    labels = torch.stack([torch.as_tensor(s["label"]) for s in slices]) > 0.5
    with torch.no_grad():
        pred = torch.sigmoid(net(images)) > 0.5
    tp = float((pred & labels).sum())
    total = float(pred.sum() + labels.sum())
    return 100.0 * 2 * tp / total if total else 100.0


def score(root: str | Path, overrides: dict | None = None) -> list[dict]:
    """Per case of a trained run's datalist: eval-mode and train-mode Dice of ``ROOT/models/model.pt``.

    Writes them to ``ROOT/eval/bn_score.json``.

    Args:
        root: the run's ``bundle_root``.
        overrides: the train.json overrides the run used (``image_size``, ``encoder``, ...).
    """
    import sys

    from monai.bundle import ConfigParser
    from shared_transforms.files import write_json

    root = Path(root).resolve()
    overrides = dict(overrides or {})

    sys.path.insert(0, str(BUNDLES / BUNDLE))
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / BUNDLE / "configs" / "train.json"))
    parser.update({**overrides, "bundle_root": str(root)})
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True))
    datalist = json.loads((root / "eval" / "datalist.json").read_text())
    volume = parser.get_parsed_content("validate#preprocessing")
    rows = []
    for part in ("training", "validation", "test"):
        for case in datalist[part]:
            slices = volume(case)
            rows.append({"case": case["case"], "part": part, "slices": len(slices),
                         "eval_dice": _case_dice(network, slices, False), "train_mode_dice": _case_dice(network, slices, True)})
    write_json(root / "eval" / "bn_score.json", rows)
    return rows


def compare(data: str, out: str, momenta: list[float] = (0.01, 0.1), epochs: int = 25, sites: list[str] = ("RUNMC",),
         image_size: int = 160, encoder: str = "efficientnet-b3", n_folds: int = 2, seed: int = 0,
         overrides: dict | None = None) -> list[dict]:
    """Train once per BatchNorm momentum and compare eval-mode with batch-statistics Dice.

    Args:
        data: the multi-site prostate layout (site folders with CaseNN[_segmentation].nii.gz).
        out: one run folder per momentum, and bn_check.csv / bn_check.md.
        momenta: BatchNorm momenta to compare (0.01 is the EfficientNet encoders' own).
        epochs: training epochs (a short run).
        sites: training sites.
        image_size: in-plane size of the training slices.
        encoder: smp encoder (the bundle's default family).
        n_folds: folds of the split (2 for a three-case site).
        seed: split and training seed.
        overrides: further train.json overrides.
    """
    out_dir = Path(out).resolve()
    rows = []
    for momentum in momenta:
        root = out_dir / f"bn_momentum_{momentum}"
        args = dict(dataset_dir=str(Path(data).resolve()), sites=list(sites), epochs=epochs, image_size=image_size,
                    encoder=encoder, n_folds=n_folds, seed=seed, bn_momentum=momentum,
                    cache_dir=str(out_dir / "cache"), **(overrides or {}))
        run_logged(bundle_cmd(BUNDLE, ["train.json"], "training", bundle_root=str(root), **args), root / "train.log")
        for r in score(root, {k: v for k, v in args.items() if k != "epochs"}):
            rows.append({"bn_momentum": momentum, **r})
            print(f"[bn] momentum {momentum}: {r['part']:10s} {r['case']:16s} eval-mode Dice {r['eval_dice']:6.2f} %, "
                  f"batch statistics {r['train_mode_dice']:6.2f} %", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out_dir / "bn_check.csv")
    lines = [f"{epochs} epochs, {encoder}, image_size {image_size}, sites {list(sites)}; per-case Dice %.", "",
             "| bn_momentum | part | case | eval mode | batch statistics |", "|---:|---|---|---:|---:|"]
    lines += [f"| {r['bn_momentum']} | {r['part']} | {r['case']} | {r['eval_dice']:.2f} | {r['train_mode_dice']:.2f} |" for r in rows]
    for momentum in momenta:
        mine = [r for r in rows if r["bn_momentum"] == momentum]
        lines.append(f"| {momentum} | **mean** | | {np.mean([r['eval_dice'] for r in mine]):.2f} | "
                     f"{np.mean([r['train_mode_dice'] for r in mine]):.2f} |")
    (out_dir / "bn_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    fire.Fire({"compare": compare, "score": score}, serialize=lambda r: None)
