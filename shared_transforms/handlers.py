"""Ignite event handlers shared by the bundles' training and evaluation workflows.

- :class:`ResumeCheckpointSaver` / :class:`ResumeCheckpointLoader`: MONAI's ``CheckpointSaver`` /
  ``CheckpointLoader`` for the full training state (:class:`TrainingState`: random states, AMP
  scaler, best metric), saved atomically every epoch and resumed from when the run starts
  again, only by the run that wrote it (its fingerprint).
- :class:`LearningCurves`: per-epoch training loss / validation metric / learning rate to
  CSV and a PNG plot.
- :class:`SegmentationReport`: per-case Dice and IoU (%) of binary predictions to CSV,
  JSON and Markdown, plus PNG overlays of a few slices.
- :class:`CaseDice`: the same per-case Dice (pooled over a case's slices, mean over cases)
  as an ignite metric, so validation selects models on the definition the test table reports.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.handlers.checkpoint import BaseSaveHandler
from ignite.metrics import Metric
from monai.handlers import CheckpointLoader, CheckpointSaver
from shared_transforms.files import atomic_path, remove_stale_partials, write_json
from shared_transforms.utils import as_bool, gather_objects, is_main_process

__all__ = ["TrainingState", "ResumeCheckpointSaver", "ResumeCheckpointLoader", "checkpoint_fingerprint", "AtomicCheckpointSaver", "LearningCurves", "SegmentationReport", "CaseDice",
           "atomic_torch_save", "overlay_rgb", "save_overlay", "write_case_reports"]

logger = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: never a half-written file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class _AtomicSave(BaseSaveHandler):
    """An ignite save handler for MONAI's ``CheckpointSaver``: atomic writes, and removals deferred until
    the new file is in place, so replacing ``model.pt`` by a better model never leaves it missing or
    half-written (ignite removes the old file first, then writes the new one)."""

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        self.dirname, self.filename = Path(dirname), filename
        self._pending: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        target = self.filename or filename
        if is_main_process():
            atomic_torch_save(checkpoint, self.dirname / target)
            for old in self._pending:
                if old != target:
                    (self.dirname / old).unlink(missing_ok=True)
        self._pending = []

    def remove(self, filename: str) -> None:
        self._pending.append(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments) whose files are written atomically (temporary file +
    rename, removals of replaced files after): a run killed while saving keeps the previous ``model.pt``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for name in ("_final_checkpoint", "_key_metric_checkpoint", "_interval_checkpoint"):
            checkpoint = getattr(self, name, None)
            if checkpoint is not None:
                inner = checkpoint.save_handler
                checkpoint.save_handler = _AtomicSave(str(inner.dirname), getattr(inner, "filename", None))


def _numpy_state(rs: np.random.RandomState) -> dict:
    name, keys, pos, has_gauss, gauss = rs.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _set_numpy_state(rs: np.random.RandomState, state: Mapping) -> None:
    rs.set_state((state["name"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"], state["gauss"]))


def random_transforms(engine) -> list:
    """Every ``Randomizable`` (with its own ``R``) reachable from the engine's training-data transform.

    Dictionary transforms hold their array twin (``RandRotated.rand_rotate``), which draws from
    its own ``R``: the walk goes through attributes, lists and dicts, in a fixed (sorted) order.
    """
    from monai.transforms import Randomizable

    dataset = getattr(getattr(engine, "data_loader", None), "dataset", None)
    found, seen = [], set()

    def walk(obj, depth: int) -> None:
        if obj is None or id(obj) in seen or depth > 12 or isinstance(obj, (torch.Tensor, np.ndarray, str, bytes, type)):
            return
        seen.add(id(obj))
        if isinstance(obj, Randomizable):
            found.append(obj)
        if isinstance(obj, (list, tuple)):
            children = list(obj)
        elif isinstance(obj, dict):
            children = list(obj.values())
        elif hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):
            children = [vars(obj)[k] for k in sorted(vars(obj))]
        else:
            return
        for child in children:
            walk(child, depth + 1)

    walk(getattr(dataset, "transform", None), 0)
    return found


def rng_state(randomizables=()) -> dict:
    """Every random generator a training epoch draws from, as tensors and numbers (``weights_only``-loadable):
    Python's, NumPy's global, torch's (CPU and CUDA), and each random transform's own ``R``."""
    version, internal, gauss = random.getstate()
    state = {"python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
             "numpy": _numpy_state(np.random.mtrand._rand), "torch": torch.get_rng_state(),
             "transforms": [_numpy_state(t.R) for t in randomizables]}
    if torch.cuda.is_available():  # this process's device (one per DDP rank); any device count on resume
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping, randomizables=()) -> None:
    """Restore what :func:`rng_state` saved (the transforms matched by position)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"]), py["gauss"]))
    _set_numpy_state(np.random.mtrand._rand, state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.is_tensor(state.get("cuda")) and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    saved = state.get("transforms", [])
    if len(saved) != len(randomizables):
        logger.warning("resume: %d random transforms saved, %d now: their random states start afresh", len(saved), len(randomizables))
        return
    for t, s in zip(randomizables, saved):
        _set_numpy_state(t.R, s)


def _key_metric_savers(engine) -> list:
    """The MONAI ``CheckpointSaver``s attached to ``engine`` that keep a best-by-key-metric file."""
    found: list = []
    for handlers in getattr(engine, "_event_handlers", {}).values():
        for handler, *_ in handlers:
            owner = getattr(handler, "__self__", None)
            if isinstance(owner, CheckpointSaver) and owner._key_metric_checkpoint is not None and all(owner is not f for f in found):
                found.append(owner)
    return found


class TrainingState:
    """What a resumed run needs beside the network, optimizer, scheduler and trainer counters, as one
    ``state_dict`` / ``load_state_dict`` object for ignite's ``Checkpoint`` (saved by
    :class:`ResumeCheckpointSaver`, loaded by :class:`ResumeCheckpointLoader`).

    - ``fingerprint``: the run's name (stage, data, fold...); the loader resumes only its own run;
    - every random state an epoch draws from (Python, NumPy, torch CPU/CUDA, each random
      transform of the training data): saved at the end of an epoch, restored at the start, a
      resumed run (on CPU, same seed) repeats the uninterrupted one down to the final weights;
    - the trainer's AMP ``GradScaler`` (MONAI makes it in ``run()``, after the config is built);
    - the evaluator's best metric and epoch, and the tracking of each key-metric
      ``CheckpointSaver`` attached to it: a resumed run replaces ``model.pt`` only with a
      better model, as an uninterrupted one. (MONAI's ``key_metric_save_state`` would put that
      tracking into ``model.pt``, which must stay a plain ``state_dict`` for MONAI Label.)

    All tensors and numbers: ``weights_only``-loadable. ``trainer`` is set when a handler attaches.
    """

    def __init__(self, fingerprint: str = "", evaluator=None) -> None:
        self.fingerprint, self.evaluator, self.trainer = str(fingerprint), evaluator, None

    def state_dict(self) -> dict:
        state: dict[str, Any] = {"fingerprint": self.fingerprint, "rng": rng_state(random_transforms(self.trainer))}
        scaler = getattr(self.trainer, "scaler", None)
        if scaler is not None and scaler.is_enabled():  # AMP's loss scale, so the resumed steps scale alike
            state["scaler"] = scaler.state_dict()
        if self.evaluator is not None:
            ev = self.evaluator
            state["best"] = {"best_metric": float(ev.state.best_metric), "best_metric_epoch": int(ev.state.best_metric_epoch),
                             "savers": [s._key_metric_checkpoint.state_dict() for s in _key_metric_savers(ev)]}
        return state

    def load_state_dict(self, state: Mapping) -> None:
        scaler = getattr(self.trainer, "scaler", None)
        if state.get("scaler") and scaler is not None:
            scaler.load_state_dict(state["scaler"])
        if state.get("best") is not None and self.evaluator is not None:
            self._load_best(state["best"])
        if state.get("rng") is not None:
            set_rng_state(state["rng"], random_transforms(self.trainer))
        else:
            logger.warning("the resume checkpoint has no random states: the resumed run will not repeat the original")

    def _load_best(self, best: Mapping) -> None:
        ev = self.evaluator
        ev.state.best_metric, ev.state.best_metric_epoch = best["best_metric"], best["best_metric_epoch"]
        for saver, saved in zip(_key_metric_savers(ev), best["savers"]):
            checkpoint = saver._key_metric_checkpoint
            checkpoint.load_state_dict(saved)
            fixed = getattr(checkpoint.save_handler, "filename", None)
            folder = Path(getattr(checkpoint.save_handler, "dirname", "."))
            kept = [item for item in checkpoint._saved if (folder / (fixed or item.filename)).is_file()]
            if len(kept) < len(checkpoint._saved):  # a best model lost (e.g. by a run before atomic saves): save anew
                logger.warning("resume: %d best-model file(s) missing in %s: the next validation saves one",
                               len(checkpoint._saved) - len(kept), folder)
                checkpoint._saved[:] = kept
        logger.info("resume: best %s so far %.5f (epoch %d)", getattr(ev, "key_metric_name", "metric"),
                    best["best_metric"], best["best_metric_epoch"])


def checkpoint_fingerprint(checkpoint: Mapping) -> str:
    """The run fingerprint of a resume checkpoint (in its ``training_state``; at the top level in files before 0.4)."""
    state = checkpoint.get("training_state")
    return str(state.get("fingerprint", "") if isinstance(state, Mapping) else checkpoint.get("fingerprint", ""))


#: what checkpoints before 0.4 (the former ResumeCheckpoint) kept at the top level instead of in training_state
_LEGACY_STATE_KEYS = ("rng", "best", "scaler")


class ResumeCheckpointSaver(AtomicCheckpointSaver):
    """MONAI's ``CheckpointSaver`` (``save_interval``, ``n_saved=1``) writing the whole training state to
    ``save_dir/filename`` after every ``save_interval`` epochs, atomically (see :class:`AtomicCheckpointSaver`).

    Args:
        save_dir: e.g. ``models/resume`` (auxiliary files live in subfolders of ``models/`` so
            MONAI Label does not offer them as the model).
        save_dict: objects with ``state_dict``: network, optimizer, lr scheduler... The trainer
            it is attached to is added as ``"trainer"`` (epoch, iteration), and a
            :class:`TrainingState` as ``"training_state"``.
        filename: the checkpoint's fixed name.
        fingerprint, evaluator: see :class:`TrainingState`.
        save_interval: epochs between saves.
    """

    def __init__(self, save_dir: str, save_dict: Mapping[str, Any], filename: str = "checkpoint.pt",
                 fingerprint: str = "", evaluator=None, save_interval: int = 1) -> None:
        self.training_state = TrainingState(fingerprint, evaluator)
        super().__init__(save_dir=save_dir, save_dict={**save_dict, "training_state": self.training_state},
                         save_interval=int(save_interval), n_saved=1, epoch_level=True)
        self._interval_checkpoint.save_handler.filename = filename

    def attach(self, engine) -> None:
        self.save_dict["trainer"] = engine  # the dict ignite's Checkpoint holds
        self.training_state.trainer = engine
        super().attach(engine)


class ResumeCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` for :class:`ResumeCheckpointSaver`'s file, with the run check as a thin wrapper.

    At the start of a run it removes temporary files that a killed write left (``.partial-*`` in
    ``load_path``'s folder and the one above), then loads ``load_path`` (``weights_only=True``)
    only if ``resume`` is true, the file exists and its fingerprint is this run's: a checkpoint of
    another run (e.g. the source stage of a fine-tuning chain sharing ``models/``) is left alone
    and later overwritten. Objects an older checkpoint lacks start afresh, with a warning. The
    trainer it is attached to and a :class:`TrainingState` are added to ``load_dict``; a resumed
    run may be asked for more epochs than the first one.
    """

    def __init__(self, load_path: str, load_dict: Mapping[str, Any], resume: bool = True, fingerprint: str = "",
                 evaluator=None, map_location: Any = "cpu") -> None:
        self.training_state = TrainingState(fingerprint, evaluator)
        super().__init__(load_path=load_path, load_dict={**load_dict, "training_state": self.training_state},
                         map_location=map_location)
        self.resume = as_bool(resume, "resume")

    def attach(self, engine) -> None:
        self.load_dict["trainer"] = engine
        self.training_state.trainer = engine
        super().attach(engine)

    def __call__(self, engine) -> None:
        path = Path(self.load_path)
        if is_main_process():
            for folder in {path.parent, path.parent.parent}:
                for stale in remove_stale_partials(folder):
                    logger.info("removed %s (left by an interrupted run)", stale)
        if not (self.resume and path.is_file()):
            return
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # the keys, without reading it all
        run = checkpoint_fingerprint(saved)
        if run != self.training_state.fingerprint:
            logger.warning("not resuming from %s: it belongs to another run (%s)", path, run)
            return
        # before 0.4 the training state was kept at the top level: restored from there
        legacy = None if "training_state" in saved else {k: saved[k] for k in _LEGACY_STATE_KEYS if k in saved}
        missing = [k for k in self.load_dict if k not in saved and not (k == "training_state" and legacy)]
        if "model" in missing:
            raise ValueError(f"{path}: no 'model' in the resume checkpoint (keys: {sorted(saved)})")
        if missing:  # written by an older version: resume the rest, say what starts afresh
            logger.warning("%s has no %s (an older checkpoint): %s", path, missing,
                           "the resumed run will not repeat the original" if "training_state" in missing else
                           "they start afresh")
        trainer = saved.get("trainer", {})  # ignite keeps the iteration (or the epoch) and the epoch length
        done = int(trainer["epoch"]) if "epoch" in trainer else int(trainer.get("iteration", 0)) // max(
            1, int(trainer.get("epoch_length") or 1))
        if engine.state.max_epochs is not None and done > engine.state.max_epochs:
            # MONAI's loader refuses this; the run has nothing left to do, as an uninterrupted one would have
            logger.warning("%s holds %d epochs, more than the %d asked: nothing to train (--resume false starts "
                           "afresh)", path, done, engine.state.max_epochs)
            engine.state.max_epochs = done
        full = self.load_dict
        self.load_dict = {k: v for k, v in full.items() if k not in missing and not (k == "training_state" and legacy)}
        try:
            super().__call__(engine)
        finally:
            self.load_dict = full
        if legacy:
            self.training_state.load_state_dict({"rng": None, **legacy})
        logger.info("resumed from %s at epoch %d (iteration %d)", path, engine.state.epoch, engine.state.iteration)


class LearningCurves:
    """Write ``learning_curves.csv`` and ``learning_curves.png`` after every training epoch.

    A resumed run keeps the CSV's rows of the epochs it resumes after (read at its first epoch,
    once :class:`ResumeCheckpointLoader` has restored the epoch), so the curves are whole.

    Args:
        output_dir: where the two files go.
        evaluator: the validation engine; its ``metric_name`` is read after each epoch.
        metric_name: key of the validation metric in ``evaluator.state.metrics``.
        optimizer: to log the learning rate of the first parameter group.
    """

    def __init__(self, output_dir: str, evaluator=None, metric_name: str | None = None, optimizer=None) -> None:
        self.output_dir = Path(output_dir)
        self.evaluator = evaluator
        self.metric_name = metric_name
        self.optimizer = optimizer
        self.rows: list[dict] = []
        self._losses: list[float] = []
        self._rows_read = False  # reset when a run starts; the CSV is read at its first epoch

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, lambda e: setattr(self, "_rows_read", False))
        engine.add_event_handler(Events.EPOCH_STARTED, self._keep_earlier_rows)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._record_loss)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _keep_earlier_rows(self, engine) -> None:
        """At the first epoch of a run (a resume is loaded by then), keep the CSV's rows up to the resumed epoch."""
        if self._rows_read:
            return
        self._rows_read = True
        path = self.output_dir / "learning_curves.csv"
        self.rows = []
        resumed = engine.state.epoch - 1  # EPOCH_STARTED has already counted the new epoch
        if resumed > 0 and path.is_file():
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    if int(row["epoch"]) <= resumed:
                        self.rows.append({k: int(v) if k == "epoch" else float(v) for k, v in row.items()})
            logger.info("learning curves: kept %d epochs from before the resume", len(self.rows))

    def _record_loss(self, engine) -> None:
        out = engine.state.output
        out = out[0] if isinstance(out, list) and out else out
        loss = out.get("loss") if isinstance(out, Mapping) else out
        if loss is not None:
            self._losses.append(float(loss))

    def _epoch_completed(self, engine) -> None:
        row = {"epoch": engine.state.epoch, "train_loss": float(np.mean(self._losses)) if self._losses else math.nan}
        # ignite stores the epoch's duration (training iterations only) before firing EPOCH_COMPLETED
        row["epoch_seconds"] = float(engine.state.times.get("EPOCH_COMPLETED") or math.nan)
        self._losses = []
        if self.evaluator is not None and self.metric_name:
            row[self.metric_name] = float(self.evaluator.state.metrics.get(self.metric_name, math.nan))
        if self.optimizer is not None:
            row["lr"] = float(self.optimizer.param_groups[0]["lr"])
        self.rows.append(row)
        if is_main_process():
            self.write()

    def write(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "learning_curves.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.rows[-1]))
            writer.writeheader()
            writer.writerows(self.rows)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] for r in self.rows]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(epochs, [r["train_loss"] for r in self.rows], "o-", label="training loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        val_key = self.metric_name
        if val_key and val_key in self.rows[-1]:
            ax2 = ax.twinx()
            ax2.plot(epochs, [r[val_key] for r in self.rows], "s-", color="tab:orange", label=self.metric_name)
            ax2.set_ylabel(self.metric_name)
            ax2.legend(loc="lower right")
        ax.legend(loc="upper right")
        ax.set_title("learning curves")
        fig.tight_layout()
        fig.savefig(self.output_dir / "learning_curves.png", dpi=100)
        plt.close(fig)


#: overlay colours: ground truth only (missed), prediction only (false positive), both (agreement)
OVERLAY_COLOURS = {"ground truth only": "lime", "prediction only": "red", "both": "yellow"}
_OVERLAY_CMAP = "medseg_overlay"


def overlay_rgb(image: np.ndarray, label: np.ndarray | None, pred: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """``(H, W, 3)`` in [0, 1]: ``image`` blended with ``monai.visualize.blend_images``.

    ``image`` is ``(H, W)`` grey (scaled by its 1st-99th percentiles) or ``(H, W, 3)`` RGB
    (0-255 or 0-1); ``label`` and ``pred`` are ``(H, W)`` binary (``label`` may be ``None``).
    Pixels in the ground truth only are green, in the prediction only red, in both yellow
    (:data:`OVERLAY_COLOURS`); everywhere else the image is unchanged.
    """
    import matplotlib
    from matplotlib.colors import ListedColormap
    from monai.visualize import blend_images

    if _OVERLAY_CMAP not in matplotlib.colormaps:
        matplotlib.colormaps.register(ListedColormap(list(OVERLAY_COLOURS.values()), name=_OVERLAY_CMAP))
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 2:
        lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
        image = np.clip((image - lo) / (hi - lo), 0, 1)[None] if hi > lo else np.zeros((1, *image.shape))
    else:
        image = np.moveaxis(image / (255.0 if image.max() > 1 else 1.0), -1, 0)
    gt = np.zeros(pred.shape, bool) if label is None else np.asarray(label) > 0.5
    pr = np.asarray(pred) > 0.5
    # the three classes at the centres of the colour map's three bins; 0 stays transparent
    classes = np.select([gt & ~pr, pr & ~gt, gt & pr], [1 / 6, 1 / 2, 5 / 6], 0.0)[None]
    blended = blend_images(image, classes, alpha=alpha, cmap=_OVERLAY_CMAP, rescale_arrays=False)
    return np.moveaxis(np.asarray(blended), 0, -1)


def save_overlay(image: np.ndarray, label: np.ndarray | None, pred: np.ndarray, path: str | os.PathLike, title: str = "",
                 transpose: bool = True, origin: str = "lower") -> None:
    """PNG of :func:`overlay_rgb` with a colour legend.

    ``transpose``: the arrays are ``(W, H[, 3])`` as MONAI's readers give them (shown transposed);
    ``origin``: ``"lower"`` for volumes' slices, ``"upper"`` for photographs.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if transpose:
        image, pred = np.swapaxes(np.asarray(image), 0, 1), np.asarray(pred).T
        label = None if label is None else np.asarray(label).T
    fig, ax = plt.subplots(figsize=(4, 4.3))
    ax.imshow(overlay_rgb(image, label, pred), origin=origin, interpolation="nearest")
    ax.legend(handles=[Patch(color=c, label=n) for n, c in OVERLAY_COLOURS.items()], loc="lower center",
              bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=6, frameon=False)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def dice_iou(tp: float, fp: float, fn: float) -> tuple[float, float]:
    """Dice (MONAI's ``"f1 score"``) and IoU (``"threat score"``) from pixel counts, by
    ``monai.metrics.compute_confusion_matrix_metric``; both 1 when prediction and truth are empty
    (where MONAI gives NaN: an empty slice predicted empty is right, as ``compute_dice(ignore_empty=False)``)."""
    if tp + fp + fn == 0:
        return 1.0, 1.0
    from monai.metrics import compute_confusion_matrix_metric

    matrix = torch.tensor([tp, fp, 0.0, fn], dtype=torch.float64)  # tp, fp, tn, fn
    return (float(compute_confusion_matrix_metric("f1 score", matrix)),
            float(compute_confusion_matrix_metric("threat score", matrix)))


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def confusion_counts(pred: np.ndarray, label: np.ndarray) -> tuple[float, float, float]:
    """True positives, false positives and false negatives of two boolean masks (pixel counts), by
    ``monai.metrics.get_confusion_matrix``."""
    from monai.metrics import get_confusion_matrix

    tp, fp, _, fn = get_confusion_matrix(torch.as_tensor(np.asarray(pred))[None, None].float(),
                                         torch.as_tensor(np.asarray(label))[None, None].float())[0, 0].tolist()
    return tp, fp, fn


def write_case_reports(output_dir: str | os.PathLike, cases: list[str], details: Mapping[str, Any],
                       class_labels: list[str]) -> None:
    """Per-case ``<metric>_raw.csv`` and ``<metric>_summary.csv`` (mean, median, max, min, 90th
    percentile, std, count) as MONAI's ``MetricsSaver`` writes them (``write_metrics_reports``).

    ``details``: ``{metric: (n_cases, n_classes) array}``, rows in the order of ``cases``. Only
    the main process writes. The bundles' own ``metrics.csv`` / ``.json`` / ``.md`` stay beside.
    """
    from monai.handlers.utils import write_metrics_reports

    if not is_main_process() or not cases:
        return
    arrays = {k: np.asarray(v, dtype=np.float64).reshape(len(cases), -1) for k, v in details.items()}
    write_metrics_reports(str(output_dir), images=list(cases), metrics=None, metric_details=arrays, summary_ops="*",
                          class_labels=list(class_labels))


def binary_items(engine, case_key: str = "case", pred_key: str = "pred", label_key: str = "label"):
    """Yield ``(case, pred, label, item)`` for each decollated output item of an evaluator iteration.

    ``pred``/``label`` are the first channel thresholded at 0.5 (numpy bool). The case name comes
    from the item or, as the engine's output holds tensors only, from the decollated batch.
    """
    items = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
    batch = engine.state.batch if isinstance(engine.state.batch, list) else [{}] * len(items)
    for item, data in zip(items, batch):
        case = str(item.get(case_key, data.get(case_key, "unknown")))
        yield case, _np(item[pred_key])[0] > 0.5, _np(item[label_key])[0] > 0.5, item


class SegmentationReport:
    """Per-case Dice/IoU (%) of binary 2D predictions, pixel-wise over all of a case's slices.

    Reads the evaluator's decollated output items (``pred``, ``label``, ``image`` and a
    ``case_key`` entry); counts come from ``monai.metrics.get_confusion_matrix``, Dice and IoU
    from ``compute_confusion_matrix_metric``. At the end writes ``metrics.csv`` (one row per
    case, %), ``metrics.json`` (mean/std over cases and pooled over all pixels) and ``metrics.md``
    into ``output_dir``; MONAI ``MetricsSaver``'s per-case ``dice_raw.csv`` / ``iou_raw.csv`` and
    ``*_summary.csv`` (fractions, class ``class_name``) beside them; and ``overlays/*.png``
    (``monai.visualize.blend_images``) for the ``num_overlays`` slices with the largest ground
    truth of distinct cases. Under DDP the ranks' counts are merged and rank 0 writes.
    """

    def __init__(
        self,
        output_dir: str,
        case_key: str = "case",
        pred_key: str = "pred",
        label_key: str = "label",
        image_key: str = "image",
        num_overlays: int = 4,
        prefix: str = "",
        class_name: str = "foreground",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.class_name = class_name
        self.case_key, self.pred_key, self.label_key, self.image_key = case_key, pred_key, label_key, image_key
        self.num_overlays = num_overlays
        self.prefix = prefix
        self.counts: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(4))  # tp, fp, fn, slices
        self._best_slice: dict[str, tuple[float, dict]] = {}

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def reset(self, engine=None) -> None:
        self.counts.clear()
        self._best_slice.clear()

    def update(self, engine) -> None:
        for case, pred, label, item in binary_items(engine, self.case_key, self.pred_key, self.label_key):
            tp, fp, fn = confusion_counts(pred, label)
            self.counts[case] += (tp, fp, fn, 1)
            area = float(label.sum())
            if area > self._best_slice.get(case, (-1.0, None))[0]:
                image = _np(item[self.image_key])[0] if self.image_key in item else pred.astype(float)
                self._best_slice[case] = (area, {"image": image, "label": label, "pred": pred, "tp": tp, "fp": fp, "fn": fn})

    def summary(self) -> dict[str, Any]:
        rows = []
        for case in sorted(self.counts):
            tp, fp, fn, n = self.counts[case]
            dice, iou = dice_iou(tp, fp, fn)
            rows.append({"case": case, "slices": int(n), "dice": 100 * dice, "iou": 100 * iou})
        total = np.sum([self.counts[c] for c in self.counts], axis=0) if rows else np.zeros(4)
        pooled_dice, pooled_iou = dice_iou(*total[:3])
        dices, ious = [r["dice"] for r in rows], [r["iou"] for r in rows]
        return {
            "cases": rows,
            "n_cases": len(rows),
            "mean_dice": float(np.mean(dices)) if rows else math.nan,
            "std_dice": float(np.std(dices)) if rows else math.nan,
            "mean_iou": float(np.mean(ious)) if rows else math.nan,
            "std_iou": float(np.std(ious)) if rows else math.nan,
            "pooled_dice": 100 * pooled_dice,
            "pooled_iou": 100 * pooled_iou,
        }

    def gather(self) -> None:
        """Under DDP: add up every rank's counts (a case's slices may be split between ranks), keep each case's
        largest-truth slice of all ranks."""
        parts = gather_objects((dict(self.counts), self._best_slice))
        if len(parts) == 1:
            return
        self.reset()
        for counts, best in parts:
            for case, c in counts.items():
                self.counts[case] += c
            for case, s in best.items():
                if s[0] > self._best_slice.get(case, (-1.0, None))[0]:
                    self._best_slice[case] = s

    def write(self, engine=None) -> dict[str, Any]:
        """Write the tables and overlays (on the main process; under DDP after :meth:`gather`)."""
        self.gather()
        result = self.summary()
        if not is_main_process():
            return result
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"{self.prefix}metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["case", "slices", "dice", "iou"])
            writer.writeheader()
            for r in result["cases"]:
                writer.writerow({**r, "dice": f"{r['dice']:.2f}", "iou": f"{r['iou']:.2f}"})
        write_json(out / f"{self.prefix}metrics.json", result)
        lines = ["| case | slices | Dice % | IoU % |", "|---|---:|---:|---:|"]
        lines += [f"| {r['case']} | {r['slices']} | {r['dice']:.2f} | {r['iou']:.2f} |" for r in result["cases"]]
        lines.append(
            f"| **mean ± std** | | {result['mean_dice']:.2f} ± {result['std_dice']:.2f} | "
            f"{result['mean_iou']:.2f} ± {result['std_iou']:.2f} |"
        )
        lines.append(f"| pooled (all pixels) | | {result['pooled_dice']:.2f} | {result['pooled_iou']:.2f} |")
        (out / f"{self.prefix}metrics.md").write_text("\n".join(lines) + "\n")
        write_case_reports(out, [r["case"] for r in result["cases"]],
                           {f"{self.prefix}dice": [[r["dice"] / 100] for r in result["cases"]],
                            f"{self.prefix}iou": [[r["iou"] / 100] for r in result["cases"]]}, [self.class_name])
        overlay_dir = out / "overlays"
        overlay_dir.mkdir(exist_ok=True)
        chosen = sorted(self._best_slice.items(), key=lambda kv: -kv[1][0])[: self.num_overlays]
        for case, (_, s) in chosen:
            dice, _ = dice_iou(s["tp"], s["fp"], s["fn"])
            name = case.replace("/", "_").replace(os.sep, "_")
            save_overlay(s["image"], s["label"], s["pred"], overlay_dir / f"{name}.png", f"{case}  slice Dice {100 * dice:.1f}%")
        logger.info(
            "%d cases: Dice %.2f ± %.2f %%, IoU %.2f ± %.2f %% -> %s",
            result["n_cases"], result["mean_dice"], result["std_dice"], result["mean_iou"], result["std_iou"], out,
        )
        return result


class CaseDice(Metric):
    """Mean over cases of each case's Dice, pooled over all of its slices (the test table's ``mean_dice``, as a fraction).

    An ignite ``Metric`` (``key_val_metric`` of a bundle's evaluator): per iteration it adds each
    slice's true/false positives and false negatives to its case (see :func:`binary_items`); at
    the end of the epoch the per-case Dice (1 for a case with neither prediction nor truth) is
    averaged over cases. Counts are merged across processes under DDP, where one case's slices
    may be split between ranks. Per-slice Dice (MONAI ``MeanDice`` on 2D slices) weighs a small
    apex slice like a mid-gland one and skips empty ones: a different number from the report's.
    """

    def __init__(self, case_key: str = "case", pred_key: str = "pred", label_key: str = "label") -> None:
        self.case_key, self.pred_key, self.label_key = case_key, pred_key, label_key
        self.counts: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(3))
        super().__init__(output_transform=lambda x: x)

    def reset(self) -> None:
        self.counts = defaultdict(lambda: np.zeros(3))

    def update(self, output) -> None:
        """Unused: the case names are in the engine's batch, so :meth:`iteration_completed` reads the engine."""

    def iteration_completed(self, engine) -> None:
        for case, pred, label, _ in binary_items(engine, self.case_key, self.pred_key, self.label_key):
            self.counts[case] += confusion_counts(pred, label)

    def compute(self) -> float:
        counts = dict(self.counts)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, counts)
            counts = defaultdict(lambda: np.zeros(3))
            for part in gathered:
                for case, c in part.items():
                    counts[case] += c
        if not counts:
            return math.nan
        return float(np.mean([dice_iou(*c)[0] for c in counts.values()]))
