"""N4 bias-field correction (SimpleITK) as a MONAI transform.

The field is estimated on an in-plane shrunk copy of each channel and applied at full
resolution, which is how N4 is normally used on MRI: the field is smooth, so fitting it on
a coarser grid changes little and is many times faster.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor, get_track_meta
from monai.data.utils import affine_to_spacing
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_numpy, convert_to_tensor

__all__ = ["N4BiasFieldCorrection", "N4BiasFieldCorrectiond"]

logger = logging.getLogger(__name__)


def _source_name(img: Any) -> str:
    """File name from MONAI metadata, for messages; ``"<array>"`` when unknown."""
    meta = getattr(img, "meta", None) or {}
    return str(meta.get("filename_or_obj", "<array>"))


def _spacing(img: Any, spatial_ndim: int) -> tuple[float, ...]:
    """Voxel size per spatial axis: affine column norms of a MetaTensor, else ones."""
    if not isinstance(img, MetaTensor) or img.is_batch:
        return (1.0,) * spatial_ndim
    affine = img.affine
    r = min(spatial_ndim, affine.shape[-1] - 1)
    spacing = [float(s) for s in convert_to_numpy(affine_to_spacing(affine, r=r))]
    spacing += [1.0] * (spatial_ndim - r)
    # a degenerate affine must not give ITK a zero/NaN spacing
    return tuple(s if np.isfinite(s) and s > 0 else 1.0 for s in spacing)


def _to_sitk(arr: np.ndarray, spacing: Sequence[float]) -> sitk.Image:
    """MONAI (x, y[, z]) array -> SimpleITK image; GetImageFromArray expects (z, y, x)."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.T))
    img.SetSpacing([float(s) for s in spacing])
    return img


def _from_sitk(img: sitk.Image) -> np.ndarray:
    """SimpleITK image -> MONAI (x, y[, z]) array."""
    return np.ascontiguousarray(sitk.GetArrayFromImage(img).T)


class N4BiasFieldCorrection(Transform):
    """N4 bias-field correction of a channel-first 2D ``(C, H, W)`` or 3D ``(C, H, W, D)`` image.

    Each channel is corrected separately with SimpleITK's ``N4BiasFieldCorrectionImageFilter``.
    The field is fitted on a copy shrunk by ``shrink_factor`` along the first two spatial axes
    only (through-plane resolution of MRI stacks is already coarse), then evaluated with
    ``GetLogBiasFieldAsImage`` on the full-resolution grid and divided out. The voxel
    spacing is taken from the affine of a MetaTensor (ones for plain arrays), so anisotropic
    voxels such as 0.6 x 0.6 x 3.6 mm are fitted in physical space.

    Defaults, chosen by measurement on a 2-core machine (one core partly busy with another
    process): synthetic T2-like 320x320x20 volume, spacing 0.6x0.6x3.6 mm, body/fat/rectum and
    an ellipsoid two-zone gland (24k voxels), smooth multiplicative field 0.47-1.63 (6.6 %
    CV inside the gland), Otsu mask, 4x50 iterations. "diff" is the mean relative intensity
    difference inside the gland vs the full-resolution result; "field error" is the CV of
    estimated/true field inside the gland (lower is better):

    ======  =========  ============  =======  ===========
    shrink  threshold  seconds       diff     field error
    ======  =========  ============  =======  ===========
    1       1e-3       170           (ref.)   2.4 %
    2       1e-3       43 (90 busy)  0.3 %    2.4 %
    4       1e-3       11            0.2 %    2.4 %
    4       1e-2       0.8           6.5 %    5.9 %
    4       1e-4       34            33 %     6.8 %
    4       1e-6       30            38 %     6.8 %
    2       1e-6       73            43 %     6.5 %
    ======  =========  ============  =======  ===========

    Hence ``shrink_factor=4`` (15x faster than full resolution at no measurable loss here;
    on a real volume the reference was ~3 min / ~50 s / ~12 s with ~3 % / ~7 % gland
    differences at shrink 1 / 2 / 4) and ``convergence_threshold=1e-3`` (SimpleITK's
    default: levels 1-2 use all 50 iterations, levels 3-4 stop after ~8; tighter
    thresholds run every iteration, rescale the whole image by 1.3-1.4 and fit anatomy into
    the field (~4 % diff even after removing that scale); 1e-2 stops before the field is fitted).

    Intensities: input is cast to float32. N4 works on log intensities, so an image with
    negative values is shifted by ``-min`` before fitting and shifted back afterwards
    (``corrected = (img - min) / field + min``). Voxels at zero after that shift (zero
    background, or the minimum) carry no information in the log domain: they are left out of
    the fit and keep their value. A constant image, a non-finite image or an empty mask is
    returned unchanged (as float32) with a warning.

    Args:
        shrink_factor: in-plane shrink factor for fitting (1 = fit at full resolution).
        num_iterations: maximum iterations per fitting level; its length is the number of levels.
        convergence_threshold: N4 stops a level when the coefficient of variation of the
            ratio of successive field estimates falls below this.
        mask: ``"otsu"`` fits on ``sitk.OtsuThreshold(img, 0, 1, 200)`` (the bright part,
            i.e. the body), ``None`` on the whole image. An explicit mask is passed per call.
        return_bias_field: if True, ``__call__`` returns ``(corrected, bias_field)``.
        num_control_points: B-spline control points per axis at the first level (ITK default 4).
        num_threads: SimpleITK threads (``None``: SimpleITK's default, all cores); set 1 in
            multi-worker data loaders to avoid oversubscription.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        shrink_factor: int = 4,
        num_iterations: Sequence[int] = (50, 50, 50, 50),
        convergence_threshold: float = 1e-3,
        mask: str | None = "otsu",
        return_bias_field: bool = False,
        num_control_points: int | Sequence[int] = 4,
        num_threads: int | None = None,
    ) -> None:
        if int(shrink_factor) < 1:
            raise ValueError(f"shrink_factor must be >= 1, got {shrink_factor}.")
        if isinstance(num_iterations, int):
            num_iterations = [num_iterations]
        if len(num_iterations) == 0 or any(int(n) < 1 for n in num_iterations):
            raise ValueError(f"num_iterations must be a non-empty list of positive ints, got {num_iterations}.")
        if mask is not None and mask != "otsu":
            raise ValueError(f"mask must be 'otsu' or None (pass an explicit mask at call time), got {mask!r}.")
        self.shrink_factor = int(shrink_factor)
        self.num_iterations = [int(n) for n in num_iterations]
        self.convergence_threshold = float(convergence_threshold)
        self.mask = mask
        self.return_bias_field = bool(return_bias_field)
        self.num_control_points = num_control_points
        self.num_threads = num_threads

    def __call__(
        self, img: NdarrayOrTensor, mask: NdarrayOrTensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            img: channel-first ``(C, H, W)`` or ``(C, H, W, D)`` numpy array, tensor or MetaTensor.
            mask: optional foreground mask (``> 0`` is fitted), ``(H, W[, D])`` or ``(1 or C, H, W[, D])``;
                overrides the ``mask`` option.

        Returns:
            float32 MetaTensor of the same shape with ``img``'s meta and affine (plain tensor when
            MONAI meta tracking is off); with ``return_bias_field`` also the multiplicative field
            (same shape and meta, ones where a channel was left unchanged).
        """
        img_t = convert_to_tensor(img, track_meta=get_track_meta())
        if img_t.ndim not in (3, 4):
            raise ValueError(f"expected a channel-first 2D or 3D image (C,H,W[,D]), got shape {tuple(img_t.shape)}.")
        spatial_shape = tuple(img_t.shape[1:])
        spacing = _spacing(img_t, len(spatial_shape))
        name = _source_name(img_t)
        data = convert_to_numpy(img_t, dtype=np.float32)
        masks = self._channel_masks(mask, data.shape[0], spatial_shape)

        out = np.empty_like(data)
        field = np.ones_like(data)
        for c in range(data.shape[0]):
            res = self._correct(data[c], spacing, masks[c], f"{name} channel {c}")
            if res is None:
                out[c] = data[c]
            else:
                out[c], field[c] = res

        out_t = convert_to_dst_type(out, dst=img_t, dtype=torch.float32)[0]
        if self.return_bias_field:
            return out_t, convert_to_dst_type(field, dst=img_t, dtype=torch.float32)[0]
        return out_t

    @staticmethod
    def _channel_masks(mask: NdarrayOrTensor | None, channels: int, spatial_shape: tuple) -> list:
        if mask is None:
            return [None] * channels
        m = convert_to_numpy(mask) > 0
        if m.shape == spatial_shape:
            return [m] * channels
        if m.ndim == len(spatial_shape) + 1 and m.shape[1:] == spatial_shape and m.shape[0] in (1, channels):
            return [m[0]] * channels if m.shape[0] == 1 else list(m)
        raise ValueError(f"mask shape {m.shape} does not match image spatial shape {spatial_shape} (channels {channels}).")

    def _correct(
        self, arr: np.ndarray, spacing: Sequence[float], mask: np.ndarray | None, what: str
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Correct one spatial array; ``None`` (after a warning) when it must be left unchanged."""
        if not np.all(np.isfinite(arr)):
            warnings.warn(f"N4: {what} has non-finite values; left uncorrected.", stacklevel=4)
            return None
        lo, hi = float(arr.min()), float(arr.max())
        if hi <= lo:
            warnings.warn(f"N4: {what} is constant ({lo:g}); left uncorrected.", stacklevel=4)
            return None
        offset = -lo if lo < 0 else 0.0
        shifted = arr + np.float32(offset) if offset else arr

        image = _to_sitk(shifted, spacing)
        if mask is not None:
            fit = mask.copy()
        elif self.mask == "otsu":
            fit = _from_sitk(sitk.OtsuThreshold(image, 0, 1, 200)) > 0
        else:
            fit = np.ones(arr.shape, dtype=bool)
        fit &= shifted > 0  # log(0) is undefined: zero voxels cannot inform the fit
        mask_img = _to_sitk(fit.astype(np.uint8), spacing)

        # in-plane shrink only; never below 1 voxel along an axis
        factors = [max(1, min(self.shrink_factor, n)) for n in arr.shape[:2]] + [1] * (arr.ndim - 2)
        small, small_mask = sitk.Shrink(image, factors), sitk.Shrink(mask_img, factors)
        if not fit.any() or not sitk.GetArrayViewFromImage(small_mask).any():
            warnings.warn(f"N4: {what} has an empty mask (shrink factor {self.shrink_factor}); left uncorrected.", stacklevel=4)
            return None

        corrector = sitk.N4BiasFieldCorrectionImageFilter()
        corrector.SetMaximumNumberOfIterations(self.num_iterations)
        corrector.SetConvergenceThreshold(self.convergence_threshold)
        ncp = self.num_control_points
        corrector.SetNumberOfControlPoints([int(ncp)] * arr.ndim if np.isscalar(ncp) else [int(n) for n in ncp])
        if self.num_threads is not None:
            corrector.SetNumberOfThreads(int(self.num_threads))
        start = time.perf_counter()
        corrector.Execute(small, small_mask)
        # evaluate the fitted B-spline on the full-resolution grid (same physical space)
        log_field = _from_sitk(corrector.GetLogBiasFieldAsImage(image))
        logger.debug(
            "N4 %s: shrunk %s -> %s, %d iterations in last level, %.1f s",
            what, arr.shape, small.GetSize(), corrector.GetElapsedIterations(), time.perf_counter() - start,
        )
        bias = np.exp(log_field).astype(np.float32)
        corrected = shifted / bias
        if offset:
            corrected -= np.float32(offset)
        return corrected.astype(np.float32, copy=False), bias


class N4BiasFieldCorrectiond(MapTransform):
    """Dictionary version of :class:`N4BiasFieldCorrection`.

    Args:
        keys: keys of the images to correct.
        mask_key: optional key of a mask image (``> 0`` is fitted) used for every key,
            instead of the ``mask`` option.
        bias_field_postfix: with ``return_bias_field=True`` the field of ``key`` is stored under
            ``f"{key}_{bias_field_postfix}"``.
        allow_missing_keys: don't raise if a key is missing.
        options: passed to :class:`N4BiasFieldCorrection` (``shrink_factor``, ``num_iterations``,
            ``convergence_threshold``, ``mask``, ``return_bias_field``, ...).
    """

    backend = N4BiasFieldCorrection.backend

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str | None = None,
        bias_field_postfix: str = "bias_field",
        allow_missing_keys: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.corrector = N4BiasFieldCorrection(**options)
        self.mask_key = mask_key
        self.bias_field_postfix = bias_field_postfix

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = None
        if self.mask_key is not None:
            if self.mask_key not in d:
                raise KeyError(f"mask_key {self.mask_key!r} not in data (keys: {list(d)}).")
            mask = d[self.mask_key]
        for key in self.key_iterator(d):
            out = self.corrector(d[key], mask=mask)
            if self.corrector.return_bias_field:
                d[key], d[f"{key}_{self.bias_field_postfix}"] = out
            else:
                d[key] = out
        return d
