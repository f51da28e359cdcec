"""Remap label values, e.g. merge prostate zones into one gland label."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import DtypeLike, KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor, get_track_meta
from monai.transforms import MapLabelValue, MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor, get_equivalent_dtype

__all__ = ["MergeLabels", "MergeLabelsd"]


def _number(value: Any) -> int | float:
    """JSON configs give mapping keys as strings ("1"): turn numeric strings into numbers."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"label value {value!r} is not a number.") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    try:  # numpy / torch scalars
        return value.item()
    except AttributeError:
        raise ValueError(f"label value {value!r} is not a number.") from None


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


class MergeLabels(Transform):
    """Map label values to new values, all at once (MONAI ``MapLabelValue``, plus JSON keys and strict checking).

    ``{1: 1, 2: 1}`` merges central gland (1) and peripheral zone (2) into one foreground;
    ``{1: 2, 2: 1}`` swaps them (the mapping is applied simultaneously, not in sequence).
    Values not in the mapping are kept, unless ``strict=True``: then any value other than 0
    that the mapping does not cover raises ``ValueError`` naming the values and the file.

    Args:
        mapping: ``{old: new}``; numeric strings are accepted for both (JSON gives ``"1"``).
        strict: raise on label values (other than 0) missing from ``mapping``.
        dtype: output dtype (e.g. ``"uint8"``, ``torch.int64``); ``None`` keeps the input's.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, mapping: Mapping[Any, Any], strict: bool = False, dtype: DtypeLike | torch.dtype = None) -> None:
        if not isinstance(mapping, Mapping):
            raise TypeError(f"mapping must be a dict {{old: new}}, got {type(mapping).__name__}.")
        self.mapping = {_number(k): _number(v) for k, v in mapping.items()}
        self.strict = strict
        self.dtype = dtype

    def __call__(self, img: NdarrayOrTensor) -> torch.Tensor:
        """
        Args:
            img: label array of any shape (numpy, tensor or MetaTensor).

        Returns:
            remapped (Meta)Tensor of the same shape, with ``img``'s meta and affine.
        """
        img_t = convert_to_tensor(img, track_meta=get_track_meta())
        data = img_t.as_tensor() if isinstance(img_t, MetaTensor) else img_t
        if self.strict:
            uncovered = [v for v in torch.unique(data).tolist() if v != 0 and v not in self.mapping]
            if uncovered:
                meta = getattr(img_t, "meta", {}) or {}
                where = f" in {meta['filename_or_obj']}" if "filename_or_obj" in meta else ""
                raise ValueError(
                    f"MergeLabels(strict=True): label value(s) {', '.join(map(_fmt, uncovered))}{where} "
                    f"not covered by mapping {self.mapping}."
                )
        dtype = data.dtype if self.dtype is None else get_equivalent_dtype(self.dtype, torch.Tensor)
        # MONAI's MapLabelValue (torch backend for a torch dtype) takes every mask from the input,
        # so that e.g. {1: 2, 2: 1} swaps instead of chaining
        out = MapLabelValue(list(self.mapping), list(self.mapping.values()), dtype=dtype)(data)
        return convert_to_dst_type(out, dst=img_t, dtype=dtype)[0]


class MergeLabelsd(MapTransform):
    """Dictionary version of :class:`MergeLabels`.

    Args:
        keys: keys of the labels to remap.
        mapping: ``{old: new}``; numeric strings are accepted (JSON configs).
        strict: raise on label values (other than 0) missing from ``mapping``.
        allow_missing_keys: don't raise if a key is missing.
        dtype: output dtype; ``None`` keeps the input's.
    """

    backend = MergeLabels.backend

    def __init__(
        self,
        keys: KeysCollection,
        mapping: Mapping[Any, Any],
        strict: bool = False,
        allow_missing_keys: bool = False,
        dtype: DtypeLike | torch.dtype = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.merger = MergeLabels(mapping, strict=strict, dtype=dtype)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.merger(d[key])
        return d
