"""Handlers: keep the m_best checkpoints by validation loss; per-class Dice / HD (mm) evaluation."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared_transforms.datalist import write_json
from shared_transforms.handlers import atomic_torch_save, save_overlay, write_case_reports
from shared_transforms.utils import gather_in_order, gather_objects, is_main_process, unwrap_model

from .qc import CLASS_NAMES, _json_safe, dice, hausdorff

logger = logging.getLogger(__name__)

__all__ = ["BestCheckpoints", "CardiacMetrics"]


class BestCheckpoints:
    """Keep the ``k`` best checkpoints of ``network`` by the evaluator's ``metric_name`` (lower is
    better for a loss), as files ``save_dir/model_epoch<E>.pt`` with an index
    ``save_dir/candidates.json`` (file, epoch, score, best first); the best is also copied to
    ``best_file`` (e.g. ``models/model.pt``). Attach to the validation evaluator.

    The list survives a resume: put the handler in the ``save_dict``/``load_dict`` of the run's
    ``ResumeCheckpointSaver``/``Loader`` (``state_dict``/``load_state_dict``), so after a restart a candidate
    only enters the list, and ``best_file`` is only overwritten, when it beats what is kept.
    """

    def __init__(
        self,
        save_dir: str,
        network: torch.nn.Module,
        k: int = 3,
        metric_name: str = "val_loss",
        mode: str = "min",
        best_file: str | None = None,
        prefix: str = "model_epoch",
        trainer=None,
    ) -> None:
        if k < 1:
            raise ValueError(f"k (m_best) must be >= 1, got {k}")
        self.save_dir, self.network, self.k = Path(save_dir), network, int(k)
        self.metric_name, self.sign = metric_name, (1.0 if mode == "min" else -1.0)
        self.best_file = Path(best_file) if best_file else None
        self.prefix, self.trainer = prefix, trainer
        self.kept: list[dict[str, Any]] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def state_dict(self) -> dict[str, Any]:
        return {"kept": [dict(e) for e in self.kept]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the kept list; entries whose file has disappeared since are dropped."""
        kept = [dict(e) for e in state.get("kept", [])]
        self.kept = [e for e in kept if (self.save_dir / e["file"]).is_file()]
        if len(self.kept) < len(kept):
            logger.warning("%d kept checkpoint(s) missing from %s: dropped", len(kept) - len(self.kept), self.save_dir)

    def __call__(self, engine) -> None:
        score = float(engine.state.metrics[self.metric_name])
        # a validator run by ValidationHandler counts the trainer's epochs
        epoch = int(self.trainer.state.epoch) if self.trainer is not None else int(engine.state.epoch)
        if not is_main_process() or not math.isfinite(score):
            return
        entry = {"file": f"{self.prefix}{epoch}.pt", "epoch": epoch, self.metric_name: score}
        ranked = sorted(self.kept + [entry], key=lambda e: self.sign * e[self.metric_name])
        keep, drop = ranked[: self.k], ranked[self.k :]
        net = unwrap_model(self.network)
        state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        if entry in keep:
            atomic_torch_save(state, self.save_dir / entry["file"])
        for e in drop:
            if e is not entry:
                (self.save_dir / e["file"]).unlink(missing_ok=True)
        self.kept = keep
        write_json(
            self.save_dir / "candidates.json",
            {"metric": self.metric_name, "mode": "min" if self.sign > 0 else "max", "candidates": self.kept},
        )
        if self.best_file is not None and keep[0] is entry:
            atomic_torch_save(state, self.best_file)
            logger.info("new best %s %.5f at epoch %d -> %s", self.metric_name, score, epoch, self.best_file)


class CardiacMetrics:
    """Per-case Dice and Hausdorff distance (mm, on the input's grid) for RV, LV and MYO.

    Reads the evaluator's items (``pred``: label map (1, H, W, Z) after argmax, ``label``) and
    writes ``metrics.csv``, ``metrics.json`` (per class mean/std, RV first) and ``metrics.md``;
    MONAI ``MetricsSaver``'s per-case ``dice_raw.csv`` / ``hd_mm_raw.csv`` (failures at the volume
    diagonal) and their ``*_summary.csv``;
    and ``overlays/<case>.png`` (the RV, the challenge's class, on the SA slice with the most RV
    ground truth) for ``num_overlays`` cases.

    A case whose HD is infinite (the class is missing from the prediction or from the label)
    is a failure, not a gap: ``mean_hd_mm_<class>`` counts it at the penalty of the volume's
    diagonal in mm (the largest distance possible inside it), ``n_infinite_hd_mm_<class>``
    counts the failures and ``mean_finite_hd_mm_<class>`` is the mean over the other cases.
    """

    ORDER = [3, 1, 2]  # RV first

    def __init__(self, output_dir: str, prefix: str = "", qc_inferer=None, num_overlays: int = 4) -> None:
        self.output_dir, self.prefix, self.qc_inferer = Path(output_dir), prefix, qc_inferer
        self.num_overlays = int(num_overlays)
        self.rows: list[dict] = []
        self._penalty: dict[str, float] = {}  # case -> volume diagonal (mm), the HD of a failed case
        self._slices: list[tuple] = []  # (case, image, RV truth, RV prediction) of the first num_overlays cases

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(
            Events.EPOCH_STARTED, lambda e: (self.rows.clear(), self._penalty.clear(), self._slices.clear())
        )
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def update(self, engine) -> None:
        items = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for item in items:
            pred = np.asarray(item["pred"].detach().cpu())[0]
            label = item["label"]
            spacing = [float(np.linalg.norm(np.asarray(label.affine)[:3, i])) for i in range(3)]
            lab = np.asarray(label.detach().cpu())[0]
            # the image's name (the label's may differ, e.g. a hidden reference label)
            name = str(
                getattr(item["pred"], "meta", {}).get("filename_or_obj") or label.meta.get("filename_or_obj", "case")
            )
            row = {"case": Path(name).name.split(".nii")[0].removesuffix("_gt")}
            self._penalty[row["case"]] = float(np.linalg.norm(np.asarray(lab.shape) * np.asarray(spacing[: lab.ndim])))
            for c in self.ORDER:
                row[f"dice_{CLASS_NAMES[c]}"] = dice(pred == c, lab == c)
                row[f"hd_mm_{CLASS_NAMES[c]}"] = hausdorff(pred == c, lab == c, spacing[: lab.ndim])
            if self.qc_inferer is not None and getattr(self.qc_inferer, "last_report", None):
                row["ood"] = self.qc_inferer.last_report["ood"]
                row["selected_model"] = self.qc_inferer.last_report["selected_model"]
            self.rows.append(row)
            if len(self._slices) < self.num_overlays and "image" in item and lab.ndim == 3:
                rv = self.ORDER[0]
                z = int(np.argmax((lab == rv).sum(axis=(0, 1))))
                image = np.asarray(torch.as_tensor(item["image"]).detach().cpu())[0]
                if image.shape == lab.shape:
                    self._slices.append((row["case"], image[..., z], lab[..., z] == rv, pred[..., z] == rv))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n_cases": len(self.rows)}
        for c in self.ORDER:
            for metric in ("dice", "hd_mm"):
                key = f"{metric}_{CLASS_NAMES[c]}"
                vals = np.array([r[key] for r in self.rows], float)
                finite = vals[np.isfinite(vals)]
                if metric == "hd_mm":
                    out[f"n_infinite_{key}"] = int((~np.isfinite(vals)).sum())
                    out[f"mean_finite_{key}"] = float(finite.mean()) if len(finite) else math.nan
                    vals = np.array(
                        [
                            v if math.isfinite(v) else self._penalty.get(r["case"], math.nan)
                            for v, r in zip(vals, self.rows)
                        ],
                        float,
                    )
                    finite = vals[np.isfinite(vals)]
                out[f"mean_{key}"] = float(finite.mean()) if len(finite) else math.nan
                out[f"std_{key}"] = float(finite.std()) if len(finite) else math.nan
        out["mean_dice"] = out["mean_dice_RV"]  # the challenge scores RV only
        out["cases"] = self.rows
        return out

    def write(self, engine=None) -> dict[str, Any]:
        """Write the tables on the main process; under DDP the rows of every rank first, in the test set's order."""
        self.rows = gather_in_order(self.rows)
        self._penalty = {k: v for part in gather_objects(self._penalty) for k, v in part.items()}
        self._slices = gather_in_order(self._slices)[: self.num_overlays]
        result = self.summary()
        if not is_main_process():
            return result
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self._slices:
            (self.output_dir / "overlays").mkdir(exist_ok=True)
        for case, image, gt, pr in self._slices:
            rv_dice = next(r["dice_RV"] for r in self.rows if r["case"] == case)
            save_overlay(image, gt, pr, self.output_dir / "overlays" / f"{case}.png", f"{case}  RV  Dice {rv_dice:.3f}")
        if self.rows:
            with open(self.output_dir / f"{self.prefix}metrics.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(self.rows[0]))
                writer.writeheader()
                writer.writerows(self.rows)
        write_json(self.output_dir / f"{self.prefix}metrics.json", _json_safe(result))
        lines = ["| class | Dice | HD (mm) | HD failures (counted at the volume diagonal) |", "|---|---:|---:|---:|"]
        for c in self.ORDER:
            n = CLASS_NAMES[c]
            lines.append(
                f"| {n} | {result[f'mean_dice_{n}']:.4f} ± {result[f'std_dice_{n}']:.4f} | "
                f"{result[f'mean_hd_mm_{n}']:.2f} ± {result[f'std_hd_mm_{n}']:.2f} | "
                f"{result[f'n_infinite_hd_mm_{n}']} of {result['n_cases']} |"
            )
        (self.output_dir / f"{self.prefix}metrics.md").write_text("\n".join(lines) + "\n")
        names = [CLASS_NAMES[c] for c in self.ORDER]
        hd = [
            [
                r[f"hd_mm_{n}"] if math.isfinite(r[f"hd_mm_{n}"]) else self._penalty.get(r["case"], math.nan)
                for n in names
            ]
            for r in self.rows
        ]
        write_case_reports(
            self.output_dir,
            [r["case"] for r in self.rows],
            {f"{self.prefix}dice": [[r[f"dice_{n}"] for n in names] for r in self.rows], f"{self.prefix}hd_mm": hd},
            names,
        )
        logger.info(
            "%d cases: RV Dice %.4f, RV HD %.2f mm -> %s",
            len(self.rows),
            result["mean_dice_RV"],
            result["mean_hd_mm_RV"],
            self.output_dir,
        )
        return result


class GradientClip:
    """Clip the gradient norm (METHODS: 12) after each backward pass of a MONAI ``SupervisedTrainer``.

    Under AMP the trainer's ``BACKWARD_COMPLETED`` sees gradients multiplied by the GradScaler's
    scale (2^16 at the start): they are unscaled first (``scaler.unscale_``; the trainer's
    ``scaler.step`` then does not unscale again), so the clip acts on the true gradient norm.
    """

    def __init__(self, network: torch.nn.Module, max_norm: float = 12.0) -> None:
        self.network, self.max_norm = network, float(max_norm)

    def attach(self, engine) -> None:
        from monai.engines.utils import IterationEvents

        if getattr(engine, "accumulation_steps", 1) > 1:  # it would clip (and unscale) partial sums
            raise ValueError("GradientClip does not support gradient accumulation (accumulation_steps > 1)")
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine) -> None:
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None and scaler.is_enabled():
            scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.max_norm)
