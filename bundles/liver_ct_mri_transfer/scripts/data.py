"""Dataset layouts of the liver CT -> MRI transfer, and the CT slice sampling.

LiTS (CT, source)::

    CT_ROOT/[Training Batch 1/]volume-N.nii[.gz] + segmentation-N.nii[.gz]   0 bg, 1 liver, 2 tumour

Arterial-phase liver MRI (target), one case per folder::

    MRI_ROOT/<case>/artery.nii[.gz] + label.nii[.gz]                          0 bg, 1 tumour
"""

from __future__ import annotations

import logging
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from shared_transforms import SelectSlices
from shared_transforms.datalist import BAD_CASES_FILE, scan_cases, split_cases, write_json
from shared_transforms.datalist_file import read_datalist_file

logger = logging.getLogger(__name__)

__all__ = [
    "natural_key",
    "find_lits_cases",
    "find_mri_cases",
    "prepare_ct_datalist",
    "prepare_mri_datalist",
    "sample_slice_indices",
    "SampleLiverSlicesd",
    "LabelsToChannelsd",
]

_VOLUME = re.compile(r"^volume-(?P<n>\d+)\.nii(\.gz)?$")
_SEGMENTATION = re.compile(r"^segmentation-(?P<n>\d+)\.nii(\.gz)?$")


def _first(folder: Path, stem: str) -> str | None:
    for suffix in (".nii.gz", ".nii"):
        if (folder / f"{stem}{suffix}").is_file():
            return str(folder / f"{stem}{suffix}")
    return None


def find_lits_cases(ct_root: str) -> tuple[list[dict], list[dict]]:
    """``volume-N`` / ``segmentation-N`` pairs directly under ``ct_root`` or its ``Training Batch *`` folders."""
    root = Path(ct_root)
    if not root.is_dir():
        raise FileNotFoundError(f"CT dataset folder not found: {root}")
    volumes, segmentations = {}, {}
    for folder in [root, *sorted(p for p in root.glob("Training Batch*") if p.is_dir())]:
        for f in sorted(folder.iterdir()):
            if m := _VOLUME.match(f.name):
                volumes[int(m["n"])] = str(f)
            elif m := _SEGMENTATION.match(f.name):
                segmentations[int(m["n"])] = str(f)
    cases = [{"image": volumes[n], "label": segmentations.get(n), "case": f"volume-{n}"} for n in sorted(volumes)]
    rejected = [
        {"case": f"volume-{n}", "file": segmentations[n], "reason": "no image file"}
        for n in sorted(set(segmentations) - set(volumes))
    ]
    if not cases:
        raise FileNotFoundError(f"no volume-N.nii[.gz] under {root} (or its 'Training Batch *' folders)")
    return cases, rejected


def natural_key(name: str) -> list:
    """Sort key that orders numbers by value: ``case2`` before ``case10`` (plain sorting puts it after)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def find_mri_cases(mri_root: str) -> list[dict]:
    """One case per sub-folder of ``mri_root`` with ``artery.nii[.gz]`` (and ``label.nii[.gz]``), in natural order."""
    root = Path(mri_root)
    if not root.is_dir():
        raise FileNotFoundError(f"MRI dataset folder not found: {root}")
    cases = []
    for folder in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name)):
        image = _first(folder, "artery")
        if image is not None:
            cases.append({"image": image, "label": _first(folder, "label"), "case": folder.name})
    if not cases:
        raise FileNotFoundError(f"no <case>/artery.nii[.gz] under {root}")
    return cases


def _report(output_dir: str | None, name: str, datalist: dict) -> None:
    if output_dir is not None:
        write_json(Path(output_dir) / name, datalist)
        write_json(Path(output_dir) / BAD_CASES_FILE, datalist["bad_cases"])


def prepare_ct_datalist(
    dataset_dir: str,
    val_fraction: float = 0.1,
    seed: int = 0,
    output_dir: str | None = None,
    datalist_file: str | None = None,
) -> dict:
    """LiTS cases, cleaned (unreadable, mismatched or unlabelled volumes dropped and reported), split per volume.

    With ``datalist_file`` (a MONAI/Decathlon datalist JSON of CT volumes) its lists are used instead.
    """
    if datalist_file:
        datalist = read_datalist_file(datalist_file, scan_cases, val_fraction=val_fraction, seed=seed)
        bad = datalist["bad_cases"]
    else:
        cases, rejected = find_lits_cases(dataset_dir)
        good, bad = scan_cases(cases, known_bad=rejected)
        split = split_cases(good, test_fraction=val_fraction, n_folds=1, seed=seed)
        datalist = {"training": split["folds"][0], "validation": split["test"], "bad_cases": bad}
    datalist["validation"] = datalist["validation"] or datalist["training"][-1:]
    _report(output_dir, "datalist_ct.json", datalist)
    logger.info(
        "CT datalist: %d training, %d validation volumes; %d dropped",
        len(datalist["training"]),
        len(datalist["validation"]),
        len(bad),
    )
    return datalist


def prepare_mri_datalist(
    dataset_dir: str, n_test: int = 4, n_val: int = 1, output_dir: str | None = None, datalist_file: str | None = None
) -> dict:
    """MRI cases, cleaned; the LAST ``n_test`` cases (natural order of folder names) are the test set, as in the report.

    The ``n_val`` cases before them validate during training (best checkpoint); with
    ``n_val=0``, as in the report, nothing validates and the final epoch's model is kept. The
    split is written to ``datalist_mri.json`` (usable as ``datalist_file``).

    With ``datalist_file`` (a MONAI/Decathlon datalist JSON) its lists are used instead of
    ``dataset_dir`` and ``n_test``; ``n_val`` still says whether validation runs: without a
    ``"validation"`` list the last ``n_val`` training cases validate, and with ``n_val=0`` a
    ``"validation"`` list is not used.
    """
    if n_test < 1 or n_val < 0:
        raise ValueError(f"n_test must be >= 1 and n_val >= 0, got n_test={n_test}, n_val={n_val}")
    if datalist_file:
        datalist = read_datalist_file(datalist_file, scan_cases, val_fraction=0.0)
        if n_val == 0 and datalist["validation"]:
            logger.warning(
                "n_val is 0: the %d validation cases of %s are not used", len(datalist["validation"]), datalist_file
            )
            datalist["validation"] = []
        elif n_val > 0 and not datalist["validation"]:
            if len(datalist["training"]) <= n_val:
                raise ValueError(
                    f"{datalist_file}: {len(datalist['training'])} training cases, need more than n_val = {n_val}"
                )
            datalist["training"], datalist["validation"] = datalist["training"][:-n_val], datalist["training"][-n_val:]
        _report(output_dir, "datalist_mri.json", datalist)
        return datalist
    good, bad = scan_cases(find_mri_cases(dataset_dir))
    if len(good) <= n_test + n_val:
        raise ValueError(f"{dataset_dir}: {len(good)} usable cases, need more than n_test + n_val = {n_test + n_val}")
    datalist = {
        "training": good[: len(good) - n_test - n_val],
        "validation": good[len(good) - n_test - n_val : len(good) - n_test],
        "test": good[len(good) - n_test :],
        "bad_cases": bad,
    }
    _report(output_dir, "datalist_mri.json", datalist)
    logger.info(
        "MRI datalist: %d training, %d validation, %d test cases; %d dropped",
        len(datalist["training"]),
        len(datalist["validation"]),
        len(datalist["test"]),
        len(bad),
    )
    return datalist


def sample_slice_indices(has_liver: Sequence[bool], n_liver: int = 30, n_background: int = 20) -> list[int]:
    """The report's CT sampling: ``n_liver`` slices containing liver and ``n_background`` adjacent ones without.

    Liver slices are spread evenly over the liver's slices when there are more than
    ``n_liver``; background slices are the liver-free slices nearest to the liver's extent,
    taken alternately below and above it. Fewer are returned when the volume has fewer.
    """
    has_liver = np.asarray(has_liver, dtype=bool)
    liver = np.flatnonzero(has_liver)
    if len(liver) == 0:
        return []
    if len(liver) > n_liver:
        liver = liver[np.round(np.linspace(0, len(liver) - 1, n_liver)).astype(int)]
    lo, hi = int(np.flatnonzero(has_liver)[0]), int(np.flatnonzero(has_liver)[-1])
    below = [k for k in range(lo - 1, -1, -1) if not has_liver[k]]
    above = [k for k in range(hi + 1, len(has_liver)) if not has_liver[k]]
    background: list[int] = []
    while len(background) < n_background and (below or above):
        for side in (below, above):
            if side and len(background) < n_background:
                background.append(side.pop(0))
    return sorted({int(k) for k in liver} | set(background))


class SampleLiverSlicesd(MapTransform):
    """CT volume dict -> list of 2D slice dicts chosen by :func:`sample_slice_indices`.

    The liver mask is ``label >= 1`` of ``label_key``; the slices are cut along the last
    spatial axis with :meth:`shared_transforms.SelectSlices.extract` (meta keeps ``slice_index``).
    """

    def __init__(
        self, keys: KeysCollection, label_key: str = "label", n_liver: int = 30, n_background: int = 20
    ) -> None:
        super().__init__(keys)
        self.label_key = label_key
        self.n_liver, self.n_background = n_liver, n_background
        self.slicer = SelectSlices(axis=-1)

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict]:
        d = dict(data)
        label = torch.as_tensor(d[self.label_key])
        has_liver = (label >= 1).flatten(0, -2).any(dim=0).tolist()
        idx = sample_slice_indices(has_liver, self.n_liver, self.n_background)
        if not idx:
            logger.warning("no liver in %s", getattr(d[self.label_key], "meta", {}).get("filename_or_obj", "volume"))
        keys = list(dict.fromkeys([*self.key_iterator(d), self.label_key]))
        others = {k: v for k, v in d.items() if k not in keys and not isinstance(v, (np.ndarray, torch.Tensor))}
        return [{**others, **{k: self.slicer.extract(d[k], z) for k in keys}, "slice_index": z} for z in idx]


class LabelsToChannelsd(MapTransform):
    """Integer label ``(1, ...)`` -> one binary channel per entry of ``channels``.

    ``channels=[[1, 2], [2]]`` turns LiTS labels (1 liver, 2 tumour) into the report's two
    outputs: liver = label in {1, 2}, tumour = label == 2.
    """

    def __init__(self, keys: KeysCollection, channels: Sequence[Sequence[int]]) -> None:
        super().__init__(keys)
        self.channels = [[int(v) for v in values] for values in channels]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            planes = [torch.isin(torch.as_tensor(label[0]), torch.tensor(values)) for values in self.channels]
            out = torch.stack(planes).to(torch.float32)
            d[key] = MetaTensor(out, affine=label.affine, meta=label.meta) if isinstance(label, MetaTensor) else out
        return d
