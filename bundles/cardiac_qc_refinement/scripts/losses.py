"""Losses: generalised Dice (optionally class-weighted, e.g. towards RV) + cross-entropy with deep
supervision for segmenter M; MSE + generalised Dice for the QC autoencoder R."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["generalized_dice_loss", "GeneralizedDiceCELoss", "QCLoss", "one_hot"]


def one_hot(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, 1, H, W) integer-valued labels -> (B, C, H, W) float one-hot."""
    lab = label.long()
    lab = lab[:, 0] if lab.ndim == 4 else lab
    return F.one_hot(lab.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2).float()


def generalized_dice_loss(probs: torch.Tensor, target: torch.Tensor, class_weights: Sequence[float] | None = None,
                          eps: float = 1e-5) -> torch.Tensor:
    """Generalised Dice loss (Sudre et al. 2017) of probabilities vs a (soft or one-hot) target, both (B, C, ...).

    Per-class weights 1 / (sum of target)^2 (classes absent from the batch get the largest
    present weight), multiplied by ``class_weights`` (e.g. ``[1, 1, 1, 3]`` weights RV up: the
    weighted generalised Dice L_WGD of the refinement).
    """
    dims = [0] + list(range(2, probs.ndim))
    ref = target.sum(dims)
    w = 1.0 / (ref * ref).clamp_min(eps)
    present = ref > 0
    if present.any():
        w = torch.where(present, w, w[present].max())
    else:
        w = torch.ones_like(w)
    if class_weights is not None:
        w = w * torch.as_tensor(class_weights, dtype=w.dtype, device=w.device)
    inter = (probs * target).sum(dims)
    denom = (probs + target).sum(dims)
    return 1.0 - (2.0 * (w * inter).sum() + eps) / ((w * denom).sum() + eps)


class GeneralizedDiceCELoss(nn.Module):
    """L_GD + L_CE on logits vs integer labels; a stacked deep-supervision output ``(B, S, C, H, W)``
    is scored head by head with weights proportional to 2^-i (normalised)."""

    def __init__(self, num_classes: int = 4, class_weights: Sequence[float] | None = None, ce_weight: float = 1.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.class_weights = class_weights
        self.ce_weight = ce_weight

    def single(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        target = one_hot(label, self.num_classes)
        gd = generalized_dice_loss(torch.softmax(logits, 1), target, self.class_weights)
        ce = F.cross_entropy(logits, target.argmax(1))
        return gd + self.ce_weight * ce

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if logits.ndim == label.ndim + 1:  # deep supervision: (B, S, C, H, W)
            heads = torch.unbind(logits, dim=1)
            weights = torch.tensor([0.5**i for i in range(len(heads))])
            weights = weights / weights.sum()
            return sum(float(w) * self.single(h, label) for w, h in zip(weights, heads))
        return self.single(logits, label)


class QCLoss(nn.Module):
    """L_R = MSE(y_R, y) + L_GD(y_R, y): ``recon`` are R's softmax outputs, ``target`` the one-hot masks."""

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(recon, target) + generalized_dice_loss(recon, target)


class OneHotLabelBatch:
    """``prepare_batch`` for training R: input and target are both the one-hot ground-truth mask."""

    def __init__(self, num_classes: int = 4) -> None:
        self.num_classes = num_classes

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        y = one_hot(batchdata["label"], self.num_classes).to(device=device, non_blocking=non_blocking)
        return y, y
