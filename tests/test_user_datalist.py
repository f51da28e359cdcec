"""A user's own data: every bundle trains from a MONAI/Decathlon datalist JSON (``--datalist_file``).

The phantoms' files are copied into a Decathlon-style folder under new names (``imagesTr/``,
``labelsTr/``, relative paths in ``dataset.json``) and ``dataset_dir`` points nowhere, so only the
datalist can have been read. One entry names a missing label: it is reported in
``bad_cases.json`` and the run goes on. The datalist the run writes is then read back as a
``datalist_file`` and gives the same split.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import BUNDLES, assert_progress_eta, bundle_run, make_phantoms

from shared_transforms.datalist import scan_cases
from shared_transforms.datalist_file import read_datalist_file


def _decathlon(pairs: list[tuple[Path, Path]], root: Path, suffix: str, n_val: int, n_test: int) -> tuple[Path, list[str]]:
    """Copy ``(image, label)`` pairs to ``root/imagesTr|labelsTr/pat_NN<suffix>``; write ``root/dataset.json``.

    The first ``n_val`` pairs validate (no ``"validation"`` list when 0: the bundle splits its own),
    the last ``n_test`` are the test list. Returns the file and the training cases' names.
    """
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    items = []
    for i, (image, label) in enumerate(pairs):
        name = f"pat_{i:02d}{suffix}"
        shutil.copy(image, root / "imagesTr" / name)
        shutil.copy(label, root / "labelsTr" / name)
        items.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
    training = items[n_val:len(items) - n_test]
    shutil.copy(pairs[0][0], root / "imagesTr" / f"broken{suffix}")
    content = {"training": training + [{"image": f"imagesTr/broken{suffix}", "label": f"labelsTr/missing{suffix}"}],
               "test": items[len(items) - n_test:]}
    if n_val:
        content["validation"] = items[:n_val]
    path = root / "dataset.json"
    path.write_text(json.dumps(content, indent=2))
    return path, [Path(t["image"]).name.removesuffix(suffix) for t in training]


def _prostate(tmp: Path):
    data = make_phantoms("prostate", tmp / "data", cwd=tmp, cases_per_site=6, shape="(64,64,8)", seed=1)
    images = sorted(p for p in (data / "BMC").glob("Case*.nii.gz") if "egmentation" not in p.name)
    pairs = [(p, p.with_name(p.name.replace(".nii.gz", "_segmentation.nii.gz"))) for p in images]
    file, train = _decathlon(pairs, tmp / "user", ".nii.gz", n_val=0, n_test=1)
    return ["train.json"], file, train, "eval/datalist.json", dict(
        image_size=64, encoder="efficientnet-b0", batch_size=4, n_folds=4)


def _liver(tmp: Path):
    data = make_phantoms("liver_mri", tmp / "data", cwd=tmp, cases=10, shape="(48,40,8)")
    pairs = [(d / "artery.nii.gz", d / "label.nii.gz") for d in sorted(data.iterdir())
             if (d / "label.nii.gz").is_file() and d.name != "case_001"]  # case_001: the phantom's mismatched label
    file, train = _decathlon(pairs, tmp / "user", ".nii.gz", n_val=1, n_test=2)
    return ["train.json"], file, train, "eval/datalist_mri.json", dict(image_size=48, channels=[8, 16, 32, 64],
                                                                        batch_size=4)


def _polyp(tmp: Path):
    data = make_phantoms("polyp", tmp / "data", cwd=tmp, train=14, per_test_set=1, size=48, broken=False)
    pairs = [(p, data / "TrainDataset" / "masks" / p.name) for p in sorted((data / "TrainDataset" / "images").glob("*.png"))]
    file, train = _decathlon(pairs, tmp / "user", ".png", n_val=2, n_test=2)
    return ["train_teacher.json"], file, train, "eval/teacher/datalist.json", dict(image_size=64, size_multiple=32,
                                                                                    batch_size=2)


def _cardiac(tmp: Path):
    data = make_phantoms("cardiac", tmp / "data", cwd=tmp, subjects=6, ood_subjects=0, sa_shape="(48,48,3)")
    images = sorted(p for p in data.rglob("*_SA_E[DS].nii.gz"))
    pairs = [(p, p.with_name(p.name.replace(".nii.gz", "_gt.nii.gz"))) for p in images]
    file, train = _decathlon([pr for pr in pairs if pr[1].is_file()], tmp / "user", ".nii.gz", n_val=2, n_test=2)
    return ["train.json"], file, train, "eval/datalist_SA.json", dict(image_size=48, filters=[8, 16, 32, 64],
                                                                       deep_supr_num=2, batch_size=4, m_best=1)


SETUPS = {"prostate_mri_transfer": _prostate, "liver_ct_mri_transfer": _liver, "polyp_kdas_student": _polyp,
          "cardiac_qc_refinement": _cardiac}


@pytest.mark.parametrize("bundle", list(SETUPS))
def test_training_from_a_datalist_file_and_its_written_datalist_reads_back(bundle, tmp_path):
    configs, file, train_names, written, small = SETUPS[bundle](tmp_path)
    root = tmp_path / "bundle"
    proc = bundle_run(bundle, configs, cwd=tmp_path, run_id="training", bundle_root=str(root), epochs=1,
                      dataset_dir=str(tmp_path / "no_such_folder"), datalist_file=str(file), **small)
    # progress bars on stdout with elapsed<remaining (the ETA): the training epoch, and the volumes' preparation
    assert_progress_eta(proc.stdout, "Iteration")
    if bundle != "polyp_kdas_student":
        assert re.search(r"preparing volumes: +100%.*\[\d\d:\d\d<00:00", proc.stdout), proc.stdout[-3000:]

    models = root / ("models/teacher" if bundle == "polyp_kdas_student" else "models")
    assert torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    # TensorBoardImageHandler: image, label and prediction of a validation item, at the trainer's epoch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root / Path(written).parent / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    images = events.Tags()["images"]
    assert any(t.startswith("input_0") for t in images) and any(t.startswith("output") for t in images), images
    assert {e.step for t in images for e in events.Images(t)} == {1}
    datalist = json.loads((root / written).read_text())
    used = {key: [c["case"] for c in datalist[key]] for key in ("training", "validation", "test")}
    assert used["test"] and used["validation"]
    if bundle == "prostate_mri_transfer":  # no validation list given: a quarter of the training cases validate
        assert sorted(used["training"] + used["validation"]) == sorted(train_names) and len(used["validation"]) == 1
    else:
        assert used["training"] == train_names
    assert all(Path(c["image"]).is_absolute() and "imagesTr" in c["image"] for c in datalist["training"])
    bad = json.loads((root / Path(written).parent / "bad_cases.json").read_text())
    assert [b["case"] for b in bad] == ["broken"] and "labelsTr/missing" in bad[0]["file"], bad
    assert "cannot read" in bad[0]["reason"], bad

    # the written datalist is itself a datalist_file: read back, it gives the same split
    scan = scan_cases if bundle != "polyp_kdas_student" else (lambda items: (items, []))
    again = read_datalist_file(root / written, scan, val_fraction=0.5)
    assert {key: [c["case"] for c in again[key]] for key in used} == used


def test_datalist_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="datalist_file not found: .*absent.json"):
        read_datalist_file(tmp_path / "absent.json", scan_cases)
    (tmp_path / "text.json").write_text("training: a.nii.gz")
    with pytest.raises(ValueError, match="text.json: not a JSON datalist"):
        read_datalist_file(tmp_path / "text.json", scan_cases)
    (tmp_path / "empty.json").write_text(json.dumps({"validation": [{"image": "a.nii.gz", "label": "b.nii.gz"}]}))
    with pytest.raises(ValueError, match="empty.json: a datalist needs a non-empty 'training' list"):
        read_datalist_file(tmp_path / "empty.json", scan_cases)
    (tmp_path / "broken.json").write_text(json.dumps({"training": [{"image": "a.nii.gz", "label": "b.nii.gz"}]}))
    with pytest.raises(ValueError, match="broken.json: no usable training case"):
        read_datalist_file(tmp_path / "broken.json", scan_cases)


def test_case_names_from_files_are_unique():
    """Files of one name in different folders (the liver MRI layout: ``<case>/artery.nii.gz``) keep distinct cases."""
    from shared_transforms.datalist_file import _name_cases

    items = [{"image": "/d/case1/artery.nii.gz"}, {"image": "/d/case2/artery.nii.gz"}, {"image": "/d/x.png"},
             {"image": "/d/y.nii", "case": "mine"}]
    _name_cases(items)
    assert [i["case"] for i in items] == ["case1/artery", "case2/artery", "x", "mine"]


TRAIN_CONFIGS = [("prostate_mri_transfer", ["train.json"]), ("liver_ct_mri_transfer", ["train.json"]),
                 ("liver_ct_mri_transfer", ["train.json", "pretrain_ct.json"]), ("polyp_kdas_student", ["train.json"]),
                 ("polyp_kdas_student", ["train_teacher.json"]), ("cardiac_qc_refinement", ["train.json"])]


@pytest.mark.parametrize("bundle, configs", TRAIN_CONFIGS)
def test_every_training_has_random_transforms_its_dataset_applies(bundle, configs):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / c) for c in configs])
    assert parser["train#random_transforms"]["_target_"] == "Compose"
    dataset = json.dumps(parser["train#dataset"])
    assert "@train#random_transforms" in dataset and "datalist_file" in json.dumps(parser["datalist"])


def test_a_random_transform_added_by_override_reaches_training_items(tmp_path):
    """``--train#random_transforms#transforms`` with a flip: the training item is the preprocessed one, flipped."""
    import sys

    from monai.bundle import ConfigParser

    data = make_phantoms("polyp", tmp_path / "data", cwd=tmp_path, train=2, per_test_set=1, size=48, broken=False)
    pair = next((data / "TrainDataset" / "images").glob("*.png"))
    items = [{"image": str(pair), "label": str(data / "TrainDataset" / "masks" / pair.name), "case": "a"}]
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "polyp_kdas_student" / "configs" / "train.json"))
    parser.update({"bundle_root": str(BUNDLES / "polyp_kdas_student"), "image_size": 48, "train#dataset#data": items})
    sys.path.insert(0, str(BUNDLES / "polyp_kdas_student"))
    try:
        plain = parser.get_parsed_content("train#dataset", instantiate=True)[0]
        parser["train#random_transforms#transforms"] = [{"_target_": "RandFlipd", "keys": ["image", "label"], "prob": 1.0,
                                                        "spatial_axis": 0}]
        parser.ref_resolver.reset()
        flipped = parser.get_parsed_content("train#dataset", instantiate=True)[0]
    finally:
        sys.path.remove(str(BUNDLES / "polyp_kdas_student"))
        for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[name]
    for key in ("image", "label"):
        assert torch.equal(torch.as_tensor(flipped[key]), torch.flip(torch.as_tensor(plain[key]), dims=[1]))
        assert not torch.equal(torch.as_tensor(flipped[key]), torch.as_tensor(plain[key]))
