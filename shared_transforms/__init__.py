"""MONAI-style transforms shared by the bundles in this repository.

Array transforms and their dictionary twins, usable from bundle configs, e.g.
``{"_target_": "shared_transforms.MergeLabelsd", "keys": "label", "mapping": {"1": 1, "2": 1}}``.

Names and submodules load on first use (PEP 562), so a bundle pays only for what it uses:
``shared_transforms.MergeLabelsd`` needs no SimpleITK, ``shared_transforms.datalist`` no
torch. Each bundle's ``metadata.json`` lists the packages of the parts it uses
(``tests/test_dependencies.py`` checks it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> submodule that defines it
_EXPORTS = {
    "MergeLabels": "labels",
    "MergeLabelsd": "labels",
    "N4BiasFieldCorrection": "n4",
    "N4BiasFieldCorrectiond": "n4",
    "SelectSlices": "slices",
    "SelectSlicesd": "slices",
}
_SUBMODULES = ("datalist", "datalist_file", "datasets", "files", "handlers", "image_check", "inference", "inputs",
               "labels", "n4", "progress", "slices", "splits", "utils",
               "volume_check")

__all__ = [
    "__version__",
    "MergeLabels",
    "MergeLabelsd",
    "N4BiasFieldCorrection",
    "N4BiasFieldCorrectiond",
    "SelectSlices",
    "SelectSlicesd",
]

if TYPE_CHECKING:
    from .labels import MergeLabels, MergeLabelsd
    from .n4 import N4BiasFieldCorrection, N4BiasFieldCorrectiond
    from .slices import SelectSlices, SelectSlicesd


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})
