"""Polyp-PVT (PVTv2 backbone + 32-channel CIM / CFM / SAM decoder), written from METHODS §2.

Two sizes are used by KDAS: the student on timm's ``pvt_v2_b0`` (3,650,740 parameters) and
the frozen teacher on ``pvt_v2_b2`` (25,107,604 parameters). The network returns the two
logit maps ``(P1, P2)`` (CFM branch, SAM branch) at the input resolution when
``return_both=True`` (training, distillation) and their sum ``P1 + P2`` otherwise (one
tensor: evaluation, inference, TorchScript/ONNX export, MONAI Label).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.utils import convert_to_dst_type, convert_to_tensor
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["PolypPVT", "load_frozen", "load_backbone_weights", "PolypPVTSumInferer"]


def cbn(in_ch: int, out_ch: int, kernel_size: int) -> nn.Sequential:
    """Convolution without bias followed by BatchNorm, no activation ("CBN" of METHODS §2)."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False), nn.BatchNorm2d(out_ch)
    )


def _up_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Bilinear (align_corners) resize of ``x`` to ``ref``'s size: ×2 for sizes that are multiples of 32."""
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=True)


class ChannelAttention(nn.Module):
    """Shared two-layer 1×1 MLP (no bias) on global average- and max-pooled features, summed, sigmoid."""

    def __init__(self, channels: int, ratio: int = 16) -> None:
        super().__init__()
        hidden = max(channels // ratio, 1)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(F.adaptive_avg_pool2d(x, 1))
        mx = self.mlp(F.adaptive_max_pool2d(x, 1))
        return torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    """7×7 convolution (no bias) on [channel mean, channel max], sigmoid."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(stats))


class CIM(nn.Module):
    """Camouflage identification module on stage 1: channel attention, then spatial attention."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.ca = ChannelAttention(channels, 16)
        self.sa = SpatialAttention(7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ca(x) * x
        return self.sa(x) * x


class CFM(nn.Module):
    """Cascaded fusion of the translated stages 2-4 (c × H/8 × W/8 output)."""

    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.u1, self.u2, self.u3, self.u4 = (cbn(c, c, 3) for _ in range(4))
        self.u5 = cbn(2 * c, 2 * c, 3)
        self.cat2 = cbn(2 * c, 2 * c, 3)
        self.cat3 = cbn(3 * c, 3 * c, 3)
        self.out = cbn(3 * c, c, 3)

    def forward(self, t4: torch.Tensor, t3: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
        t4_up = _up_to(t4, t3)  # 1/32 -> 1/16
        a = self.u1(t4_up) * t3
        b = self.u2(_up_to(t4_up, t2)) * self.u3(_up_to(t3, t2)) * t2
        a2 = self.cat2(torch.cat([a, self.u4(t4_up)], dim=1))
        b2 = self.cat3(torch.cat([b, self.u5(_up_to(a2, t2))], dim=1))
        return self.out(b2)


class GCN(nn.Module):
    """Graph convolution: 1-D conv over nodes (with bias) minus identity, 1-D conv over states (no bias), ReLU."""

    def __init__(self, num_state: int, num_node: int) -> None:
        super().__init__()
        self.node_conv = nn.Conv1d(num_node, num_node, 1)
        self.state_conv = nn.Conv1d(num_state, num_state, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, states, nodes)
        h = self.node_conv(x.transpose(1, 2)).transpose(1, 2)
        h = h - x
        return F.relu(self.state_conv(h))


def _adaptive_pool_matrix(size: int, out: int, ref: torch.Tensor) -> torch.Tensor:
    """``(out, size)`` matrix M with ``M @ v`` = ``adaptive_avg_pool1d(v, out)``: bin i averages
    ``[floor(i·size/out), ceil((i+1)·size/out))``."""
    i = torch.arange(out, device=ref.device)
    start = (i * size) // out
    end = ((i + 1) * size + out - 1) // out
    j = torch.arange(size, device=ref.device)
    inside = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])
    return inside.to(ref.dtype) / (end - start).to(ref.dtype)[:, None]


class SAM(nn.Module):
    """Similarity aggregation module: graph reasoning on the CFM output guided by the CIM features.

    ``num_state`` = 16 states, 4×4 = 16 nodes (the inner 4×4 of a 6×6 adaptive average pool).
    """

    def __init__(self, c: int = 32, num_state: int = 16, grid: int = 4) -> None:
        super().__init__()
        self.grid = grid
        self.conv_state = nn.Conv2d(c, num_state, 1)
        self.conv_proj = nn.Conv2d(c, num_state, 1)
        self.gcn = GCN(num_state, grid * grid)
        self.conv_extend = nn.Conv2d(num_state, c, 1, bias=False)

    def forward(self, x: torch.Tensor, edge: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        edge = torch.softmax(edge, dim=1)[:, 1:2]  # channel-softmax, channel 1
        state = self.conv_state(x).reshape(b, -1, h * w)  # (B, S, HW)
        proj = self.conv_proj(x)  # (B, S, H, W)
        masked = proj * edge  # only the anchors come from the edge-masked projection (as Polyp-PVT)
        # inner grid×grid cells of a (grid+2)×(grid+2) adaptive average pool, as two pooling matrices
        # (identical to F.adaptive_avg_pool2d, and exportable to ONNX for any input size)
        ph = _adaptive_pool_matrix(h, self.grid + 2, masked)[1:-1]
        pw = _adaptive_pool_matrix(w, self.grid + 2, masked)[1:-1]
        anchors = torch.einsum("bshw,ih,jw->bsij", masked, ph, pw).reshape(b, -1, self.grid * self.grid)
        # pixel-to-anchor affinities from the UNMASKED projection, softmax over the anchors
        affinity = torch.softmax(torch.bmm(anchors.transpose(1, 2), proj.reshape(b, -1, h * w)), dim=1)  # (B, N, HW)
        nodes = torch.bmm(state, affinity.transpose(1, 2))  # (B, S, N)
        nodes = self.gcn(nodes)
        back = torch.bmm(nodes, affinity).reshape(b, -1, h, w)  # (B, S, H, W)
        return x + self.conv_extend(back)


class PolypPVT(nn.Module):
    """Polyp-PVT on a timm PVTv2 backbone.

    Args:
        backbone: timm model name, ``"pvt_v2_b0"`` (student) or ``"pvt_v2_b2"`` (teacher).
        channels: decoder width c (32).
        return_both: return ``(P1, P2)`` (training) instead of ``P1 + P2`` (one tensor).
        pretrained: download timm's ImageNet weights of the backbone (needs the internet).
        pretrained_path: a local ImageNet checkpoint of the backbone (timm's classification
            model ``state_dict``, or the backbone's own keys); loaded into the backbone.

    Input ``(B, 3, H, W)`` ImageNet-normalised RGB, H and W multiples of 32 (other sizes
    ≥ 32 work too); outputs at ``(H, W)``.
    """

    def __init__(
        self,
        backbone: str = "pvt_v2_b0",
        channels: int = 32,
        return_both: bool = False,
        pretrained: bool = False,
        pretrained_path: str | None = None,
    ) -> None:
        super().__init__()
        if pretrained and pretrained_path:
            raise ValueError("Give either pretrained=True (download) or pretrained_path (local file), not both.")
        self.return_both = return_both
        self.backbone = timm.create_model(backbone, pretrained=bool(pretrained), features_only=True)
        if pretrained_path:
            load_backbone_weights(self.backbone, pretrained_path)
        f1, f2, f3, f4 = self.backbone.feature_info.channels()
        c = channels
        self.cim = CIM(f1)
        self.t1 = cbn(f1, c, 1)
        self.t2 = cbn(f2, c, 1)
        self.t3 = cbn(f3, c, 1)
        self.t4 = cbn(f4, c, 1)
        self.cfm = CFM(c)
        self.sam = SAM(c, num_state=16, grid=4)
        self.head1 = nn.Conv2d(c, 1, 1)
        self.head2 = nn.Conv2d(c, 1, 1)

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f1, f2, f3, f4 = self.backbone(x)
        cim = self.t1(self.cim(f1))
        cfm = self.cfm(self.t4(f4), self.t3(f3), self.t2(f2))
        # ×0.5 with align_corners=True (Polyp-PVT's down05); with aligned corners only the output size matters
        edge = F.interpolate(cim, size=cfm.shape[-2:], mode="bilinear", align_corners=True)
        sam = self.sam(cfm, edge)
        size = x.shape[-2:]
        p1 = F.interpolate(self.head1(cfm), size=size, mode="bilinear", align_corners=False)
        p2 = F.interpolate(self.head2(sam), size=size, mode="bilinear", align_corners=False)
        return p1, p2

    def forward(self, x: torch.Tensor):
        p1, p2 = self.forward_both(x)
        # TorchScript compiles only the single-tensor branch (the exported inference network)
        if not torch.jit.is_scripting() and self.return_both:
            return p1, p2
        return p1 + p2


def load_backbone_weights(backbone: nn.Module, path: str) -> None:
    """Load a local ImageNet PVTv2 checkpoint into a timm ``features_only`` backbone.

    Accepts timm's classification ``state_dict`` (the ``head.*`` classifier is dropped), a
    dict with a ``state_dict``/``model`` entry, or the backbone's own keys. Every backbone
    tensor must be found with the right shape, otherwise ``ValueError`` says which are missing.
    """
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    own = backbone.state_dict()
    matched = {}
    for k, ref in own.items():
        # timm's features_only wrapper flattens `stages.0.` into `stages_0.`
        for name in (k, re.sub(r"^([A-Za-z]\w*?)_(\d+)\.", r"\1.\2.", k)):
            if name in state and tuple(state[name].shape) == tuple(ref.shape):
                matched[k] = state[name]
                break
    missing = sorted(set(own) - set(matched))
    if missing:
        raise ValueError(f"{path}: {len(missing)} backbone tensors missing or of another shape, e.g. {missing[:5]}")
    backbone.load_state_dict(matched, strict=True)
    logger.info("loaded %d ImageNet backbone tensors from %s", len(matched), path)


def load_frozen(network: nn.Module, ckpt: str, device: str | torch.device = "cpu") -> nn.Module:
    """The KD teacher: ``network`` with the trained weights of ``ckpt``, in eval mode, no gradients."""
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(
            f"teacher checkpoint not found: {path}. Train one with configs/train_teacher.json "
            "(it writes models/teacher/model.pt) or pass --teacher_ckpt, or use --kd none."
        )
    network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    network = network.to(device).eval()
    for p in network.parameters():
        p.requires_grad_(False)
    return network


class PolypPVTSumInferer:
    """``inferer(inputs, network)`` returning the single logit map ``P1 + P2`` of any Polyp-PVT mode.

    The network sees a plain tensor (a MetaTensor's bookkeeping on each of the transformer's ~600
    operations costs about 15 % of a 352² CPU forward); the logits get the input's metadata and
    transform trace back once, as MONAI's own inferers return them, for ``Invertd``.
    """

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor:
        out = network(convert_to_tensor(inputs, track_meta=False), *args, **kwargs)
        if isinstance(out, (tuple, list)):
            out = out[0] + out[1]
        return convert_to_dst_type(out, inputs, dtype=out.dtype)[0] if isinstance(inputs, MetaTensor) else out
