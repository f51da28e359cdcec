"""The 2D U-Net of the liver CT -> MRI transfer report, after Chlebus et al. 2018.

Four resolution levels; in every level two 3×3 conv + BatchNorm + ReLU layers wrapped by a
short residual skip; long skips (concatenation) from the contracting to the expanding path;
dropout (p = 0.5) before each convolution of the expanding path; a 1×1 head.

Transfer helpers for the three models of the report:
A ``scratch``          Xavier-normal initialisation;
B ``finetune``         all weights from the CT model, the head keeping only the tumour channel;
C ``finetune_freeze``  as B with the first two layers (the two encoder levels nearest the
                       input) frozen.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from shared_transforms.utils import unwrap_model

logger = logging.getLogger(__name__)

__all__ = ["ResidualBlock", "ResidualUNet", "xavier_init", "load_ct_weights", "configure_transfer"]


class ConvBNReLU(nn.Sequential):
    """3×3 convolution, BatchNorm, ReLU; optional dropout BEFORE the convolution.

    Plain (element-wise) dropout, as the report describes it ("dropout 0.5 before each
    convolution"), not ``Dropout2d``, which would drop whole feature maps at p = 0.5.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
        layers += [
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """Two :class:`ConvBNReLU` layers plus a short residual skip (1×1 projection when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(in_channels, out_channels, dropout)
        self.conv2 = ConvBNReLU(out_channels, out_channels, dropout)
        self.shortcut = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.conv2(self.conv1(x))


class ResidualUNet(nn.Module):
    """2D U-Net with long and short skips.

    Args:
        in_channels: image channels (1).
        out_channels: 2 (liver, tumour) for CT pre-training, 1 (tumour) for MRI.
        channels: width of each resolution level, e.g. ``(32, 64, 128, 256)`` (4 levels; the
            report's widths were "slightly shrunk" from Chlebus et al. and not published).
        dropout: dropout before each convolution of the expanding path.

    Input ``(B, in_channels, H, W)`` with H, W multiples of ``2 ** (levels - 1)``; output
    ``(B, out_channels, H, W)`` logits.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 256),
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) < 2:
            raise ValueError(f"need at least two levels, got channels={channels}")
        self.encoder = nn.ModuleList()
        prev = in_channels
        for width in channels:
            self.encoder.append(ResidualBlock(prev, width))
            prev = width
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for width in reversed(channels[:-1]):
            self.up.append(nn.ConvTranspose2d(prev, width, 2, stride=2))
            self.decoder.append(ResidualBlock(2 * width, width, dropout=dropout))
            prev = width
        self.head = nn.Conv2d(prev, out_channels, 1)

    def freeze_levels(self, levels: int) -> list[str]:
        """Stop training the first ``levels`` encoder levels: weights AND BatchNorm statistics.

        Returns the names of the frozen parameters.
        """
        frozen = []
        for i in range(levels):
            for name, p in self.encoder[i].named_parameters():
                p.requires_grad_(False)
                frozen.append(f"encoder.{i}.{name}")
        self.frozen_levels = levels
        self.train(self.training)
        return frozen

    def train(self, mode: bool = True) -> ResidualUNet:
        # frozen levels stay in eval mode so training does not move their BatchNorm statistics
        super().train(mode)
        for block in self.encoder[: getattr(self, "frozen_levels", 0)]:
            block.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        deepest = len(skips) - 1
        for i, (up, block) in enumerate(zip(self.up, self.decoder)):  # written to be TorchScript-able
            x = block(torch.cat([up(x), skips[deepest - 1 - i]], dim=1))
        return self.head(x)


def xavier_init(network: nn.Module) -> nn.Module:
    """Model A of the report: Xavier-normal convolution weights, zero biases, BatchNorm at 1/0."""
    for m in network.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return network


def load_ct_weights(network: nn.Module, path: str, keep_channels: Sequence[int] = (1,)) -> nn.Module:
    """Model B's initialisation: every weight from the CT model; the head keeps ``keep_channels``.

    The CT model's head has two output channels (0 liver, 1 tumour); the MRI model's has one
    (tumour), so only the head rows of ``keep_channels`` are copied. Loads with ``weights_only=True``.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"CT checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    target = unwrap_model(network)
    keep = list(keep_channels)
    for key in ("head.weight", "head.bias"):
        if key not in state:
            raise KeyError(f"{path}: no '{key}' — not a checkpoint of this U-Net")
        state[key] = state[key][keep]
    target.load_state_dict(state, strict=True)
    logger.info("initialised from the CT model %s (head channels %s kept)", path, keep)
    return network


def configure_transfer(
    network: nn.Module, transfer: str, source_ckpt: str | None = None, freeze_levels: int = 2
) -> nn.Module:
    """Initialise ``network`` as model A (``scratch``), B (``finetune``) or C (``finetune_freeze``)."""
    if transfer == "scratch":
        return xavier_init(network)
    if transfer not in ("finetune", "finetune_freeze"):
        raise ValueError(f"transfer must be 'scratch', 'finetune' or 'finetune_freeze', got {transfer!r}")
    if not source_ckpt:
        raise ValueError(f"transfer={transfer!r} needs source_ckpt (the CT model's models/model.pt)")
    load_ct_weights(network, source_ckpt)
    if transfer == "finetune_freeze":
        target = unwrap_model(network)
        frozen = target.freeze_levels(freeze_levels)
        logger.info("froze %d parameters of the first %d encoder levels", len(frozen), freeze_levels)
    return network
