"""scripts/phantoms.py: the prostate phantom's layout, headers, labels, gland sizes and determinism.

The CLI runs in a subprocess from a temporary working directory (never the repository), so
the script is proven to work from anywhere; a few helpers are also imported from the file.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "phantoms.py"
SITES = ("RUNMC", "BMC", "I2CVB")
SMALL = ("--cases_per_site", "2", "--shape", "(48,48,10)")


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"rc {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    return proc


def _write(root: Path, name: str, *options: str) -> tuple[Path, subprocess.CompletedProcess]:
    out = root / name
    cwd = root / f"cwd_{name}"
    cwd.mkdir()
    return out, _cli(["prostate", str(out), *options], cwd=cwd)


def _load(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    img = nib.load(path)
    return img, np.asanyarray(img.dataobj)


def _module():
    spec = importlib.util.spec_from_file_location("phantoms_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    return _write(tmp_path_factory.mktemp("phantoms"), "small", *SMALL)


@pytest.fixture(scope="module")
def default_size(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("phantoms_default"), "default", "--cases_per_site", "1")[0]


def test_layout_and_progress(small):
    out, proc = small
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    expected = sorted(f"{site}/Case{i:02d}{suffix}.nii.gz" for site in SITES for i in range(2)
                      for suffix in ("", "_segmentation"))
    assert files == expected
    assert sorted(p.name for p in out.iterdir()) == sorted(SITES)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) >= 7, proc.stdout  # one line per case, then the summary
    assert str(out.resolve()) in lines[-1] and "6 cases" in lines[-1]


def test_shapes_dtypes_and_labels(small):
    out, _ = small
    dtypes = {"RUNMC": np.int16, "BMC": np.uint16, "I2CVB": np.float32}
    labels = {"RUNMC": {0, 1, 2}, "BMC": {0, 1, 2}, "I2CVB": {0, 1}}
    for site in SITES:
        for i in range(2):
            img, x = _load(out / site / f"Case{i:02d}.nii.gz")
            seg, y = _load(out / site / f"Case{i:02d}_segmentation.nii.gz")
            assert x.shape == y.shape == (48, 48, 10)
            assert x.dtype == dtypes[site] and img.get_data_dtype() == dtypes[site]
            assert y.dtype == np.uint8
            assert set(np.unique(y).tolist()) == labels[site], (site, i)
            assert x.min() >= 0 and x.max() > 0 and np.isfinite(x).all()
            np.testing.assert_allclose(img.affine, seg.affine)
            # the gland is visible: brighter on average than the tissue around it
            gland = y > 0
            ring = np.zeros_like(gland)
            for dx, dy in ((3, 0), (-3, 0), (0, 3), (0, -3)):
                ring |= np.roll(gland, (dx, dy), axis=(0, 1))
            ring &= ~gland
            assert x[gland].mean() > 1.2 * x[ring].mean(), (site, i)


def test_spacing_and_orientation(small):
    out, _ = small
    spacings, codes = {}, {}
    for site in SITES:
        for i in range(2):
            for suffix in ("", "_segmentation"):
                img = nib.load(out / site / f"Case{i:02d}{suffix}.nii.gz")
                zooms = tuple(float(z) for z in img.header.get_zooms())
                np.testing.assert_allclose(zooms, np.linalg.norm(img.affine[:3, :3], axis=0), rtol=1e-6)
                assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
                np.testing.assert_allclose(img.get_qform(), img.affine, atol=1e-5)
                assert img.affine.shape == (4, 4) and np.any(img.affine[:3, 3] != 0)
                assert spacings.setdefault(site, zooms) == zooms  # one spacing per site
                codes.setdefault(site, nib.aff2axcodes(img.affine))
    assert len(set(spacings.values())) == len(SITES), spacings
    assert ("L", "P", "S") in codes.values() and ("R", "A", "S") in codes.values(), codes


def test_headers_are_anatomically_true_and_one_case_is_oblique(small):
    """Reoriented by its header, every site's array shows the same anatomy (the generator's, laid
    out as LPS, seen in RAS); the RAS sites store it flipped against BMC, and Case01 is oblique."""
    out, _ = small
    spec = importlib.util.spec_from_file_location("phantoms_mod", SCRIPT)
    phantoms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(phantoms)
    for site in SITES:
        for case in range(2):
            img = nib.load(out / site / f"Case{case:02d}_segmentation.nii.gz")
            _, label = phantoms._prostate_case((48, 48, 10), phantoms.PROSTATE_SITES[site], phantoms.rng_for(0, "prostate", site, case))
            canonical = np.asanyarray(nib.as_closest_canonical(img).dataobj)
            np.testing.assert_array_equal(canonical, label[::-1, ::-1])  # LPS anatomy seen as RAS
            stored = np.asanyarray(img.dataobj)
            flipped = site != "BMC"
            assert np.array_equal(stored, label[::-1, ::-1] if flipped else label), site
            axes = img.affine[:3, :3] / np.linalg.norm(img.affine[:3, :3], axis=0)
            tilt = np.degrees(np.arccos(abs(axes[0, 0])))
            assert tilt == pytest.approx(phantoms.PROSTATE_OBLIQUE_DEGREES if case == 1 else 0.0, abs=1e-6), (site, case)


def test_gland_slice_areas_at_default_size(default_size):
    """Some gland slices fall below the bundle's min_area of 200 pixels, the middle ones well above it."""
    for site in SITES:
        _, y = _load(default_size / site / "Case00_segmentation.nii.gz")
        assert y.shape == (64, 64, 16)
        areas = np.count_nonzero(y, axis=(0, 1))
        assert ((areas > 0) & (areas <= 200)).any(), (site, areas)
        assert (areas > 200).any() and 300 <= areas.max() <= 800, (site, areas)
        assert areas[0] == 0 and areas[-1] == 0 and (areas > 0).sum() >= 10, (site, areas)


def test_deterministic_for_a_seed(small, tmp_path):
    out, _ = small
    again, _ = _write(tmp_path, "again", *SMALL)
    other, _ = _write(tmp_path, "other", *SMALL, "--seed", "1")
    for site in SITES:
        for name in ("Case01.nii.gz", "Case01_segmentation.nii.gz"):
            a, x = _load(out / site / name)
            b, x_again = _load(again / site / name)
            _, x_other = _load(other / site / name)
            np.testing.assert_array_equal(x, x_again)
            np.testing.assert_allclose(a.affine, b.affine)
            assert not np.array_equal(x, x_other), (site, name)


def test_help_exits_zero(tmp_path):
    proc = _cli(["prostate", "--help"], cwd=tmp_path)
    text = proc.stdout + proc.stderr  # fire pages help to stdout on a terminal, else writes it to stderr
    assert "cases_per_site" in text and "seed" in text and "RUNMC" in text
    _cli(["--help"], cwd=tmp_path)


def test_importable_helpers(tmp_path):
    phantoms = _module()
    for text in ((32, 32, 4), [32, 32, 4], "(32,32,4)", "32,32,4", "32x32x4", " ( 32, 32, 4 ) "):
        assert phantoms.parse_shape(text) == (32, 32, 4)
    for bad in ("(32,32)", "abc", (32, 32, 4.5)):
        with pytest.raises(ValueError):
            phantoms.parse_shape(bad)
    with pytest.raises(ValueError):
        phantoms.rng_for(-1)
    summary = phantoms.prostate(str(tmp_path / "d"), cases_per_site=1, shape="32,32,6", seed=5)
    assert summary["out_dir"] == str((tmp_path / "d").resolve()) and summary["shape"] == (32, 32, 6)
    assert set(summary["sites"]) == set(SITES)
    assert (tmp_path / "d" / "I2CVB" / "Case00_segmentation.nii.gz").is_file()


def test_polyp_layout_formats_and_determinism(tmp_path):
    """The polyp kind: PraNet layout, RGB frames of mixed sizes, .jpg/.png/.tif, 0/255 masks, two broken files."""
    from PIL import Image

    out = tmp_path / "polyp"
    _cli(["polyp", str(out), "--train", "4", "--per_test_set", "2", "--size", "40"], cwd=tmp_path)
    images = sorted(p.name for p in (out / "TrainDataset" / "images").iterdir())
    assert images == ["1.jpg", "2.png", "3.png", "4.jpg", "truncated.png", "unmatched.png"]
    assert sorted(p.name for p in (out / "TrainDataset" / "masks").iterdir()) == ["1.png", "2.png", "3.png", "4.png", "truncated.png"]
    sets = sorted(p.name for p in (out / "TestDataset").iterdir())
    assert sets == sorted(["Kvasir", "CVC-ClinicDB", "CVC-ColonDB", "ETIS-LaribPolypDB", "CVC-300"])
    assert (out / "TestDataset" / "Kvasir" / "images" / "1.jpg").is_file()
    assert (out / "TestDataset" / "CVC-ClinicDB" / "masks" / "1.tif").is_file()
    sizes = set()
    for stem in ("1", "2", "3", "4"):
        img = Image.open(next((out / "TrainDataset" / "images").glob(f"{stem}.*")))
        mask = np.asarray(Image.open(out / "TrainDataset" / "masks" / f"{stem}.png"))
        assert img.mode == "RGB" and img.size == mask.shape[::-1] and 40 <= min(img.size) <= max(img.size) <= 60
        assert set(np.unique(mask).tolist()) == {0, 255} and 0 < (mask > 0).mean() < 0.8
        rgb = np.asarray(img).astype(float)
        assert rgb[..., 0].mean() > rgb[..., 2].mean()  # reddish mucosa
        sizes.add(img.size)
    assert len(sizes) > 1
    with pytest.raises(Exception):
        Image.open(out / "TrainDataset" / "masks" / "truncated.png").load()
    again = tmp_path / "again"
    _cli(["polyp", str(again), "--train", "4", "--per_test_set", "2", "--size", "40"], cwd=tmp_path)
    for p in out.rglob("*.png"):
        assert p.read_bytes() == (again / p.relative_to(out)).read_bytes()


def test_cardiac_layout_vendors_labels_and_ood_group(tmp_path):
    """The cardiac kind: M&Ms-2 layout, SA stacks + single-slice LA, ED/ES labels 0-3, two labelled
    vendors with different spacing and contrast, an unlabelled OoD vendor (inverted contrast)."""
    import csv

    out = tmp_path / "mnm2"
    _cli(["cardiac", str(out), "--subjects", "2", "--ood_subjects", "1", "--sa_shape", "(48,48,3)"], cwd=tmp_path)
    assert sorted(p.name for p in (out / "001").iterdir()) == sorted(
        f"001_{v}_{p}{s}.nii.gz" for v in ("SA", "LA") for p in ("ED", "ES") for s in ("", "_gt"))
    assert sorted(p.name for p in (out / "003").iterdir()) == ["003_LA_ED.nii.gz", "003_LA_ES.nii.gz", "003_SA_ED.nii.gz", "003_SA_ES.nii.gz"]
    rows = list(csv.DictReader(open(out / "dataset_information.csv")))
    assert list(rows[0]) == ["SUBJECT_CODE", "DISEASE", "VENDOR", "SCANNER", "FIELD"]
    assert [r["VENDOR"] for r in rows] == ["SIEMENS", "PHILIPS", "GE"]
    sa, sa_lab = _load(out / "001" / "001_SA_ED.nii.gz")[1], _load(out / "001" / "001_SA_ED_gt.nii.gz")[1]
    la = _load(out / "002" / "002_LA_ES_gt.nii.gz")[1]
    assert sa.shape == sa_lab.shape == (48, 48, 3) and la.shape == (48, 48, 1)
    assert set(np.unique(sa_lab).tolist()) == {0, 1, 2, 3} and sa_lab.dtype == np.uint8
    es = _load(out / "001" / "001_SA_ES_gt.nii.gz")[1]
    assert (es == 1).sum() < (sa_lab == 1).sum()  # end-systole: smaller LV blood pool
    assert _load(out / "001" / "001_SA_ED.nii.gz")[0].header.get_zooms()[0] != _load(out / "002" / "002_SA_ED.nii.gz")[0].header.get_zooms()[0]
    ood = _load(out / "003" / "003_SA_ED.nii.gz")[1]
    assert sa[sa_lab == 1].mean() > sa[sa_lab == 2].mean()  # in distribution: bright blood, dark myocardium
    centre = ood[20:28, 20:28].mean()
    assert centre < np.percentile(ood, 90)  # out of distribution: inverted contrast (dark blood pool)
