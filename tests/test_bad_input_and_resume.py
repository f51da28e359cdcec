"""Bad input and interruption, for all four bundles, through the documented MONAI CLI.

- A corpus of malformed inputs (scripts/phantoms.py bad_inputs: generated here, never committed)
  goes through every bundle's inference.json: each usable input gets its mask in the input's
  geometry, each unusable one is skipped with its reason in inference_report.json, the run
  exits 0; a rerun keeps the masks; ``--strict true`` stops at the first bad input.
- The checks themselves, the atomic writers and the MONAI Label loading path, in process.
- Kill and resume: training killed with SIGKILL during epoch 2 of 3 and rerun with the same
  command ends with the same weights, bit for bit, as an uninterrupted run (CPU, fixed seed),
  and both runs log the same metrics.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import BUNDLES, PHANTOMS, assert_progress_eta, bundle_cmd, make_phantoms, run
from PIL import Image

from shared_transforms.files import PARTIAL_PREFIX
from shared_transforms.image_check import ImageCheck
from shared_transforms.inference import REPORT_FILE, AtomicNibabelWriter, InferenceReport, ReportingDataset
from shared_transforms.inputs import InputError, InputWarning, LoadCheckedImaged
from shared_transforms.volume_check import VolumeCheck

# the words each skipped input's reason must contain (the checks' contract, written independently of them)
VOLUME_REASONS = {
    "truncated.nii.gz": "truncated gzip",
    "zero_size.nii.gz": "empty file",
    "not_an_image.nii.gz": "not an image file",
    "four_d.nii.gz": "4D volume (64, 64, 8, 2): expected one",
    "tiny_8x8.nii.gz": "in-plane size 8×8 is smaller than the minimum 32×32",
    "zero_spacing.nii.gz": "zero or missing voxel spacing",
    "singular_affine.nii.gz": "singular affine",
}
VOLUME_WARNINGS = {"nan_voxels.nii.gz": "NaN/inf voxels", "constant.nii.gz": "constant image",
                   "sheared.nii.gz": "sheared"}
RGB_REASONS = {
    "truncated.jpg": "truncated image file",
    "zero_size.png": "empty file",
    "not_an_image.png": "not an image file",
    "tiny_4x4.png": "image size 4×4 is smaller than the minimum 32×32",
}
RGB_WARNINGS = {"rgba.png": "alpha channel dropped", "grey16.png": "16-bit", "grey8.png": "converted to RGB",
                "palette.png": "converted to RGB", "constant.png": "constant image"}


def _corpus(root: Path, kind: str, source: Path) -> tuple[Path, dict[str, str]]:
    folder = root / f"bad_{kind}"
    run([sys.executable, str(PHANTOMS), "bad_inputs", str(folder), str(source), "--kind", kind], cwd=root)
    return folder, json.loads((root / f"bad_{kind}_expected.json").read_text())


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad_inputs")
    prostate = make_phantoms("prostate", root / "prostate", cwd=root, cases_per_site=1, shape="(64,64,8)", seed=3)
    polyp = make_phantoms("polyp", root / "polyp", cwd=root, train=2, per_test_set=1, size=64)
    volume = _corpus(root, "volume", prostate / "RUNMC" / "Case00.nii.gz")
    rgb = _corpus(root, "rgb", next((polyp / "TrainDataset" / "images").glob("*.png")))
    return {"root": root, "volume": volume, "rgb": rgb}


def test_corpus_has_the_issues_cases(corpora):
    volume, rgb = corpora["volume"][1], corpora["rgb"][1]
    assert set(VOLUME_REASONS) <= set(volume) and set(VOLUME_WARNINGS) <= set(volume)
    assert {"good.nii.gz", "bön case 2.nii.gz", "single_slice.nii.gz"} <= set(volume)
    assert set(RGB_REASONS) <= set(rgb) and set(RGB_WARNINGS) <= set(rgb)
    assert Image.open(corpora["rgb"][0] / "grey16.png").mode.startswith("I;16")
    assert Image.open(corpora["rgb"][0] / "rgba.png").mode == "RGBA"
    assert nib.load(corpora["volume"][0] / "four_d.nii.gz").ndim == 4


@pytest.mark.parametrize("kind", ["volume", "rgb"])
def test_checks_give_each_file_its_status_and_reason(corpora, kind):
    folder, expected = corpora[kind]
    check = VolumeCheck("3D T2 volume") if kind == "volume" else ImageCheck("RGB frame")
    reasons, fixes = (VOLUME_REASONS, VOLUME_WARNINGS) if kind == "volume" else (RGB_REASONS, RGB_WARNINGS)
    for name, status in expected.items():
        if status == "skipped":
            with pytest.raises(InputError) as err:
                check(folder / name)
            assert reasons[name] in str(err.value) and str(err.value).startswith(str(folder / name))
        else:
            found = check(folder / name)  # voxel-value problems (NaN, constant) are found after loading
            if name in fixes and kind == "rgb" and name != "constant.png":
                assert any(fixes[name] in w for w in found), (name, found)
            elif name == "sheared.nii.gz":
                assert any("sheared" in w for w in found)
            elif status == "ok":
                assert found == [], (name, found)


def test_truncation_is_found_without_decompressing_good_files(corpora, monkeypatch):
    """The check reads the gzip trailer; a whole file's voxels are never decompressed by it."""
    import gzip

    folder, _ = corpora["volume"]
    read = []
    real = gzip.GzipFile.read
    monkeypatch.setattr(gzip.GzipFile, "read", lambda self, *a: read.append(len(out := real(self, *a))) or out)
    VolumeCheck()(folder / "good.nii.gz")
    voxels = int(np.prod(nib.load(folder / "good.nii.gz").shape)) * 4
    assert sum(read) < voxels // 10, f"{sum(read)} bytes decompressed to check a file of {voxels} voxel bytes"
    read.clear()
    with pytest.raises(InputError, match="truncated gzip"):
        VolumeCheck()(folder / "truncated.nii.gz")
    assert sum(read) > 0  # only a mismatching trailer costs a decompression


def test_frames_are_checked_by_their_structure_without_decoding_pixels(corpora, monkeypatch, tmp_path):
    """PNG and JPEG frames that pass are never decoded by the check (the loader decodes each once); a truncated
    PNG or JPEG is still found (a file the structure does not vouch for is decoded, as before), and an
    intact-looking file whose pixel data is corrupt is found by the loader with the file named."""
    from PIL import ImageFile

    folder, expected = corpora["rgb"]
    decoded = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.format) or real(self))
    good = [n for n, status in expected.items() if status != "skipped" and n.endswith((".png", ".jpg"))]
    assert {"good.png", "bön frame 2.jpg"} <= set(good)
    for name in good:
        ImageCheck()(folder / name)
    assert decoded == [], f"the check decoded {decoded}"
    with pytest.raises(InputError, match="truncated image file"):
        ImageCheck()(folder / "truncated.jpg")
    data = (folder / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])  # cut inside the pixel data
    with pytest.raises(InputError, match="truncated image file"):
        ImageCheck()(tmp_path / "cut.png")
    (tmp_path / "no_end.png").write_bytes(data[:-5])  # cut inside IEND: every pixel is there, and it decodes
    decoded.clear()
    assert ImageCheck()(tmp_path / "no_end.png") == [] and decoded == ["PNG"]
    # flip pixel-data bytes and fix the chunk's CRC: the structure is intact, the zlib stream is not
    import struct
    import zlib

    start = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[start:start + 4])[0]
    body = bytearray(data[start + 8:start + 8 + length])
    body[2:] = bytes(b ^ 0x5A for b in body[2:])
    chunk = b"IDAT" + bytes(body)
    broken = data[:start + 4] + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[start + 12 + length:]
    (tmp_path / "corrupt.png").write_bytes(broken)
    assert ImageCheck()(tmp_path / "corrupt.png") == []
    with pytest.raises(InputError, match=r"corrupt\.png: cannot read"):
        LoadCheckedImaged("image", check=ImageCheck(), reader="PILReader")({"image": str(tmp_path / "corrupt.png")})


def test_monai_label_loading_names_the_file_and_the_next_request_works(corpora):
    """MONAI Label runs the bundle's preprocessing per request: a bad file raises one message naming it."""
    from monai.bundle import ConfigParser

    folder, _ = corpora["volume"]
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "prostate_mri_transfer" / "configs" / "inference.json"))
    parser["bundle_root"] = str(corpora["root"])
    pre = parser.get_parsed_content("preprocessing", instantiate=True)
    for name, words in [("truncated.nii.gz", "truncated gzip"), ("four_d.nii.gz", "4D volume")]:
        with pytest.raises(Exception) as err:
            pre({"image": str(folder / name)})
        chain, messages = err.value, []
        while chain is not None:
            messages.append(str(chain))
            chain = chain.__cause__
        assert any(m.startswith(str(folder / name)) and words in m for m in messages), messages
    out = pre({"image": str(folder / "good.nii.gz")})  # the server goes on with the next request
    assert out["image"].shape[0] == 1 and out["constant_input"] is False


def test_polyp_network_input_equals_the_hand_computation(corpora):
    """The polyp inference preprocessing (8-bit frame, checked, resized to 352², scaled by 1/255 and ImageNet-
    normalised per channel) gives the network ((bilinear resize of the RGB frame) / 255 - mean) / std, computed
    here with PIL and torch alone, for an RGB PNG, a JPEG and a grey frame; the resize is the one trace Invertd
    undoes."""
    import torch.nn.functional as F
    from monai.bundle import ConfigParser

    folder, _ = corpora["rgb"]
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "polyp_kdas_student" / "configs" / "inference.json"))
    parser["bundle_root"] = str(corpora["root"])
    targets = [t["_target_"] for t in parser["preprocessing"]["transforms"]]
    # EnsureRGBd (the bundle's scripts) leaves a 3-channel frame as it is: every frame here is one after loading
    steps = [parser.get_parsed_content(f"preprocessing#transforms#{k}", instantiate=True)
             for k, target in enumerate(targets) if target != "scripts.data.EnsureRGBd"]
    size = parser["image_size"]
    mean = torch.tensor(parser["imagenet_mean"])[:, None, None]
    std = torch.tensor(parser["imagenet_std"])[:, None, None]
    for name in ["good.png", "bön frame 2.jpg", "grey8.png"]:
        item = {"image": str(folder / name)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InputWarning)
            for step in steps:
                item = step(item)
        frame = np.asarray(Image.open(folder / name).convert("RGB"), dtype=np.float32)  # (H, W, 3)
        x = torch.from_numpy(frame).permute(2, 1, 0)  # MONAI's PILReader: channel first, spatial (W, H)
        resized = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(item["image"].as_tensor(), (resized / 255 - mean) / std, atol=1e-5, rtol=1e-5)
        assert [op["class"] for op in item["image"].applied_operations] == ["Resize"], name


def test_rgb_loading_through_the_polyp_preprocessing(corpora):
    """What the loader makes of each fixable frame: 3 channels of 8-bit values, the fix announced."""
    from monai.bundle import ConfigParser

    folder, _ = corpora["rgb"]
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "polyp_kdas_student" / "configs" / "inference.json"))
    parser["bundle_root"] = str(corpora["root"])
    load = parser.get_parsed_content("preprocessing#transforms#0", instantiate=True)  # the rest needs the bundle's scripts
    assert isinstance(load, LoadCheckedImaged)
    for name, words in RGB_WARNINGS.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            img = load({"image": str(folder / name)})["image"]
        assert img.shape[0] == 3 and float(img.max()) <= 255 and float(img.max()) >= 1, (name, img.shape)
        if name != "constant.png":  # constant frames are found after loading
            assert any(issubclass(w.category, InputWarning) and words in str(w.message) for w in caught), name
    grey = np.asarray(Image.open(folder / "grey16.png"), dtype=np.float64)
    loaded = load({"image": str(folder / "grey16.png")})["image"][0].numpy().T  # MONAI's PIL reader is (W, H)
    assert np.abs(loaded - grey * 255 / 65535).max() <= 0.5  # rescaled, not clipped


def test_reporting_dataset_and_report_never_lose_the_run(corpora, tmp_path):
    folder, expected = corpora["volume"]
    check = VolumeCheck()
    report = InferenceReport(str(tmp_path), check=check)
    data = [{"image": str(folder / n)} for n in sorted(expected)]
    todo = report.screen(data)
    assert {Path(d["image"]).name for d in todo} == {n for n, s in expected.items() if s != "skipped"}
    saved = json.loads((tmp_path / REPORT_FILE).read_text())
    assert saved["counts"]["skipped"] == len(VOLUME_REASONS)
    # a file that breaks after screening (here: truncated) becomes an item with its reason, never an exception
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes((folder / "good.nii.gz").read_bytes()[:400])
    ds = ReportingDataset([{"image": str(broken)}], LoadCheckedImaged("image", check=check))
    item = ds[0]
    assert item["input_file"] == str(broken) and "truncated gzip" in item["input_error"]
    strict = ReportingDataset([{"image": str(broken)}], LoadCheckedImaged("image", check=check), strict=True)
    with pytest.raises(InputError, match="truncated gzip"):
        strict[0]


def test_a_checked_file_is_not_decoded_again_unless_it_changed(tmp_path, monkeypatch):
    """Screening checks every input; loading it for the network must not decode it a second time (the check
    remembers passes by path, size and mtime), but a file replaced in between is checked afresh."""
    import PIL.Image

    frame = tmp_path / "frame.png"
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(frame)
    opened = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    check = ImageCheck()
    assert check(frame) == [] and check(str(frame)) == [] and len(opened) == 1
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(frame)  # now grey: another file, another answer
    os.utime(frame, ns=(1, 1))
    assert "converted to RGB" in check(frame)[0] and len(opened) == 2
    assert "converted to RGB" in check(frame)[0] and len(opened) == 2  # remembered with its warning
    frame.write_bytes(frame.read_bytes()[:30])  # truncated after it passed: never served from memory
    with pytest.raises(InputError, match="truncated|corrupt|not an image"):
        check(frame)
    volume = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 4), np.float32), np.eye(4)), volume)
    vcheck = VolumeCheck()
    import nibabel

    loads = []
    real_load = nibabel.load
    monkeypatch.setattr(nibabel, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    assert vcheck(volume) == vcheck(volume) == [] and len(loads) == 1
    volume.write_bytes(volume.read_bytes()[:200])
    with pytest.raises(InputError):
        vcheck(volume)


def test_inputs_with_the_same_mask_name_are_never_overwritten(tmp_path):
    """Two inputs named alike in different folders (the liver MRI layout's case_*/artery.nii.gz) would write
    one mask file: the first is processed, the second skipped naming the first (found by scripts/gpu_check.py)."""
    files = [tmp_path / f"case_{i}" / "artery.nii.gz" for i in (1, 2)] + [tmp_path / "case_3" / "other.nii.gz"]
    report = InferenceReport(str(tmp_path / "out"))
    todo = report.screen([{"image": str(f)} for f in files])
    assert [d["image"] for d in todo] == [str(files[0]), str(files[2])]
    entry = report.entries[str(files[1])]
    assert entry["status"] == "skipped" and str(files[0]) in entry["reason"] and "artery_seg.nii.gz" in entry["reason"]
    with pytest.raises(InputError, match="case_1"):
        InferenceReport(str(tmp_path / "strict"), strict=True).screen([{"image": str(f)} for f in files])

    def check(path):  # case_1's file is broken: case_2's, of the same name, must still run
        if "case_1" in str(path):
            raise InputError(path, "corrupt")
        return []

    report = InferenceReport(str(tmp_path / "bad_first"), check=check)
    assert [d["image"] for d in report.screen([{"image": str(f)} for f in files])] == [str(files[1]), str(files[2])]
    assert report.entries[str(files[0])]["reason"] == "corrupt"


def test_atomic_writer_leaves_no_partial_mask(tmp_path, monkeypatch):
    def writer() -> AtomicNibabelWriter:  # a MONAI writer holds one image
        w = AtomicNibabelWriter()
        w.set_data_array(torch.zeros(1, 8, 8, 4), channel_dim=0)
        w.set_metadata({"affine": np.eye(4), "spatial_shape": (8, 8, 4)})
        return w

    target = tmp_path / "case_seg.nii.gz"
    writer().write(str(target))
    assert nib.load(target).shape == (8, 8, 4) and not list(tmp_path.glob(f"{PARTIAL_PREFIX}*"))

    def interrupted(img, filename):  # the write stops halfway (a kill, a full disk)
        Path(filename).write_bytes(b"half a mask")
        raise KeyboardInterrupt

    monkeypatch.setattr(nib, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        writer().write(str(tmp_path / "other_seg.nii.gz"))
    with pytest.raises(KeyboardInterrupt):
        writer().write(str(target))  # an existing mask being overwritten stays whole
    assert not (tmp_path / "other_seg.nii.gz").exists() and not list(tmp_path.glob(f"{PARTIAL_PREFIX}*"))
    assert nib.load(target).shape == (8, 8, 4)


# ------------------------------------------------------------------------------------------
# the corpus through each bundle's inference.json
# ------------------------------------------------------------------------------------------

# random weights at small sizes: what matters here is which inputs get a mask, not its quality
INFERENCE = {
    "prostate_mri_transfer": ("volume", {"image_size": 64, "encoder": "efficientnet-b0"}),
    "liver_ct_mri_transfer": ("volume", {"image_size": 64, "channels": [8, 16, 32, 64]}),
    "cardiac_qc_refinement": ("volume", {"image_size": 64, "filters": [8, 16, 32, 64]}),
    "polyp_kdas_student": ("rgb", {"image_size": 64}),
}
# the files each bundle needs in models/, and the config key of the network they hold
MODELS = {
    "prostate_mri_transfer": {"model.pt": "network_def"},
    "liver_ct_mri_transfer": {"model.pt": "network_def"},
    "polyp_kdas_student": {"model.pt": "network_def"},
    "cardiac_qc_refinement": {"model.pt": "network_def", "candidates/candidate_00.pt": "network_def",
                              "qc/model.pt": "qc_network_def"},
}

SAVE_RANDOM_MODELS = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from monai.bundle import ConfigParser
    config, root, overrides, models = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    sys.path.insert(0, str(Path(config).parents[1]))  # the bundle's scripts package, as monai.bundle run does
    parser = ConfigParser()
    parser.read_config(config)
    parser.update({"bundle_root": root, **overrides})
    torch.manual_seed(0)
    for name, key in models.items():
        path = Path(root) / "models" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(parser.get_parsed_content(key, instantiate=True).state_dict(), path)
""")


def _save_random_models(bundle: str, root: Path, overrides: dict) -> None:
    config = BUNDLES / bundle / "configs" / "inference.json"
    run([sys.executable, "-c", SAVE_RANDOM_MODELS, str(config), str(root), json.dumps(overrides), json.dumps(MODELS[bundle])],
        cwd=root)


def _shape_of(path: Path) -> tuple[int, ...]:
    if path.suffix in (".png", ".jpg"):
        return Image.open(path).size[::-1]
    return tuple(nib.load(path).shape)


@pytest.mark.parametrize("bundle", sorted(INFERENCE))
def test_inference_over_the_bad_input_corpus(corpora, bundle, tmp_path):
    kind, sizes = INFERENCE[bundle]
    folder, expected = corpora[kind]
    root = tmp_path / "bundle"
    root.mkdir()
    _save_random_models(bundle, root, sizes)
    if bundle == "cardiac_qc_refinement":  # thresholds as a trained bundle ships them (the set here is too small)
        (root / "models" / "qc" / "calibration.json").write_text(json.dumps({"th_low": 0.5, "th_up": 10.0}))
    out = tmp_path / "out"
    args = dict(bundle_root=str(root), dataset_dir=str(folder), output_dir=str(out), **sizes)
    proc = run(bundle_cmd(bundle, ["inference.json"], "run", **args), cwd=tmp_path)  # exits 0
    log = proc.stdout + proc.stderr
    assert_progress_eta(proc.stdout, "inference")
    report = {Path(e["file"]).name: e for e in json.loads((out / REPORT_FILE).read_text())["inputs"]}
    assert set(report) == set(expected), "every input is in the report"
    reasons, fixes = (VOLUME_REASONS, VOLUME_WARNINGS) if kind == "volume" else (RGB_REASONS, RGB_WARNINGS)
    for name, status in expected.items():
        entry = report[name]
        if status == "skipped":
            assert entry["status"] == "skipped" and reasons[name] in entry["reason"], entry
            assert name in log  # on the console too
            continue
        assert entry["status"] == "written", entry
        mask = Path(entry["output"])
        assert mask.is_file() and mask.parent == out
        assert _shape_of(mask) == _shape_of(folder / name)[:3], f"{name}: the mask has the input's geometry"
        if status == "fixed":
            assert any(fixes[name] in w for w in entry["warnings"]), entry
        if name.startswith("constant"):
            assert not np.asarray(Image.open(mask) if kind == "rgb" else nib.load(mask).dataobj).any()
    if kind == "volume":
        for name in ("good.nii.gz", "sheared.nii.gz"):  # the mask keeps the input's header
            mask = nib.load(report[name]["output"])
            assert np.allclose(mask.affine, nib.load(folder / name).affine, atol=1e-4)
    assert not list(out.glob(f"{PARTIAL_PREFIX}*"))

    # a rerun keeps every mask; strict stops at the first bad input, naming it
    proc = run(bundle_cmd(bundle, ["inference.json"], "run", **args), cwd=tmp_path)
    counts = json.loads((out / REPORT_FILE).read_text())["counts"]
    assert counts["kept"] == sum(s != "skipped" for s in expected.values()) and counts["written"] == 0
    strict = subprocess.run(bundle_cmd(bundle, ["inference.json"], "run", strict=True, overwrite=True, **args),
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    first_bad = next(n for n in sorted(expected) if expected[n] == "skipped")
    assert strict.returncode != 0
    assert f"{folder / first_bad}: {reasons[first_bad]}" in strict.stderr + strict.stdout
    if bundle == "cardiac_qc_refinement":  # an interrupted run, finished by a rerun, keeps the set's QC verdicts
        first = json.loads((out / "good_qc.json").read_text())
        for name in ("good_seg.nii.gz", "good_qc.json"):
            (out / name).unlink()
        proc = run(bundle_cmd(bundle, ["inference.json"], "run", **args), cwd=tmp_path)
        assert "QC thresholds of the earlier run" in proc.stdout + proc.stderr
        again = json.loads((out / "good_qc.json").read_text())
        assert {k: again[k] for k in ("ood", "th_low", "th_up", "selected_model")} == \
            {k: first[k] for k in ("ood", "th_low", "th_up", "selected_model")}


# ------------------------------------------------------------------------------------------
# kill and resume
# ------------------------------------------------------------------------------------------

def _polyp_teacher(root: Path) -> str:
    """A random-weight PVTv2-B2 teacher checkpoint (the KD machinery, not the teacher's quality, is under test)."""
    path = root / "teacher.pt"
    models = {"teacher.pt": "teacher_def"}
    config = BUNDLES / "polyp_kdas_student" / "configs" / "train.json"
    run([sys.executable, "-c", SAVE_RANDOM_MODELS.replace('Path(root) / "models" / name', "Path(root) / name"),
         str(config), str(root), json.dumps({}), json.dumps(models)], cwd=root)
    return str(path)


def _training(bundle: str, tmp: Path) -> tuple[list[str], dict]:
    """Configs and overrides of a 3-epoch run on small phantoms (several iterations per epoch)."""
    data = tmp / "data"
    if bundle == "prostate_mri_transfer":
        make_phantoms("prostate", data, cwd=tmp, cases_per_site=4, shape="(64,64,8)", seed=1)
        return ["train.json"], dict(dataset_dir=str(data), sites=["I2CVB"], n_folds=2, image_size=64,
                                    encoder="efficientnet-b0", batch_size=2)
    if bundle == "liver_ct_mri_transfer":
        make_phantoms("liver_mri", data, cwd=tmp, cases=10, shape="(48,40,8)")
        return ["train.json"], dict(dataset_dir=str(data), image_size=48, channels=[8, 16, 32, 64], batch_size=4)
    if bundle == "polyp_kdas_student":
        make_phantoms("polyp", data, cwd=tmp, train=12, per_test_set=1, size=48)
        return ["train.json"], dict(dataset_dir=str(data), teacher_ckpt=_polyp_teacher(tmp), image_size=48,
                                    size_multiple=16, batch_size=4)
    make_phantoms("cardiac", data, cwd=tmp, subjects=6, ood_subjects=2, sa_shape="(48,48,3)")
    return ["train.json"], dict(dataset_dir=str(data), image_size=48, filters=[8, 16, 32, 64], deep_supr_num=2,
                                batch_size=4, m_best=2)  # augmentation on: its random states must resume too


def _weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state)  # the resume checkpoint holds it under "model"; model.pt is the state dict


@pytest.mark.parametrize("bundle", ["prostate_mri_transfer", "liver_ct_mri_transfer", "polyp_kdas_student",
                                    "cardiac_qc_refinement"])
def test_kill_during_epoch_2_and_resume_gives_bit_identical_weights(bundle, tmp_path):
    configs, overrides = _training(bundle, tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    def command(root: Path) -> list[str]:
        return bundle_cmd(bundle, configs, "training", bundle_root=str(root), epochs=3, **overrides)

    whole, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    # both start together (one core each); the second is killed right after its first iteration of epoch 2
    reference = subprocess.Popen(command(whole), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    victim = subprocess.Popen(command(killed), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    seen = []
    for line in victim.stdout:
        seen.append(line)
        if "Epoch: 2/3, Iter: 1/" in line:
            victim.send_signal(signal.SIGKILL)
            break
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "".join(seen[-40:])
    assert not (killed / "eval" / "learning_curves.csv").is_file() or \
        len(list(csv.DictReader(open(killed / "eval" / "learning_curves.csv")))) == 1
    resumed = run(command(killed), cwd=tmp_path, env=env)
    assert "resumed from" in resumed.stdout + resumed.stderr and "at epoch 1" in resumed.stdout + resumed.stderr
    assert reference.wait(timeout=900) == 0

    for name in ("models/model.pt", "models/resume/checkpoint.pt"):  # the best model and the last epoch's
        a, b = _weights(whole / name), _weights(killed / name)
        assert a.keys() == b.keys()
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, f"{name}: {len(differ)} of {len(a)} tensors differ after the resume, e.g. {differ[:3]}"
    # the same seed gives the same metrics: epoch 1 from two separate runs, epochs 2-3 across the resume
    curves = [[{k: v for k, v in row.items() if k != "epoch_seconds"} for row in csv.DictReader(open(r / "eval" / "learning_curves.csv"))]
              for r in (whole, killed)]
    assert len(curves[0]) == 3 and curves[0] == curves[1]


def test_resume_checkpoint_restores_amp_scaler_random_states_and_best_metric(tmp_path):
    """In process, on CPU: the AMP loss scale, every random generator and the evaluator's best metric."""
    import random

    from ignite.engine import Engine, Events
    from monai.transforms import RandGaussianNoised

    from shared_transforms.handlers import ResumeCheckpointLoader, ResumeCheckpointSaver

    noise = RandGaussianNoised("x", prob=1.0)
    noise.set_random_state(seed=1)

    class Data(list):  # a dataset with a random transform, as MONAI's Dataset holds it
        transform = noise

    def make():
        net = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)

        def step(engine, batch):  # one AMP step on CPU
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = net(torch.ones(1, 2)).float().sum()
            engine.scaler.scale(loss).backward()
            engine.scaler.step(opt)
            engine.scaler.update()

        trainer = Engine(step)
        trainer.data_loader = torch.utils.data.DataLoader(Data([0, 1]))
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        evaluator = Engine(lambda e, b: None)
        evaluator.state.best_metric, evaluator.state.best_metric_epoch = -1.0, -1
        ResumeCheckpointLoader(str(tmp_path / "resume" / "checkpoint.pt"), {"model": net}, evaluator=evaluator).attach(trainer)
        ResumeCheckpointSaver(str(tmp_path / "resume"), {"model": net}, evaluator=evaluator).attach(trainer)
        return net, trainer, evaluator

    def draws():
        return (random.random(), float(np.random.rand()), float(torch.rand(1)), float(noise.R.rand()),
                float(noise.rand_gaussian_noise.R.rand()))

    net, trainer, evaluator = make()

    @trainer.on(Events.EPOCH_COMPLETED)
    def _(engine):  # before the resume checkpoint's save: a halved scale, a best metric
        engine.scaler.update(new_scale=2.0 ** 7)
        evaluator.state.best_metric, evaluator.state.best_metric_epoch = 0.75, engine.state.epoch

    trainer._event_handlers[Events.EPOCH_COMPLETED].reverse()  # this one first
    trainer.run([0], max_epochs=1)
    expected = draws()  # what the next epoch would draw
    random.seed(5), np.random.seed(5), torch.manual_seed(5), noise.set_random_state(seed=5)

    net2, trainer2, evaluator2 = make()
    trainer2.run([0], max_epochs=1)  # resumes at epoch 1 of 1: nothing to do but load
    assert trainer2.state.epoch == 1 and float(trainer2.scaler.get_scale()) == 2.0 ** 7
    assert evaluator2.state.best_metric == 0.75 and evaluator2.state.best_metric_epoch == 1
    assert torch.equal(net2.weight, net.weight)
    assert draws() == expected


def test_flags_and_volume_check_edge_cases(tmp_path):
    from shared_transforms.utils import as_bool

    assert [as_bool(v) for v in (True, "True", "true", "1", False, "False", "false", "0", 0)] == [True] * 4 + [False] * 5
    with pytest.raises(ValueError, match="strict"):
        as_bool("maybe", "strict")
    check = VolumeCheck(min_size=32, axcodes="RAS")
    tiny = tmp_path / "tiny.nii.gz"
    tiny.write_bytes(b"\x1f\x8b\x08")  # a gzip stream cut after 3 bytes: a reason, not an OSError
    with pytest.raises(InputError, match="truncated gzip"):
        check(tiny)
    other = tmp_path / "scan.nrrd"
    other.write_bytes(b"NRRD0004\n")
    assert check(other) == []  # another format: the reader decides, LoadCheckedImaged names the file
    data = np.zeros((12, 64, 48), np.float32)
    # axial slices stored first: voxel axes (0, 1, 2) run along world (S, A, R); after RAS the volume is (48, 64, 12)
    slices_first = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    nib.save(nib.Nifti1Image(data, slices_first), tmp_path / "slices_first.nii.gz")
    with pytest.raises(InputError, match="in-plane size 48×64"):
        VolumeCheck(min_size=50, axcodes="RAS")(tmp_path / "slices_first.nii.gz")
    assert VolumeCheck(min_size=32, axcodes="RAS")(tmp_path / "slices_first.nii.gz") == []
    # stored as (12, 64, 48) the first two axes would be 12 × 64: without axcodes (no reorientation) it is too small
    with pytest.raises(InputError, match="in-plane size 12×64"):
        VolumeCheck(min_size=32)(tmp_path / "slices_first.nii.gz")
    # pixdim 0 with a valid sform: MONAI takes the spacing from the sform, so the volume is usable
    img = nib.Nifti1Image(np.zeros((40, 40, 4), np.float32), np.diag([0.5, 0.5, 3.0, 1.0]))
    img.header.set_zooms((0.0, 0.0, 0.0))
    img.set_sform(np.diag([0.5, 0.5, 3.0, 1.0]), code=1)
    nib.save(img, tmp_path / "sform_only.nii.gz")
    assert VolumeCheck()(tmp_path / "sform_only.nii.gz") == []


def test_atomic_checkpoint_saver_replaces_model_pt_only_when_the_new_one_is_whole(tmp_path, monkeypatch):
    from shared_transforms.handlers import AtomicCheckpointSaver

    net = torch.nn.Linear(2, 1)
    saver = AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_key_metric=True, key_metric_filename="model.pt")
    handler = saver._key_metric_checkpoint.save_handler
    handler({"model": net.state_dict()}, "ignored.pt")
    before = torch.load(tmp_path / "model.pt", weights_only=True)
    handler.remove("model.pt")  # what ignite does before saving a better model under the same name

    def killed(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with torch.no_grad():
        net.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        handler({"model": net.state_dict()}, "ignored.pt")
    after = torch.load(tmp_path / "model.pt", weights_only=True)
    assert torch.equal(after["model"]["weight"] if "model" in after else after["weight"],
                       before["model"]["weight"] if "model" in before else before["weight"])
    assert not list(tmp_path.glob(f"{PARTIAL_PREFIX}*"))
    assert oct((tmp_path / "model.pt").stat().st_mode & 0o777) != oct(0o600)  # not private to its writer
