"""Input validation shared by the bundles: a clear reason for every file that cannot be used.

- :class:`InputError` / :class:`InputWarning`: what the checks raise and warn;
  :class:`~shared_transforms.volume_check.VolumeCheck` (NIfTI header and data size) and
  :class:`~shared_transforms.image_check.ImageCheck` (2D frames) are the cheap checks run before
  any network work.
- :class:`LoadCheckedImaged`: MONAI's ``LoadImaged`` that runs such a check first and turns
  every reader failure into an :class:`InputError` naming the file. It is the first transform of
  every bundle's inference preprocessing, so MONAI Label's server log shows that one message.
- :class:`CheckIntensityd`: replaces NaN/inf voxels (with a warning) and flags constant
  images; :class:`BlankIfFlaggedd` gives a flagged image an empty mask.

Problems the pipeline fixes are emitted as :class:`InputWarning` (``warnings.warn``), which
:class:`shared_transforms.inference.ReportingDataset` collects into the inference report.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import LoadImaged, MapTransform, Transform

__all__ = ["InputError", "InputWarning", "LoadCheckedImaged", "CheckIntensity", "CheckIntensityd", "BlankIfFlaggedd",
           "root_cause"]

#: in-plane pixels below which an input is not a scan/frame the networks were built for
MIN_INPUT_SIZE = 32


class InputError(ValueError):
    """An input file that cannot be used. ``str()`` is ``"<file>: <reason>"``."""

    def __init__(self, file: str | os.PathLike, reason: str) -> None:
        self.file, self.reason = str(file), reason
        super().__init__(f"{self.file}: {reason}")


class InputWarning(UserWarning):
    """A problem of an input that the pipeline fixes (the message names the file and the fix)."""


def root_cause(e: BaseException) -> BaseException:
    """The innermost error: MONAI wraps a transform's own error in ``RuntimeError("applying transform ...")``."""
    while e.__cause__ is not None:
        e = e.__cause__
    return e


class FileCheck:
    """Base of the input checks: ``check(path) -> [warnings]`` (raising :class:`InputError`) is the subclass's.

    ``__call__`` remembers each file that passed, by path, size and modification time: a file checked when
    an inference run screens its inputs is not decoded a second time when it is loaded for the network,
    and a file replaced in between is checked again.
    """

    def check(self, path: Path) -> list[str]:
        raise NotImplementedError

    def __call__(self, path: str | os.PathLike) -> list[str]:
        path = Path(path)
        try:
            st = path.stat()
            key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        except OSError:  # missing or unreadable: the check names the problem
            key = None
        passed = self.__dict__.setdefault("_passed", {})
        if key is not None and key in passed:
            return list(passed[key])
        found = list(self.check(path))
        if key is not None:
            passed[key] = found
        return list(found)


def _size_problem(path: Path) -> str | None:
    if not path.exists():
        return "file not found"
    if not path.is_file():
        return "not a file"
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    return None


class LoadCheckedImaged(LoadImaged):
    """``LoadImaged`` that checks every file first and names the file and the problem when it cannot.

    Args:
        keys: as ``LoadImaged``.
        check: a ``VolumeCheck`` / ``ImageCheck`` (or any callable ``path -> [warnings]``
            raising :class:`InputError`); ``None`` loads without checking.
        kwargs: ``LoadImaged``'s (``reader``, ``ensure_channel_first``, ``image_only``, reader options).

    A failure raises :class:`InputError` ``"<file>: <reason>"``: the check's reason, or the
    reader's own error. Several keys (image and label) must have equal spatial shapes. Fixable
    problems are emitted as :class:`InputWarning`. It stays a ``LoadImaged``, so MONAI Label
    keeps it (wrapped) as the loader of its pre-transforms.
    """

    def __init__(self, keys: KeysCollection, check: Callable[[str], Sequence[str]] | None = None, **kwargs) -> None:
        super().__init__(keys, **kwargs)
        self.check = check

    def __call__(self, data, reader=None):
        paths = {key: data[key] for key in self.key_iterator(dict(data)) if isinstance(data[key], (str, os.PathLike))}
        if self.check is not None:
            for path in paths.values():
                for message in self.check(path):
                    warnings.warn(InputWarning(f"{path}: {message}"), stacklevel=2)
        try:
            d = super().__call__(data, reader)
        except InputError:
            raise
        except Exception as e:
            cause = root_cause(e)
            raise InputError(next(iter(paths.values()), "input"), f"cannot read: {type(cause).__name__}: {cause}") from e
        shapes = {key: tuple(int(s) for s in getattr(d[key], "meta", {}).get("spatial_shape", ())) for key in paths}
        if len(set(shapes.values())) > 1:
            last = list(paths)[-1]
            raise InputError(paths[last], "shape mismatch: " + ", ".join(f"{k} {s}" for k, s in shapes.items()))
        return d


class CheckIntensity(Transform):
    """Replace non-finite voxels by the smallest finite value (a warning says how many); report constancy.

    ``__call__(img) -> (img, constant)``: ``img`` (channel first) with every NaN/±inf replaced (the
    same tensor when there are none), ``constant`` True when every pixel has the same value in
    each channel (a flat colour frame too). ``name`` is the file named in the warnings. Integer images
    (8-bit frames as read) are checked as they are: run it before the conversion to float.
    """

    def __call__(self, img: torch.Tensor, name: str = "image") -> tuple[torch.Tensor, bool]:
        finite = torch.isfinite(img) if img.is_floating_point() else None  # integers are always finite
        if finite is not None and not bool(finite.all()):
            bad = int((~finite).sum())
            fill = float(img[finite].min()) if bool(finite.any()) else 0.0
            img = torch.where(finite, img, torch.as_tensor(fill, dtype=img.dtype))
            warnings.warn(InputWarning(f"{name}: {bad} NaN/inf voxels of {img.numel()} replaced by {fill:g}"), stacklevel=2)
        flat = img.reshape(img.shape[0], -1) if img.ndim > 1 else img.reshape(1, -1)
        constant = flat.numel() == 0 or bool((flat.amax(1) == flat.amin(1)).all())
        if constant:
            values = ", ".join(f"{float(v):g}" for v in flat[:, 0]) if flat.numel() else "none"
            warnings.warn(InputWarning(f"{name}: constant image (every pixel {values}): an empty mask is written"), stacklevel=2)
        return img, constant


class CheckIntensityd(MapTransform):
    """Dictionary twin of :class:`CheckIntensity`: fixes ``keys`` in place and sets ``data[flag_key]``
    (True when the image is constant, for :class:`BlankIfFlaggedd`)."""

    def __init__(self, keys: KeysCollection, flag_key: str = "constant_input", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.flag_key = flag_key
        self.checker = CheckIntensity()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        constant = False
        for key in self.key_iterator(d):
            img = d[key]
            name = str(getattr(img, "meta", {}).get("filename_or_obj", key))
            tensor = torch.as_tensor(img)
            fixed, flat = self.checker(tensor, name)
            if fixed is not tensor:  # NaNs replaced: write back in place, keeping the MetaTensor's header
                tensor.copy_(fixed)
            d[key] = tensor
            constant = constant or flat
        d[self.flag_key] = constant
        return d


class BlankIfFlaggedd(MapTransform):
    """Zero ``keys`` (the prediction) when ``data[flag_key]`` is true (a constant input has nothing to segment)."""

    def __init__(self, keys: KeysCollection, flag_key: str = "constant_input", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.flag_key = flag_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        if bool(torch.as_tensor(d.get(self.flag_key, False)).any()):
            for key in self.key_iterator(d):
                d[key] = d[key] * 0
        return d
