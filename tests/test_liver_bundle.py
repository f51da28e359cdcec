"""bundles/liver_ct_mri_transfer: the network's structure, CT slice sampling, and the CT -> MRI
chain through the documented MONAI CLI on phantoms (subprocesses from a temporary directory)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import BUNDLES, assert_ddp_evaluation_matches, assert_progress_eta, bundle_run, make_phantoms, run

BUNDLE = "liver_ct_mri_transfer"
ROOT = BUNDLES / BUNDLE
SMALL = {"image_size": 64, "channels": [8, 16, 32, 64]}


def _bundle_module(name: str):
    """Import one of the bundle's scripts modules in a throw-away namespace (no `scripts` clash)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"liver_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unet_structure():
    net_mod = _bundle_module("net")
    from torch import nn

    net = net_mod.ResidualUNet(in_channels=1, out_channels=2, channels=(8, 16, 32, 64))
    assert len(net.encoder) == 4 and len(net.decoder) == 3  # 4 resolution levels
    for i, block in enumerate([*net.encoder, *net.decoder]):
        for layer in (block.conv1, block.conv2):
            kinds = [type(m) for m in layer]
            core = [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
            if i < len(net.encoder):
                assert kinds == core, "contracting path: conv, BN, ReLU, no dropout"
            else:
                assert kinds == [nn.Dropout, *core] and layer[0].p == 0.5, "plain dropout 0.5 before each expanding conv"
            assert layer[-3].kernel_size == (3, 3)
    assert net.head.out_channels == 2
    # the short skip really adds: silence the second conv and the block returns its shortcut
    block = net.encoder[1].eval()
    nn.init.zeros_(block.conv2[1].weight)
    nn.init.zeros_(block.conv2[1].bias)
    x = torch.rand(2, 8, 16, 16)
    assert torch.allclose(block(x), block.shortcut(x))
    # long skips: the decoder block sees the upsampled features concatenated with the encoder's
    assert net.decoder[0].conv1[1].in_channels == 2 * 32
    assert net(torch.rand(1, 1, 32, 32)).shape == (1, 2, 32, 32)


def test_ct_slice_sampling_counts():
    data = _bundle_module("data")
    has_liver = np.zeros(100, bool)
    has_liver[40:80] = True  # 40 liver slices
    idx = data.sample_slice_indices(has_liver, n_liver=30, n_background=20)
    assert len(idx) == 50
    assert sum(has_liver[idx]) == 30 and sum(~has_liver[idx]) == 20
    assert sorted(k for k in idx if not has_liver[k]) == list(range(30, 40)) + list(range(80, 90))  # adjacent
    short = np.zeros(10, bool)
    short[2:6] = True  # fewer than asked: all 4 liver slices, and the 6 liver-free ones
    assert data.sample_slice_indices(short, 30, 20) == list(range(10))
    assert data.sample_slice_indices(np.zeros(5, bool)) == []
    # the dictionary transform on a hand-built CT volume: liver (1) in slices 40-79, tumour (2) in 50-54
    label = torch.zeros(1, 8, 8, 100)
    label[:, 2:6, 2:6, 40:80] = 1
    label[:, 3:5, 3:5, 50:55] = 2
    out = data.SampleLiverSlicesd(["image", "label"], n_liver=30, n_background=20)(
        {"image": torch.rand(1, 8, 8, 100), "label": label, "case": "volume-0"})
    assert len(out) == 50 and all(o["case"] == "volume-0" and o["image"].shape == (1, 8, 8) for o in out)
    assert sum(bool((o["label"] >= 1).any()) for o in out) == 30
    assert [o["slice_index"] for o in out] == sorted(idx)


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    """pretrain_ct, then the three MRI transfer modes, through the CLI."""
    work = tmp_path_factory.mktemp("liver")
    ct = make_phantoms("liver_ct", work / "lits", cwd=work, cases=4, shape="(64,64,24)")
    mri = make_phantoms("liver_mri", work / "mri", cwd=work, cases=10, shape="(64,52,16)")
    ct_root = work / "ct_run"
    bundle_run(BUNDLE, ["train.json", "pretrain_ct.json"], cwd=work, run_id="training", bundle_root=str(ct_root),
               dataset_dir=str(ct), epochs=2, val_fraction=0.25, n_liver_slices=10, n_background_slices=6, **SMALL)
    source = ct_root / "models" / "ct" / "model.pt"
    runs = {}
    for mode in ("scratch", "finetune", "finetune_freeze"):
        runs[mode] = work / mode
        bundle_run(BUNDLE, ["train.json"], cwd=work, run_id="training", bundle_root=str(runs[mode]), dataset_dir=str(mri),
                   transfer=mode, source_ckpt=str(source), epochs=2, batch_size=8, **SMALL)
    return {"work": work, "ct": ct, "mri": mri, "source": source, "runs": runs}


def test_ct_pretraining_samples_and_saves_two_channel_model(chain):
    state = torch.load(chain["source"], map_location="cpu", weights_only=True)
    assert state["head.weight"].shape[0] == 2
    datalist = json.loads((chain["source"].parents[2] / "eval" / "ct" / "datalist_ct.json").read_text())
    assert {c["case"] for c in datalist["training"] + datalist["validation"]} == {f"volume-{n}" for n in range(4)}


def test_mri_cleaning_report(chain):
    report = json.loads((chain["runs"]["scratch"] / "eval" / "bad_cases.json").read_text())
    reasons = {b["case"]: b["reason"] for b in report}
    assert set(reasons) == {"case_001", "case_002"}
    assert "shape mismatch" in reasons["case_001"] and reasons["case_002"] == "no label file"
    datalist = json.loads((chain["runs"]["scratch"] / "eval" / "datalist_mri.json").read_text())
    assert [c["case"] for c in datalist["test"]] == ["case_006", "case_007", "case_008", "case_009"]  # the last 4


def test_initial_weights_of_models_a_and_b(chain, tmp_path):
    check = textwrap.dedent(
        f"""
        import sys, torch
        from monai.bundle import ConfigWorkflow
        sys.path.insert(1, {str(ROOT)!r})
        source = torch.load({str(chain['source'])!r}, map_location='cpu', weights_only=True)
        for mode in ('finetune', 'scratch'):
            wf = ConfigWorkflow(config_file={str(ROOT / 'configs' / 'train.json')!r}, workflow_type=None,
                                bundle_root={str(tmp_path)!r}, dataset_dir={str(chain['mri'])!r}, transfer=mode,
                                source_ckpt={str(chain['source'])!r}, image_size=64, channels=[8, 16, 32, 64])
            wf.initialize()
            net = wf.parser.get_parsed_content('train#transfer')
            state = net.state_dict()
            same = [torch.equal(state[k], source[k][1:2] if k.startswith('head.') else source[k]) for k in source]
            print(mode, 'ALL_EQUAL' if all(same) else 'DIFFERENT', sum(same), len(same))
        """
    )
    out = run([sys.executable, "-c", check], cwd=tmp_path).stdout
    assert "finetune ALL_EQUAL" in out, out  # model B starts from the CT model, tumour head included
    assert "scratch DIFFERENT" in out, out  # model A does not


def test_model_c_keeps_first_two_levels_bit_identical(chain):
    source = torch.load(chain["source"], map_location="cpu", weights_only=True)
    tuned = torch.load(chain["runs"]["finetune_freeze"] / "models" / "resume" / "checkpoint.pt", map_location="cpu",
                       weights_only=True)["model"]
    frozen = [k for k in source if k.startswith(("encoder.0.", "encoder.1."))]
    assert frozen and all(torch.equal(tuned[k], source[k]) for k in frozen), "frozen levels changed"
    trained = [k for k in source if k.endswith("weight") and not k.startswith(("encoder.0.", "encoder.1.", "head."))]
    assert all(not torch.equal(tuned[k], source[k]) for k in trained if "conv" in k or "up" in k)
    b = torch.load(chain["runs"]["finetune"] / "models" / "resume" / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    assert any(not torch.equal(b[k], source[k]) for k in frozen), "model B trains its first levels"


def test_evaluate_and_inference(chain, tmp_path):
    run_root = chain["runs"]["finetune"]
    proc = bundle_run(BUNDLE, ["train.json", "evaluate.json"], cwd=tmp_path, run_id="evaluating",
                      bundle_root=str(run_root), dataset_dir=str(chain["mri"]), **SMALL)
    assert_progress_eta(proc.stdout, "evaluating")
    metrics = json.loads((run_root / "eval" / "metrics.json").read_text())
    assert [r["case"] for r in metrics["cases"]] == ["case_006", "case_007", "case_008", "case_009"]
    assert all(0.0 <= r["dice"] <= 100.0 for r in metrics["cases"]) and list((run_root / "eval" / "overlays").glob("*.png"))
    new = tmp_path / "new"
    new.mkdir()
    for case in ("case_008", "case_009"):
        img = nib.load(chain["mri"] / case / "artery.nii.gz")
        nib.save(img, new / f"{case}.nii")  # .nii and .nii.gz both read
    out = tmp_path / "out"
    bundle_run(BUNDLE, ["inference.json"], cwd=tmp_path, bundle_root=str(run_root), dataset_dir=str(new),
               output_dir=str(out), **SMALL)
    for case in ("case_008", "case_009"):
        src, pred = nib.load(new / f"{case}.nii"), nib.load(out / f"{case}_seg.nii.gz")
        assert pred.shape == src.shape
        np.testing.assert_allclose(pred.affine, src.affine, atol=1e-5)
        assert set(np.unique(np.asanyarray(pred.dataobj)).tolist()) <= {0, 1}



def test_multi_gpu_evaluate_matches_one_process(chain, tmp_path):
    """multi_gpu_evaluate.json in 2 CPU processes: the same per-case table as one process."""
    run_root = chain["runs"]["finetune"]
    args = dict(bundle_root=str(run_root), dataset_dir=str(chain["mri"]), **SMALL)
    if not (run_root / "eval" / "metrics.json").is_file():  # run alone: the one-process evaluation first
        bundle_run(BUNDLE, ["train.json", "evaluate.json"], cwd=tmp_path, run_id="evaluating", **args)
    assert_ddp_evaluation_matches(BUNDLE, run_root / "eval", tmp_path, ["metrics.json"], **args)


def test_ddp_two_cpu_processes_with_frozen_levels(chain, tmp_path):
    """multi_gpu_train.json under torchrun (gloo): model C trains in 2 processes and saves one checkpoint."""
    configs = ROOT / "configs"
    files = json.dumps([str(configs / "train.json"), str(configs / "multi_gpu_train.json")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29534",
           "-m", "monai.bundle", "run", "training", "--config_file", files, "--bundle_root", str(tmp_path),
           "--dataset_dir", str(chain["mri"]), "--epochs", "1", "--image_size", "64", "--channels", "[8,16,32,64]",
           "--transfer", "finetune_freeze", "--source_ckpt", str(chain["source"]), "--batch_size", "4"]
    run(cmd, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    saved = sorted(p.relative_to(tmp_path / "models") for p in (tmp_path / "models").rglob("*.pt"))
    assert saved == [Path("model.pt"), Path("resume/checkpoint.pt")]


def test_mri_test_cases_are_the_last_in_natural_order(tmp_path):
    """"Last 4 cases as test": case10 and case11 come after case9, not between case1 and case2."""
    data = _bundle_module("data")
    for i in range(1, 12):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        for stem in ("artery", "label"):
            nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.uint8), np.eye(4)), folder / f"{stem}.nii.gz")
    names = [c["case"] for c in data.find_mri_cases(str(tmp_path))]
    assert names == [f"case{i}" for i in range(1, 12)]
    split = data.prepare_mri_datalist(str(tmp_path), n_test=4, n_val=1)
    assert [c["case"] for c in split["test"]] == ["case8", "case9", "case10", "case11"]


def test_mri_transfer_at_native_size_without_validation(chain, tmp_path):
    """n_val 0, as in the report: no validation case, the last epoch's weights become model.pt.

    At the default ``image_size`` (null) the 64×52 MRI slices are trained at their native size,
    padded to 64×56 (a multiple of 8), from the CT model trained at 64×64; inference returns
    masks in each input's geometry.
    """
    root = tmp_path / "no_val"
    native = {"channels": SMALL["channels"]}
    bundle_run(BUNDLE, ["train.json"], cwd=tmp_path, run_id="training", bundle_root=str(root), dataset_dir=str(chain["mri"]),
               transfer="finetune", source_ckpt=str(chain["source"]), epochs=2, batch_size=8, n_val=0, **native)
    datalist = json.loads((root / "eval" / "datalist_mri.json").read_text())
    assert datalist["validation"] == [] and len(datalist["test"]) == 4 and len(datalist["training"]) == 4
    final = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    resume = torch.load(root / "models" / "resume" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(final[k], resume["model"][k]) for k in final), "model.pt is the final epoch's model"
    curves = (root / "eval" / "learning_curves.csv").read_text().splitlines()
    assert len(curves) == 3 and curves[-1].split(",")[0] == "2"
    out, folder = tmp_path / "pred", tmp_path / "held_out"
    folder.mkdir()
    oblique = chain["mri"] / "case_003" / "artery.nii.gz"  # LPS with an oblique header
    inputs = {"test": datalist["test"][0]["image"], "oblique": str(oblique)}
    for name, src in inputs.items():
        (folder / f"{name}.nii.gz").symlink_to(src)
    bundle_run(BUNDLE, ["inference.json"], cwd=tmp_path, run_id="run", bundle_root=str(root),
               dataset_dir=str(folder), output_dir=str(out), **native)
    assert nib.aff2axcodes(nib.load(oblique).affine) == ("L", "P", "S")
    for name, src in inputs.items():
        image, pred = nib.load(src), nib.load(out / f"{name}_seg.nii.gz")
        assert pred.shape == image.shape == (64, 52, 16)
        np.testing.assert_allclose(pred.affine, image.affine, atol=1e-5)


def test_mri_intensity_scaling_ignores_outliers():
    """A few hot voxels must not squeeze the tissue into the bottom of [0, 1] (min-max scaling did)."""
    check = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from monai.bundle import ConfigParser
        parser = ConfigParser()
        parser.read_config({str(ROOT / "configs" / "train.json")!r})
        scale = [t for t in parser.get_parsed_content("train#preprocessing").transforms
                 if type(t).__name__ == "ScaleIntensityRangePercentilesd"][0]
        image = torch.rand(1, 32, 32, 4) * 100 + 100
        image[0, 0, 0, 0] = 1e6
        out = scale({{"image": image}})["image"]
        assert float(out.max()) <= 1.0 and float(out.median()) > 0.3, float(out.median())
        print("SCALING_OK")
        """
    )
    assert "SCALING_OK" in run([sys.executable, "-c", check], cwd=ROOT).stdout


def test_ct_and_mri_phantoms_agree_in_world_orientation(chain):
    """Reoriented by their headers (CT stored as RAS, MRI as LPS, one MRI case oblique) both show
    the liver on the same side: the transfer sees one anatomy, not a mirror image."""
    ct = nib.as_closest_canonical(nib.load(next(chain["ct"].rglob("segmentation-0.nii"))))
    raw_mri = nib.load(chain["mri"] / "case_003" / "label.nii.gz")
    mri = nib.as_closest_canonical(raw_mri)
    assert nib.aff2axcodes(raw_mri.affine) == ("L", "P", "S") and nib.aff2axcodes(mri.affine) == ("R", "A", "S")
    liver_x = np.nonzero(np.asanyarray(ct.dataobj) >= 1)[0].mean() / ct.shape[0]
    tumour_x = np.nonzero(np.asanyarray(mri.dataobj) > 0)[0].mean() / mri.shape[0]  # tumours lie in the liver
    assert (liver_x - 0.5) * (tumour_x - 0.5) > 0, (liver_x, tumour_x)
    # stored as it is, the MRI array is the mirror image
    stored_x = np.nonzero(np.asanyarray(raw_mri.dataobj) > 0)[0].mean() / raw_mri.shape[0]
    assert (liver_x - 0.5) * (stored_x - 0.5) < 0, (liver_x, stored_x)
