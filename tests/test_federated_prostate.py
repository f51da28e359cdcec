"""Federated prostate training on NVIDIA FLARE (scripts/federated_prostate.py) on a tiny three-site phantom."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import BUNDLES, REPO, bundle_run, make_phantoms, run

pytest.importorskip("nvflare", reason="federated training needs the fl extra: pip install -e '.[fl]'")

BUNDLE = "prostate_mri_transfer"
SITES = ["RUNMC", "BMC", "I2CVB"]
TOOL = REPO / "scripts" / "federated_prostate.py"
SMALL = {"encoder": "efficientnet-b0", "batch_size": 8}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fl_data")
    return make_phantoms("prostate", root / "data", cwd=root, cases_per_site=5, shape="(64,64,12)", seed=2)


def fl_run(data: Path, out: Path, workflow: str, cache: Path, **options) -> Path:
    overrides = {**SMALL, "cache_dir": str(cache)}
    cmd = [sys.executable, str(TOOL), "run", str(data), str(out), "--sites", repr(SITES), "--workflow", workflow,
           "--rounds", "2", "--local_epochs", "1", "--image_size", "64", "--overrides", repr(overrides)]
    for key, value in options.items():
        cmd += [f"--{key}", str(value)]
    run(cmd, cwd=out.parent, timeout=900)
    return out


@pytest.fixture(scope="module")
def fedavg(tmp_path_factory, data) -> Path:
    root = tmp_path_factory.mktemp("fl_fedavg")
    return fl_run(data, root / "out", "fedavg", data.parent / "cache")


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_changes_every_round(out: Path) -> None:
    states = [load(out / "rounds" / f) for f in ("round_init.pt", "round_000.pt", "round_001.pt")]
    for before, after in zip(states, states[1:]):
        changed = [k for k in before if k.endswith("weight") and not torch.equal(before[k], after[k])]
        assert changed, "a round left the global weights unchanged"
    assert all(torch.equal(states[-1][k], v) for k, v in load(out / "model.pt").items())


def test_fedavg_runs_in_the_simulator_and_changes_the_model_every_round(fedavg):
    assert_changes_every_round(fedavg)
    metrics = json.loads((fedavg / "metrics.json").read_text())
    assert metrics["workflow"] == "fedavg" and len(metrics["rounds"]) == 2
    rows = list(csv.DictReader(open(fedavg / "val_dice.csv")))
    assert [(int(r["round"]), r["site"]) for r in rows] == [(i, s) for i in range(2) for s in SITES]
    assert all(0 <= float(r["val_dice"]) <= 100 for r in rows)
    assert (fedavg / "val_dice.png").stat().st_size > 0
    # the exported job: one server app, one app per site, deployable as it is
    job = fedavg / "job" / "prostate_fedavg"
    server = json.loads((job / "app_server" / "config" / "config_fed_server.json").read_text())
    assert server["workflows"][0]["path"] == "fl_prostate.ProstateFLController"
    assert server["workflows"][0]["args"]["workflow"] == "fedavg"
    for site in SITES:
        assert (job / f"app_{site}" / "custom" / "fl_prostate_client.py").is_file()


def test_each_site_reads_only_its_own_folder(fedavg, data):
    for site in SITES:
        log = (fedavg / "sites" / site / "fl_client.log").read_text()
        assert f"site {site}: reads only {data / site}" in log
        for other in set(SITES) - {site}:
            assert str(data / other) not in log, f"{site}'s log names {other}'s folder"
        datalist = json.loads((fedavg / "sites" / site / "eval" / "datalist.json").read_text())
        files = [c[k] for split in ("training", "validation", "test") for c in datalist[split] for k in ("image", "label")]
        assert files and all(Path(f).parent == data / site for f in files)


def test_federated_intensity_statistics_equal_the_pooled_training_slices(fedavg, data):
    """The server's statistics from per-site sums equal those of one dataset of all sites' training slices."""
    check = textwrap.dedent(
        f"""
        import json, sys
        from monai.bundle import ConfigWorkflow
        sys.path.insert(1, {str(BUNDLES / BUNDLE)!r})
        wf = ConfigWorkflow(config_file={str(BUNDLES / BUNDLE / 'configs' / 'train.json')!r}, workflow_type=None,
                            logging_file=False, bundle_root={str(data.parent / 'pooled')!r}, dataset_dir={str(data)!r},
                            sites={SITES!r}, cache_dir={str(data.parent / 'cache')!r}, image_size=64,
                            encoder='efficientnet-b0')
        wf.initialize()
        ds = wf.parser.get_parsed_content('train#dataset')
        print('POOLED' + json.dumps({{**ds.intensity_stats(), 'slices': len(ds)}}))
        """
    )
    proc = run([sys.executable, "-c", check], cwd=data.parent)
    pooled = json.loads(proc.stdout.split("POOLED")[-1])
    metrics = json.loads((fedavg / "metrics.json").read_text())
    assert sum(metrics["train_slices"].values()) == pooled["slices"]
    assert metrics["intensity_stats"]["mean"] == pytest.approx(pooled["mean"], rel=1e-12)
    assert metrics["intensity_stats"]["std"] == pytest.approx(pooled["std"], rel=1e-12)
    model = load(fedavg / "model.pt")  # float32 buffers, in every round's model
    assert float(model["intensity_mean"]) == pytest.approx(pooled["mean"], rel=1e-6)
    assert float(model["intensity_std"]) == pytest.approx(pooled["std"], rel=1e-6)


def test_global_model_loads_into_inference_and_gives_masks_in_input_geometry(fedavg, data, tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes((fedavg / "model.pt").read_bytes())
    src, out = data / "BMC", tmp_path / "pred"
    bundle_run(BUNDLE, ["inference.json"], cwd=tmp_path, run_id="run", bundle_root=str(tmp_path),
               dataset_dir=str(src), output_dir=str(out), image_size=64, encoder="efficientnet-b0")
    image = src / "Case00.nii.gz"
    pred = nib.load(out / "Case00_seg.nii.gz")
    assert pred.shape == nib.load(image).shape
    np.testing.assert_allclose(pred.affine, nib.load(image).affine, atol=1e-5)


def test_cyclic_visits_every_site_in_a_random_order_each_round(tmp_path, data):
    out = fl_run(data, tmp_path / "out", "cyclic", data.parent / "cache", order="random", seed=3)
    assert_changes_every_round(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["workflow"] == "cyclic" and len(metrics["orders"]) == 2
    assert all(sorted(order) == sorted(SITES) for order in metrics["orders"])
    # seeded: the order of round r is SITES shuffled by random.Random(seed * 100003 + r), not the fixed one
    expected = []
    for r in range(2):
        order = list(SITES)
        random.Random(3 * 100003 + r).shuffle(order)
        expected.append(order)
    assert metrics["orders"] == expected and expected != [SITES, SITES]
    assert len(list(csv.DictReader(open(out / "val_dice.csv")))) == 2 * len(SITES)


def test_fedavg_round_weights_sites_by_training_slices_and_keeps_the_statistics():
    """Known answer: two sites with 1 and 3 training slices -> (1 a + 3 b) / 4; integer buffers stay integers;
    the standardisation buffers are the pooled ones, not an average."""
    sys.path.insert(0, str(REPO / "scripts"))
    from fl_prostate import ProstateFLController
    from nvflare.app_common.abstract.fl_model import FLModel
    from nvflare.app_common.workflows.base_fedavg import BaseFedAvg

    ctl = ProstateFLController(workflow="fedavg", num_rounds=1, sites=["S1", "S2"])
    ctl.slices = {"S1": 1, "S2": 3}
    ctl.stats = {"mean": 5.0, "std": 2.0}
    ctl.current_round = 0
    a = {"w": np.array([0.0, 4.0], np.float32), "n": np.array(10, np.int64), "intensity_mean": np.array(5.0, np.float32),
         "intensity_std": np.array(2.0, np.float32)}
    b = {"w": np.array([8.0, 0.0], np.float32), "n": np.array(15, np.int64), "intensity_mean": np.array(1.0, np.float32),
         "intensity_std": np.array(9.0, np.float32)}
    ctl._ask = lambda task, params, targets, meta=None: {"S1": FLModel(params=a, meta={"site": "S1"}),
                                                             "S2": FLModel(params=b, meta={"site": "S2"})}
    ctl.aggregate = BaseFedAvg.aggregate_fn
    params = ctl._set_stats(ctl.fedavg_round(dict(a), ["S1", "S2"]))
    np.testing.assert_allclose(params["w"], [6.0, 1.0])
    assert params["n"].dtype == np.int64 and int(params["n"]) == 14  # 13.75 rounded, not truncated
    assert float(params["intensity_mean"]) == 5.0 and float(params["intensity_std"]) == 2.0


def test_client_refuses_overrides_that_would_undo_federated_training(tmp_path):
    """A site's --resume / --init_weights / --sites ... would replace the global model or read other folders."""
    client = REPO / "scripts" / "fl_prostate_client.py"
    for flag, value in (("resume", "True"), ("init_weights", "/x/model.pt"), ("sites", "['BMC']")):
        proc = subprocess.run([sys.executable, str(client), f"--{flag}", value], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode != 0 and f"['{flag}'] are set by federated training itself" in proc.stderr, proc.stderr
