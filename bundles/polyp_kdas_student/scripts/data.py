"""The PraNet polyp layout and the bundle's small image transforms.

```
DATASET_DIR/TrainDataset/images/<stem>.png|.jpg     masks/<stem>.png|.tif
DATASET_DIR/TestDataset/<set>/images/...            <set>/masks/...
```
Images and masks are paired by file stem. Unmatched files and unreadable pairs (or a mask
whose size differs from its image) are reported with the file and the reason (console and
``bad_cases.json``) and skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from shared_transforms.datalist_file import read_datalist_file
from shared_transforms.files import BAD_CASES_FILE, write_json

__all__ = [
    "IMAGE_SUFFIXES",
    "MASK_SUFFIXES",
    "check_pair",
    "scan_items",
    "scan_pairs",
    "polyp_datalist",
    "EnsureRGBd",
    "BinarizeMaskd",
    "list_rgb_images",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MASK_SUFFIXES = (".png", ".tif", ".tiff")
#: the five PraNet test sets, in the order of the paper's tables
TEST_SETS = ("Kvasir", "CVC-ClinicDB", "CVC-ColonDB", "ETIS-LaribPolypDB", "CVC-300")


def _files(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.is_file() and p.suffix.lower() in suffixes:
                out.setdefault(p.stem, p)
    return out


def _read_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        im.load()  # decode everything: a truncated file fails here, not at training time
        return im.size


def check_pair(image: str | Path, mask: str | Path | None) -> tuple[str, str] | None:
    """``None`` when the image and its mask decode completely and have one size, otherwise ``(file, reason)``."""
    if mask is None:
        return (str(image), "no mask with this stem")
    sizes = {}
    for path in (Path(image), Path(mask)):
        try:
            sizes[path] = _read_size(path)
        except Exception as e:  # PIL raises several types for broken files
            return (str(path), f"cannot read: {type(e).__name__}: {e}")
    if sizes[Path(image)] != sizes[Path(mask)]:
        return (str(mask), f"image/mask size mismatch: {sizes[Path(image)]} vs {sizes[Path(mask)]}")
    return None


def scan_items(items: list[dict]) -> tuple[list[dict], list[dict]]:
    """``(good, bad)`` of a user's datalist items (``{"image", "label", "case", ...}``), by :func:`check_pair`."""
    good, bad = [], []
    for item in items:
        problem = check_pair(item["image"], item.get("label"))
        if problem is None:
            good.append(item)
        else:
            bad.append({"case": item["case"], "file": problem[0], "reason": problem[1]})
            logger.warning("skipping %s: %s (%s)", item["case"], problem[1], problem[0])
    return good, bad


def scan_pairs(folder: str | Path, set_name: str = "train") -> tuple[list[dict], list[dict]]:
    """``(good, bad)`` image/mask pairs of ``folder/images`` and ``folder/masks``.

    ``good`` entries: ``{"image", "label", "case", "set"}``; ``bad``: ``{"case", "file", "reason"}``.
    """
    folder = Path(folder)
    images, masks = _files(folder / "images", IMAGE_SUFFIXES), _files(folder / "masks", MASK_SUFFIXES)
    good, bad = [], []
    for stem in sorted(set(images) | set(masks)):
        case = f"{set_name}/{stem}"
        if stem not in images:
            bad.append({"case": case, "file": str(masks[stem]), "reason": "no image with this stem"})
        elif problem := check_pair(images[stem], masks.get(stem)):
            bad.append({"case": case, "file": problem[0], "reason": problem[1]})
        else:
            good.append({"image": str(images[stem]), "label": str(masks[stem]), "case": stem, "set": set_name})
    for b in bad:
        logger.warning("skipping %s: %s (%s)", b["case"], b["reason"], b["file"])
    return good, bad


def _subset(items: list[dict], fraction: float, seed: int) -> list[dict]:
    """``fraction`` of ``items`` (at least one), chosen by ``seed``; a smaller fraction is a subset of a larger one."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(items))]
    kept = set(order[: max(1, int(round(len(items) * fraction)))] if items else [])
    return [c for i, c in enumerate(items) if i in kept]


def polyp_datalist(
    dataset_dir: str,
    output_dir: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    train_fraction: float = 1.0,
    datalist_file: str | None = None,
) -> dict:
    """Training / validation lists from ``TrainDataset`` and one test list per ``TestDataset/<set>``.

    ``val_fraction`` of the training pairs (at least one) is held out for model selection,
    chosen by ``seed``; of the rest, ``train_fraction`` (at least one pair, chosen by ``seed``)
    is trained on (1.0: all; smaller for low-data experiments such as the KD sanity check).
    With ``datalist_file`` (a MONAI/Decathlon datalist JSON of image/mask pairs; test items may
    name their set in ``"set"``) its lists are used instead of ``dataset_dir``. Writes
    ``datalist.json`` (usable as ``datalist_file``) and ``bad_cases.json`` into ``output_dir``.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...], "test_sets": [names]}``;
        test items carry their set name in ``"set"``.
    """
    if datalist_file:
        lists = read_datalist_file(datalist_file, scan_items, val_fraction=val_fraction, seed=seed)
        training, validation, bad = (
            _subset(lists["training"], train_fraction, seed),
            lists["validation"],
            lists["bad_cases"],
        )
        test = [{"set": "test", **c} for c in lists["test"]]
        test_sets = list(dict.fromkeys(c["set"] for c in test))
    else:
        training, validation, test, test_sets, bad = _scan_layout(Path(dataset_dir), val_fraction, seed, train_fraction)
    result = {"training": training, "validation": validation, "test": test, "test_sets": test_sets}
    if output_dir:
        write_json(Path(output_dir) / "datalist.json", result)
        write_json(Path(output_dir) / BAD_CASES_FILE, bad)
    logger.info(
        "%d training, %d validation, %d test pairs (%s); %d skipped",
        len(training),
        len(validation),
        len(test),
        ", ".join(test_sets) or "no test set",
        len(bad),
    )
    return result


def _scan_layout(root: Path, val_fraction: float, seed: int, train_fraction: float) -> tuple:
    """The PraNet layout's training, validation and test pairs, test set names and skipped pairs."""
    if not (root / "TrainDataset").is_dir() and not (root / "TestDataset").is_dir():
        raise FileNotFoundError(f"{root}: neither TrainDataset/ nor TestDataset/ found (PraNet layout expected)")
    train, bad = scan_pairs(root / "TrainDataset", "train")
    order = np.random.default_rng(seed).permutation(len(train))
    n_val = max(1, int(round(len(train) * val_fraction))) if len(train) > 1 and val_fraction > 0 else 0
    val_idx = set(order[:n_val].tolist())
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    rest = [int(i) for i in order[n_val:]]  # in the seeded order: a subset is a prefix
    kept = set(rest[: max(1, int(round(len(rest) * train_fraction)))] if rest else [])
    training = [c for i, c in enumerate(train) if i in kept]
    validation = [c for i, c in enumerate(train) if i in val_idx]
    test, test_sets = [], []
    test_root = root / "TestDataset"
    found = sorted(p.name for p in test_root.iterdir() if (p / "images").is_dir()) if test_root.is_dir() else []
    for name in [s for s in TEST_SETS if s in found] + [s for s in found if s not in TEST_SETS]:
        good, set_bad = scan_pairs(test_root / name, name)
        test += good
        bad += set_bad
        test_sets.append(name)
    return training, validation, test, test_sets, bad


def list_rgb_images(folder: str) -> list[dict[str, str]]:
    """``[{"image": path}]`` for every .png/.jpg/.jpeg directly inside ``folder`` (inference)."""
    folder_path = Path(folder)
    if not folder_path.is_dir():
        raise FileNotFoundError(f"input folder not found: {folder_path}")
    files = sorted(p for p in folder_path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no .png/.jpg images directly inside {folder_path}")
    return [{"image": str(p)} for p in files]


class EnsureRGBd(MapTransform):
    """Channel-first image to exactly 3 channels: grey is repeated, an alpha channel dropped."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] == 1:
                img = img.repeat(3, *([1] * (img.ndim - 1)))
            elif img.shape[0] == 2:  # grey + alpha
                img = img[:1].repeat(3, *([1] * (img.ndim - 1)))
            elif img.shape[0] > 3:
                img = img[:3]
            d[key] = img
        return d


class BinarizeMaskd(MapTransform):
    """Channel-first mask (grey, RGB or RGBA; 0/1, 0/255 or JPEG-like values) to one 0/1 float channel.

    A pixel is foreground when its brightest colour channel exceeds half the mask's range
    (0.5 for masks stored as 0/1, 127.5 for 8-bit masks).
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            m = d[key]
            if m.shape[0] == 4:
                m = m[:3]
            m = m.float().amax(dim=0, keepdim=True)
            top = 1.0 if float(m.max()) <= 1.0 else 255.0 if float(m.max()) <= 255.0 else 65535.0
            d[key] = (m > top / 2).float()
        return d
