"""A user's own data: a MONAI/Decathlon-style datalist JSON instead of a published folder layout.

```json
{"training":   [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}, ...],
 "validation": [...],
 "test":       [...]}
```
Read with ``monai.data.load_decathlon_datalist`` (relative paths from the file's folder), then
checked case by case as a published layout is. A ``datalist.json`` a bundle's run writes is such
a file: fed back in as ``datalist_file``, it gives the same split.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .splits import split_cases

__all__ = ["case_id", "read_datalist_file"]

logger = logging.getLogger(__name__)

#: ``scan(items) -> (good, bad)``: the bundle's own check of its files (``shared_transforms.datalist.scan_cases``
#: for NIfTI volumes); ``bad`` entries are ``{"case", "file", "reason"}``
Scan = Callable[[list[dict]], tuple[list[dict], list[dict]]]


def case_id(path: str | os.PathLike) -> str:
    """A case name from an image path: the file name without ``.nii.gz``, ``.nii`` or its other suffix."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _name_cases(items: list[dict]) -> None:
    """Give every item without a ``"case"`` one from its image's name; equal names get their folder prefixed."""
    names = [case_id(item["image"]) for item in items]
    for item, name in zip(items, names):
        if "case" not in item:
            item["case"] = f"{Path(item['image']).parent.name}/{name}" if names.count(name) > 1 else name


def read_datalist_file(
    datalist_file: str | os.PathLike,
    scan: Scan,
    base_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    patient_key: str = "case",
    extra_keys: Sequence[str] = (),
) -> dict[str, list]:
    """The ``"training"`` (required), ``"validation"`` and ``"test"`` lists of a datalist JSON, checked.

    Args:
        datalist_file: the JSON; items are ``{"image": path, "label": path, ...}``, extra entries
            (``"case"``, ``"site"``, ...) kept. Every item without a ``"case"`` gets one from its
            image's file name.
        scan: checks the labelled items (every one needs a label: evaluation reads it, so a
            Decathlon ``"test"`` list of bare images is reported as unlabelled). Unusable items
            are dropped and reported, as for a published layout.
        base_dir: folder of relative paths (default: the file's folder).
        val_fraction: without a ``"validation"`` list, this fraction of the training patients
            (``patient_key`` where every item has one, else ``"case"``; chosen by ``seed``)
            validates; ``0`` leaves it empty.
        extra_keys: further lists (e.g. unlabelled images) read and kept unchecked.

    Returns:
        ``{"training", "validation", "test", "bad_cases", *extra_keys}`` (missing lists empty).

    Raises:
        FileNotFoundError / ValueError naming the file: missing, not JSON, no training list, or
        no usable training case.
    """
    from monai.data import load_decathlon_datalist

    path = Path(datalist_file)
    if not path.is_file():
        raise FileNotFoundError(f"datalist_file not found: {path}")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON datalist ({e})") from e
    if not isinstance(content, dict) or not isinstance(content.get("training"), list) or not content["training"]:
        raise ValueError(f"{path}: a datalist needs a non-empty 'training' list of {{'image', 'label'}} items")
    base = str(base_dir if base_dir is not None else path.parent)
    lists: dict[str, list] = {}
    for key in ("training", "validation", "test", *extra_keys):
        items = load_decathlon_datalist(str(path), True, key, base) if content.get(key) else []
        if any(not isinstance(item, dict) or "image" not in item for item in items):
            raise ValueError(f"{path}: every '{key}' item needs an 'image' entry")
        lists[key] = [dict(item) for item in items]
    _name_cases([item for items in lists.values() for item in items])
    bad: list[dict] = []
    for key in ("training", "validation", "test"):
        lists[key], dropped = scan(lists[key])
        bad += dropped
    if not lists["training"]:
        raise ValueError(f"{path}: no usable training case (see the warnings above)")
    if not content.get("validation") and val_fraction > 0:
        key = patient_key if all(patient_key in c for c in lists["training"]) else "case"
        split = split_cases(lists["training"], test_fraction=val_fraction, n_folds=1, seed=seed, patient_key=key)
        lists["training"], lists["validation"] = split["folds"][0], split["test"]
    logger.info("datalist %s: %d training, %d validation, %d test cases; %d dropped", path,
                len(lists["training"]), len(lists["validation"]), len(lists["test"]), len(bad))
    return {**lists, "bad_cases": bad}
