"""Select the 2D slices of a 3D volume that contain enough labelled foreground."""

from __future__ import annotations

import copy
import logging
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor, get_track_meta
from monai.transforms import MapTransform, SplitDim, Transform
from monai.utils import TransformBackends, convert_to_tensor

from .utils import source_name

__all__ = ["SelectSlices", "SelectSlicesd"]

logger = logging.getLogger(__name__)


class SelectSlices(Transform):
    """Keep the 2D slices of a channel-first 3D volume whose label area exceeds ``min_area``.

    The area of slice ``k`` is the number of voxels with ``label > 0`` in that slice, counted
    over all label channels; a slice is kept when its area is strictly greater than
    ``min_area`` (so ``min_area=0`` keeps every slice with any foreground).

    Each returned slice is a channel-first 2D MetaTensor ``(C, X, Y)`` (a contiguous copy, so
    caching one slice never stores the whole volume) carrying a copy of the volume's meta plus
    ``meta["slice_index"] = k`` and ``meta["volume_affine"]`` (the 3D affine). Its ``affine``
    is the 2D affine of the slice plane: origin moved to slice ``k``, then the row and column of
    ``axis`` dropped, as MONAI's ``SqueezeDim`` does.

    Args:
        min_area: minimum foreground voxel count (exclusive) for a slice to be kept.
        axis: spatial axis to slice along: -1 (the last, ``Z``), or 0, 1, 2 / -3, -2 counting
            spatial axes only (the channel axis is never counted).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, min_area: float = 200, axis: int = -1) -> None:
        self.min_area = min_area
        self.axis = int(axis)

    def spatial_axis(self, ndim: int) -> int:
        """Index among the spatial axes of a channel-first array with ``ndim`` dimensions."""
        n_spatial = ndim - 1
        if n_spatial < 1:
            raise ValueError(f"expected a channel-first array, got {ndim} dimension(s).")
        if not -n_spatial <= self.axis < n_spatial:
            raise ValueError(f"axis {self.axis} out of range for {n_spatial} spatial dimensions.")
        return self.axis % n_spatial

    def areas(self, label: NdarrayOrTensor) -> torch.Tensor:
        """Foreground voxel count (``label > 0``, all channels) of every slice along ``axis``."""
        lab = convert_to_tensor(label, track_meta=False)
        dim = self.spatial_axis(lab.ndim) + 1
        return (lab > 0).sum(dim=[d for d in range(lab.ndim) if d != dim])

    def indices(self, label: NdarrayOrTensor) -> list[int]:
        """Indices (along ``axis``) of the slices whose label area is ``> min_area``, ascending."""
        return [int(k) for k in torch.nonzero(self.areas(label) > self.min_area).flatten()]

    def extract(self, img: NdarrayOrTensor, index: int) -> torch.Tensor:
        """Slice ``index`` of channel-first ``img`` along ``axis`` as a channel-first 2D (Meta)Tensor."""
        return self.extract_many(img, [index])[0]

    def extract_many(self, img: NdarrayOrTensor, indices: list[int]) -> list[torch.Tensor]:
        """Slices ``indices`` of channel-first ``img`` along ``axis``, each as :meth:`extract` gives it.

        The data come from MONAI's ``SplitDim`` (views, copied contiguous); the meta is this
        transform's own: ``SplitDim`` would keep the 3D 4×4 affine with a shifted origin, the
        bundles' 2D slices carry the slice plane's 2D affine and their index in the volume.
        """
        img_t = convert_to_tensor(img, track_meta=get_track_meta())
        s = self.spatial_axis(img_t.ndim)
        plain = img_t.as_tensor() if isinstance(img_t, MetaTensor) else img_t
        parts = SplitDim(dim=s + 1, keepdim=False, update_meta=False)(plain) if indices else []
        return [self._slice(parts[k].clone(memory_format=torch.contiguous_format), img_t, s, k) for k in indices]

    @staticmethod
    def _slice(data: torch.Tensor, img_t: torch.Tensor, s: int, index: int) -> torch.Tensor:
        if not isinstance(img_t, MetaTensor):
            return data
        out = MetaTensor(data)
        out.copy_meta_from(img_t)  # shallow copies of meta/applied_operations: the volume's stay untouched
        affine = img_t.affine
        out.meta["volume_affine"] = affine.clone()
        r = affine.shape[-1] - 1
        if affine.ndim == 2 and s < r:
            sliced = affine.clone()
            sliced[:-1, -1] += sliced[:-1, s] * index  # world position of voxel (.., k, ..)
            keep = [i for i in range(r + 1) if i != s]
            out.affine = sliced[keep][:, keep]
        out.meta["slice_index"] = int(index)
        return out

    def __call__(self, img: NdarrayOrTensor, label: NdarrayOrTensor | None = None) -> list[torch.Tensor]:
        """
        Args:
            img: channel-first 3D volume ``(C, X, Y, Z)``.
            label: its label ``(C', X, Y, Z)``; ``None`` uses ``img`` itself as the label.

        Returns:
            list of channel-first 2D MetaTensors of ``img``, one per kept slice, in slice order;
            empty (with a logged warning) when no slice qualifies.
        """
        label = img if label is None else label
        _check_slice_count(img, label, self.spatial_axis(len(img.shape)), self.spatial_axis(len(label.shape)))
        idx = self.indices(label)
        if not idx:
            logger.warning("SelectSlices: no slice of %s has label area > %s", source_name(img, label), self.min_area)
        return self.extract_many(img, idx)


def _check_slice_count(img: Any, label: Any, img_axis: int, label_axis: int) -> None:
    if img.shape[img_axis + 1] != label.shape[label_axis + 1]:
        raise ValueError(
            f"image {tuple(img.shape)} and label {tuple(label.shape)} have different numbers of slices "
            f"along the slicing axis ({source_name(img, label)})."
        )


class SelectSlicesd(MapTransform):
    """Dictionary version of :class:`SelectSlices`: one volume dict in, a LIST of slice dicts out.

    Every key in ``keys`` and ``label_key`` is sliced where ``data[label_key]`` has more than
    ``min_area`` foreground voxels. Each output dict also holds ``"slice_index": k`` (a plain
    int, also in each slice's ``meta``) and deep copies of the input's other non-array
    entries (paths, case ids, meta dicts); array/tensor entries not listed are dropped, since
    they are not sliced. MONAI's ``Compose`` maps the following transforms over the list, and
    ``Dataset`` + ``list_data_collate`` flatten it into a batch of slices. No qualifying slice
    gives an empty list and a logged warning naming the file.

    Args:
        keys: keys of the volumes to slice (channel-first ``(C, X, Y, Z)``).
        label_key: key of the label whose area decides; sliced too.
        min_area: minimum foreground voxel count (exclusive) for a slice to be kept.
        axis: spatial axis to slice along (see :class:`SelectSlices`).
        allow_missing_keys: don't raise if a key in ``keys`` is missing (``label_key`` is required).
    """

    backend = SelectSlices.backend

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str = "label",
        min_area: float = 200,
        axis: int = -1,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_key = label_key
        self.selector = SelectSlices(min_area=min_area, axis=axis)

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        d = dict(data)
        if self.label_key not in d:
            raise KeyError(f"label_key {self.label_key!r} not in data (keys: {list(d)}).")
        label = d[self.label_key]
        keys = list(self.key_iterator(d))
        if self.label_key not in keys:
            keys.append(self.label_key)
        label_axis = self.selector.spatial_axis(len(label.shape))
        for key in keys:
            _check_slice_count(d[key], label, self.selector.spatial_axis(len(d[key].shape)), label_axis)
        others = {k: v for k, v in d.items() if k not in keys and not isinstance(v, (np.ndarray, torch.Tensor))}

        idx = self.selector.indices(label)
        if not idx:
            name = source_name(*(d[k] for k in keys))
            logger.warning("SelectSlicesd: no slice of %s has label area > %s", name, self.selector.min_area)
        slices = {key: self.selector.extract_many(d[key], idx) for key in keys}
        out = []
        for n, k in enumerate(idx):
            item = copy.deepcopy(others)
            item.update({key: slices[key][n] for key in keys})
            item["slice_index"] = k
            out.append(item)
        return out
