"""Losses, built from MONAI's: generalised Dice + cross-entropy with deep supervision for
segmenter M, MSE + generalised Dice for the QC autoencoder R. The method's own loss, the
class-weighted generalised Dice L_WGD of the refinement (towards RV), is the custom part."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DeepSupervisionLoss, GeneralizedDiceLoss
from monai.networks.utils import one_hot
from torch import nn

__all__ = ["generalized_dice_loss", "GeneralizedDiceCELoss", "SegmenterLoss", "QCLoss", "OneHotLabelBatch"]


def generalized_dice_loss(
    probs: torch.Tensor, target: torch.Tensor, class_weights: Sequence[float] | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """L_WGD: generalised Dice (Sudre et al. 2017) of probabilities vs a (soft or one-hot) target,
    both (B, C, ...), over the whole batch, with extra per-class weights.

    Per-class weights 1 / (sum of target)^2 (classes absent from the batch get the largest
    present weight, as MONAI's ``GeneralizedDiceLoss``), multiplied by ``class_weights``
    (``[1, 1, 1, 3]`` weights RV up; ``[0, 0, 0, 1]`` is RV only). With no ``class_weights`` it
    equals ``GeneralizedDiceLoss(batch=True)``.
    """
    dims = [0] + list(range(2, probs.ndim))
    ref = target.sum(dims)
    w = 1.0 / (ref * ref).clamp_min(eps)
    present = ref > 0
    w = torch.where(present, w, w[present].max()) if present.any() else torch.ones_like(w)
    if class_weights is not None:
        w = w * torch.as_tensor(class_weights, dtype=w.dtype, device=w.device)
    inter = (probs * target).sum(dims)
    denom = (probs + target).sum(dims)
    return 1.0 - (2.0 * (w * inter).sum() + eps) / ((w * denom).sum() + eps)


class GeneralizedDiceCELoss(nn.Module):
    """L_GD + ``ce_weight`` · L_CE of logits (B, C, H, W) vs integer labels (B, 1, H, W):
    MONAI's ``GeneralizedDiceLoss`` (softmax, one-hot target, batch-wise) plus cross-entropy."""

    def __init__(self, num_classes: int = 4, ce_weight: float = 1.0) -> None:
        super().__init__()
        self.num_classes, self.ce_weight = num_classes, ce_weight
        self.gd = GeneralizedDiceLoss(include_background=True, to_onehot_y=True, softmax=True, batch=True)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        label = label if label.ndim == logits.ndim else label[:, None]
        return self.gd(logits, label) + self.ce_weight * F.cross_entropy(logits, label[:, 0].long())


class SegmenterLoss(DeepSupervisionLoss):
    """Segmenter M's loss: :class:`GeneralizedDiceCELoss` under MONAI's ``DeepSupervisionLoss``.

    DynUNet's deep-supervision output ``(B, S, C, H, W)`` (heads already at full size) is scored
    head by head with weights ∝ 2^-i, normalised to sum 1 (nnU-Net); a single output
    ``(B, C, H, W)`` (eval mode) is scored alone.
    """

    def __init__(self, num_classes: int = 4, ce_weight: float = 1.0) -> None:
        super().__init__(GeneralizedDiceCELoss(num_classes, ce_weight))

    def get_weights(self, levels: int = 1) -> list[float]:
        raw = [0.5**i for i in range(max(1, levels))]
        return [w / sum(raw) for w in raw]

    def forward(self, input: torch.Tensor | list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.Tensor) and input.ndim == target.ndim + 1:
            input = list(torch.unbind(input, dim=1))
        return super().forward(input, target)


class QCLoss(nn.Module):
    """L_R = MSE(y_R, y) + L_GD(y_R, y): ``recon`` are R's softmax outputs, ``target`` the one-hot masks."""

    def __init__(self) -> None:
        super().__init__()
        self.gd = GeneralizedDiceLoss(include_background=True, batch=True)

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(recon, target) + self.gd(recon, target)


class OneHotLabelBatch:
    """``prepare_batch`` for training R: input and target are both the one-hot ground-truth mask."""

    def __init__(self, num_classes: int = 4) -> None:
        self.num_classes = num_classes

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        y = one_hot(batchdata["label"].long(), self.num_classes).float().to(device=device, non_blocking=non_blocking)
        return y, y
