"""The two networks: segmenter M (nnU-Net-style 2D DynUNet) and QC module R (convolutional autoencoder)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DynUNet
from torch import nn

__all__ = ["CardiacSegmenter", "QCAutoencoder"]


class CardiacSegmenter(DynUNet):
    """2D nnU-Net-style U-Net: one level per entry of ``filters`` (default 7 levels,
    32-64-128-256-480-480-480), 3x3 convs, instance norm + LeakyReLU 0.01, strided-conv down,
    transposed-conv up, deep supervision.

    In training mode (with ``deep_supervision``) the output is stacked ``(B, 1 + deep_supr_num, C, H, W)``;
    in eval mode it is ONE tensor ``(B, C, H, W)`` (what inference, export and MONAI Label use).
    The input size must be divisible by ``2 ** (len(filters) - 1)``.

    Built with ``deep_supervision=False`` (inference.json) the network has no supervision heads,
    so it can be scripted, and it loads a checkpoint trained with them: the heads' weights,
    which only the training loss uses, are dropped on loading.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 4,
        filters: Sequence[int] = (32, 64, 128, 256, 480, 480, 480),
        deep_supervision: bool = True,
        deep_supr_num: int = 4,
    ) -> None:
        levels = len(filters)
        if levels < 3:
            raise ValueError(f"need at least 3 levels, got filters={list(filters)}")
        strides = [1] + [2] * (levels - 1)
        super().__init__(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=[3] * levels,
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=list(filters),
            norm_name=("INSTANCE", {"affine": True}),
            act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
            deep_supervision=deep_supervision,
            deep_supr_num=min(deep_supr_num, levels - 2),
        )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if not self.deep_supervision:
            state_dict = {k: v for k, v in state_dict.items() if not _is_supervision_head(k)}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _is_supervision_head(key: str) -> bool:
    """State-dict keys of DynUNet's deep-supervision heads (also reached through the skip layers)."""
    return key.startswith("deep_supervision_heads.") or ".super_head." in key


def _block(conv: nn.Module, last: bool) -> list[nn.Module]:
    return [conv] if last else [conv, nn.BatchNorm2d(conv.out_channels), nn.LeakyReLU(0.2), nn.Dropout(0.5)]


class QCAutoencoder(nn.Module):
    """QC module R (Galati & Zuluaga 2021): reconstructs 4-channel soft masks.

    Encoder: 10 convs (bias, padding 1), kernel/stride 4/2,4/2,4/2,3/1,4/2,3/1,4/2,3/1,3/1,4/2,
    channels 4-32-32-32-32-64-64-128-64-32-100; decoder: 10 transposed convs (bias, padding 1),
    4/2,3/1,3/1,4/2,3/1,4/2,3/1,4/2,4/2,4/2, channels 100-32-64-128-64-64-32-32-32-32-4; every
    layer but the last of each half is followed by BatchNorm, LeakyReLU 0.2, Dropout 0.5; a
    channel softmax ends it. 779,176 parameters with 4 classes; the latent is 100x4x4 at 256x256
    (any size divisible by 64 works: 100x1x1 at 64x64).
    """

    ENC = [
        (4, 2, 32),
        (4, 2, 32),
        (4, 2, 32),
        (3, 1, 32),
        (4, 2, 64),
        (3, 1, 64),
        (4, 2, 128),
        (3, 1, 64),
        (3, 1, 32),
        (4, 2, 100),
    ]
    DEC = [
        (4, 2, 32),
        (3, 1, 64),
        (3, 1, 128),
        (4, 2, 64),
        (3, 1, 64),
        (4, 2, 32),
        (3, 1, 32),
        (4, 2, 32),
        (4, 2, 32),
        (4, 2, None),
    ]

    def __init__(self, in_channels: int = 4) -> None:
        super().__init__()
        enc, c = [], in_channels
        for i, (k, s, out) in enumerate(self.ENC):
            enc += _block(nn.Conv2d(c, out, k, s, padding=1, bias=True), i == len(self.ENC) - 1)
            c = out
        dec = []
        for i, (k, s, out) in enumerate(self.DEC):
            out = in_channels if out is None else out
            dec += _block(nn.ConvTranspose2d(c, out, k, s, padding=1, bias=True), i == len(self.DEC) - 1)
            c = out
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.decoder(self.encoder(x)), dim=1)
