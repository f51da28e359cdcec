"""Reading the multi-site prostate layout into a cleaned, split datalist.

Layout (the public "multi-site prostate" copy of NCI-ISBI 2013 and I2CVB)::

    dataset_dir/RUNMC/Case00.nii.gz + Case00_segmentation.nii.gz   (site A)
    dataset_dir/BMC/...                                             (site B)
    dataset_dir/I2CVB/...                                           (site C)

``_Segmentation`` and ``.nii`` are accepted as well.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from shared_transforms.datalist import (
    BAD_CASES_FILE,
    PROSTATE_SITES,
    fold_datalist,
    scan_cases,
    split_cases,
    write_json,
)
from shared_transforms.datalist_file import read_datalist_file

logger = logging.getLogger(__name__)

__all__ = ["SITES", "site_folder", "find_cases", "prepare_datalist"]

#: site letter used in the paper -> folder name in the public layout
SITES = PROSTATE_SITES
_IMAGE = re.compile(r"^(?P<case>.+?)\.nii(\.gz)?$")
_LABEL = re.compile(r"^(?P<case>.+?)_[Ss]egmentation\.nii(\.gz)?$")


def site_folder(site: str) -> str:
    """``"A"``/``"site_a"``/``"RUNMC"`` -> ``"RUNMC"`` (folder names are returned unchanged)."""
    key = str(site).strip()
    letter = key.upper().removeprefix("SITE").strip(" _-")
    return SITES.get(letter, key)


def find_cases(dataset_dir: str, sites: Sequence[str] | str) -> tuple[list[dict], list[dict]]:
    """List ``{"image", "label", "case", "site"}`` dicts of the given sites.

    Returns ``(cases, rejected)``; ``rejected`` holds labels without an image (a missing label is
    reported later by the scan, which also checks readability and shapes).
    """
    root = Path(dataset_dir)
    if isinstance(sites, str):
        sites = [sites]
    cases, rejected = [], []
    for site in sites:
        folder = root / site_folder(site)
        if not folder.is_dir():
            raise FileNotFoundError(f"site folder not found: {folder} (expected one of {sorted(SITES.values())})")
        images, labels = {}, {}
        for f in sorted(folder.iterdir()):
            if m := _LABEL.match(f.name):
                labels[m["case"]] = str(f)
            elif m := _IMAGE.match(f.name):
                images[m["case"]] = str(f)
        for case in sorted(images):
            cases.append(
                {"image": images[case], "label": labels.get(case), "case": f"{folder.name}/{case}", "site": folder.name}
            )
        for case in sorted(set(labels) - set(images)):
            rejected.append({"case": f"{folder.name}/{case}", "file": labels[case], "reason": "no image file"})
    if not cases:
        raise FileNotFoundError(f"no CaseNN.nii[.gz] images under {root} for sites {list(sites)}")
    return cases, rejected


def prepare_datalist(
    dataset_dir: str,
    sites: Sequence[str] | str,
    fold: int = 0,
    seed: int = 0,
    output_dir: str | None = None,
    test_fraction: float = 0.2,
    n_folds: int = 5,
    datalist_file: str | None = None,
) -> dict[str, list]:
    """Scan, clean and split the dataset; write ``datalist.json`` and ``bad_cases.json``.

    The split is per patient and per site (a site's test cases do not depend on which other
    sites are merged in), 20% test and ``n_folds`` folds on the rest, deterministic for ``seed``.
    With ``datalist_file`` (a MONAI/Decathlon datalist JSON, see
    :func:`shared_transforms.datalist_file.read_datalist_file`) its lists are used instead of
    ``dataset_dir``/``sites``; without a ``"validation"`` list, 1/``n_folds`` of the training
    cases validate. The ``datalist.json`` written here can be fed back as ``datalist_file``.

    Returns:
        ``{"training", "validation", "test", "bad_cases"}``.
    """
    if datalist_file:
        datalist = read_datalist_file(datalist_file, scan_cases, val_fraction=1 / n_folds, seed=seed)
        meta = {"datalist_file": str(datalist_file), "seed": seed}
    else:
        cases, rejected = find_cases(dataset_dir, sites)
        good, bad = scan_cases(cases, known_bad=rejected)
        split = split_cases(good, test_fraction=test_fraction, n_folds=n_folds, seed=seed, group_key="site")
        datalist = {**fold_datalist(split, fold), "bad_cases": bad}
        meta = {
            "dataset_dir": str(dataset_dir),
            "sites": list(sites) if not isinstance(sites, str) else [sites],
            "fold": fold,
            "seed": seed,
        }
    logger.info(
        "datalist: %d training, %d validation, %d test cases; %d dropped",
        len(datalist["training"]),
        len(datalist["validation"]),
        len(datalist["test"]),
        len(datalist["bad_cases"]),
    )
    if output_dir is not None:
        write_json(Path(output_dir) / "datalist.json", {**meta, **datalist})
        write_json(Path(output_dir) / BAD_CASES_FILE, datalist["bad_cases"])
    return datalist
