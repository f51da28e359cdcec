"""Datasets shared by the bundles.

:class:`SliceDataset` turns 3D cases into 2D training slices, doing the expensive
volume-level work (loading, N4, slice selection) once and caching it on disk.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
import os
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import Dataset, PersistentDataset
from monai.data.utils import pickle_hashing

from .files import write_json
from .progress import progress
from .utils import is_main_process

__all__ = ["SliceDataset", "add_to_report", "case_hash", "stats_from_sums", "transform_hash"]

logger = logging.getLogger(__name__)

#: attributes that change when a transform runs, not when its settings do (readers remember
#: the last file names; random state; thread-local tracing flags)
_RUNTIME_ATTRIBUTES = frozenset({"filenames", "R", "_tracing"})


def _file_stamps(item: Any) -> list:
    """(path, size, mtime_ns) of every existing file named by a string value of ``item``."""
    values = item.values() if isinstance(item, dict) else [item]
    stamps = []
    for value in values:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, (str, os.PathLike)) and os.path.isfile(v):
                st = os.stat(v)
                stamps.append((str(v), st.st_size, st.st_mtime_ns))
    return stamps


def case_hash(item: Any) -> bytes:
    """Cache key of one case: its dict plus the size and modification time of each file it names,
    so a regenerated or edited file is never served from an old cache entry."""
    return pickle_hashing({"item": item, "files": _file_stamps(item)})


def _code_version(cls: type) -> str:
    """The source of a project transform's module (so a code change invalidates the cache), else its package version."""
    package = cls.__module__.split(".")[0]
    if package in ("shared_transforms", "scripts"):
        try:
            return hashlib.sha256(inspect.getsource(importlib.import_module(cls.__module__)).encode()).hexdigest()
        except (OSError, TypeError):
            pass
    return str(getattr(importlib.import_module(package), "__version__", ""))


def _settings(obj: Any, depth: int = 0) -> Any:
    """A picklable description of a transform's settings (nested transforms included), without runtime state."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if depth > 8:  # deeper than any transform's settings: the type, never a repr with a memory address
        return f"{type(obj).__module__}.{type(obj).__qualname__}"
    if isinstance(obj, (list, tuple)):
        return [_settings(v, depth + 1) for v in obj]
    if isinstance(obj, dict):
        return sorted((str(k), _settings(v, depth + 1)) for k, v in obj.items())
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return hashlib.sha256(np.ascontiguousarray(np.asarray(obj)).tobytes()).hexdigest()
    if isinstance(obj, (np.random.RandomState, np.random.Generator)):
        return None
    if isinstance(obj, (types.FunctionType, types.MethodType)):
        # a function is its name and its code (two lambdas differ), a bound method also its object
        code = getattr(obj, "__code__", None) or obj.__func__.__code__
        name = [f"{obj.__module__}.{obj.__qualname__}", hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()]
        return name + ([_settings(obj.__self__, depth + 1)] if isinstance(obj, types.MethodType) else [])
    if isinstance(obj, type) or callable(obj) and not hasattr(obj, "__dict__"):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"
    cls = type(obj)
    attributes = getattr(obj, "__dict__", None)
    if attributes is None:
        return repr(obj)
    return [f"{cls.__module__}.{cls.__qualname__}", _code_version(cls),
            sorted((k, _settings(v, depth + 1)) for k, v in attributes.items() if k not in _RUNTIME_ATTRIBUTES)]


def transform_hash(transform: Any) -> bytes:
    """Cache key of a (deterministic) transform chain: every transform's class, settings and code version.

    Unlike pickling the chain, it does not change once the chain has run (readers remember
    file names), and it does change when a project transform's code does.
    """
    return hashlib.sha256(repr(_settings(transform)).encode()).hexdigest().encode()


def add_to_report(report_file: str | os.PathLike, entries: Sequence[dict]) -> None:
    """Append ``entries`` (``{"case", "file", "reason"}``) to a JSON list of dropped cases, once per case.

    Written atomically, by the main process only under DDP (every rank prepares the same cases).
    """
    if not is_main_process():
        return
    path = Path(report_file)
    report = json.loads(path.read_text()) if path.is_file() else []
    known = {str(r.get("case")) for r in report}
    report += [e for e in entries if str(e.get("case")) not in known]
    write_json(path, report)


class SliceDataset(torch.utils.data.Dataset):
    """2D slices of 3D cases, with the expensive volume-level work done once.

    ``volume_transform`` maps one case dict to a LIST of slice dicts (it ends with
    ``SelectSlicesd``) and must be deterministic, a ``Compose`` of MONAI ``Transform``s (a
    ``PersistentDataset`` treats anything else as random and does not cache it): its results are cached on disk by a
    ``PersistentDataset`` keyed by :func:`case_hash` (the case dict and each file's size and
    modification time) and :func:`transform_hash` (the transforms' settings and code version),
    so N4 runs once per volume across epochs, runs and stages, and never again after a change. ``transform`` (optional, may be random) is applied
    to each slice at every access. A case whose volume transform fails is skipped and
    reported in ``skipped`` and, with ``report_file`` (a run's ``bad_cases.json``), added to
    that file, so every dropped case is listed in one place. ``max_slices`` keeps only the
    first slices in datalist order (the liver report used "only the first 1100 slices");
    volumes after the cap are not prepared at all.
    """

    def __init__(
        self,
        data: Sequence[dict],
        volume_transform: Callable,
        transform: Callable | None = None,
        cache_dir: str | None = None,
        report_file: str | None = None,
        max_slices: int | None = None,
    ) -> None:
        if max_slices is not None and int(max_slices) < 1:
            raise ValueError(f"max_slices must be a positive number of slices or None, got {max_slices}.")
        if cache_dir:
            volumes = PersistentDataset(data, volume_transform, cache_dir=cache_dir, hash_func=case_hash, hash_transform=transform_hash)
        else:
            volumes = Dataset(data, volume_transform)
        self.slices: list[dict] = []
        self.skipped: list[dict] = []
        start = time.perf_counter()
        # N4 over a site's volumes takes minutes on first use: a bar with the ETA (cached volumes pass quickly)
        bar = progress(range(len(volumes)), desc="preparing volumes", unit="vol")
        for i in bar:
            if max_slices is not None and len(self.slices) >= int(max_slices):
                logger.info("max_slices %d reached: %d of %d volumes used", int(max_slices), i, len(volumes))
                break
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
            bar.set_postfix(slices=len(self.slices), refresh=False)
        bar.close()
        if max_slices is not None:
            del self.slices[int(max_slices):]
        self.preparation_seconds = time.perf_counter() - start
        logger.info("prepared %d volumes (%d slices, %d skipped) in %.1f s", len(volumes), len(self.slices),
                    len(self.skipped), self.preparation_seconds)
        if report_file and self.skipped:
            add_to_report(report_file, self.skipped)
        self.transform = transform  # the per-slice (random) transforms; a resume restores their random states
        self._dataset = Dataset(self.slices, transform)

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index):
        return self._dataset[index]

    def intensity_sums(self, key: str = "image") -> dict[str, float]:
        """``{"count", "sum", "sum_sq"}`` of ``key`` over every pixel of every slice, in float64.

        Sums, unlike a mean and std, add up across datasets: federated sites send these and the
        server turns their totals into the pooled statistics (:func:`stats_from_sums`).
        """
        if not self.slices:
            raise ValueError("no slices: cannot compute intensity statistics of an empty dataset")
        total, total_sq, count = 0.0, 0.0, 0
        for s in self.slices:
            x = torch.as_tensor(s[key], dtype=torch.float64)
            total += float(x.sum())
            total_sq += float((x * x).sum())
            count += x.numel()
        return {"count": count, "sum": total, "sum_sq": total_sq}

    def intensity_stats(self, key: str = "image") -> dict[str, float]:
        """Mean and std of ``key`` over every pixel of every slice (the training-set statistics)."""
        return stats_from_sums([self.intensity_sums(key)])


def stats_from_sums(sums: Sequence[dict]) -> dict[str, float]:
    """Pooled ``{"mean", "std"}`` (population std) from the :meth:`SliceDataset.intensity_sums` of several datasets."""
    count = sum(int(s["count"]) for s in sums)
    if count <= 0:
        raise ValueError(f"no pixels in {len(sums)} intensity sum(s): cannot compute statistics")
    mean = sum(float(s["sum"]) for s in sums) / count
    var = sum(float(s["sum_sq"]) for s in sums) / count - mean * mean
    return {"mean": mean, "std": max(var, 0.0) ** 0.5}
