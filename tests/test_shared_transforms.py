"""Behaviour of the shared transforms that the bundles rely on (small images, CPU, seconds)."""

from __future__ import annotations

import json
import logging
import pickle
import warnings

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.bundle import ConfigParser
from monai.data import Dataset, MetaTensor, list_data_collate
from monai.transforms import Compose, LoadImage

import shared_transforms
from shared_transforms import (
    MergeLabels,
    MergeLabelsd,
    N4BiasFieldCorrection,
    N4BiasFieldCorrectiond,
    SelectSlices,
    SelectSlicesd,
)
from shared_transforms.n4 import _from_sitk, _to_sitk, body_mask

SPACING = (0.8, 0.8, 3.0)


def affine_of(spacing, origin=(10.0, -20.0, 5.0)) -> torch.Tensor:
    aff = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    aff[: len(spacing), -1] = torch.tensor(origin[: len(spacing)], dtype=torch.float64)
    return aff


def phantom(shape=(64, 64, 8), spacing=SPACING, seed=0):
    """Uniform gland (label 1 + 2 halves) in a uniform body, times a known smooth field.

    Returns (biased image (x, y[, z]), label, field, gland mask), all numpy, MONAI axis order.
    """
    rng = np.random.default_rng(seed)
    coords = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    x, y = coords[0], coords[1]
    z = coords[2] if len(shape) == 3 else 0.0
    extent = [n * s / 2 for n, s in zip(shape, spacing)]
    body = (x / (0.9 * extent[0])) ** 2 + (y / (0.8 * extent[1])) ** 2 < 1
    gland = (x / (0.4 * extent[0])) ** 2 + (y / (0.35 * extent[1])) ** 2 + (np.asarray(z) / (0.7 * extent[-1])) ** 2 < 1
    clean = np.where(body, 100.0, 0.0)
    clean[gland] = 200.0
    field = np.exp(0.35 * x / extent[0] - 0.25 * (y / extent[1]) ** 2 + 0.01 * np.asarray(z))
    image = (clean * field + rng.normal(0, 1.0, shape) * body).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[gland & (y < 0)] = 1  # "CG"
    label[gland & (y >= 0)] = 2  # "PZ"
    return image, label, field, gland


def cv(values: np.ndarray) -> float:
    return float(np.std(values) / np.mean(values))


# ---------------------------------------------------------------------------------------- N4


def test_sitk_conversion_keeps_monai_axis_order_and_spacing():
    arr = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    img = _to_sitk(arr, (0.6, 0.7, 3.6))
    assert img.GetSize() == (4, 5, 3)
    assert img.GetSpacing() == pytest.approx((0.6, 0.7, 3.6))
    assert img.GetPixel(3, 1, 2) == arr[3, 1, 2]
    np.testing.assert_array_equal(_from_sitk(img), arr)


def test_n4_3d_flattens_gland_keeps_meta_and_affine():
    image, _, _, gland = phantom()
    affine = affine_of(SPACING)
    img = MetaTensor(torch.from_numpy(image[None]), affine=affine, meta={"filename_or_obj": "case0.nii.gz"})
    out = N4BiasFieldCorrection()(img)

    assert isinstance(out, MetaTensor)
    assert out.shape == img.shape and out.dtype == torch.float32
    assert torch.equal(out.affine, affine)
    assert out.meta["filename_or_obj"] == "case0.nii.gz"
    before, after = cv(image[gland]), cv(out[0].numpy()[gland])
    assert after <= 0.5 * before, (before, after)


def test_n4_2d_and_numpy_input():
    image, _, _, gland = phantom(shape=(64, 64), spacing=(0.8, 0.8))
    out = N4BiasFieldCorrection(shrink_factor=2)(image[None])
    assert isinstance(out, MetaTensor) and out.shape == (1, 64, 64)
    assert cv(out[0].numpy()[gland]) <= 0.5 * cv(image[gland])


def test_n4_negative_intensities_are_shifted_not_broken():
    image, _, _, gland = phantom()
    shifted = image[None] - 50.0  # e.g. an already offset image; background becomes negative
    out = N4BiasFieldCorrection(mask=None)(shifted)
    assert torch.isfinite(out).all()
    assert cv(out[0].numpy()[gland] + 50.0) <= 0.5 * cv(image[gland])


def test_n4_multichannel_corrects_each_channel():
    image, _, _, gland = phantom(shape=(48, 48, 4))
    two = np.stack([image, 2.0 * image])
    out = N4BiasFieldCorrection()(two)
    assert out.shape == two.shape
    for c in range(2):
        assert cv(out[c].numpy()[gland]) <= 0.5 * cv(two[c][gland])


@pytest.mark.parametrize("value", [0.0, 7.0])
def test_n4_constant_image_returned_unchanged_with_warning(value):
    img = MetaTensor(torch.full((1, 16, 16, 4), value, dtype=torch.float64), affine=affine_of(SPACING))
    with pytest.warns(UserWarning, match="constant"):
        out = N4BiasFieldCorrection()(img)
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32
    assert torch.equal(out, img.float()) and torch.equal(out.affine, img.affine)


def test_n4_empty_mask_returns_unchanged_with_warning():
    image, _, _, _ = phantom(shape=(32, 32, 4))
    with pytest.warns(UserWarning, match="empty mask"):
        out = N4BiasFieldCorrection()(image[None], mask=np.zeros(image.shape))
    np.testing.assert_array_equal(out[0].numpy(), image)


def test_n4_return_bias_field_reconstructs_input_and_dict_postfix():
    image, _, _, gland = phantom()
    img = MetaTensor(torch.from_numpy(image[None]), affine=affine_of(SPACING))
    corrected, field = N4BiasFieldCorrection(return_bias_field=True)(img)
    assert isinstance(field, MetaTensor) and torch.equal(field.affine, img.affine)
    assert (field > 0).all()
    torch.testing.assert_close(corrected * field, img.float(), rtol=1e-4, atol=1e-3)

    d = N4BiasFieldCorrectiond(keys="image", mask_key="label", return_bias_field=True)(
        {"image": img, "label": torch.from_numpy(gland[None])}
    )
    assert set(d) == {"image", "label", "image_bias_field"}
    assert cv(d["image"][0].numpy()[gland]) <= 0.5 * cv(image[gland])


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_n4_preserves_brightness_and_is_scale_equivariant():
    """The field's geometric mean over the fit mask is 1: the corrected volume keeps the input's level."""
    image, _, _, gland = phantom()
    img = MetaTensor(torch.from_numpy(image[None]), affine=affine_of(SPACING))
    corrected, field = N4BiasFieldCorrection(return_bias_field=True)(img)
    def fitting_grid(a):  # the shrunk copy N4 fits on
        return _from_sitk(sitk.Shrink(_to_sitk(np.ascontiguousarray(a, dtype=np.float32), SPACING), [4, 4, 1]))

    small = fitting_grid(image)
    fit = body_mask(small) & (small > 0)
    # (within 1 %: Shrink samples voxels half a coarse voxel from the points N4 evaluates the field at)
    assert abs(float(np.log(fitting_grid(field[0].numpy()))[fit].mean())) < 0.01
    # the brightness of the body is kept (N4 leaves the field's scale free: the fix pins it)
    ratio = np.median(corrected[0].numpy()[gland]) / np.median(image[gland])
    assert 0.8 < ratio < 1.25, ratio
    # a 3x brighter scan comes out 3x brighter, not at some arbitrary level
    brighter = N4BiasFieldCorrection()(img * 3.0)
    np.testing.assert_allclose(brighter[0].numpy()[gland], 3.0 * corrected[0].numpy()[gland], rtol=0.02)


def test_body_mask_covers_the_body_not_the_air():
    from phantoms import PROSTATE_SITES, _prostate_case, centred_grid, ellipse, rng_for

    shape = (96, 96, 8)
    u, v, _ = centred_grid(shape)
    body = np.broadcast_to(ellipse(u, v, (0.0, 0.02), (0.9, 0.72)), shape)
    for site, options in PROSTATE_SITES.items():
        img, _ = _prostate_case(shape, options, rng_for(0, "prostate", site, 0))
        mask = body_mask(img)
        assert mask.shape == img.shape
        assert mask[body].mean() > 0.95, (site, mask[body].mean())  # dark muscle and rectal air included
        assert mask[~body].mean() < 0.05, (site, mask[~body].mean())
        # an Otsu threshold, the old fit mask, keeps only the bright part of the body
        otsu = _from_sitk(sitk.OtsuThreshold(_to_sitk(img.astype(np.float32), (1, 1, 1)), 0, 1, 200)) > 0
        assert otsu[body].mean() < mask[body].mean() - 0.1, site
    square = body_mask(np.pad(np.ones((8, 8)), 4))  # 2D; the median rounds the corners off
    assert square.shape == (16, 16) and square[4:12, 4:12].mean() > 0.9 and square.sum() <= 64


@pytest.mark.parametrize("seed", [0, 1])
def test_n4_keeps_cases_comparable_and_flattens_the_gland(tmp_path, seed):
    """Six cases per site (the training set of a site's model): N4 must not spread the gland
    medians (max/min over the cases) by more than 5 % beyond the input's, and must flatten each zone."""
    from phantoms import prostate

    prostate(str(tmp_path), cases_per_site=6, shape=(96, 96, 16), seed=seed)
    loader = LoadImage(image_only=True, ensure_channel_first=True)
    n4 = N4BiasFieldCorrection()
    for site in ("RUNMC", "BMC", "I2CVB"):
        before, after, cv_before, cv_after = [], [], [], []
        for f in sorted((tmp_path / site).glob("Case??.nii.gz")):
            image = loader(str(f)).float()
            label = np.asarray(loader(str(f).replace(".nii.gz", "_segmentation.nii.gz"))[0])
            out = n4(image)[0].numpy()
            raw = image[0].numpy()
            before.append(np.median(raw[label > 0]))
            after.append(np.median(out[label > 0]))
            zones = [z for z in np.unique(label) if z > 0]
            cv_before.append(np.mean([cv(raw[label == z]) for z in zones]))
            cv_after.append(np.mean([cv(out[label == z]) for z in zones]))
        spread_before, spread_after = max(before) / min(before), max(after) / min(after)
        assert spread_after <= 1.05 * spread_before, (site, spread_before, spread_after)
        assert np.mean(cv_after) < np.mean(cv_before), (site, np.mean(cv_before), np.mean(cv_after))


@pytest.mark.skipif(not (SHARED_DATA / "prostate" / "RUNMC").is_dir(),
                    reason="../shared/data/prostate is absent (see its README)")
def test_n4_on_real_prostate_scans_keeps_them_comparable():
    """Three real NCI-ISBI T2 scans: no wider spread of the gland medians than before N4.

    (Their bias is mild: the within-zone CV stays where it was, 38.85 % -> 38.73 % measured.)
    """
    loader = LoadImage(image_only=True, ensure_channel_first=True)
    n4 = N4BiasFieldCorrection()
    before, after, cv_before, cv_after = [], [], [], []
    for f in sorted((SHARED_DATA / "prostate" / "RUNMC").glob("Case??.nii.gz")):
        image = loader(str(f)).float()
        zones = np.asarray(loader(str(f).replace(".nii.gz", "_Segmentation.nii.gz"))[0])
        out, raw = n4(image)[0].numpy(), image[0].numpy()
        before.append(np.median(raw[zones > 0]))
        after.append(np.median(out[zones > 0]))
        cv_before.append(np.mean([cv(raw[zones == z]) for z in (1, 2)]))
        cv_after.append(np.mean([cv(out[zones == z]) for z in (1, 2)]))
    assert len(before) == 3
    assert max(after) / min(after) <= 1.05 * max(before) / min(before), (before, after)
    assert np.mean(cv_after) <= 1.01 * np.mean(cv_before), (cv_before, cv_after)


# --------------------------------------------------------------------------------- SelectSlices

AREAS = [0, 150, 200, 201, 500]  # 200 itself is not kept (strictly greater than min_area)
KEPT = [3, 4]


def volume_with_areas(areas=AREAS, size=32):
    label = torch.zeros(1, size, size, len(areas))
    for k, area in enumerate(areas):
        flat = torch.zeros(size * size)
        flat[:area] = 1
        label[0, :, :, k] = flat.reshape(size, size)
    image = torch.arange(label.numel(), dtype=torch.float32).reshape(label.shape)
    affine = affine_of((0.6, 0.6, 3.6), origin=(1.0, 2.0, 3.0))
    meta = {"filename_or_obj": "vol.nii.gz"}
    return MetaTensor(image, affine=affine, meta=dict(meta)), MetaTensor(label, affine=affine, meta=dict(meta))


def test_volume_helper_has_the_intended_areas():
    _, label = volume_with_areas()
    assert (label > 0).sum(dim=(0, 1, 2)).tolist() == AREAS


def test_select_slices_exact_indices_and_content():
    image, label = volume_with_areas()
    select = SelectSlices(min_area=200)
    assert select.indices(label) == KEPT
    slices = select(image, label)
    assert len(slices) == len(KEPT)
    for k, s in zip(KEPT, slices):
        assert isinstance(s, MetaTensor) and s.shape == (1, 32, 32)
        torch.testing.assert_close(s.as_tensor(), image[..., k].as_tensor())
        assert s.meta["slice_index"] == k and s.meta["filename_or_obj"] == "vol.nii.gz"
        # 2D affine of the slice plane, origin moved to slice k; the volume's is kept in meta
        expected = torch.tensor([[0.6, 0, 1.0], [0, 0.6, 2.0], [0, 0, 1]], dtype=torch.float64)
        torch.testing.assert_close(s.affine, expected)
        assert torch.equal(s.meta["volume_affine"], image.affine)
    assert image.affine.shape == (4, 4)  # the volume is not modified


def test_select_slices_label_none_uses_image_and_counts_all_channels():
    _, label = volume_with_areas([0, 100, 300])
    assert [int(s.meta["slice_index"]) for s in SelectSlices(min_area=200)(label)] == [2]
    two = torch.cat([label, label])  # 100 + 100 voxels in slice 1
    assert SelectSlices(min_area=150).indices(two) == [1, 2]


@pytest.mark.parametrize("axis", [0, -3, 1])
def test_select_slices_other_axes(axis):
    image, label = volume_with_areas()
    spatial = axis % 3
    order = [0] + [1 + i for i in range(3) if i != 2]
    order.insert(spatial + 1, 3)  # move the sliced axis (Z) to spatial position `spatial`
    img_p, lab_p = image.permute(*order), label.permute(*order)
    select = SelectSlices(min_area=200, axis=axis)
    assert select.indices(lab_p) == KEPT
    for k, s in zip(KEPT, select(img_p, lab_p)):
        torch.testing.assert_close(s.as_tensor(), image[..., k].as_tensor())


def test_select_slicesd_list_of_dicts_collates():
    image, label = volume_with_areas()
    data = {"image": image, "label": label, "case": "c0", "extra": np.zeros(3)}
    out = SelectSlicesd(keys=["image", "label"], min_area=200)(data)
    assert isinstance(out, list) and len(out) == len(KEPT)
    for k, item in zip(KEPT, out):
        assert item["slice_index"] == k and item["case"] == "c0"
        assert "extra" not in item  # unsliced arrays are dropped
        assert item["image"].meta["slice_index"] == k and item["label"].meta["slice_index"] == k
        assert item["image"].shape == item["label"].shape == (1, 32, 32)

    batch = list_data_collate([out, out])  # what a DataLoader over a MONAI Dataset receives
    assert batch["image"].shape == (2 * len(KEPT), 1, 32, 32)
    assert batch["slice_index"].tolist() == KEPT * 2


def test_select_slicesd_no_slice_logs_warning(caplog):
    image, label = volume_with_areas([0, 10, 20])
    with caplog.at_level(logging.WARNING, logger="shared_transforms"):
        out = SelectSlicesd(keys="image", label_key="label")({"image": image, "label": label})
    assert out == []
    assert "vol.nii.gz" in caplog.text


# ---------------------------------------------------------------------------------- MergeLabels


def test_merge_labels_simultaneous_swap_and_unmapped_kept():
    lab = MetaTensor(torch.tensor([[0, 1, 2, 3, 2, 1]]), affine=affine_of(SPACING))
    out = MergeLabels({1: 2, 2: 1})(lab)
    assert out.tolist() == [[0, 2, 1, 3, 1, 2]]
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, lab.affine) and out.dtype == lab.dtype


def test_merge_labels_string_keys_and_dtype():
    lab = np.array([0.0, 1.0, 2.0, 2.0], dtype=np.float32)
    out = MergeLabels({"1": 1, "2": "1"}, dtype="uint8")(lab)
    assert out.tolist() == [0, 1, 1, 1] and out.dtype == torch.uint8


def test_merge_labels_strict_names_uncovered_values_and_file():
    lab = MetaTensor(torch.tensor([0.0, 1.0, 2.0, 5.0]), meta={"filename_or_obj": "bad_case.nii.gz"})
    with pytest.raises(ValueError, match=r"5.*bad_case\.nii\.gz"):
        MergeLabels({"1": 1, "2": 1}, strict=True)(lab)
    MergeLabels({1: 1, 2: 1, 5: 0}, strict=True)(lab)  # covered: no error


def test_merge_labelsd():
    d = MergeLabelsd(keys="label", mapping={"2": 1})({"label": torch.tensor([0, 1, 2]), "image": "x"})
    assert d["label"].tolist() == [0, 1, 1] and d["image"] == "x"


# --------------------------------------------------------------- bundle-style config, end to end


def test_compose_from_json_config(tmp_path):
    image, label, _, gland = phantom(shape=(48, 48, 6))
    affine = affine_of(SPACING).numpy()
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "case0.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "case0_seg.nii.gz")
    min_area = 150  # gland areas per slice: 0, 120, 240, 240, 120, 0
    config = {
        "min_area": min_area,
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": ["image", "label"], "ensure_channel_first": True},
                {"_target_": "shared_transforms.MergeLabelsd", "keys": "label", "mapping": {"1": 1, "2": 1}, "strict": True},
                {"_target_": "shared_transforms.N4BiasFieldCorrectiond", "keys": "image", "shrink_factor": 2},
                {"_target_": "shared_transforms.SelectSlicesd", "keys": ["image", "label"], "min_area": "@min_area"},
                {"_target_": "Resized", "keys": ["image", "label"], "spatial_size": [32, 32], "mode": ["bilinear", "nearest"]},
            ],
        },
    }
    config_file = tmp_path / "train.json"
    config_file.write_text(json.dumps(config))
    parser = ConfigParser()
    parser.read_config(str(config_file))
    preprocessing = parser.get_parsed_content("preprocessing")
    assert isinstance(preprocessing, Compose)

    case = {"image": str(tmp_path / "case0.nii.gz"), "label": str(tmp_path / "case0_seg.nii.gz"), "case": "case0"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # N4 must not fall back to "unchanged" here
        out = preprocessing(case)

    expected = [k for k in range(6) if (label[..., k] > 0).sum() > min_area]
    assert expected == [2, 3]
    assert [item["slice_index"] for item in out] == expected
    for item in out:
        k = item["slice_index"]
        assert item["case"] == "case0"
        assert item["image"].shape == item["label"].shape == (1, 32, 32)
        assert set(torch.unique(item["label"]).tolist()) <= {0.0, 1.0}
        assert item["image"].meta["filename_or_obj"].endswith("case0.nii.gz")
        assert item["label"].meta["slice_index"] == k

    # N4 ran inside the pipeline: the gland is flatter than in the file
    volume = Compose(preprocessing.transforms[:3])(case)
    assert torch.allclose(volume["image"].affine, torch.as_tensor(affine, dtype=torch.float64))
    assert cv(volume["image"][0].numpy()[gland]) <= 0.5 * cv(image[gland])

    # a MONAI Dataset of such cases + list_data_collate gives one batch entry per kept slice
    batch = list_data_collate([Dataset([case], preprocessing)[0]])
    assert batch["image"].shape == (len(expected), 1, 32, 32)


def test_package_exports_and_transforms_pickle():
    assert shared_transforms.__version__ == "0.1.0"
    for name in ("N4BiasFieldCorrectiond", "SelectSlicesd", "MergeLabelsd"):
        assert name in shared_transforms.__all__
    # PersistentDataset hashes the transform chain with pickle, DataLoader workers pickle it too
    chain = Compose([MergeLabelsd("label", {"1": 1}), N4BiasFieldCorrectiond("image"), SelectSlicesd("image")])
    restored = pickle.loads(pickle.dumps(chain))
    assert restored.transforms[0].merger.mapping == {1: 1}
