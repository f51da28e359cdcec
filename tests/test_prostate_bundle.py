"""End-to-end tests of bundles/prostate_mri_transfer through the documented MONAI CLI.

Every run happens in a subprocess started from a temporary working directory, on phantoms
written by scripts/phantoms.py in the real multi-site layout. Sizes are small (64×64
slices, a smaller encoder, few epochs) through config overrides only.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import BUNDLES, REPO, assert_ddp_evaluation_matches, assert_progress_eta, bundle_run, make_phantoms, run

BUNDLE = "prostate_mri_transfer"
CONFIGS = BUNDLES / BUNDLE / "configs"
# small but real: the paper's UNet++ with the smallest EfficientNet at 64×64
ENCODER = "efficientnet-b0"  # the default family (EfficientNet-B3 is its big sibling); bn_momentum 0.1 by default
SMALL = {"image_size": 64, "encoder": ENCODER, "batch_size": 8}
EPOCHS = 20


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prostate_data")
    return make_phantoms("prostate", root / "data", cwd=root, cases_per_site=8, shape="(64,64,12)", seed=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data) -> dict:
    """One training run on RUNMC, shared by the tests that need a trained model."""
    work = tmp_path_factory.mktemp("prostate_train")
    proc = bundle_run(
        BUNDLE, ["train.json"], cwd=work, run_id="training",
        bundle_root=str(work), dataset_dir=str(data), sites=["RUNMC"], epochs=EPOCHS, **SMALL,
    )
    return {"work": work, "data": data, "stdout": proc.stdout + proc.stderr}


def test_training_writes_model_logs_and_datalist(trained):
    work = trained["work"]
    state = torch.load(work / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert "intensity_mean" in state and "intensity_std" in state, "standardisation must be saved with the model"
    assert float(state["intensity_std"]) > 0 and float(state["intensity_mean"]) != 0.0
    datalist = json.loads((work / "eval" / "datalist.json").read_text())
    ids = {k: {c["case"] for c in datalist[k]} for k in ("training", "validation", "test")}
    assert ids["training"] and ids["validation"] and ids["test"]
    assert not (ids["training"] & ids["test"]) and not (ids["validation"] & ids["test"])
    assert not (ids["training"] & ids["validation"])
    assert list((work / "eval" / "tensorboard").glob("events.out.tfevents.*"))
    rows = list(csv.DictReader(open(work / "eval" / "learning_curves.csv")))
    assert len(rows) == EPOCHS and (work / "eval" / "learning_curves.png").stat().st_size > 1000
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert (work / "models" / "resume" / "checkpoint.pt").is_file()


def test_eval_mode_matches_batch_statistics_after_a_short_run(trained):
    """20 epochs with the default encoder family: BatchNorm's running statistics have caught up,
    so eval mode (evaluation, inference, MONAI Label) scores like batch statistics."""
    work = trained["work"]
    run([sys.executable, str(REPO / "scripts" / "prostate_bn_check.py"), "score", str(work), "--overrides",
         repr({"dataset_dir": str(trained["data"]), "sites": ["RUNMC"], **SMALL})], cwd=work)
    rows = json.loads((work / "eval" / "bn_score.json").read_text())
    seen = [r for r in rows if r["part"] in ("training", "validation")]
    assert seen and all(r["train_mode_dice"] > 70 for r in seen), rows
    gap = np.mean([r["train_mode_dice"] - r["eval_dice"] for r in seen])
    assert abs(gap) < 5, rows


def test_evaluation_learns_the_gland(trained):
    """Learning actually happens: test Dice on held-out phantom cases > 0.8."""
    work, data = trained["work"], trained["data"]
    proc = bundle_run(
        BUNDLE, ["train.json", "evaluate.json"], cwd=work, run_id="evaluating",
        bundle_root=str(work), dataset_dir=str(data), sites=["RUNMC"], **SMALL,
    )
    assert_progress_eta(proc.stdout, "evaluating")
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    test_cases = {c["case"] for c in json.loads((work / "eval" / "datalist.json").read_text())["test"]}
    assert {r["case"] for r in metrics["cases"]} == test_cases
    assert metrics["mean_dice"] > 80.0, metrics
    assert 0 < metrics["mean_iou"] < metrics["mean_dice"]
    rows = list(csv.DictReader(open(work / "eval" / "metrics.csv")))
    assert len(rows) == len(test_cases)
    raw = list(csv.DictReader(open(work / "eval" / "dice_raw.csv")))  # MONAI MetricsSaver's per-case file
    assert [r["filename"] for r in raw] == [r["case"] for r in rows]
    assert all(float(r["foreground"]) == pytest.approx(float(m["dice"]) / 100, abs=1e-4) for r, m in zip(raw, rows))
    assert list((work / "eval" / "overlays").glob("*.png"))


def test_multi_gpu_evaluate_matches_one_process(trained, tmp_path):
    """multi_gpu_evaluate.json in 2 CPU processes: a case's slices split between the ranks, the same per-case table."""
    work, args = trained["work"], dict(bundle_root=str(trained["work"]), dataset_dir=str(trained["data"]), sites=["RUNMC"], **SMALL)
    if not (work / "eval" / "metrics.json").is_file():  # run alone: the one-process evaluation first
        bundle_run(BUNDLE, ["train.json", "evaluate.json"], cwd=work, run_id="evaluating", **args)
    assert_ddp_evaluation_matches(BUNDLE, work / "eval", tmp_path, ["metrics.json"], **args)


def test_finetune_starts_from_source_weights_and_trains(trained, tmp_path):
    work, data = trained["work"], trained["data"]
    source = work / "models" / "model.pt"
    # the fine-tuning workflow exactly as the CLI builds it: its trainer's first handler loads the source
    check = textwrap.dedent(
        f"""
        import torch
        from monai.bundle import ConfigWorkflow
        wf = ConfigWorkflow(config_file={[str(CONFIGS / 'train.json'), str(CONFIGS / 'finetune.json')]!r},
                            workflow_type=None, bundle_root={str(tmp_path)!r}, dataset_dir={str(data)!r},
                            sites=['BMC'], source_ckpt={str(source)!r}, image_size=64, encoder={ENCODER!r})
        wf.initialize()
        import sys; sys.path.insert(1, {str(BUNDLES / BUNDLE)!r})
        net = wf.parser.get_parsed_content('network_def')
        fresh = {{k: v.clone() for k, v in net.state_dict().items()}}
        wf.parser.get_parsed_content('train#handlers')[0]()  # what Events.STARTED runs
        saved = torch.load({str(source)!r}, map_location='cpu', weights_only=True)
        loaded = net.state_dict()
        weights = [k for k in saved if not k.startswith('intensity_')]
        assert loaded.keys() == saved.keys()
        assert all(torch.equal(loaded[k], saved[k]) for k in weights), 'initial weights differ from the source'
        assert not all(torch.equal(fresh[k], saved[k]) for k in weights), 'a fresh network already equals the source?'
        stats = wf.parser.get_parsed_content('train#dataset').intensity_stats()  # the new site's standardisation
        assert abs(float(loaded['intensity_mean']) - stats['mean']) <= 1e-4 * abs(stats['mean'])
        print('INITIAL_WEIGHTS_EQUAL_SOURCE')
        """
    )
    proc = run([sys.executable, "-c", check], cwd=tmp_path)
    assert "INITIAL_WEIGHTS_EQUAL_SOURCE" in proc.stdout
    # and the documented CLI fine-tunes on another site, writing its own checkpoint
    ft = tmp_path / "ft"
    proc = bundle_run(
        BUNDLE, ["train.json", "finetune.json"], cwd=tmp_path, run_id="training",
        bundle_root=str(ft), dataset_dir=str(data), sites=["BMC"], source_ckpt=str(source), epochs=2, **SMALL,
    )
    assert f"initialised the network from {source}" in proc.stdout + proc.stderr
    tuned = torch.load(ft / "models" / "model.pt", map_location="cpu", weights_only=True)
    original = torch.load(source, map_location="cpu", weights_only=True)
    assert any(not torch.equal(tuned[k], original[k]) for k in original if k.endswith("weight"))


def test_inference_keeps_shape_and_affine(trained, tmp_path):
    work, data = trained["work"], trained["data"]
    src = data / "BMC"  # another site, with its own spacing and orientation
    out = tmp_path / "pred"
    bundle_run(
        BUNDLE, ["inference.json"], cwd=tmp_path, run_id="run",
        bundle_root=str(work), dataset_dir=str(src), output_dir=str(out), image_size=64, encoder=ENCODER,
    )
    inputs = sorted(p for p in src.glob("Case*.nii.gz") if "egmentation" not in p.name)
    outputs = sorted(out.glob("*.nii.gz"))
    assert len(outputs) == len(inputs)
    for image in inputs:
        pred_file = out / image.name.replace(".nii.gz", "_seg.nii.gz")
        img, pred = nib.load(image), nib.load(pred_file)
        assert pred.shape == img.shape
        np.testing.assert_allclose(pred.affine, img.affine, atol=1e-5)
        values = np.unique(np.asanyarray(pred.dataobj))
        assert set(values.tolist()) <= {0, 1}


def test_inference_reorients_by_the_header(trained, tmp_path):
    """The same scan stored flipped (another converter, LPS) or with an oblique header gets the same
    mask, in its own geometry: the pipeline reorients to the training orientation and back."""
    work = trained["work"]
    case = json.loads((work / "eval" / "datalist.json").read_text())["test"][0]
    image, truth = nib.load(case["image"]), nib.load(case["label"])
    nx, ny = image.shape[:2]
    flip = np.array([[-1.0, 0, 0, nx - 1], [0, -1.0, 0, ny - 1], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    folder = tmp_path / "in"
    folder.mkdir()
    data = np.asanyarray(image.dataobj)
    nib.save(nib.Nifti1Image(data, image.affine), folder / "original.nii.gz")
    nib.save(nib.Nifti1Image(data[::-1, ::-1].copy(), image.affine @ flip), folder / "flipped.nii.gz")  # same world
    t = np.deg2rad(10.0)
    tilted = image.affine.copy()
    tilted[:3, :3] = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]) @ image.affine[:3, :3]
    nib.save(nib.Nifti1Image(data, tilted), folder / "oblique.nii.gz")
    assert nib.aff2axcodes(image.affine) != nib.aff2axcodes(image.affine @ flip)
    out = tmp_path / "pred"
    bundle_run(BUNDLE, ["inference.json"], cwd=tmp_path, run_id="run", bundle_root=str(work), dataset_dir=str(folder),
               output_dir=str(out), image_size=64, encoder=ENCODER)
    preds = {name: nib.load(out / f"{name}_seg.nii.gz") for name in ("original", "flipped", "oblique")}
    for name, affine in (("original", image.affine), ("flipped", image.affine @ flip), ("oblique", tilted)):
        assert preds[name].shape == image.shape
        np.testing.assert_allclose(preds[name].affine, affine, atol=1e-5)
    mask = {name: np.asanyarray(p.dataobj) > 0 for name, p in preds.items()}
    np.testing.assert_array_equal(mask["flipped"], mask["original"][::-1, ::-1])  # the same world mask
    np.testing.assert_array_equal(mask["oblique"], mask["original"])  # the same scan, other header
    gland = np.asanyarray(truth.dataobj) > 0
    dice = 2 * (mask["original"] & gland).sum() / (mask["original"].sum() + gland.sum())
    assert dice > 0.7, dice

    # the phantom's own oblique case (RUNMC/Case01, 12°): its mask overlaps its true gland
    oblique_case = trained["data"] / "RUNMC" / "Case01.nii.gz"
    one = tmp_path / "oblique_in"
    one.mkdir()
    (one / oblique_case.name).symlink_to(oblique_case)
    bundle_run(BUNDLE, ["inference.json"], cwd=tmp_path, run_id="run", bundle_root=str(work), dataset_dir=str(one),
               output_dir=str(tmp_path / "oblique_pred"), image_size=64, encoder=ENCODER)
    pred = nib.load(tmp_path / "oblique_pred" / "Case01_seg.nii.gz")
    src = nib.load(oblique_case)
    np.testing.assert_allclose(pred.affine, src.affine, atol=1e-5)
    assert abs(src.affine[1, 0]) > 0.1 * abs(src.affine[0, 0]), "the phantom's Case01 is oblique"
    got = np.asanyarray(pred.dataobj) > 0
    true = np.asanyarray(nib.load(str(oblique_case).replace(".nii.gz", "_segmentation.nii.gz")).dataobj) > 0
    assert 2 * (got & true).sum() / (got.sum() + true.sum()) > 0.7


def _break_dataset(data: Path, out: Path) -> dict[str, str]:
    """A copy of RUNMC with a truncated image, a shape mismatch and a missing label."""
    site = out / "RUNMC"
    shutil.copytree(data / "RUNMC", site)
    truncated = site / "Case00.nii.gz"
    raw = truncated.read_bytes()
    truncated.write_bytes(raw[: len(raw) // 2])
    lbl = nib.load(site / "Case01_segmentation.nii.gz")
    small = np.asanyarray(lbl.dataobj)[:-4]
    nib.save(nib.Nifti1Image(small, lbl.affine), site / "Case01_segmentation.nii.gz")
    (site / "Case02_segmentation.nii.gz").unlink()
    return {"RUNMC/Case00": "cannot read", "RUNMC/Case01": "shape mismatch", "RUNMC/Case02": "no label"}


def test_bad_cases_are_reported_and_skipped(data, tmp_path):
    broken = _break_dataset(data, tmp_path / "broken")
    with pytest.raises(Exception):  # the truncated file really is unreadable
        np.asanyarray(nib.load(tmp_path / "broken" / "RUNMC" / "Case00.nii.gz").dataobj)
    work = tmp_path / "work"
    proc = bundle_run(
        BUNDLE, ["train.json"], cwd=tmp_path, run_id="training",
        bundle_root=str(work), dataset_dir=str(tmp_path / "broken"), sites=["RUNMC"], epochs=1, n_folds=3, **SMALL,
    )
    report = {b["case"]: b for b in json.loads((work / "eval" / "bad_cases.json").read_text())}
    assert set(report) == set(broken)
    for case, reason in broken.items():
        assert reason in report[case]["reason"]
        assert Path(report[case]["file"]).name.startswith(case.split("/")[1])
        assert case in proc.stdout + proc.stderr  # reported on the console too
    datalist = json.loads((work / "eval" / "datalist.json").read_text())
    used = {c["case"] for k in ("training", "validation", "test") for c in datalist[k]}
    assert used == {f"RUNMC/Case{i:02d}" for i in range(3, 8)}
    assert (work / "models" / "model.pt").is_file()


def test_ddp_two_cpu_processes(data, tmp_path):
    """multi_gpu_train.json under torchrun with gloo: completes and saves one checkpoint."""
    files = json.dumps([str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")])
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
        "-m", "monai.bundle", "run", "training", "--config_file", files,
        "--bundle_root", str(tmp_path), "--dataset_dir", str(data), "--sites", "['BMC']", "--epochs", "2",
        "--image_size", "64", "--encoder", ENCODER, "--batch_size", "4",
    ]
    run(cmd, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    saved = sorted(p.relative_to(tmp_path / "models") for p in (tmp_path / "models").rglob("*.pt"))
    assert saved == [Path("model.pt"), Path("resume/checkpoint.pt")]
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in state), "DDP wrapper must not leak into the saved weights"



def test_pretrained_path_loads_a_local_imagenet_encoder(tmp_path):
    """``pretrained_path``: a 3-channel ImageNet encoder checkpoint, adapted to 1 input channel as smp does."""
    check = textwrap.dedent(
        f"""
        import sys, torch, segmentation_models_pytorch as smp
        sys.path.insert(0, {str(BUNDLES / BUNDLE)!r})
        from scripts.net import ProstateSegNet
        torch.manual_seed(0)
        source = smp.encoders.get_encoder("resnet18", in_channels=3, weights=None)
        torch.save(source.state_dict(), "encoder.pt")
        net = ProstateSegNet(arch="Unet", encoder_name="resnet18", pretrained_path="encoder.pt")
        got, ref = net.model.encoder.state_dict(), source.state_dict()
        assert got["conv1.weight"].shape[1] == 1
        assert torch.allclose(got["conv1.weight"], ref["conv1.weight"].sum(1, keepdim=True))
        assert all(torch.equal(got[k], ref[k]) for k in ref if k != "conv1.weight" and k in got)
        fresh = ProstateSegNet(arch="Unet", encoder_name="resnet18")
        assert not torch.equal(fresh.model.encoder.state_dict()["layer1.0.conv1.weight"], ref["layer1.0.conv1.weight"])
        # the published checkpoint's classifier is ignored, as smp does
        torch.save({{**source.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}}, "with_fc.pt")
        ProstateSegNet(arch="Unet", encoder_name="resnet18", pretrained_path="with_fc.pt")
        # a partial match (another encoder's file, a truncated one) is refused, never half-loaded
        partial = {{k: v for k, v in source.state_dict().items() if not k.startswith("layer4")}}
        torch.save(partial, "partial.pt")
        try:
            ProstateSegNet(arch="Unet", encoder_name="resnet18", pretrained_path="partial.pt")
            raise AssertionError("a partial encoder checkpoint was accepted")
        except ValueError as e:
            assert "partial.pt is not a complete 'resnet18' encoder" in str(e) and "missing" in str(e), e
        torch.save(smp.encoders.get_encoder("resnet34", in_channels=3, weights=None).state_dict(), "resnet34.pt")
        try:
            ProstateSegNet(arch="Unet", encoder_name="resnet18", pretrained_path="resnet34.pt")
            raise AssertionError("another encoder's checkpoint was accepted")
        except ValueError as e:
            assert "unexpected" in str(e), e
        print("PRETRAINED_OK")
        """
    )
    proc = run([sys.executable, "-c", check], cwd=tmp_path)
    assert "PRETRAINED_OK" in proc.stdout


REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "prostate"


@pytest.mark.skipif(not (REAL / "RUNMC").is_dir(), reason="../shared/data/prostate is absent (see its README)")
def test_real_scans_short_training_eval_mode_and_inference(tmp_path):
    """Three real NCI-ISBI T2 volumes: a short run trained on one and validated on another, then
    inference on the held-out third.

    On the two cases the run saw, eval mode (BatchNorm running statistics) must score like batch
    statistics; the held-out case's mask keeps the scan's geometry and overlaps the gland.
    """
    args = dict(dataset_dir=str(REAL), sites=["RUNMC"], n_folds=2, image_size=128, encoder=ENCODER, batch_size=4,
                cache_dir=str(tmp_path / "cache"))
    bundle_run(BUNDLE, ["train.json"], cwd=tmp_path, run_id="training", bundle_root=str(tmp_path), epochs=30, **args)
    run([sys.executable, str(REPO / "scripts" / "prostate_bn_check.py"), "score", str(tmp_path), "--overrides", repr(args)],
        cwd=tmp_path)
    rows = {r["case"]: r for r in json.loads((tmp_path / "eval" / "bn_score.json").read_text())}
    datalist = json.loads((tmp_path / "eval" / "datalist.json").read_text())
    seen = [c["case"] for c in datalist["training"] + datalist["validation"]]
    for case in seen:
        r = rows[case]
        assert r["train_mode_dice"] > 50, r
        assert abs(r["eval_dice"] - r["train_mode_dice"]) < 10, r  # running statistics caught up

    test_case = datalist["test"][0]
    held_out = tmp_path / "held_out"  # the test case alone (inference reads every image of a folder)
    held_out.mkdir()
    (held_out / Path(test_case["image"]).name).symlink_to(test_case["image"])
    out = tmp_path / "pred"
    bundle_run(BUNDLE, ["inference.json"], cwd=tmp_path, run_id="run", bundle_root=str(tmp_path),
               dataset_dir=str(held_out), output_dir=str(out), image_size=128, encoder=ENCODER)
    image = nib.load(test_case["image"])
    pred = nib.load(out / Path(test_case["image"]).name.replace(".nii.gz", "_seg.nii.gz"))
    assert pred.shape == image.shape
    np.testing.assert_allclose(pred.affine, image.affine, atol=1e-4)
    mask, gland = np.asanyarray(pred.dataobj) > 0, np.asanyarray(nib.load(test_case["label"]).dataobj) > 0
    dice = 2 * (mask & gland).sum() / (mask.sum() + gland.sum())
    print(f"held-out real case {test_case['case']}: Dice {100 * dice:.1f} %; per case {rows}")
    assert dice > 0.25, dice  # measured 43.3 % (30 epochs) and 33.8 % (40 epochs, other run): one training case
