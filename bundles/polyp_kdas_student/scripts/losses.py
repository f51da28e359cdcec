"""KDAS losses (METHODS §2): PraNet structure loss, attention KD, Symmetrical Guiding Module.

All functions take logit maps ``(B, 1, H, W)``. Teacher maps are detached inside every KD
term, so no gradient ever reaches the teacher.

    total = (1 - λ)·Σ_k L_seg(P_k) + λ·L_KD        (λ = 0.2, k over P1 and P2)

with ``L_KD`` by variant (``kd``):

- ``"none"``: no teacher; the loss is Σ_k L_seg(P_k) (the Polyp-PVT baseline);
- ``"kl"``: Hinton KL on the output maps: Σ_k T²·KL(softmax(P_t/T) ‖ softmax(P_s/T)), the
  softmax over the H·W positions of each image ('batchmean');
- ``"attention"``: L_AT = Σ_k T²·KL(softmax(A(P_t)/T) ‖ softmax(A(P_s)/T)),
  ``A(P) = softmax_row(X·Xᵀ/√W)·X`` with ``X = P[:, 0]``;
- ``"attention_sgm"`` (KDAS, default): L_AT + L_SGM with L_SGM = T²·KL(softmax(C_t/T) ‖
  softmax(C_s/T)), C the covariance-like matrix of the last scale's (P2's) attention output
  A (B × H × W, rows as variables observed over the W columns), by ``sgm_norm``:

  - ``"width"`` (default): ``C = A·Aᵀ / W`` per image (the paper's "covariance matrices");
  - ``"centred"``: ``C = (A − Ā)(A − Ā)ᵀ / W``, Ā the mean of each row over W;
  - ``"none"``: the raw Gram matrix ``A·Aᵀ``. Its entries grow with W·|logit|² (thousands at
    352²), so softmax(C_t/T) is one-hot and the term swamps the segmentation loss; kept only
    to reproduce that behaviour.

Every term is computed in fp32 with autocast disabled: under AMP ``bmm`` runs in fp16, and
X·Xᵀ or A·Aᵀ overflow 65504 once |logit| ≳ 13 at 352-448 px.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "structure_loss",
    "attention_map",
    "symmetric_structure",
    "kl_with_temperature",
    "KDASLoss",
    "KD_VARIANTS",
    "SGM_NORMS",
]

KD_VARIANTS = ("none", "kl", "attention", "attention_sgm")
SGM_NORMS = ("width", "centred", "none")


def structure_loss(pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PraNet's structure loss: weighted BCE + weighted soft IoU, mean over the batch.

    ``w = 1 + 5·|avgpool31(g) − g|`` (31×31 mean, stride 1, zero padding counted);
    wBCE = Σ w·BCE / Σ w; wIoU = 1 − (Σ w·p·g + 1) / (Σ w·(p + g) − Σ w·p·g + 1).
    """
    pred, mask = pred.float(), mask.float()
    weight = 1 + 5 * torch.abs(F.avg_pool2d(mask, kernel_size=31, stride=1, padding=15) - mask)
    bce = F.binary_cross_entropy_with_logits(pred, mask, reduction="none")
    wbce = (weight * bce).sum(dim=(2, 3)) / weight.sum(dim=(2, 3))
    prob = torch.sigmoid(pred)
    inter = (weight * prob * mask).sum(dim=(2, 3))
    union = (weight * (prob + mask)).sum(dim=(2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return (wbce + wiou).mean()


def attention_map(pred: torch.Tensor) -> torch.Tensor:
    """``A = softmax_row(X·Xᵀ/√W)·X`` with ``X = pred[:, 0]`` (B × H × W), no learned projections."""
    x = pred[:, 0].float()
    scores = torch.bmm(x, x.transpose(1, 2)) / math.sqrt(x.shape[-1])
    return torch.bmm(torch.softmax(scores, dim=-1), x)


def symmetric_structure(att: torch.Tensor, norm: str = "width") -> torch.Tensor:
    """The SGM's symmetric matrix of ``att`` (B × H × W) -> (B × H × H).

    ``norm``: ``"width"`` ``A·Aᵀ/W``; ``"centred"`` ``(A−Ā)(A−Ā)ᵀ/W`` (Ā: row means over W);
    ``"none"`` ``A·Aᵀ``.
    """
    if norm not in SGM_NORMS:
        raise ValueError(f"sgm_norm must be one of {SGM_NORMS}, got {norm!r}")
    att = att.float()
    if norm == "centred":
        att = att - att.mean(dim=-1, keepdim=True)
    gram = torch.bmm(att, att.transpose(1, 2))
    return gram if norm == "none" else gram / att.shape[-1]


def kl_with_temperature(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """``T²·KL(softmax(t/T) ‖ softmax(s/T))``, softmax over all entries of each image, 'batchmean'."""
    b = student.shape[0]
    log_s = F.log_softmax(student.float().reshape(b, -1) / temperature, dim=1)
    p_t = F.softmax(teacher.detach().float().reshape(b, -1) / temperature, dim=1)
    return F.kl_div(log_s, p_t, reduction="batchmean") * temperature**2


class KDASLoss(nn.Module):
    """Segmentation + distillation loss over the two outputs (P1, P2).

    Args:
        kd: ``"none" | "kl" | "attention" | "attention_sgm"`` (see the module docstring).
        temperature: T (2).
        kd_weight: λ (0.2).
        sgm_norm: normalisation of the SGM matrix, ``"width" | "centred" | "none"`` (module docstring).

    Call ``loss(student_outputs, label, teacher_outputs=None)``; the outputs are sequences of
    logit maps (P1, P2). ``last_terms`` keeps the detached parts of the last call for logging:
    ``seg`` (Σ_k L_seg), the KD terms (``kl`` | ``at``, ``sgm``) and ``total``.
    """

    def __init__(
        self, kd: str = "attention_sgm", temperature: float = 2.0, kd_weight: float = 0.2, sgm_norm: str = "width"
    ) -> None:
        super().__init__()
        if kd not in KD_VARIANTS:
            raise ValueError(f"kd must be one of {KD_VARIANTS}, got {kd!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if sgm_norm not in SGM_NORMS:
            raise ValueError(f"sgm_norm must be one of {SGM_NORMS}, got {sgm_norm!r}")
        self.kd, self.temperature, self.kd_weight, self.sgm_norm = kd, float(temperature), float(kd_weight), sgm_norm
        self.last_terms: dict[str, torch.Tensor] = {}  # detached scalars: no device sync per step

    @property
    def needs_teacher(self) -> bool:
        return self.kd != "none"

    def kd_terms(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The distillation terms of the configured variant (each a scalar)."""
        t = self.temperature
        if self.kd == "kl":
            return {"kl": sum(kl_with_temperature(s, tt, t) for s, tt in zip(student, teacher))}
        att_s = [attention_map(s) for s in student]
        att_t = [attention_map(tt.detach()) for tt in teacher]
        terms = {"at": sum(kl_with_temperature(a_s, a_t, t) for a_s, a_t in zip(att_s, att_t))}
        if self.kd == "attention_sgm":
            terms["sgm"] = kl_with_temperature(
                symmetric_structure(att_s[-1], self.sgm_norm), symmetric_structure(att_t[-1], self.sgm_norm), t
            )
        return terms

    def forward(
        self, student: Sequence[torch.Tensor], label: torch.Tensor, teacher: Sequence[torch.Tensor] | None = None
    ):
        student = (student,) if isinstance(student, torch.Tensor) else tuple(student)
        if teacher is not None:
            teacher = (teacher,) if isinstance(teacher, torch.Tensor) else tuple(teacher)
        # fp32 whatever the caller's autocast: the KD products overflow fp16
        with torch.autocast(device_type=label.device.type, enabled=False):
            student = tuple(s.float() for s in student)
            seg = sum(structure_loss(p, label.float()) for p in student)
            if self.kd == "none":
                self.last_terms = {"seg": seg.detach(), "total": seg.detach()}
                return seg
            if teacher is None:
                raise ValueError(f"kd={self.kd!r} needs the teacher's outputs")
            terms = self.kd_terms(student, tuple(t.float() for t in teacher))
            total = (1 - self.kd_weight) * seg + self.kd_weight * sum(terms.values())
        self.last_terms = {"seg": seg.detach(), **{k: v.detach() for k, v in terms.items()}, "total": total.detach()}
        return total
