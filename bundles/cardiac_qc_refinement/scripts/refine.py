"""Semi-supervised refinement of segmenter M driven by the QC module R (METHODS §3).

While OoD volumes remain and k <= K_semi: screen the unlabelled set (every candidate model; IQR
thresholds), then one supervised epoch on the labelled data, then, on each OoD volume,
L_SEMI = alpha * L_WGD(y_M, y_R) + L_SUP with y_R = one-hot(argmax R(softmax y_M)) and L_SUP on a
labelled batch. alpha = 1/k ("paper", default) or the authors' code schedule ("code": pseudo-label
alpha*y_M + (1-alpha)*R(y_M) with alpha = k/250, RV-only generalised Dice + CE).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import EnsureChannelFirst, LoadImage
from shared_transforms.datalist import write_json
from shared_transforms.handlers import atomic_torch_save

from .data import phase_of, preprocess_volume, spacing_from_meta
from .losses import generalized_dice_loss, one_hot
from .qc import _json_safe, load_candidates

logger = logging.getLogger(__name__)

__all__ = ["alpha_for", "QCRefinement"]


def alpha_for(k: int, schedule: str = "paper") -> float:
    """The weight of the QC term at refinement iteration ``k`` (1-based)."""
    if schedule == "paper":
        return 1.0 / k
    if schedule == "code":
        return min(k / 250.0, 1.0)
    raise ValueError(f"alpha_schedule must be 'paper' or 'code', got {schedule!r}")


class QCRefinement:
    def __init__(self, network: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.nn.Module,
                 labelled_loader, unlabelled: Sequence[Mapping[str, Any]], inferer, ckpt_dir: str, output_dir: str,
                 device: torch.device | str = "cpu", k_semi: int = 5, alpha_schedule: str = "paper",
                 wgd_class_weights: Sequence[float] = (1.0, 1.0, 1.0, 3.0), batch_size: int = 16) -> None:
        alpha_for(1, alpha_schedule)  # validates the name
        self.network, self.optimizer, self.loss = network, optimizer, loss
        self.labelled_loader, self.unlabelled = labelled_loader, list(unlabelled)
        self.inferer = inferer
        self.ckpt_dir, self.output_dir = Path(ckpt_dir), Path(output_dir)
        self.device = torch.device(device)
        self.k_semi, self.alpha_schedule = int(k_semi), alpha_schedule
        self.wgd_class_weights = list(wgd_class_weights)
        self.batch_size = int(batch_size)

    # ------------------------------------------------------------------ data
    def _volumes(self) -> list[dict]:
        load = LoadImage(image_only=True)
        vols = []
        for d in self.unlabelled:
            img = EnsureChannelFirst()(load(d["image"]))
            x, _, _ = preprocess_volume(np.asarray(img)[0], spacing_from_meta(img), self.inferer.target_spacing,
                                        self.inferer.image_size)
            sp = spacing_from_meta(img)
            vols.append({"image": d["image"], "case": d.get("case", Path(d["image"]).name), "x": x,
                         "z_ratio": sp[2] / self.inferer.target_spacing[0]})
        return vols

    def _screen(self, vols: list[dict], others: list[torch.nn.Module]) -> dict[str, Any]:
        rows = []
        for v in vols:
            ms = [self.inferer.measures(self.inferer.predict(n, v["x"]), v["z_ratio"]) for n in [self.network, *others]]
            rows.append({"case": v["case"], "phase": phase_of(v["image"]), "pDC": [m["pDC"]["RV"] for m in ms], "pHD": [m["pHD"]["RV"] for m in ms]})
        th = self.inferer.thresholds_for(rows)
        for r in rows:
            r["ood"] = self.inferer.flag(r["pDC"], r["pHD"], th, r["phase"])
        return {"thresholds": th, "volumes": rows, "ood": [r["case"] for r in rows if r["ood"]]}

    # ------------------------------------------------------------------ steps
    def _supervised_epoch(self) -> float:
        self.network.train()
        losses = []
        for batch in self.labelled_loader:
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss(self.network(batch["image"].to(self.device)), batch["label"].to(self.device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12.0)
            self.optimizer.step()
            losses.append(float(loss))
        return float(np.mean(losses)) if losses else math.nan

    def _semi_step(self, x: torch.Tensor, labelled: Mapping[str, torch.Tensor], k: int) -> dict[str, float]:
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        out = self.network(x.to(self.device))
        logits = out[:, 0] if out.ndim == 5 else out  # full-resolution head
        probs = torch.softmax(logits, 1)
        alpha = alpha_for(k, self.alpha_schedule)
        with torch.no_grad():
            recon = self.inferer.reconstruct(probs.detach().cpu()).to(self.device)
        if self.alpha_schedule == "paper":
            target = one_hot(recon.argmax(1, keepdim=True), probs.shape[1])
            semi = alpha * generalized_dice_loss(probs, target, self.wgd_class_weights)
        else:  # the authors' code: mixed pseudo-label, RV-only generalised Dice + CE
            target = alpha * one_hot(probs.detach().argmax(1, keepdim=True), probs.shape[1]) + (1 - alpha) * recon
            rv_only = [0.0] * (probs.shape[1] - 1) + [1.0]
            semi = generalized_dice_loss(probs, target, rv_only) + F.cross_entropy(logits, target.argmax(1))
        sup = self.loss(self.network(labelled["image"].to(self.device)), labelled["label"].to(self.device))
        loss = semi + sup
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12.0)
        self.optimizer.step()
        return {"loss": float(loss), "semi": float(semi), "sup": float(sup), "alpha": alpha}

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        best = self.ckpt_dir / "model.pt"
        self.network.load_state_dict(torch.load(best, map_location=self.device, weights_only=True))
        backup = self.ckpt_dir / "supervised"
        if not backup.exists():  # the supervised models, kept for the ablation (M and {M}+QC)
            backup.mkdir(parents=True)
            shutil.copy2(best, backup / "model.pt")
            if (self.ckpt_dir / "candidates").is_dir():
                shutil.copytree(self.ckpt_dir / "candidates", backup / "candidates")
        cand_dir = self.ckpt_dir / "candidates"
        index = json.loads((cand_dir / "candidates.json").read_text()) if (cand_dir / "candidates.json").is_file() else None
        others, _ = load_candidates(self.network, cand_dir) if index else ([], [])
        others = others[1:]  # the first (best) candidate is the model being refined
        vols = self._volumes()
        labelled = itertools.cycle(self.labelled_loader)
        log: dict[str, Any] = {"k_semi": self.k_semi, "alpha_schedule": self.alpha_schedule, "iterations": [],
                               "unlabelled": [v["case"] for v in vols]}
        updates, start = 0, time.perf_counter()
        for k in range(1, self.k_semi + 1):
            screen = self._screen(vols, others)
            it: dict[str, Any] = {"k": k, "thresholds": screen["thresholds"], "ood": screen["ood"], "measures": screen["volumes"]}
            log["iterations"].append(it)
            logger.info("refinement k=%d: %d/%d volumes OoD (th_low %.4f, th_up %.3f)", k, len(screen["ood"]), len(vols),
                        screen["thresholds"]["th_low"], screen["thresholds"]["th_up"])
            if not screen["ood"]:
                break
            it["supervised_loss"] = self._supervised_epoch()
            steps = []
            for v in vols:
                if v["case"] not in screen["ood"]:
                    continue
                for i in range(0, v["x"].shape[0], self.batch_size):
                    steps.append({"case": v["case"], **self._semi_step(v["x"][i:i + self.batch_size], next(labelled), k)})
            it["semi_steps"] = steps
            it["mean_semi_loss"] = float(np.mean([s["loss"] for s in steps]))
            updates += 1 + len(steps)
            self._write(log)
        else:
            if self.k_semi > 0:
                final = self._screen(vols, others)
                log["final"] = {"thresholds": final["thresholds"], "ood": final["ood"], "measures": final["volumes"]}
        log["updated"] = updates > 0
        log["seconds"] = time.perf_counter() - start
        if updates:
            state = {k: v.detach().cpu() for k, v in self.network.state_dict().items()}
            atomic_torch_save(state, best)
            if index:
                atomic_torch_save(state, cand_dir / index["candidates"][0]["file"])
                index["candidates"][0]["refined"] = True
                write_json(cand_dir / "candidates.json", index)
        self._write(log)
        return log

    def _write(self, log: dict) -> None:
        write_json(self.output_dir / "refine_log.json", _json_safe(log))
