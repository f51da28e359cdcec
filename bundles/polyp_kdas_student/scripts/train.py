"""One KDAS training iteration: multi-scale steps, frozen teacher, clamped gradients, AMP.

Used as the ``iteration_update`` of MONAI's ``SupervisedTrainer`` (train.json and
train_teacher.json). For every rate in ``rates`` (0.75, 1, 1.25) the batch is resized to
``round(image_size·rate / size_multiple)·size_multiple`` pixels (256 / 352 / 448 at 352),
the student's (P1, P2) and, for distillation, the frozen teacher's (P1, P2) are computed,
the ``KDASLoss`` is back-propagated, gradient values are clamped to ±``clip_value`` and the
optimiser steps: one step per rate, as in Polyp-PVT / KDAS.

The output carries ``loss`` (the total, mean over the rates) and each term of the loss
(``loss_seg`` = Σ_k L_seg, ``loss_at``, ``loss_sgm`` or ``loss_kl``, means over the rates);
:func:`loss_terms` hands them to the Stats/TensorBoard handlers, so a user sees per iteration
which term drives training.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch import nn

__all__ = ["MultiScaleKDStep", "scale_sizes", "loss_terms"]

logger = logging.getLogger(__name__)


def loss_terms(output) -> dict:
    """``output_transform`` for Stats/TensorBoard handlers: ``train_loss`` and ``train_loss_<term>`` of
    the iteration's (decollated) output."""
    first = output[0] if isinstance(output, (list, tuple)) else output
    return {
        ("train_loss" if k == Keys.LOSS else f"train_{k}"): first[k]
        for k in sorted(first)
        if k == Keys.LOSS or k.startswith("loss_")
    }


def scale_sizes(image_size: int, rates, size_multiple: int = 32) -> list[int]:
    """Training sizes of the rates: multiples of ``size_multiple``, at least one multiple."""
    return [max(size_multiple, int(round(image_size * r / size_multiple)) * size_multiple) for r in rates]


class MultiScaleKDStep:
    """``iteration_update(engine, batch)`` for ``SupervisedTrainer``.

    Args:
        teacher: the teacher network (``None``: no distillation); frozen by ``load_teacher``.
        teacher_ckpt: the teacher's trained weights, loaded at the first iteration.
        image_size: the base training size (352).
        rates: multi-scale rates ({0.75, 1, 1.25}).
        size_multiple: sizes are rounded to multiples of this (32).
        clip_value: gradient values are clamped to ±clip_value (0.5); ``None`` disables.
        backbone_pretrained: whether the trained network's backbone starts from ImageNet weights
            (``pretrained`` or ``pretrained_path``); when not, the first iteration warns that the
            run is not comparable to the paper.

    The engine's ``loss_function`` is a ``KDASLoss``; its ``network`` returns ``(P1, P2)``.
    The output's ``pred`` is ``P1 + P2`` of the rate-1 step (for the training metric).
    """

    def __init__(
        self,
        teacher: nn.Module | None = None,
        teacher_ckpt: str | None = None,
        image_size: int = 352,
        rates=(0.75, 1.0, 1.25),
        size_multiple: int = 32,
        clip_value: float | None = 0.5,
        backbone_pretrained: bool = True,
    ) -> None:
        self.teacher = teacher
        self._warn_random_init = not backbone_pretrained
        self.teacher_ckpt = teacher_ckpt
        self._teacher_loaded = teacher is None or teacher_ckpt is None
        self.sizes = scale_sizes(image_size, rates, size_multiple)
        self.base = scale_sizes(image_size, [1.0], size_multiple)[0]
        self.clip_value = clip_value

    def load_teacher(self, device=None) -> nn.Module | None:
        """Load ``teacher_ckpt`` into the teacher and freeze it (once; at the first iteration at the latest).

        Loading lazily lets the workflow be built (``monai.bundle.load``, property checks, MONAI
        Label) where no teacher checkpoint exists yet.
        """
        if not self._teacher_loaded:
            from scripts.net import load_frozen

            if device is None:
                device = next(self.teacher.parameters()).device
            self.teacher = load_frozen(self.teacher, self.teacher_ckpt, device)
            self._teacher_loaded = True
        return self.teacher

    def __call__(self, engine, batchdata) -> dict:
        loss_fn = engine.loss_function
        if self._warn_random_init:
            logger.warning(
                "the PVTv2 backbone starts from random weights (pretrained: false, no pretrained_path): "
                "Polyp-PVT and KDAS start from ImageNet weights, so this run is NOT comparable to the paper's numbers"
            )
            self._warn_random_init = False
        if getattr(loss_fn, "needs_teacher", False) and self.teacher is None:
            raise ValueError(f"kd={loss_fn.kd!r} needs a teacher (teacher_def and teacher_ckpt)")
        if self.teacher is not None:
            self.load_teacher(engine.state.device)
        images, labels = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)[
            :2
        ]
        images, labels = torch.as_tensor(images), torch.as_tensor(labels)
        engine.network.train()
        if self.teacher is not None:
            self.teacher.eval()
        use_amp = bool(engine.amp and engine.scaler is not None)
        output = {Keys.IMAGE: images, Keys.LABEL: labels}
        losses, terms = [], {}
        for size in self.sizes:
            if size != images.shape[-1] or size != images.shape[-2]:
                x = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=True)
                y = F.interpolate(labels, size=(size, size), mode="bilinear", align_corners=True)
            else:
                x, y = images, labels
            engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
            with torch.autocast(images.device.type, enabled=use_amp, **engine.amp_kwargs):
                student = engine.network(x)
                teacher = None
                if self.teacher is not None and loss_fn.needs_teacher:
                    with torch.no_grad():
                        teacher = tuple(t.detach() for t in self.teacher(x))
                loss = loss_fn(student, y, teacher)
            params = [p for p in engine.network.parameters() if p.requires_grad]
            if use_amp:
                engine.scaler.scale(loss).backward()
                engine.scaler.unscale_(engine.optimizer)
                if self.clip_value is not None:
                    torch.nn.utils.clip_grad_value_(params, self.clip_value)
                engine.scaler.step(engine.optimizer)
                engine.scaler.update()
            else:
                loss.backward()
                if self.clip_value is not None:
                    torch.nn.utils.clip_grad_value_(params, self.clip_value)
                engine.optimizer.step()
            losses.append(loss.detach())
            for name, value in getattr(loss_fn, "last_terms", {}).items():
                if name != "total":
                    terms.setdefault(f"loss_{name}", []).append(value)
            if size == self.base or Keys.PRED not in output:
                pred = student[0] + student[1] if isinstance(student, (tuple, list)) else student
                output[Keys.PRED] = F.interpolate(
                    pred.detach().float(), size=images.shape[-2:], mode="bilinear", align_corners=False
                )
        output[Keys.LOSS] = torch.stack(losses).mean()
        output.update({name: torch.stack(values).mean() for name, values in terms.items()})
        engine.state.output = output
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # MONAI decollates and post-processes here
        return engine.state.output
