"""Dataset scanning and per-patient splitting shared by the bundles.

Every bundle reads a published dataset layout into a list of case dicts
(``{"image": path, "label": path, "case": id, ...}``); the helpers here then
drop unusable cases with a reason, split per patient into a held-out test set and
cross-validation folds, and write the resulting datalist JSON so a run can be
audited and repeated.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .files import BAD_CASES_FILE, write_json  # noqa: F401  (re-exported: bundles import them from here)
from .splits import fold_datalist, split_cases  # noqa: F401  (re-exported)

__all__ = ["PROSTATE_SITES", "check_case", "scan_cases", "split_cases", "fold_datalist", "write_json", "list_images",
           "BAD_CASES_FILE"]

logger = logging.getLogger(__name__)

#: the multi-site prostate data (NCI-ISBI 2013 + I2CVB): the paper's site letter -> folder name
PROSTATE_SITES = {"A": "RUNMC", "B": "BMC", "C": "I2CVB"}


def _load_shape(path: str) -> tuple[int, ...]:
    """Read the whole voxel array (a truncated .gz only fails when its data are read)."""
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    return tuple(int(s) for s in data.shape)


def check_case(image: str | None, label: str | None, require_label: bool = True) -> tuple[str, str] | None:
    """Say why an (image, label) pair cannot be used.

    Returns:
        ``None`` when both files read completely and their shapes agree, otherwise
        ``(file, reason)`` naming the offending file.
    """
    if image is None:
        return (str(label), "no image file for this label")
    if label is None:
        if require_label:
            return (str(image), "no label file")
        return None
    shapes = {}
    for path in (image, label):
        try:
            shapes[path] = _load_shape(path)
        except Exception as e:  # nibabel raises many types for broken files (EOFError, zlib.error, ...)
            return (str(path), f"cannot read: {type(e).__name__}: {e}")
    img_shape, lbl_shape = shapes[image], shapes[label]
    if img_shape != lbl_shape:
        return (str(label), f"image/label shape mismatch: image {img_shape} vs label {lbl_shape}")
    return None


def _orientation(path: str | None) -> dict[str, str]:
    """``{"axcodes": "LPS"}`` of a NIfTI file's header (recorded in the datalist: how the scan was stored)."""
    if not path or not str(path).endswith((".nii", ".nii.gz")):
        return {}
    return {"axcodes": "".join(nib.aff2axcodes(nib.load(str(path)).affine))}


def scan_cases(
    cases: Sequence[Mapping[str, Any]],
    image_key: str = "image",
    label_key: str = "label",
    require_label: bool = True,
    known_bad: Sequence[Mapping[str, Any]] = (),
) -> tuple[list[dict], list[dict]]:
    """Split ``cases`` into usable ones and dropped ones, never stopping at a broken case.

    Args:
        cases: case dicts with at least ``image_key`` (and ``label_key`` when labelled).
        known_bad: cases a layout reader already rejected (e.g. a label with no image);
            they are carried into the report unchanged.

    Returns:
        ``(good, bad)``; each entry of ``bad`` is ``{"case", "file", "reason"}``, also logged.
        Each good NIfTI case gains ``"axcodes"``, its image's orientation as stored (e.g. ``"LPS"``;
        the bundles reorient to their training orientation and back).
    """
    good: list[dict] = []
    bad: list[dict] = [dict(b) for b in known_bad]
    for case in cases:
        problem = check_case(case.get(image_key), case.get(label_key), require_label=require_label)
        if problem is None:
            good.append({**case, **_orientation(case.get(image_key))})
        else:
            bad.append({"case": case.get("case", case.get(image_key)), "file": problem[0], "reason": problem[1]})
    for b in bad:
        logger.warning("skipping case %s: %s (%s)", b["case"], b["reason"], b["file"])
    return good, bad


def list_images(
    folder: str | os.PathLike,
    patterns: Sequence[str] = ("*.nii", "*.nii.gz"),
    exclude: Sequence[str] = (),
) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` for the files directly inside ``folder`` (for inference).

    Args:
        patterns: glob patterns of the images.
        exclude: name fragments of files that are not images (e.g. ``"_segmentation"``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"input folder not found: {folder}")
    files = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
    files = [p for p in files if not any(x in p.name for x in exclude)]
    if not files:
        raise FileNotFoundError(f"no {' or '.join(patterns)} files directly inside {folder}")
    return [{"image": str(p)} for p in files]

