"""The polyp literature's metrics and the per-test-set evaluation report.

Threshold-averaged mDice / mIoU (METHODS §2, as the PraNet evaluation computes them): for
256 thresholds t = 1, 254/255, ..., 0, per-image Dice and IoU of (pred ≥ t) against
(gt > 0.5), 0 when TP = 0; mean over the images, then over the thresholds. The plain Dice /
IoU at 0.5 are reported beside them (same TP = 0 rule), labelled as such.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from shared_transforms.files import write_json

__all__ = ["THRESHOLDS", "threshold_dice_iou", "dice_iou_at", "PolypReport", "PAPER_TABLE1"]

logger = logging.getLogger(__name__)

#: 1 down to 0 in steps of 1/255, computed as k/255 so that they match uint8-quantised maps exactly
THRESHOLDS = np.arange(255, -1, -1) / 255.0

#: KDAS student, paper Table 1 (mDice, mIoU); CVC-300 is not reported there
PAPER_TABLE1 = {
    "Kvasir": (0.913, 0.848),
    "CVC-ClinicDB": (0.925, 0.872),
    "CVC-ColonDB": (0.759, 0.679),
    "ETIS-LaribPolypDB": (0.755, 0.677),
}


def threshold_dice_iou(prob: np.ndarray, gt: np.ndarray, thresholds: np.ndarray = THRESHOLDS) -> tuple[np.ndarray, np.ndarray]:
    """Per-threshold Dice and IoU of one image (arrays of ``len(thresholds)``), 0 where TP = 0.

    Counts come from the sorted probabilities, so the 256 thresholds cost one sort.
    """
    prob = np.asarray(prob, dtype=np.float64).ravel()
    gt = np.asarray(gt).ravel() > 0.5
    pos, neg = np.sort(prob[gt]), np.sort(prob[~gt])
    tp = pos.size - np.searchsorted(pos, thresholds, side="left")  # pixels with prob >= t
    fp = neg.size - np.searchsorted(neg, thresholds, side="left")
    fn = pos.size - tp
    tp, fp, fn = tp.astype(np.float64), fp.astype(np.float64), fn.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        dice = np.where(tp > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
        iou = np.where(tp > 0, tp / (tp + fp + fn), 0.0)
    return dice, iou


def dice_iou_at(prob: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> tuple[float, float]:
    """Plain Dice and IoU of (prob ≥ threshold), 0 when TP = 0."""
    d, i = threshold_dice_iou(prob, gt, np.array([threshold]))
    return float(d[0]), float(i[0])


class PolypReport:
    """Evaluation handler: per test set mDice / mIoU (threshold-averaged) and Dice / IoU at 0.5.

    Reads the evaluator's items: ``pred`` = logits ``(1, h, w)`` at the network's size,
    ``label`` = the mask at its original size. The logits are resized bilinearly to the mask
    and passed through a sigmoid. By default the map is then processed as the published
    pipeline does before its evaluation (Polyp-PVT ``Test.py``): min-max normalised to [0, 1]
    per image (``minmax``) and saved as 8-bit, i.e. quantised to k/255 (``quantise_uint8``).
    ``minmax=False, quantise_uint8=False`` evaluates the raw sigmoid; every table says which
    it used. The plain Dice / IoU at 0.5 are always computed on the raw sigmoid (the mask
    ``inference.json`` writes). Writes ``per_image.csv``, ``metrics.csv``, ``metrics.md``
    (with the paper's Table 1 beside), ``metrics.json`` and ``overlays/<set>_<case>.png``
    (``num_overlays`` per set) into ``output_dir``.
    """

    def __init__(self, output_dir: str, num_overlays: int = 2, minmax: bool = True, quantise_uint8: bool = True,
                 title: str = "") -> None:
        self.output_dir = Path(output_dir)
        self.num_overlays = num_overlays
        self.minmax, self.quantise_uint8 = bool(minmax), bool(quantise_uint8)
        self.title = title
        self.rows: list[dict] = []
        self.curves: dict[str, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
        self._overlays: dict[str, int] = defaultdict(int)

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def reset(self, engine=None) -> None:
        self.rows.clear()
        self.curves.clear()
        self._overlays.clear()

    @staticmethod
    def raw_probability(logits: torch.Tensor, size) -> torch.Tensor:
        """Sigmoid of the logits resized bilinearly to ``size`` (what inference thresholds at 0.5)."""
        x = torch.as_tensor(logits).detach().float().cpu()[None]
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        return torch.sigmoid(x)[0, 0]

    def probability(self, logits: torch.Tensor, size) -> np.ndarray:
        """The map the threshold-averaged metrics are computed on (see the class docstring)."""
        return self.published_map(self.raw_probability(logits, size))

    def published_map(self, p: torch.Tensor) -> np.ndarray:
        """A raw sigmoid map as the threshold-averaged metrics see it (min-max, uint8, by the options)."""
        if self.minmax:
            p = (p - p.min()) / (p.max() - p.min() + 1e-8)
        p = p.double().numpy()
        if self.quantise_uint8:  # as written to an 8-bit PNG and read back / 255
            p = np.round(np.clip(p, 0.0, 1.0) * 255.0) / 255.0
        return p

    @property
    def evaluation(self) -> str:
        """Which probability maps the metrics were computed on, in words (goes into every table)."""
        steps = ["sigmoid"] + (["min-max normalised"] if self.minmax else []) + (["uint8-quantised"] if self.quantise_uint8 else [])
        paper = " (as Polyp-PVT Test.py, paper-comparable)" if self.minmax and self.quantise_uint8 else " (not the published pipeline)"
        return ", ".join(steps) + paper

    def update(self, engine) -> None:
        items = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        batch = engine.state.batch if isinstance(engine.state.batch, list) else [{}] * len(items)
        for item, data in zip(items, batch):
            gt = np.asarray(torch.as_tensor(item["label"]).detach().cpu())[0] > 0.5
            raw_map = self.raw_probability(item["pred"], gt.shape)  # resized once, used twice
            prob, raw = self.published_map(raw_map), raw_map.double().numpy()
            set_name = str(item.get("set", data.get("set", "test")))
            case = str(item.get("case", data.get("case", len(self.rows))))
            dice, iou = threshold_dice_iou(prob, gt)
            d05, i05 = dice_iou_at(raw, gt, 0.5)  # plain Dice: the raw sigmoid at 0.5, as inference.json
            self.curves[set_name].append((dice, iou))
            self.rows.append({"set": set_name, "case": case, "mdice": float(dice.mean()), "miou": float(iou.mean()),
                              "dice@0.5": d05, "iou@0.5": i05})
            if self._overlays[set_name] < self.num_overlays:
                self._overlays[set_name] += 1
                image = data.get("image")
                path = getattr(image, "meta", {}).get("filename_or_obj") if image is not None else None
                self._overlay(path, gt, raw >= 0.5, f"{set_name}_{case}", d05)

    def _overlay(self, image_path, gt: np.ndarray, pred: np.ndarray, name: str, dice: float) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        # arrays are (W, H) as MONAI's PIL reader returns them; show them (H, W)
        rgb = None
        if image_path:
            from PIL import Image

            with Image.open(image_path) as im:
                rgb = np.asarray(im.convert("RGB"))
        out = self.output_dir / "overlays"
        out.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.imshow(rgb if rgb is not None and rgb.shape[:2] == gt.T.shape else gt.T, cmap=None if rgb is not None else "gray")
        if gt.any():
            ax.contour(gt.T.astype(float), levels=[0.5], colors="lime", linewidths=1.2)
        if pred.any():
            ax.contour(pred.T.astype(float), levels=[0.5], colors="red", linewidths=1.2)
        ax.set_title(f"{name}  Dice@0.5 {100 * dice:.1f}%  (green gt, red pred)", fontsize=7)
        ax.axis("off")
        fig.tight_layout()
        fig.savefig(out / f"{name.replace('/', '_')}.png", dpi=100)
        plt.close(fig)

    def summary(self) -> dict:
        sets = []
        for name, curves in self.curves.items():
            dice = np.mean([c[0] for c in curves], axis=0)  # mean over images, per threshold
            iou = np.mean([c[1] for c in curves], axis=0)
            rows = [r for r in self.rows if r["set"] == name]
            paper = PAPER_TABLE1.get(name, (math.nan, math.nan))
            sets.append({
                "set": name, "images": len(rows), "mDice": float(dice.mean()), "mIoU": float(iou.mean()),
                "Dice@0.5": float(np.mean([r["dice@0.5"] for r in rows])),
                "IoU@0.5": float(np.mean([r["iou@0.5"] for r in rows])),
                "paper_mDice": paper[0], "paper_mIoU": paper[1], "evaluation": self.evaluation,
            })
        all_mdice = [r["mdice"] for r in self.rows]
        return {
            "evaluation": self.evaluation,
            "minmax_normalise": self.minmax,
            "quantise_uint8": self.quantise_uint8,
            "sets": sets,
            "n_images": len(self.rows),
            # mean over all test images of the threshold-averaged Dice, in % (repository-wide key)
            "mean_dice": 100 * float(np.mean(all_mdice)) if all_mdice else math.nan,
        }

    def write(self, engine=None) -> dict:
        result = self.summary()
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "per_image.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["set", "case", "mdice", "miou", "dice@0.5", "iou@0.5"])
            writer.writeheader()
            writer.writerows({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()} for r in self.rows)
        fields = ["set", "images", "mDice", "mIoU", "Dice@0.5", "IoU@0.5", "paper_mDice", "paper_mIoU", "evaluation"]
        with open(out / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in s.items()} for s in result["sets"])

        def fmt(v):
            return "–" if isinstance(v, float) and math.isnan(v) else f"{v:.3f}"

        lines = [f"# {self.title}" if self.title else "# Polyp test sets",
                 "",
                 "mDice/mIoU: threshold-averaged (256 thresholds, METHODS §2); Dice/IoU@0.5: plain, at 0.5. "
                 "Paper: KDAS student, Table 1 (CVC-300 not reported).",
                 "",
                 f"Probability maps: {self.evaluation}.",
                 "",
                 "| test set | images | mDice | mIoU | Dice@0.5 | IoU@0.5 | paper mDice | paper mIoU |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {s['set']} | {s['images']} | {fmt(s['mDice'])} | {fmt(s['mIoU'])} | {fmt(s['Dice@0.5'])} | "
                  f"{fmt(s['IoU@0.5'])} | {fmt(s['paper_mDice'])} | {fmt(s['paper_mIoU'])} |" for s in result["sets"]]
        (out / "metrics.md").write_text("\n".join(lines) + "\n")
        write_json(out / "metrics.json", json.loads(json.dumps(result, default=float).replace("NaN", "null")))
        for s in result["sets"]:
            logger.info("%s: %d images, mDice %.4f, mIoU %.4f, Dice@0.5 %.4f (paper mDice %s)", s["set"], s["images"],
                        s["mDice"], s["mIoU"], s["Dice@0.5"], fmt(s["paper_mDice"]))
        return result
