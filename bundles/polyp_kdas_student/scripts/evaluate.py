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
from shared_transforms.handlers import save_overlay, write_case_reports
from shared_transforms.utils import gather_in_order, is_main_process

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


def threshold_dice_iou(
    prob: np.ndarray, gt: np.ndarray, thresholds: np.ndarray = THRESHOLDS
) -> tuple[np.ndarray, np.ndarray]:
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
    (with the paper's Table 1 beside), ``metrics.json``, MONAI ``MetricsSaver``'s per-image
    ``<metric>_raw.csv`` and ``<metric>_summary.csv`` (mdice, miou, dice_at_0.5, iou_at_0.5) and
    ``overlays/<set>_<case>.png`` (``num_overlays`` per set) into ``output_dir``.
    """

    def __init__(
        self, output_dir: str, num_overlays: int = 2, minmax: bool = True, quantise_uint8: bool = True, title: str = ""
    ) -> None:
        self.output_dir = Path(output_dir)
        self.num_overlays = num_overlays
        self.minmax, self.quantise_uint8 = bool(minmax), bool(quantise_uint8)
        self.title = title
        self.rows: list[dict] = []
        self.curves: dict[str, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
        self._overlays: dict[str, int] = defaultdict(int)
        # row index -> (image file, gt, pred, name, Dice@0.5): this process's first num_overlays images per set
        self._overlay_items: dict[int, tuple] = {}

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def reset(self, engine=None) -> None:
        self.rows.clear()
        self.curves.clear()
        self._overlays.clear()
        self._overlay_items.clear()

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
        steps = (
            ["sigmoid"]
            + (["min-max normalised"] if self.minmax else [])
            + (["uint8-quantised"] if self.quantise_uint8 else [])
        )
        paper = (
            " (as Polyp-PVT Test.py, paper-comparable)"
            if self.minmax and self.quantise_uint8
            else " (not the published pipeline)"
        )
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
            self.rows.append(
                {
                    "set": set_name,
                    "case": case,
                    "mdice": float(dice.mean()),
                    "miou": float(iou.mean()),
                    "dice@0.5": d05,
                    "iou@0.5": i05,
                }
            )
            if self._overlays[set_name] < self.num_overlays:  # drawn at the end, by rank 0 (see gather)
                self._overlays[set_name] += 1
                image = data.get("image")
                path = getattr(image, "meta", {}).get("filename_or_obj") if image is not None else None
                self._overlay_items[len(self.rows) - 1] = (path, gt, raw >= 0.5, f"{set_name}_{case}", d05)

    def _overlay(self, image_path, gt: np.ndarray, pred: np.ndarray, name: str, dice: float) -> None:
        # arrays are (W, H) as MONAI's PIL reader returns them; the frame is read (H, W, 3) from its file
        rgb = None
        if image_path:
            from PIL import Image

            with Image.open(image_path) as im:
                rgb = np.asarray(im.convert("RGB"))
        image = rgb if rgb is not None and rgb.shape[:2] == gt.T.shape else gt.T.astype(float)
        out = self.output_dir / "overlays"
        out.mkdir(parents=True, exist_ok=True)
        save_overlay(
            image,
            gt.T,
            pred.T,
            out / f"{name.replace('/', '_')}.png",
            f"{name}  Dice@0.5 {100 * dice:.1f}%",
            transpose=False,
            origin="upper",
        )

    def summary(self) -> dict:
        sets = []
        for name, curves in self.curves.items():
            dice = np.mean([c[0] for c in curves], axis=0)  # mean over images, per threshold
            iou = np.mean([c[1] for c in curves], axis=0)
            rows = [r for r in self.rows if r["set"] == name]
            paper = PAPER_TABLE1.get(name, (math.nan, math.nan))
            sets.append(
                {
                    "set": name,
                    "images": len(rows),
                    "mDice": float(dice.mean()),
                    "mIoU": float(iou.mean()),
                    "Dice@0.5": float(np.mean([r["dice@0.5"] for r in rows])),
                    "IoU@0.5": float(np.mean([r["iou@0.5"] for r in rows])),
                    "paper_mDice": paper[0],
                    "paper_mIoU": paper[1],
                    "evaluation": self.evaluation,
                }
            )
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

    def gather(self) -> None:
        """Under DDP: every rank's images and overlay candidates, in the test sets' order."""
        seen: dict[str, int] = defaultdict(int)
        records = []
        for i, row in enumerate(self.rows):  # the k-th row of a set has the set's k-th curve
            records.append((row, self.curves[row["set"]][seen[row["set"]]], self._overlay_items.get(i)))
            seen[row["set"]] += 1
        records = gather_in_order(records)
        self.rows, self.curves, self._overlay_items = [r for r, _, _ in records], defaultdict(list), {}
        drawn: dict[str, int] = defaultdict(int)
        for i, (row, curve, overlay) in enumerate(records):
            self.curves[row["set"]].append(curve)
            # every rank drew its first images of each set: the first num_overlays of the whole set are among them
            if overlay is not None and drawn[row["set"]] < self.num_overlays:
                drawn[row["set"]] += 1
                self._overlay_items[i] = overlay

    def write(self, engine=None) -> dict:
        """Write the tables on the main process (under DDP after :meth:`gather`)."""
        self.gather()
        result = self.summary()
        if not is_main_process():
            return result
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        for path, gt, pred, name, dice in self._overlay_items.values():
            self._overlay(path, gt, pred, name, dice)
        with open(out / "per_image.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["set", "case", "mdice", "miou", "dice@0.5", "iou@0.5"])
            writer.writeheader()
            writer.writerows({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()} for r in self.rows)
        fields = ["set", "images", "mDice", "mIoU", "Dice@0.5", "IoU@0.5", "paper_mDice", "paper_mIoU", "evaluation"]
        with open(out / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(
                {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in s.items()} for s in result["sets"]
            )

        def fmt(v):
            return "–" if isinstance(v, float) and math.isnan(v) else f"{v:.3f}"

        lines = [
            f"# {self.title}" if self.title else "# Polyp test sets",
            "",
            "mDice/mIoU: threshold-averaged (256 thresholds, METHODS §2); Dice/IoU@0.5: plain, at 0.5. "
            "Paper: KDAS student, Table 1 (CVC-300 not reported).",
            "",
            f"Probability maps: {self.evaluation}.",
            "",
            "| test set | images | mDice | mIoU | Dice@0.5 | IoU@0.5 | paper mDice | paper mIoU |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {s['set']} | {s['images']} | {fmt(s['mDice'])} | {fmt(s['mIoU'])} | {fmt(s['Dice@0.5'])} | "
            f"{fmt(s['IoU@0.5'])} | {fmt(s['paper_mDice'])} | {fmt(s['paper_mIoU'])} |"
            for s in result["sets"]
        ]
        (out / "metrics.md").write_text("\n".join(lines) + "\n")
        write_json(out / "metrics.json", json.loads(json.dumps(result, default=float).replace("NaN", "null")))
        write_case_reports(
            out,
            [f"{r['set']}/{r['case']}" for r in self.rows],
            {
                "mdice": [[r["mdice"]] for r in self.rows],
                "miou": [[r["miou"]] for r in self.rows],
                "dice_at_0.5": [[r["dice@0.5"]] for r in self.rows],
                "iou_at_0.5": [[r["iou@0.5"]] for r in self.rows],
            },
            ["polyp"],
        )
        for s in result["sets"]:
            logger.info(
                "%s: %d images, mDice %.4f, mIoU %.4f, Dice@0.5 %.4f (paper mDice %s)",
                s["set"],
                s["images"],
                s["mDice"],
                s["mIoU"],
                s["Dice@0.5"],
                fmt(s["paper_mDice"]),
            )
        return result
