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
import zlib
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .files import BAD_CASES_FILE, write_json  # noqa: F401  (re-exported: bundles import them from here)

__all__ = ["PROSTATE_SITES", "check_case", "scan_cases", "split_cases", "fold_datalist", "write_json", "list_images", "BAD_CASES_FILE"]

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


def _group_seed(seed: int, group: Hashable) -> int:
    # a stable per-group seed: a group's split must not depend on which other groups are present
    return (int(seed) * 1_000_003 + zlib.crc32(str(group).encode())) % (2**32)


def split_cases(
    cases: Sequence[Mapping[str, Any]],
    test_fraction: float = 0.2,
    n_folds: int = 5,
    seed: int = 0,
    patient_key: str = "case",
    group_key: str | None = None,
) -> dict[str, list]:
    """Split cases per patient into a held-out test set and ``n_folds`` cross-validation folds.

    All cases of one patient (same ``patient_key``) land in the same part. With ``group_key``
    (e.g. ``"site"``) each group is split on its own, so a site's test set is the same
    whether it is trained alone or merged with other sites. Deterministic for a seed.

    Returns:
        ``{"test": [case, ...], "folds": [[case, ...], ...]}`` (``n_folds`` lists).
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}.")
    if n_folds < 1:
        raise ValueError(f"n_folds must be >= 1, got {n_folds}.")
    groups: dict[Hashable, list[Mapping[str, Any]]] = {}
    for case in cases:
        groups.setdefault(case.get(group_key) if group_key else None, []).append(case)
    test: list[dict] = []
    folds: list[list[dict]] = [[] for _ in range(n_folds)]
    for group in sorted(groups, key=str):
        members = groups[group]
        patients = sorted({str(c[patient_key]) for c in members})
        order = np.random.default_rng(_group_seed(seed, group)).permutation(len(patients))
        patients = [patients[i] for i in order]
        n_test = int(round(len(patients) * test_fraction))
        if test_fraction > 0 and n_test == 0 and len(patients) > 1:
            n_test = 1
        test_ids = set(patients[:n_test])
        fold_of = {p: i % n_folds for i, p in enumerate(patients[n_test:])}
        for case in members:
            pid = str(case[patient_key])
            if pid in test_ids:
                test.append(dict(case))
            else:
                folds[fold_of[pid]].append(dict(case))
    return {"test": test, "folds": folds}


def fold_datalist(split: Mapping[str, Sequence], fold: int) -> dict[str, list]:
    """Training/validation/test lists for one fold of :func:`split_cases`'s result."""
    folds = split["folds"]
    if not 0 <= fold < len(folds):
        raise ValueError(f"fold must be in [0, {len(folds) - 1}], got {fold}.")
    validation = list(folds[fold])
    training = [c for i, f in enumerate(folds) if i != fold for c in f]
    if not training or not validation:
        raise ValueError(
            f"fold {fold} leaves {len(training)} training and {len(validation)} validation cases: "
            "the dataset has too few patients for this number of folds."
        )
    return {"training": training, "validation": validation, "test": list(split["test"])}


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
