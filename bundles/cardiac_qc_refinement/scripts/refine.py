"""Semi-supervised refinement of segmenter M driven by the QC module R (METHODS §3).

The unlabelled set is screened first; with nothing out of distribution (OoD) the weights are
left alone. Otherwise, for k = 1 .. K_semi:

1. one supervised epoch on the labelled data (a MONAI ``SupervisedTrainer``; the batches are
   reshuffled every pass);
2. screening of the unlabelled set with the updated model (every candidate, IQR thresholds);
   with no OoD volume left the loop ends;
3. one pass over the OoD volumes' slices (a ``SupervisedTrainer`` with the refinement iteration):

   - ``alpha_schedule: "paper"``: L_SEMI = α·L_WGD(ŷ_M, ŷ_R) + L_SUP, ŷ_R = one-hot(argmax R(softmax ŷ_M)),
     α = 1/k, L_WGD generalised Dice weighted towards RV, L_SUP the segmenter's loss on a labelled batch;
   - ``alpha_schedule: "code"`` (the authors' code): pseudo-label one-hot(argmax(α·ŷ_best + (1-α)·R(softmax ŷ_M)))
     with ŷ_best the QC-selected candidate's prediction of the volume and α = (start + k - 1) / epochs
     (the code resumes at epoch 200 of 250: α 0.8, 0.804, ...), loss RV-only generalised Dice + RV
     cross-entropy, no L_SUP;
4. validation loss on the labelled validation set (train.json's ``validate#evaluator``), whose
   ``BestCheckpoints`` keeps the m_best refined models, staged in ``models/refined``; at the end
   they replace ``models/candidates`` and the best becomes ``models/model.pt``: inference selects
   among them.

The supervised models are kept in ``models/supervised`` (the ablation's M and {M}+QC).
``eval/refine/refine_log.json`` records the screenings, thresholds, losses and the kept models.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.networks.utils import one_hot
from monai.transforms import EnsureChannelFirst, LoadImage

from shared_transforms.files import write_json
from shared_transforms.handlers import atomic_torch_save, checkpoint_fingerprint

from .data import phase_of
from .handlers import GradientClip
from .losses import generalized_dice_loss
from .qc import _json_safe, load_candidates, select_candidate, thresholds_of

logger = logging.getLogger(__name__)

__all__ = ["alpha_for", "load_optimizer_state", "QCRefinement"]

SCHEDULES = ("paper", "code")


def alpha_for(k: int, schedule: str = "paper", code_start_epoch: int = 200, code_epochs: int = 250) -> float:
    """The α of refinement iteration ``k`` (1-based): 1/k ("paper"), or the authors' code's
    epoch/EPOCHS counted from the epoch the refinement resumes at ("code")."""
    if schedule == "paper":
        return 1.0 / k
    if schedule == "code":
        return min((code_start_epoch + k - 1) / code_epochs, 1.0)
    raise ValueError(f"alpha_schedule must be one of {list(SCHEDULES)}, got {schedule!r}")


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, checkpoint: str | Path, lr: float | None = None, fingerprint: str | None = None
) -> dict[str, torch.Tensor] | None:
    """Continue ``optimizer`` from the state saved in a resume checkpoint (its ``"optimizer"`` entry):
    SGD's momentum buffers go on where training stopped. ``lr`` then replaces the saved learning
    rate (a finished poly schedule leaves it near 0).

    Returns the checkpoint's model weights (the same epoch as the optimiser state: the caller
    starts from them, as the authors' code resumes its last epoch), or None when nothing was
    loaded (a warning says why): no file, a checkpoint of another run (``fingerprint``), another
    optimiser type or another network (parameter groups, counts or buffer shapes differ).
    """
    path, reason, model = Path(checkpoint), "", None
    if not path.is_file():
        reason = "no such file"
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved, own = state.get("optimizer"), optimizer.state_dict()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if fingerprint is not None and checkpoint_fingerprint(state) != fingerprint:
            reason = f"it belongs to another run ({checkpoint_fingerprint(state)})"
        elif saved is None or "model" not in state:
            reason = "no optimiser state or model in it"
        elif len(saved["param_groups"]) != len(own["param_groups"]) or not all(
            set(a) - {"initial_lr"} == set(b) - {"initial_lr"} and len(a["params"]) == len(b["params"])
            for a, b in zip(saved["param_groups"], own["param_groups"])
        ):  # initial_lr: added by an lr scheduler
            reason = "it holds another optimiser's state"
        elif any(
            torch.is_tensor(v) and v.ndim and v.shape != params[int(i)].shape
            for i, buf in saved["state"].items()
            for v in buf.values()
        ):
            reason = "its buffers do not fit this network"
        else:
            optimizer.load_state_dict(saved)
            model = state["model"]
    if reason:
        logger.warning("refinement optimiser starts afresh from models/model.pt: %s: %s", path, reason)
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = float(lr)
    return model


def _reshuffled(loader) -> Iterator[Any]:
    """The batches of ``loader`` without end, every pass freshly shuffled (``itertools.cycle``
    would replay the first pass)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the labelled data loader is empty")


class QCRefinement:
    """The refinement loop (module docstring). ``network``/``optimizer``/``loss`` are train.json's
    (the optimiser continues from ``resume_checkpoint``); ``evaluator`` is train.json's validation
    evaluator with its ``BestCheckpoints`` pointed at the refined models (refine.json)."""

    def __init__(
        self,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss: torch.nn.Module,
        labelled_loader,
        unlabelled: Sequence[Mapping[str, Any]],
        inferer,
        ckpt_dir: str,
        output_dir: str,
        evaluator=None,
        device: torch.device | str = "cpu",
        k_semi: int = 5,
        alpha_schedule: str = "paper",
        wgd_class_weights: Sequence[float] = (1.0, 1.0, 1.0, 3.0),
        batch_size: int = 16,
        amp: bool = False,
        grad_clip: float = 12.0,
        resume_checkpoint: str | None = None,
        learning_rate: float | None = None,
        code_start_epoch: int = 200,
        code_epochs: int = 250,
        tensorboard_dir: str | None = None,
        refined_dir: str | None = None,
        fingerprint: str | None = None,
    ) -> None:
        alpha_for(1, alpha_schedule)  # validates the name
        self.network, self.optimizer, self.loss = network, optimizer, loss
        self.labelled_loader, self.unlabelled = labelled_loader, list(unlabelled)
        self.inferer, self.evaluator = inferer, evaluator
        self.ckpt_dir, self.output_dir = Path(ckpt_dir), Path(output_dir)
        self.device = torch.device(device)
        self.k_semi, self.alpha_schedule = int(k_semi), alpha_schedule
        self.code_start_epoch, self.code_epochs = int(code_start_epoch), int(code_epochs)
        self.wgd_class_weights = list(wgd_class_weights)
        self.batch_size, self.amp, self.grad_clip = int(batch_size), bool(amp), float(grad_clip)
        self.resume_checkpoint, self.learning_rate = resume_checkpoint, learning_rate
        self.tensorboard_dir, self.fingerprint = tensorboard_dir, fingerprint
        # where validation keeps the refined models until they replace the candidates (refine.json
        # points validate#best_checkpoints there): an interrupted run leaves models/candidates intact
        self.refined_dir = Path(refined_dir) if refined_dir else self.ckpt_dir / "refined"
        self._labelled: Iterator[Any] | None = None
        self._k = 1

    def alpha(self, k: int) -> float:
        return alpha_for(k, self.alpha_schedule, self.code_start_epoch, self.code_epochs)

    # ------------------------------------------------------------------ data
    def _volumes(self) -> list[dict]:
        load = LoadImage(image_only=True)
        vols = []
        for d in self.unlabelled:
            x, _, z_ratio, _ = self.inferer.prepare(EnsureChannelFirst()(load(d["image"])))
            vols.append(
                {
                    "image": d["image"],
                    "case": d.get("case", Path(d["image"]).name),
                    "x": x,
                    "z_ratio": z_ratio,
                    "phase": phase_of(d["image"]),
                }
            )
        return vols

    def _screen(self, vols: list[dict], others: list[torch.nn.Module]) -> dict[str, Any]:
        """pDC/pHD of the current model and the other candidates on every unlabelled volume (the
        others' are computed once and kept in ``vols``); the thresholds over the set; the OoD
        verdicts; the QC-selected soft map of each OoD volume (``alpha_schedule: "code"``)."""
        rows, softs, nets = [], {}, [self.network, *others]
        for v in vols:  # measures only: the soft maps of a whole set would not fit in memory
            if "others" not in v:  # the other candidates do not change: measured once, at the first screening
                v["others"] = [self.inferer.measures(self.inferer.predict(n, v["x"]), v["z_ratio"]) for n in others]
            ms = [self.inferer.measures(self.inferer.predict(self.network, v["x"]), v["z_ratio"]), *v["others"]]
            rows.append(
                {
                    "case": v["case"],
                    "phase": v["phase"],
                    "pDC": [m["pDC"]["RV"] for m in ms],
                    "pHD": [m["pHD"]["RV"] for m in ms],
                }
            )
        th = self.inferer.thresholds_for(rows)
        for r, v in zip(rows, vols):
            r["ood"] = self.inferer.flag(r["pDC"], r["pHD"], th, r["phase"])
            if r["ood"] and self.alpha_schedule == "code":  # the authors' pseudo-label needs ŷ_best: predicted again
                choice = select_candidate(r["pDC"], r["pHD"], thresholds_of(th, r["phase"])[1])
                r["selected"] = choice
                idx = [choice["model"]] if choice["rule"] == "ranked" else choice["models"]
                softs[r["case"]] = sum(self.inferer.predict(nets[i], v["x"]) for i in idx) / len(idx)
        return {"thresholds": th, "volumes": rows, "ood": [r["case"] for r in rows if r["ood"]], "best": softs}

    def _ood_batches(self, vols: list[dict], screen: Mapping[str, Any]) -> list[dict]:
        batches = []
        for v in vols:
            if v["case"] not in screen["ood"]:
                continue
            for i in range(0, v["x"].shape[0], self.batch_size):
                b = {"image": v["x"][i : i + self.batch_size], "case": v["case"]}
                if v["case"] in screen["best"]:
                    b["best"] = screen["best"][v["case"]][i : i + self.batch_size]
                batches.append(b)
        return batches

    # ------------------------------------------------------------------ engines
    def _trainer(self, data, iteration_update=None, max_epochs: int = 1) -> SupervisedTrainer:
        trainer = SupervisedTrainer(
            device=self.device,
            max_epochs=max_epochs,
            train_data_loader=data,
            network=self.network,
            optimizer=self.optimizer,
            loss_function=self.loss,
            iteration_update=iteration_update,
            amp=self.amp,
            decollate=False,
        )
        GradientClip(self.network, self.grad_clip).attach(trainer)
        return trainer

    def _semi_iteration(self, engine: SupervisedTrainer, batch: Mapping[str, Any]) -> dict[str, Any]:
        """One refinement step on a batch of OoD slices (AMP-aware; clipping by :class:`GradientClip`)."""
        k, net = self._k, engine.network
        alpha = self.alpha(k)
        x = batch["image"].to(engine.state.device)
        net.train()
        engine.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, enabled=engine.amp, **engine.amp_kwargs):
            out = net(x)
            logits = (out[:, 0] if out.ndim == 5 else out).float()  # full-resolution head
        probs = torch.softmax(logits, 1)
        n_classes = probs.shape[1]
        with torch.no_grad():
            recon = self.inferer.reconstruct(probs.detach().cpu()).to(x.device)
        if self.alpha_schedule == "paper":
            target = one_hot(recon.argmax(1, keepdim=True), n_classes)
            semi = alpha * generalized_dice_loss(probs, target, self.wgd_class_weights)
            labelled = next(self._labelled)
            with torch.autocast(x.device.type, enabled=engine.amp, **engine.amp_kwargs):
                sup = self.loss(net(labelled["image"].to(x.device)), labelled["label"].to(x.device))
            loss = semi + sup.float()
        else:  # the authors' code: mixed, hard pseudo-label; RV only; no supervised term
            mixed = alpha * batch["best"].to(x.device) + (1.0 - alpha) * recon
            target = one_hot(mixed.argmax(1, keepdim=True), n_classes)
            rv_only = [0.0] * (n_classes - 1) + [1.0]
            semi = generalized_dice_loss(probs, target, rv_only) + F.binary_cross_entropy(
                probs[:, -1].clamp(1e-6, 1 - 1e-6), target[:, -1]
            )
            sup = torch.zeros(())
            loss = semi
        if engine.amp and engine.scaler is not None:
            engine.scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        return {"loss": float(loss), "semi": float(semi), "sup": float(sup), "alpha": alpha, "case": batch["case"]}

    # ------------------------------------------------------------------ run
    def _backup_supervised(self) -> None:
        backup = self.ckpt_dir / "supervised"
        if backup.exists():  # a second refinement run continues from the refined model
            return
        backup.mkdir(parents=True)
        shutil.copy2(self.ckpt_dir / "model.pt", backup / "model.pt")
        if (self.ckpt_dir / "candidates").is_dir():
            shutil.copytree(self.ckpt_dir / "candidates", backup / "candidates")

    def _install_refined(self) -> list[dict]:
        """The refined models kept by validation replace ``models/candidates`` and ``models/model.pt``."""
        cand_dir, index = self.ckpt_dir / "candidates", self.refined_dir / "candidates.json"
        if self.evaluator is None or not index.is_file():  # nothing kept by validation: the last refined model
            atomic_torch_save(
                {k: v.detach().cpu() for k, v in self.network.state_dict().items()}, self.refined_dir / "model.pt"
            )
            write_json(index, {"metric": None, "candidates": [{"file": "model_last.pt"}]})
            shutil.copy2(self.refined_dir / "model.pt", self.refined_dir / "model_last.pt")
        kept = json.loads(index.read_text())
        cand_dir.mkdir(parents=True, exist_ok=True)
        for f in list(cand_dir.glob("*.pt")) + [cand_dir / "candidates.json"]:
            f.unlink(missing_ok=True)
        for e in kept["candidates"]:
            shutil.copy2(self.refined_dir / e["file"], cand_dir / e["file"])
        write_json(cand_dir / "candidates.json", kept)  # last: an index only ever lists files that are there
        tmp = self.ckpt_dir / ".model.pt.tmp"
        shutil.copy2(self.refined_dir / "model.pt", tmp)
        os.replace(tmp, self.ckpt_dir / "model.pt")
        shutil.rmtree(self.refined_dir)
        return kept["candidates"]

    def _validate(self, k: int) -> float | None:
        if self.evaluator is None:
            return None
        self.evaluator.run(global_epoch=k)
        return float(self.evaluator.state.metrics.get("val_loss", math.nan))

    def run(self) -> dict[str, Any]:
        best = self.ckpt_dir / "model.pt"
        self.network.load_state_dict(torch.load(best, map_location=self.device, weights_only=True))
        cand_dir = self.ckpt_dir / "candidates"
        others, _ = load_candidates(self.network, cand_dir) if (cand_dir / "candidates.json").is_file() else ([], [])
        others = [n.to(self.device) for n in others[1:]]  # the first (best) candidate is the model being refined
        vols = self._volumes()
        log: dict[str, Any] = {
            "k_semi": self.k_semi,
            "alpha_schedule": self.alpha_schedule,
            "iterations": [],
            "unlabelled": [v["case"] for v in vols],
        }
        start = time.perf_counter()
        screen = self._screen(vols, others)
        log["initial"] = {"thresholds": screen["thresholds"], "ood": screen["ood"], "measures": screen["volumes"]}
        logger.info("refinement: %d/%d unlabelled volumes OoD before refinement", len(screen["ood"]), len(vols))
        updated = bool(screen["ood"]) and self.k_semi > 0
        if updated:
            self._backup_supervised()
            shutil.rmtree(self.refined_dir, ignore_errors=True)  # an interrupted run's leftovers
            resumed = (
                load_optimizer_state(self.optimizer, self.resume_checkpoint, self.learning_rate, self.fingerprint)
                if self.resume_checkpoint
                else None
            )
            log["optimizer_state_loaded"] = resumed is not None
            if resumed is not None:  # weights of the same epoch as the optimiser's momentum
                self.network.load_state_dict(resumed)
            log["start_weights"] = "resume checkpoint (last epoch)" if resumed is not None else "models/model.pt"
            self._labelled = _reshuffled(self.labelled_loader)
            supervised = self._trainer(self.labelled_loader)
            sup_losses: list[float] = []
            supervised.add_event_handler(
                Events.ITERATION_COMPLETED, lambda e: sup_losses.append(float(e.state.output["loss"]))
            )
            for k in range(1, self.k_semi + 1):
                self._k = k
                supervised.state.max_epochs = k  # one more epoch of the same engine
                sup_losses.clear()
                supervised.run()
                it: dict[str, Any] = {"k": k, "supervised_loss": float(np.mean(sup_losses))}
                screen = self._screen(vols, others)
                it.update(thresholds=screen["thresholds"], ood=screen["ood"], measures=screen["volumes"])
                logger.info(
                    "refinement k=%d: %d/%d volumes OoD after the supervised epoch", k, len(screen["ood"]), len(vols)
                )
                if screen["ood"]:
                    steps: list[dict] = []
                    semi = self._trainer(self._ood_batches(vols, screen), iteration_update=self._semi_iteration)
                    semi.add_event_handler(Events.ITERATION_COMPLETED, lambda e: steps.append(dict(e.state.output)))
                    semi.run()
                    it.update(
                        alpha=self.alpha(k), semi_steps=steps, mean_semi_loss=float(np.mean([s["loss"] for s in steps]))
                    )
                it["val_loss"] = self._validate(k)
                log["iterations"].append(it)
                self._tensorboard(it)
                self._write(log)
                if not screen["ood"]:
                    break
            log["kept"] = self._install_refined()
            self.network.load_state_dict(torch.load(best, map_location=self.device, weights_only=True))
            final = self._screen(vols, others)  # the model inference will use
            log["final"] = {"thresholds": final["thresholds"], "ood": final["ood"], "measures": final["volumes"]}
        log["updated"] = updated
        log["seconds"] = time.perf_counter() - start
        self._write(log)
        return log

    def _tensorboard(self, it: Mapping[str, Any]) -> None:
        """Per-iteration scalars (step k): OoD count, thresholds, losses."""
        if not self.tensorboard_dir:
            return
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(self.tensorboard_dir) as tb:
            tb.add_scalar("refine/n_ood", len(it["ood"]), it["k"])
            for key in ("supervised_loss", "mean_semi_loss", "val_loss", "alpha"):
                if it.get(key) is not None:
                    tb.add_scalar(f"refine/{key}", it[key], it["k"])
            for key in ("th_low", "th_up"):
                if math.isfinite(it["thresholds"][key]):
                    tb.add_scalar(f"refine/{key}", it["thresholds"][key], it["k"])

    def _write(self, log: dict) -> None:
        write_json(self.output_dir / "refine_log.json", _json_safe(log))
