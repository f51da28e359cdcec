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
from ignite.engine import Events
from torch import nn

from shared_transforms.utils import unwrap_model

logger = logging.getLogger(__name__)

__all__ = ["InitialState", "ProstateSegNet", "load_weights"]

#: ImageNet classifier layers that published encoder checkpoints carry and smp's encoders drop
_CLASSIFIER_HEADS = {"fc", "_fc", "classifier", "head", "last_linear"}


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
            Every encoder tensor must load (a classifier head in the file is ignored).
        bn_momentum: momentum of every BatchNorm layer (``None`` keeps the encoder's own). The
            EfficientNet encoders come with TensorFlow's 0.01, so their running statistics lag
            the weights for hundreds of iterations and eval-mode predictions of a short run
            collapse; PyTorch's 0.1 settles within a few dozen (see the bundle README).
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
        bn_momentum: float | None = 0.1,
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
            # a partial load would silently train a half-random encoder labelled "ImageNet"
            missing = sorted(set(own) - set(state))
            unexpected = sorted(k for k in state if k not in own and k.split(".")[0] not in _CLASSIFIER_HEADS)
            mismatched = sorted(k for k in own if k in state and own[k].shape != state[k].shape)
            if missing or unexpected or mismatched:
                raise ValueError(
                    f"{pretrained_path} is not a complete '{encoder_name}' encoder: {len(missing)} of {len(own)} "
                    f"encoder tensors missing (e.g. {missing[:3]}), {len(mismatched)} with another shape "
                    f"(e.g. {mismatched[:3]}), "
                    f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})."
                )
            self.model.encoder.load_state_dict({k: state[k] for k in own})
            logger.info("loaded all %d encoder tensors from %s", len(own), pretrained_path)
            if in_channels != 3:
                self.model.encoder.set_in_channels(in_channels, pretrained=True)
        if bn_momentum is not None:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = float(bn_momentum)
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
    target = unwrap_model(network)
    target.load_state_dict(state, strict=strict)
    logger.info("initialised the network from %s", path)
    return network


class InitialState:
    """Puts the network in its starting state when the trainer first starts (``Events.STARTED``).

    In this order: the whole network from ``init_weights`` (a previous stage's ``models/model.pt``,
    the transfer step that ``finetune.json`` turns on), then the training set's intensity mean
    and std into the standardisation buffers. Only on the trainer's first start: a trainer that
    is run again (once per federated round) keeps its state. List it before the resume loader, so
    that a resumed run ends with its checkpoint's state. ``compute_intensity_stats=False`` keeps
    the buffers: federated training sets them from every site's sums
    (:meth:`shared_transforms.datasets.SliceDataset.intensity_sums`).

    Args:
        network: the :class:`ProstateSegNet` (``@network_def``; a DDP wrapper is unwrapped).
        dataset: the training :class:`shared_transforms.datasets.SliceDataset`.
        init_weights: a ``state_dict`` file to start from, or ``None``.
        compute_intensity_stats: set the standardisation from ``dataset``.
    """

    def __init__(
        self, network: nn.Module, dataset, init_weights: str | None = None, compute_intensity_stats: bool = True
    ) -> None:
        self.network = network
        self.dataset = dataset
        self.init_weights = init_weights
        self.compute_intensity_stats = bool(compute_intensity_stats)
        self._done = False

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine=None) -> None:
        if self._done:
            return
        if self.init_weights:
            load_weights(self.network, self.init_weights)
        if self.compute_intensity_stats:
            unwrap_model(self.network).set_intensity_stats(**self.dataset.intensity_stats())
        self._done = True
