"""Datasets shared by the bundles.

:class:`SliceDataset` turns 3D cases into 2D training slices, doing the expensive
volume-level work (loading, N4, slice selection) once and caching it on disk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch
from monai.data import Dataset, PersistentDataset
from monai.data.utils import pickle_hashing

__all__ = ["SliceDataset"]

logger = logging.getLogger(__name__)


class SliceDataset(torch.utils.data.Dataset):
    """2D slices of 3D cases, with the expensive volume-level work done once.

    ``volume_transform`` maps one case dict to a LIST of slice dicts (it ends with
    ``SelectSlicesd``) and must be deterministic, a ``Compose`` of MONAI ``Transform``s (a
    ``PersistentDataset`` treats anything else as random and does not cache it): its results are cached on disk by a
    ``PersistentDataset`` keyed by the case dict and the transform, so N4 runs once per
    volume across epochs, runs and stages. ``transform`` (optional, may be random) is applied
    to each slice at every access. A case whose volume transform fails is skipped and
    reported in ``skipped``.
    """

    def __init__(
        self,
        data: Sequence[dict],
        volume_transform: Callable,
        transform: Callable | None = None,
        cache_dir: str | None = None,
    ) -> None:
        if cache_dir:
            volumes = PersistentDataset(data, volume_transform, cache_dir=cache_dir, hash_transform=pickle_hashing)
        else:
            volumes = Dataset(data, volume_transform)
        self.slices: list[dict] = []
        self.skipped: list[dict] = []
        start = time.perf_counter()
        for i in range(len(volumes)):
            try:
                out = volumes[i]
            except Exception as e:
                while e.__cause__ is not None:  # MONAI wraps the transform's own error
                    e = e.__cause__
                case = data[i].get("case", data[i].get("image"))
                reason = f"preprocessing failed: {type(e).__name__}: {e}"
                logger.warning("skipping case %s: %s", case, reason)
                self.skipped.append({"case": case, "file": data[i].get("image"), "reason": reason})
                continue
            self.slices.extend(out if isinstance(out, list) else [out])
            logger.info("prepared %d/%d volumes (%d slices)", i + 1, len(volumes), len(self.slices))
        self.preparation_seconds = time.perf_counter() - start
        self._dataset = Dataset(self.slices, transform)

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index):
        return self._dataset[index]

    def intensity_stats(self, key: str = "image") -> dict[str, float]:
        """Mean and std of ``key`` over every pixel of every slice (the training-set statistics)."""
        if not self.slices:
            raise ValueError("no slices: cannot compute intensity statistics of an empty dataset")
        total, total_sq, count = 0.0, 0.0, 0
        for s in self.slices:
            x = torch.as_tensor(s[key], dtype=torch.float64)
            total += float(x.sum())
            total_sq += float((x * x).sum())
            count += x.numel()
        mean = total / count
        std = max(total_sq / count - mean * mean, 0.0) ** 0.5
        return {"mean": mean, "std": std}
