"""MONAI-style transforms shared by the bundles in this repository.

Array transforms and their dictionary twins, usable from bundle configs, e.g.
``{"_target_": "shared_transforms.MergeLabelsd", "keys": "label", "mapping": {"1": 1, "2": 1}}``.
"""

from .labels import MergeLabels, MergeLabelsd
from .n4 import N4BiasFieldCorrection, N4BiasFieldCorrectiond
from .slices import SelectSlices, SelectSlicesd

from . import datalist  # noqa: F401  (configs call shared_transforms.datalist.list_images(...))



__version__ = "0.1.0"

__all__ = [
    "__version__",
    "MergeLabels",
    "MergeLabelsd",
    "N4BiasFieldCorrection",
    "N4BiasFieldCorrectiond",
    "SelectSlices",
    "SelectSlicesd",
]
