"""The segmentation network: an smp encoder-decoder that standardises its own input.

The paper standardises every image with the TRAINING set's mean and std. Keeping those two
numbers as buffers of the network puts them into ``models/model.pt``, so evaluation,
inference, TorchScript export and MONAI Label all apply exactly the numbers the model was
trained with, without a side file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["ProstateSegNet", "load_weights"]


class ProstateSegNet(nn.Module):
    """``smp.create_model(arch, encoder_name)`` with training-set intensity standardisation.

    Args:
        arch: smp architecture name (``"UnetPlusPlus"``, ``"Unet"``, ``"MAnet"``, ``"DeepLabV3"``...).
        encoder_name: smp encoder (``"efficientnet-b3"``, ``"resnet18"``...).
        in_channels: image channels (1 for T2 MRI).
        out_channels: output channels (1: binary gland logits).
        pretrained: load ImageNet encoder weights through smp (needs the internet once).
        pretrained_path: a local ImageNet encoder checkpoint (an smp encoder ``state_dict`` with
            3 input channels, as smp downloads it); adapted to ``in_channels`` the way smp does.
        kwargs: passed to ``smp.create_model`` (e.g. ``encoder_depth``, ``decoder_channels``).

    Input ``(B, in_channels, H, W)`` raw (N4-corrected) intensities, H and W multiples of 32;
    output ``(B, out_channels, H, W)`` logits.
    """

    def __init__(
        self,
        arch: str = "UnetPlusPlus",
        encoder_name: str = "efficientnet-b3",
        in_channels: int = 1,
        out_channels: int = 1,
        pretrained: bool = False,
        pretrained_path: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        if pretrained and pretrained_path:
            raise ValueError("Give either pretrained=True (download) or pretrained_path (local file), not both.")
        build_channels = 3 if pretrained_path else in_channels
        try:
            self.model = smp.create_model(
                arch,
                encoder_name=encoder_name,
                encoder_weights="imagenet" if pretrained else None,
                in_channels=build_channels,
                classes=out_channels,
                **kwargs,
            )
        except Exception as e:
            if pretrained:
                raise RuntimeError(
                    f"Could not fetch ImageNet weights for encoder '{encoder_name}' ({e}). Offline? "
                    "Pass pretrained_path=<local encoder checkpoint> or pretrained=False."
                ) from e
            raise
        if pretrained_path:
            state = torch.load(pretrained_path, map_location="cpu", weights_only=True)
            own = self.model.encoder.state_dict()
            matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
            if not matched:
                raise ValueError(f"{pretrained_path}: no tensor matches the '{encoder_name}' encoder.")
            self.model.encoder.load_state_dict({**own, **matched})
            logger.info("loaded %d/%d encoder tensors from %s", len(matched), len(own), pretrained_path)
            if in_channels != 3:
                self.model.encoder.set_in_channels(in_channels, pretrained=True)
        self.register_buffer("intensity_mean", torch.zeros(()))
        self.register_buffer("intensity_std", torch.ones(()))

    @torch.no_grad()
    def set_intensity_stats(self, mean: float, std: float) -> None:
        """Store the training set's intensity mean and std (saved with the weights)."""
        if not std > 0:
            raise ValueError(f"intensity std must be > 0, got {std}.")
        self.intensity_mean.fill_(float(mean))
        self.intensity_std.fill_(float(std))
        logger.info("training-set intensity standardisation: mean %.4f, std %.4f", mean, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.intensity_mean) / self.intensity_std)


def load_weights(network: nn.Module, path: str, strict: bool = True) -> nn.Module:
    """Initialise ``network`` from a saved ``state_dict`` (``models/model.pt`` of a previous stage).

    Loads with ``weights_only=True``; accepts a plain state_dict or ``{"model": state_dict}``.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"source checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    target = network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network
    target.load_state_dict(state, strict=strict)
    logger.info("initialised the network from %s", path)
    return network
