"""M&Ms-2 layout, datalists and the preprocessing of METHODS §3 (and its inverse).

Layout (both read)::

    DATA_ROOT/NNN/NNN_{SA,LA}_{ED,ES}.nii.gz  (+ NNN_{SA,LA}_{ED,ES}_gt.nii.gz)   per-subject folders
    DATA_ROOT/data/NNN_{SA,LA}_{ED,ES}.nii.gz (+ _gt)                          flattened copy
    DATA_ROOT/dataset_information.csv   SUBJECT_CODE, DISEASE, VENDOR, SCANNER, FIELD

Labels 0 background, 1 LV, 2 MYO, 3 RV. Preprocessing per volume: crop to the non-zero box
(in-plane), resample in-plane to the dataset's median spacing (z untouched), z-score, centre
pad/crop to ``size`` x ``size``; :func:`invert_volume` maps network-grid probabilities back to
the input's grid.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import CropForeground, MapTransform, NormalizeIntensity, Resize, ResizeWithPadOrCrop

from shared_transforms.datalist import BAD_CASES_FILE, fold_datalist, scan_cases, split_cases, write_json
from shared_transforms.datalist_file import case_id as _stem
from shared_transforms.datalist_file import read_datalist_file
from shared_transforms.files import atomic_path

logger = logging.getLogger(__name__)

__all__ = [
    "find_mnms2_cases",
    "mnms2_datalist",
    "list_unlabelled",
    "inference_datalist",
    "median_spacing",
    "target_spacing",
    "preprocess_volume",
    "invert_volume",
    "CardiacSlicesd",
    "CLASSES",
]

CLASSES = {"0": "background", "1": "LV", "2": "MYO", "3": "RV"}
_FILE = re.compile(r"^(?P<subject>\d+)_(?P<view>SA|LA)_(?P<phase>ED|ES|CINE)(?P<gt>_gt)?\.nii(\.gz)?$")


def phase_of(path: str | Path) -> str | None:
    """``"ED"``/``"ES"`` from an M&Ms-2 file name (``NNN_SA_ED.nii.gz``), else None."""
    m = re.search(r"_(ED|ES)(?:_gt)?$", _stem(path))
    return m.group(1) if m else None


def _read_information(root: Path) -> dict[str, dict]:
    for folder in (root, root.parent):
        path = folder / "dataset_information.csv"
        if path.is_file():
            with open(path, newline="") as f:
                return {str(int(r["SUBJECT_CODE"])).zfill(3): r for r in csv.DictReader(f) if r.get("SUBJECT_CODE")}
    return {}


def find_mnms2_cases(dataset_dir: str, view: str = "SA") -> list[dict]:
    """Every ``NNN_<view>_{ED,ES}`` image under ``dataset_dir`` (nested or flattened), with its label when present."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    images: dict[tuple, str] = {}
    labels: dict[tuple, str] = {}
    for path in sorted(root.rglob("*.nii*")):  # sorted: NNN/ sorts before data/, so the nested copy wins
        m = _FILE.match(path.name)
        if not m or m["view"] != view or m["phase"] == "CINE":
            continue
        key = (m["subject"].zfill(3), m["phase"])
        (labels if m["gt"] else images).setdefault(key, str(path))
    info = _read_information(root)
    cases = []
    for (subject, phase), image in sorted(images.items()):
        row = info.get(subject, {})
        cases.append(
            {
                "image": image,
                "label": labels.get((subject, phase)),
                "case": f"{subject}_{view}_{phase}",
                "subject": subject,
                "phase": phase,
                "view": view,
                "vendor": row.get("VENDOR", ""),
                "disease": row.get("DISEASE", ""),
            }
        )
    return cases


def mnms2_datalist(
    dataset_dir: str,
    view: str = "SA",
    test_fraction: float = 0.2,
    n_folds: int = 5,
    fold: int = 0,
    seed: int = 0,
    output_dir: str | None = None,
    datalist_file: str | None = None,
) -> dict[str, list]:
    """Labelled subjects split per subject into training / validation / test; unlabelled images listed apart.

    With ``datalist_file`` (a MONAI/Decathlon datalist JSON of short-axis volumes and their
    0/1/2/3 = background/LV/myocardium/RV labels; an optional ``"unlabelled"`` list) its lists
    are used instead of ``dataset_dir``; without a ``"validation"`` list, 1/``n_folds`` of the
    training subjects (``"subject"`` when every item has one) validate.
    Writes ``datalist_<view>.json`` (usable as ``datalist_file``) and ``bad_cases.json`` into
    ``output_dir`` when given.
    """
    if datalist_file:
        datalist = read_datalist_file(
            datalist_file,
            scan_cases,
            val_fraction=1 / n_folds,
            seed=seed,
            patient_key="subject",
            extra_keys=["unlabelled"],
        )
        bad = datalist.pop("bad_cases")
    else:
        cases = find_mnms2_cases(dataset_dir, view)
        labelled = [c for c in cases if c["label"]]
        unlabelled = [{k: v for k, v in c.items() if k != "label"} for c in cases if not c["label"]]
        good, bad = scan_cases(labelled)
        if not good:
            raise FileNotFoundError(f"no labelled NNN_{view}_(ED|ES).nii[.gz] with _gt under {dataset_dir}")
        split = split_cases(good, test_fraction=test_fraction, n_folds=n_folds, seed=seed, patient_key="subject")
        datalist = {**fold_datalist(split, fold), "unlabelled": unlabelled}
    if output_dir:
        write_json(Path(output_dir) / f"datalist_{view}.json", datalist)
        write_json(Path(output_dir) / BAD_CASES_FILE, bad)
    return datalist


def list_unlabelled(folder: str, view: str = "SA") -> list[dict]:
    """Images to refine on: the M&Ms-2-named ``view`` images under ``folder`` that have no ``_gt``;
    when none are named so, every ``.nii``/``.nii.gz`` directly inside ``folder`` not ending in ``_gt``."""
    cases = [c for c in find_mnms2_cases(folder, view) if not c["label"]]
    if cases:
        return [{"image": c["image"], "case": c["case"], "vendor": c["vendor"]} for c in cases]
    return [{**d, "case": _stem(d["image"])} for d in inference_datalist(folder)]


def inference_datalist(folder: str) -> list[dict]:
    """``[{"image": path}]`` for every ``.nii``/``.nii.gz`` directly inside ``folder``, except ``*_gt`` files."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder not found: {root}")
    files = sorted(
        p
        for p in root.iterdir()
        if p.is_file() and p.name.endswith((".nii", ".nii.gz")) and not _stem(p).endswith("_gt")
    )
    if not files:
        raise FileNotFoundError(f"no .nii/.nii.gz image directly inside {root}")
    return [{"image": str(p)} for p in files]


def _spacing_of(path: str) -> tuple[float, float, float]:
    zooms = nib.load(path).header.get_zooms()
    return tuple(float(z) for z in (list(zooms) + [1.0, 1.0, 1.0])[:3])


def median_spacing(
    data: Sequence[Mapping[str, Any]], image_key: str = "image", default: Sequence[float] = (1.25, 1.25)
) -> list[float]:
    """The median in-plane spacing (mm) over ``data``'s images: the network grid's spacing.

    An empty ``data`` (a workflow built before its data is given, e.g. a property check) gets
    ``default`` with a warning; training on no data fails later, at the data loader."""
    sp = np.array([_spacing_of(d[image_key])[:2] for d in data])
    if not len(sp):
        logger.warning("no images to compute the median spacing from: using %s mm", list(default))
        return [float(v) for v in default]
    return [float(v) for v in np.median(sp, axis=0)]


def target_spacing(ckpt_dir: str, default: Sequence[float] = (1.25, 1.25)) -> list[float]:
    """The training set's median spacing saved with the model (``models/preprocessing.json``), else ``default``."""
    path = Path(ckpt_dir) / "preprocessing.json"
    if path.is_file():
        return [float(v) for v in json.loads(path.read_text())["target_spacing"]]
    logger.warning("%s not found: using the default in-plane spacing %s mm", path, list(default))
    return [float(v) for v in default]


def save_target_spacing(ckpt_dir: str, spacing: Sequence[float], view: str) -> str:
    return write_json(
        Path(ckpt_dir) / "preprocessing.json", {"target_spacing": [float(s) for s in spacing], "view": view}
    )


def preprocess_volume(
    image: np.ndarray | torch.Tensor,
    spacing: Sequence[float],
    target: Sequence[float],
    size: int,
    label: np.ndarray | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """``image`` (H, W, Z) -> network input (Z, 1, size, size), label (Z, 1, size, size) and the inversion info.

    MONAI transforms on the slices as channels ``(Z, H, W)``, so every step is in-plane:
    ``CropForeground`` (non-zero box), ``Resize`` to the target spacing (bilinear; labels nearest),
    ``NormalizeIntensity`` (z-score over the volume), ``ResizeWithPadOrCrop`` (centre). The applied
    operations travel in ``info`` for :func:`invert_volume`.
    """
    img = torch.as_tensor(np.asarray(image), dtype=torch.float32)
    if img.ndim == 2:
        img = img[..., None]
    h, w, z = img.shape
    chan = MetaTensor(img.permute(2, 0, 1).contiguous())  # slices as channels: every step is in-plane
    crop = CropForeground(select_fn=lambda v: v != 0, margin=0, allow_smaller=True, return_coords=True)
    pad = ResizeWithPadOrCrop(spatial_size=(size, size))
    cropped, start, stop = crop(chan)
    if cropped.shape[1] == 0 or cropped.shape[2] == 0:  # an empty image: no box, keep the whole plane
        cropped, start, stop = chan.clone(), np.array([0, 0]), np.array([h, w])
        cropped.applied_operations = []
        crop = None
    new = (
        max(1, round(cropped.shape[1] * spacing[0] / target[0])),
        max(1, round(cropped.shape[2] * spacing[1] / target[1])),
    )
    resize = Resize(spatial_size=new, mode="bilinear", align_corners=False)
    x = pad(NormalizeIntensity()(resize(cropped)))
    y = None
    if label is not None:
        lab = torch.as_tensor(np.asarray(label), dtype=torch.float32)
        lab = (lab[..., None] if lab.ndim == 2 else lab).permute(2, 0, 1).contiguous()
        lab = lab[:, int(start[0]) : int(stop[0]), int(start[1]) : int(stop[1])]
        y = pad(Resize(spatial_size=new, mode="nearest")(lab)).as_tensor()[:, None]
    info = {
        "shape": (h, w, z),
        "box": (int(start[0]), int(stop[0]), int(start[1]), int(stop[1])),
        "resampled": new,
        "size": size,
        "transforms": [t for t in (crop, resize, pad) if t is not None],
        "applied_operations": list(x.applied_operations),
    }
    return x.as_tensor()[:, None], y, info


def invert_volume(prob: torch.Tensor, info: Mapping[str, Any]) -> torch.Tensor:
    """Network-grid probabilities (Z, C, size, size) -> (C, H, W, Z) on the input's grid: the MONAI
    transforms of :func:`preprocess_volume` inverted (pad/crop, resize, crop) from the operations
    it recorded. The foreground channels are inverted (their padding, 0, is right) and background
    is 1 - their sum: whatever lies outside the network's view is background."""
    z, c, size, _ = prob.shape
    flat = MetaTensor(prob[:, 1:].reshape(z * (c - 1), size, size).float())
    flat.applied_operations = copy.deepcopy(info["applied_operations"])  # inverse() consumes its records
    for t in reversed(info["transforms"]):
        flat = t.inverse(flat)
    h, w, _ = info["shape"]
    fg = flat.as_tensor().reshape(z, c - 1, h, w)
    out = torch.cat([(1.0 - fg.sum(1, keepdim=True)).clamp_min(0.0), fg], 1).to(prob.dtype)
    return out.permute(1, 2, 3, 0)


def spacing_from_meta(img) -> list[float]:
    """In-plane voxel spacing (mm) of a loaded MetaTensor (from its affine)."""
    affine = np.asarray(img.affine if hasattr(img, "affine") else np.eye(4), dtype=float)
    return [float(np.linalg.norm(affine[:3, i])) for i in range(3)]


class CardiacSlicesd(MapTransform):
    """A loaded volume (channel-first, ``(1, H, W, Z)``) and its label -> a list of 2D slice dicts.

    Applies :func:`preprocess_volume` with the volume's own spacing (from its affine) and
    ``target_spacing``; every z slice becomes ``{"image": (1, size, size), "label": (1, size, size),
    "case", "slice_index"}``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        target_spacing: Sequence[float],
        size: int = 256,
        label_key: str = "label",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.target_spacing = [float(s) for s in target_spacing]
        self.size = int(size)
        self.label_key = label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict]:
        d = dict(data)
        image = d["image"]
        spacing = spacing_from_meta(image)
        label = d.get(self.label_key)
        x, y, _ = preprocess_volume(
            np.asarray(image)[0],
            spacing,
            self.target_spacing,
            self.size,
            None if label is None else np.asarray(label)[0],
        )
        case = str(d.get("case", Path(str(getattr(image, "meta", {}).get("filename_or_obj", "case"))).name))
        out = []
        for k in range(x.shape[0]):
            item = {"image": x[k].clone(), "case": case, "slice_index": k}
            if y is not None:
                item["label"] = y[k].clone()
            out.append(item)
        return out


from monai.transforms import SaveImaged  # noqa: E402


class SaveMaskd(SaveImaged):
    """Write a label map ``(1, H, W, Z)`` as uint8 NIfTI ``<stem>_<postfix>.nii.gz`` with EXACTLY the
    input's shape (a single-slice LA image stays ``(H, W, 1)``, which ``SaveImaged`` squeezes or
    pads) and the input file's header and affine. A ``SaveImaged`` subclass, so MONAI Label drops
    it and uses its own writer."""

    def __init__(
        self, keys: KeysCollection, output_dir: str, output_postfix: str = "seg", print_log: bool = True
    ) -> None:
        super().__init__(keys=keys, output_dir=output_dir, output_postfix=output_postfix, print_log=False)
        self.out_dir, self.postfix, self.verbose = Path(output_dir), output_postfix, print_log

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            arr = np.asarray(pred.detach().cpu() if isinstance(pred, torch.Tensor) else pred)[0].astype(np.uint8)
            source = str(getattr(pred, "meta", {}).get("filename_or_obj", ""))
            if source and Path(source).is_file() and source.endswith((".nii", ".nii.gz")):
                ref = nib.load(source)
                header = ref.header.copy()
                header.set_data_dtype(np.uint8)
                img = nib.Nifti1Image(arr.reshape(ref.shape), ref.affine, header)
                img.header.set_slope_inter(1.0, 0.0)
            else:
                img = nib.Nifti1Image(arr, np.asarray(getattr(pred, "affine", np.eye(4)), dtype=float))
            path = self.out_dir / f"{_stem(source or 'volume')}_{self.postfix}.nii.gz"
            with atomic_path(path) as tmp:  # never a half-written mask
                nib.save(img, str(tmp))
            if self.verbose:
                logger.info("wrote %s", path)
        return d
