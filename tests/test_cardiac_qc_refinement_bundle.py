"""bundles/cardiac_qc_refinement: QC autoencoder size, threshold/selection logic on hand-made lists,
preprocessing, and the whole chain (segmenter, QC, evaluation, inference with QC reports,
refinement) through the documented MONAI CLI on phantoms, in subprocesses from a temporary directory."""

from __future__ import annotations

import csv
import importlib
import importlib.util
import json
import math
import shutil
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import BUNDLES, assert_ddp_evaluation_matches, assert_progress_eta, bundle_run, make_phantoms, run
from monai.losses import GeneralizedDiceLoss
from monai.networks.utils import one_hot

BUNDLE = "cardiac_qc_refinement"
ROOT = BUNDLES / BUNDLE
SMALL = {"image_size": 64, "filters": [8, 16, 32, 64], "deep_supr_num": 2}
ADAM = "$torch.optim.Adam(@network.parameters(), lr=0.002)"  # short CI runs; the default is the paper's SGD


def _scripts():
    """Import the bundle's `scripts` package under another name (no clash with other bundles)."""
    name = "cardiac_scripts"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "scripts")])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return {m: importlib.import_module(f"{name}.{m}") for m in ("net", "qc", "data", "losses", "refine", "handlers")}


# --------------------------------------------------------------------------------------- units
def test_qc_autoencoder_has_779176_parameters_and_segmenter_returns_one_tensor_in_eval():
    s = _scripts()
    ae = s["net"].QCAutoencoder(4)
    assert sum(p.numel() for p in ae.parameters()) == 779_176
    assert ae.encoder(torch.rand(1, 4, 256, 256)).shape == (1, 100, 4, 4)
    out = ae.eval()(torch.rand(2, 4, 256, 256))
    assert out.shape == (2, 4, 256, 256) and torch.allclose(out.sum(1), torch.ones(2, 256, 256), atol=1e-5)
    seg = s["net"].CardiacSegmenter(filters=[8, 16, 32, 64], deep_supr_num=2)
    assert seg.train()(torch.rand(2, 1, 64, 64)).shape == (2, 3, 4, 64, 64)  # stacked deep supervision
    assert seg.eval()(torch.rand(2, 1, 64, 64)).shape == (2, 4, 64, 64)
    default = s["net"].CardiacSegmenter()
    assert len(default.filters) == 7 and list(default.filters) == [32, 64, 128, 256, 480, 480, 480]


def test_thresholds_ood_and_selection_on_hand_made_lists():
    qc = _scripts()["qc"]
    pdc = [0.90, 0.92, 0.91, 0.89, 0.93, 0.20]
    phd = [3.0, 4.0, 3.5, 5.0, 4.5, 40.0, math.inf]
    th = qc.iqr_thresholds(pdc, phd)
    q1, q3 = np.percentile(pdc, [25, 75])
    assert th["th_low"] == pytest.approx(q1 - 1.5 * (q3 - q1))
    h1, h3 = np.percentile(phd[:-1], [25, 75])  # infinite HD is left out of the quartiles
    assert th["th_up"] == pytest.approx(h3 + 1.5 * (h3 - h1))
    assert qc.iqr_thresholds([], [math.inf]) == {"th_low": -math.inf, "th_up": 0.0}
    # OoD only when EVERY candidate fails one of the two tests; infinite HD always fails
    assert qc.is_ood([0.5, 0.6], [3.0, 4.0], th_low=0.8, th_up=10.0)
    assert not qc.is_ood([0.5, 0.9], [3.0, 4.0], th_low=0.8, th_up=10.0)
    assert qc.is_ood([0.95, 0.5], [math.inf, 4.0], th_low=0.8, th_up=10.0)
    assert qc.is_ood([0.95, 0.9], [12.0, 11.0], th_low=0.8, th_up=10.0)
    # selection: rank by pDC, first with pHD < th_up
    assert qc.select_candidate([0.8, 0.9, 0.85], [5.0, 12.0, 6.0], th_up=10.0) == {"rule": "ranked", "model": 2}
    assert qc.select_candidate([0.8, 0.9, 0.85], [5.0, 9.0, 6.0], th_up=10.0) == {"rule": "ranked", "model": 1}
    # none passes -> average of best-by-pDC and best-by-pHD
    assert qc.select_candidate([0.8, 0.9, 0.85], [15.0, 30.0, 12.0], th_up=10.0) == {"rule": "average", "models": [1, 2]}
    # infinite HD never passes, even with th_up = inf
    assert qc.select_candidate([0.9, 0.1], [math.inf, math.inf], th_up=math.inf)["rule"] == "average"
    assert qc.select_candidate([0.9, 0.1], [math.inf, 3.0], th_up=math.inf) == {"rule": "ranked", "model": 1}


def test_threshold_pooling_phase_split_and_ood_rules_on_hand_made_lists():
    qc = _scripts()["qc"]
    rows = [{"pDC": [0.90, 0.70], "pHD": [3.0, 9.0], "phase": "ED"},
            {"pDC": [0.80, 0.95], "pHD": [6.0, 2.0], "phase": "ES"},
            {"pDC": [0.85, 0.88], "pHD": [4.0, math.inf], "phase": "ED"},
            {"pDC": [0.60, 0.91], "pHD": [12.0, 5.0], "phase": "ES"}]
    # the empty prediction's pair (0.88, inf) is a failure, left out of both lists
    assert qc.pooled_measures(rows, "all_pairs") == ([0.9, 0.7, 0.8, 0.95, 0.85, 0.6, 0.91],
                                                     [3.0, 9.0, 6.0, 2.0, 4.0, 12.0, 5.0])
    # the authors' code: per volume the best pDC (max) and the best pHD (min)
    assert qc.pooled_measures(rows, "best_of") == ([0.9, 0.95, 0.85, 0.91], [3.0, 2.0, 4.0, 5.0])
    th = qc.set_thresholds(rows, "best_of")
    d1, d3 = np.percentile([0.9, 0.95, 0.85, 0.91], [25, 75])
    h1, h3 = np.percentile([3.0, 2.0, 4.0, 5.0], [25, 75])
    assert (th["th_low"], th["th_up"]) == pytest.approx((d1 - 1.5 * (d3 - d1), h3 + 1.5 * (h3 - h1)))
    assert "by_phase" not in th and qc.thresholds_of(th, "ED") == (th["th_low"], th["th_up"])
    split = qc.set_thresholds(rows, "all_pairs", split_by_phase=True)
    ed = qc.iqr_thresholds([0.9, 0.7, 0.85], [3.0, 9.0, 4.0])
    assert qc.thresholds_of(split, "ED") == pytest.approx((ed["th_low"], ed["th_up"]))
    assert qc.thresholds_of(split, None) == (split["th_low"], split["th_up"])  # no phase: the pooled thresholds
    with pytest.raises(ValueError, match="threshold_pooling"):
        qc.pooled_measures(rows, "mean")
    # candidate A fails on pHD, candidate B on pDC: OoD for the paper's rule, not for the code's
    pdcs, phds = [0.95, 0.50], [12.0, 3.0]
    assert qc.is_ood(pdcs, phds, 0.8, 10.0, rule="every_candidate")
    assert not qc.is_ood(pdcs, phds, 0.8, 10.0, rule="best_candidate")
    assert qc.is_ood([0.7, 0.75], [3.0, 4.0], 0.8, 10.0, rule="best_candidate")  # max pDC < th_low
    assert qc.is_ood([0.9, 0.95], [11.0, 12.0], 0.8, 10.0, rule="best_candidate")  # min pHD > th_up
    assert qc.is_ood([0.9], [math.inf], 0.8, math.inf, rule="best_candidate")  # empty prediction fails
    with pytest.raises(ValueError, match="ood_rule"):
        qc.is_ood(pdcs, phds, 0.8, 10.0, rule="any")


def test_losses_match_hand_computations():
    """Segmenter loss = Σ w_i (GD_i + CE_i), w ∝ 2^-i normalised, each head scored against the label;
    MONAI's generalised Dice equals the bundle's L_WGD with unit class weights; QC loss = MSE + GD."""
    losses = _scripts()["losses"]
    torch.manual_seed(0)
    label = torch.randint(0, 4, (2, 1, 16, 16))
    label[:, :, :4] = 3
    heads = torch.randn(2, 3, 4, 16, 16)
    target = one_hot(label, 4).float()

    def gd_ce(logits):  # by hand: batch-wise generalised Dice with 1/ref^2 weights + cross-entropy
        p = torch.softmax(logits, 1)
        ref = target.sum((0, 2, 3))
        w = 1.0 / ref**2
        gd = 1 - (2 * (w * (p * target).sum((0, 2, 3))).sum() + 1e-5) / ((w * (p + target).sum((0, 2, 3))).sum() + 1e-5)
        return gd + torch.nn.functional.cross_entropy(logits, label[:, 0])

    expected = sum(w * gd_ce(heads[:, i]) for i, w in enumerate([4 / 7, 2 / 7, 1 / 7]))
    loss = losses.SegmenterLoss(num_classes=4)
    assert float(loss(heads, label)) == pytest.approx(float(expected), rel=1e-5)
    assert float(loss(heads[:, 0], label)) == pytest.approx(float(gd_ce(heads[:, 0])), rel=1e-5)  # eval output
    probs = torch.softmax(heads[:, 0], 1)
    assert float(losses.generalized_dice_loss(probs, target)) == pytest.approx(
        float(GeneralizedDiceLoss(batch=True)(probs, target)), rel=1e-5)
    rv_only = float(losses.generalized_dice_loss(probs, target, [0, 0, 0, 1]))
    eps_rv = 1e-5 * target[:, 3].sum() ** 2  # the smoothing term, divided by RV's weight 1/ref^2
    rv = 1 - (2 * (probs[:, 3] * target[:, 3]).sum() + eps_rv) / ((probs[:, 3] + target[:, 3]).sum() + eps_rv)
    assert rv_only == pytest.approx(float(rv), rel=1e-4)  # RV alone: plain Dice of the RV channel
    # the paper's size (batch 20, 256²): 1/ref² weights are ~1e-9..1e-12 there; MONAI's smoothing
    # terms (1e-5) must not swamp them: within 1% of the exact, unsmoothed generalised Dice
    big = torch.zeros(20, 1, 256, 256, dtype=torch.long)
    big[:, :, 100:160, 100:160], big[:, :, 90:170, 90:100], big[:, :, 110:150, 60:85] = 1, 2, 3
    big_t = one_hot(big, 4).float()
    big_p = torch.softmax(torch.randn(20, 4, 256, 256), 1)
    w = 1.0 / big_t.sum((0, 2, 3)) ** 2
    exact = 1 - 2 * (w * (big_p * big_t).sum((0, 2, 3))).sum() / (w * (big_p + big_t).sum((0, 2, 3))).sum()
    assert float(GeneralizedDiceLoss(batch=True)(big_p, big_t)) == pytest.approx(float(exact), rel=0.01)
    qc = losses.QCLoss()(probs, target)
    assert float(qc) == pytest.approx(float(torch.mean((probs - target) ** 2) + gd_ce(heads[:, 0])
                                            - torch.nn.functional.cross_entropy(heads[:, 0], label[:, 0])), rel=1e-5)


def test_random_transforms_as_the_authors_training():
    """train#random_transforms: mirroring on both axes (p 0.5 each), rotation ±30°, isotropic scaling
    0.7-1.4, image and label together; on by default, off in train_qc.json (R sees true masks)."""
    from monai.bundle import ConfigParser
    from monai.transforms import RandFlipd, RandRotated, RandZoomd

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.json"))
    assert parser["augment"] is True and parser["train"]["dataset"]["transform"] == "$@train#random_transforms if @augment else None"
    sys.path.insert(0, str(ROOT))
    try:
        t = parser.get_parsed_content("train#random_transforms")
    finally:
        sys.path.remove(str(ROOT))
    flips = [x for x in t.transforms if isinstance(x, RandFlipd)]
    assert sorted(f.flipper.spatial_axis for f in flips) == [0, 1] and all(f.prob == 0.5 for f in flips)
    (rot,) = [x for x in t.transforms if isinstance(x, RandRotated)]
    assert rot.rand_rotate.range_x == pytest.approx((-math.pi / 6, math.pi / 6)) and rot.prob == 1.0
    (zoom,) = [x for x in t.transforms if isinstance(x, RandZoomd)]
    assert list(zoom.rand_zoom.min_zoom) + list(zoom.rand_zoom.max_zoom) == pytest.approx([0.7, 1.4]) and zoom.prob == 1.0
    label = torch.zeros(1, 64, 64)
    label[0, 20:40, 24:36] = 3
    label[0, 28:32, 28:32] = 1
    areas = set()
    for seed in range(6):
        t.set_random_state(seed)
        out = t({"image": label.clone() / 3, "label": label.clone()})
        assert out["label"].shape == (1, 64, 64) and set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0, 3.0}
        areas.add(int((out["label"] == 3).sum()))
    assert len(areas) > 1  # random
    qc = json.loads((ROOT / "configs" / "train_qc.json").read_text())
    assert qc["augment"] is False


def test_pseudo_measures_with_empty_masks():
    qc = _scripts()["qc"]
    a = np.zeros((1, 20, 20), bool)
    b = a.copy()
    assert qc.dice(a, b) == 1.0 and qc.hausdorff(a, b) == 0.0
    b[0, 5:10, 5:10] = True
    assert qc.dice(a, b) == 0.0 and math.isinf(qc.hausdorff(a, b))
    a[0, 5:10, 8:13] = True  # shifted by 3 pixels
    assert qc.hausdorff(a, b) == pytest.approx(3.0)
    assert qc.hausdorff(a, b, spacing=(1.0, 1.0, 1.5)) == pytest.approx(4.5)


def test_hausdorff_is_surface_to_surface_as_monai():
    """A filled disk against an annulus: each surface lies inside the other mask, yet the hole's rim is ~5 px from
    the disk's surface. A solid-to-surface distance would give 0 here."""
    from monai.metrics import compute_hausdorff_distance

    qc = _scripts()["qc"]
    yy, xx = np.mgrid[:40, :40]
    d2 = (yy - 20) ** 2 + (xx - 20) ** 2
    disk = d2 < 10**2
    ring = disk & (d2 >= 5**2)
    assert 0.7 < qc.dice(disk, ring) < 0.9
    expected = float(compute_hausdorff_distance(torch.from_numpy(disk)[None, None], torch.from_numpy(ring)[None, None],
                                                include_background=True).reshape(-1)[0])
    got = qc.hausdorff(disk, ring)

    def surface(m):  # brute force: mask pixels with a 4-neighbour outside the mask
        padded = np.pad(m, 1)
        inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        return np.argwhere(m & ~inner).astype(float)

    sa, sb = surface(disk), surface(ring)
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    by_hand = max(d.min(1).max(), d.min(0).max())
    assert got == pytest.approx(by_hand) and got == pytest.approx(expected) and 4.0 <= got <= 6.0
    assert qc.hausdorff(disk, ring, spacing=(2.0, 2.0)) == pytest.approx(2 * got)
    assert qc.hausdorff(ring, disk, percentile=95) <= got
    # one slice (LA view, H×W×1) and a slice stack of depth 1: still surface to surface
    assert qc.hausdorff(disk[..., None], ring[..., None], spacing=(1.0, 1.0, 8.0)) == pytest.approx(got)
    assert qc.hausdorff(disk[None], ring[None], spacing=(5.0, 1.0, 1.0)) == pytest.approx(got)
    holed = disk.copy()
    holed[20, 20] = False
    assert qc.hausdorff(disk[..., None], holed[..., None]) > 5  # the hole is ~10 px from the disk's surface


@pytest.mark.parametrize("target_spacing", [(1.25, 1.25), (1.25, 1.5)])
def test_measures_in_mm_equal_a_distance_transform_in_mm(target_spacing):
    """On an isotropic in-plane grid pHD_mm is pHD in pixels scaled (one distance transform per class); it must
    equal the surface distance computed with the mm spacing itself, and an anisotropic grid computes that."""
    qc = _scripts()["qc"]
    yy, xx = np.mgrid[:48, :48]
    soft = torch.zeros(3, 4, 48, 48)  # Z, classes, S, S
    for z in range(3):
        r2 = (yy - 24) ** 2 + ((xx - 20 - 2 * z) / 1.3) ** 2
        lab = np.where(r2 < 6**2, 1, np.where(r2 < 9**2, 2, np.where((r2 < 14**2) & (xx > 30), 3, 0)))
        soft[z] = torch.nn.functional.one_hot(torch.from_numpy(lab), 4).permute(2, 0, 1).float()
    recon = torch.roll(soft, shifts=(2, -3), dims=(2, 3))  # R's "reconstruction": the masks moved
    inferer = qc.QCInferer(None, None, None, list(target_spacing), image_size=48)
    inferer.reconstruct = lambda s: recon
    z_ratio = 4.0
    got = inferer.measures(soft, z_ratio)
    mm = (z_ratio * target_spacing[0], *target_spacing)
    for c, name in qc.CLASS_NAMES.items():
        a, b = soft.argmax(1).numpy() == c, recon.argmax(1).numpy() == c
        assert got["pHD_mm"][name] == pytest.approx(qc.hausdorff(a, b, mm), rel=1e-6)
        assert got["pHD"][name] == pytest.approx(qc.hausdorff(a, b, (z_ratio, 1.0, 1.0)), rel=1e-6)
        assert got["pHD_mm"][name] > got["pHD"][name] > 0


def test_empty_prediction_fails_qc_and_is_never_selected():
    s = _scripts()
    qc = s["qc"]
    empty = np.zeros((2, 16, 16), bool)
    assert qc.dice(empty, empty) == 1.0 and qc.hausdorff(empty, empty) == 0.0  # evaluation convention unchanged
    assert qc.qc_measures(empty, empty) == (0.0, math.inf)  # QC: a missing structure fails

    class Identity(torch.nn.Module):  # R that reconstructs every map perfectly
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return x

    inferer = qc.QCInferer(Identity(), None, None, target_spacing=(1.0, 1.0), image_size=16)
    no_rv = torch.zeros(2, 16, 16, dtype=torch.long)
    no_rv[:, 4:10, 4:10] = 1  # LV only
    with_rv = no_rv.clone()
    with_rv[:, 10:14, 4:10] = qc.RV
    one_hot = lambda lab: torch.nn.functional.one_hot(lab, 4).permute(0, 3, 1, 2).float()  # noqa: E731
    m_empty, m_rv = inferer.measures(one_hot(no_rv)), inferer.measures(one_hot(with_rv))
    assert (m_empty["pDC"]["RV"], m_empty["pHD"]["RV"]) == (0.0, math.inf)
    assert m_rv["pDC"]["RV"] == 1.0 and m_rv["pHD"]["RV"] == 0.0
    pdcs, phds = [m_empty["pDC"]["RV"], 0.93], [m_empty["pHD"]["RV"], 4.0]
    assert qc.select_candidate(pdcs, phds, 10.0) == {"rule": "ranked", "model": 1}


def test_gradient_clip_sees_unscaled_gradients_under_amp():
    """MONAI's SupervisedTrainer with a CPU GradScaler (scale 2^16): the optimiser sees the same clipped gradient
    norm as without AMP (a clip before unscaling would hand it 12 / 65536)."""
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer
    from monai.engines.utils import IterationEvents

    handlers = _scripts()["handlers"]

    def step_norms(amp: bool) -> list[float]:
        torch.manual_seed(0)
        net = torch.nn.Linear(8, 1)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)
        data = [{"image": torch.randn(4, 8) * 100, "label": torch.randn(4, 1)} for _ in range(2)]
        trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=data, network=net,
                                    optimizer=opt, loss_function=torch.nn.MSELoss(), amp=amp)
        if amp:  # Trainer.run() creates a CUDA scaler (disabled on CPU): swap in a CPU one once the run started
            trainer.add_event_handler(Events.STARTED, lambda e: setattr(e, "scaler", torch.amp.GradScaler("cpu", init_scale=2.0**16)))
        scales = []
        trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, lambda e: scales.append(e.scaler.get_scale() if amp else 1.0))
        handlers.GradientClip(net, max_norm=12.0).attach(trainer)
        norms = []
        opt.register_step_pre_hook(lambda o, a, k: norms.append(float(torch.cat([p.grad.reshape(-1) for p in net.parameters()]).norm())))
        trainer.run()
        assert scales[0] == (2.0**16 if amp else 1.0)
        return norms

    plain, amp = step_norms(False), step_norms(True)
    assert len(plain) == len(amp) == 2
    assert plain[0] == pytest.approx(12.0, rel=1e-4)  # the clip is active
    for p, a in zip(plain, amp):
        assert a == pytest.approx(p, rel=0.01)


def test_m_best_list_survives_kill_and_resume(tmp_path):
    """Epochs 1-3 (val loss .5, .3, .4), the process dies, a new one resumes from the resume checkpoint and runs
    epochs 4-5 (.6, .35): the kept list is the best 2 of all five epochs and model.pt stays epoch 2's weights."""
    from shared_transforms.handlers import ResumeCheckpointLoader, ResumeCheckpointSaver

    handlers = _scripts()["handlers"]
    resume_file, models = tmp_path / "resume" / "checkpoint.pt", tmp_path / "models"

    def fake_engine(e, **state):  # an engine at the end of epoch e (one iteration per epoch)
        from ignite.engine import Engine

        engine = Engine(lambda *_: None)
        for key, value in {"epoch": e, "iteration": e, "max_epochs": 5, **state}.items():
            setattr(engine.state, key, value)
        return engine

    def process():
        net = torch.nn.Linear(2, 1)
        best = handlers.BestCheckpoints(str(models / "candidates"), net, k=2, best_file=str(models / "model.pt"))
        return net, best, ResumeCheckpointSaver(str(resume_file.parent), {"best_checkpoints": best}, fingerprint="run")

    def epoch(net, best, saver, e, score):
        with torch.no_grad():
            net.weight.fill_(e)  # the weights name the epoch
        engine = fake_engine(e, metrics={"val_loss": score})
        best(engine)
        saver.training_state.trainer = engine
        saver.interval_completed(engine)  # what EPOCH_COMPLETED runs

    net, best, saver = process()
    for e, score in [(1, 0.5), (2, 0.3), (3, 0.4)]:
        epoch(net, best, saver, e, score)
    del net, best, saver  # killed
    net, best, saver = process()
    loader = ResumeCheckpointLoader(str(resume_file), {"best_checkpoints": best}, fingerprint="run")
    loader.training_state.trainer = engine = fake_engine(3)
    loader(engine)  # what STARTED runs
    assert [e["epoch"] for e in best.kept] == [2, 3]
    for e, score in [(4, 0.6), (5, 0.35)]:
        epoch(net, best, saver, e, score)
    index = json.loads((models / "candidates" / "candidates.json").read_text())
    assert [(c["epoch"], c["val_loss"]) for c in index["candidates"]] == [(2, 0.3), (5, 0.35)]
    assert sorted(p.name for p in (models / "candidates").glob("*.pt")) == ["model_epoch2.pt", "model_epoch5.pt"]
    assert float(torch.load(models / "model.pt", weights_only=True)["weight"][0, 0]) == 2.0


def test_mean_hd_counts_failures_at_the_volume_diagonal(tmp_path):
    from monai.data import MetaTensor

    handlers = _scripts()["handlers"]
    lab = np.zeros((1, 20, 20, 2), np.float32)
    lab[0, 2:8, 2:8] = 3  # RV
    lab[0, 10:18, 10:18] = 2  # MYO around LV
    lab[0, 12:16, 12:16] = 1
    affine = np.diag([1.5, 1.5, 10.0, 1.0])
    no_rv = lab.copy()
    no_rv[no_rv == 3] = 0
    items = [{"pred": MetaTensor(torch.from_numpy(p)), "label": MetaTensor(torch.from_numpy(lab), affine=affine,
                                                                          meta={"filename_or_obj": f"{n}_gt.nii.gz"})}
             for p, n in [(lab, "a"), (no_rv, "b")]]
    metrics = handlers.CardiacMetrics(str(tmp_path))
    metrics.update(type("Engine", (), {"state": type("State", (), {"output": items})()})())
    result = metrics.write()
    diagonal = math.sqrt((20 * 1.5) ** 2 * 2 + (2 * 10.0) ** 2)
    assert result["n_infinite_hd_mm_RV"] == 1 and result["mean_finite_hd_mm_RV"] == 0.0
    assert result["mean_hd_mm_RV"] == pytest.approx(diagonal / 2)
    assert result["mean_hd_mm_LV"] == 0.0 and result["n_infinite_hd_mm_LV"] == 0
    assert "1 of 2" in (tmp_path / "metrics.md").read_text()


def test_preprocessing_inverts_to_the_input_grid_and_alpha_schedules():
    s = _scripts()
    data = s["data"]
    img = np.zeros((50, 40, 3), np.float32)
    img[5:45, 4:36] = np.random.default_rng(0).uniform(1, 2, (40, 32, 3))  # zero border: cropped away
    lab = np.zeros_like(img)
    lab[15:35, 10:30] = 3
    lab[20:30, 15:25] = 1
    x, y, info = data.preprocess_volume(img, (1.5, 1.5), (1.0, 1.0), 64, lab)
    assert x.shape == y.shape == (3, 1, 64, 64) and info["box"] == (5, 45, 4, 36) and info["resampled"] == (60, 48)
    inside = x[y > -1][x[y > -1] != 0]
    assert abs(float(inside.mean())) < 0.2  # z-scored
    back = data.invert_volume(one_hot(torch.as_tensor(y).long(), 4).float(), info).argmax(0).numpy()
    assert back.shape == img.shape and (back == lab).mean() > 0.98
    again = data.invert_volume(one_hot(torch.as_tensor(y).long(), 4).float(), info).argmax(0).numpy()
    assert (again == back).all()  # the inversion info can be used again
    refine = s["refine"]
    assert [refine.alpha_for(k) for k in (1, 2, 4)] == [1.0, 0.5, 0.25]
    # the authors' code: epoch / 250 from the epoch it resumes at (200)
    assert [refine.alpha_for(k, "code") for k in (1, 2)] == pytest.approx([0.8, 0.804])
    assert refine.alpha_for(60, "code") == 1.0
    with pytest.raises(ValueError, match="alpha_schedule"):
        refine.alpha_for(1, "cosine")


def test_labelled_batches_reshuffled_every_pass_and_optimizer_state_checks(tmp_path):
    refine = _scripts()["refine"]
    loader = torch.utils.data.DataLoader(list(range(32)), batch_size=32, shuffle=True)
    stream = refine._reshuffled(loader)
    torch.manual_seed(0)
    passes = [next(stream).tolist() for _ in range(3)]
    assert all(sorted(p) == list(range(32)) for p in passes) and len({tuple(p) for p in passes}) == 3
    net = torch.nn.Linear(3, 2)
    sgd = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99)
    net(torch.rand(4, 3)).sum().backward()
    sgd.step()
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": net.state_dict(), "optimizer": sgd.state_dict(), "fingerprint": "run A"}, path)
    fresh = torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.5, momentum=0.99)
    assert refine.load_optimizer_state(fresh, path, lr=0.02, fingerprint="run A") is not None
    assert fresh.param_groups[0]["lr"] == 0.02 and len(fresh.state) == 2  # momentum buffers restored
    assert refine.load_optimizer_state(torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1),
                                       path, fingerprint="run B") is None  # another run
    assert refine.load_optimizer_state(torch.optim.Adam(torch.nn.Linear(3, 2).parameters()), path) is None
    assert refine.load_optimizer_state(torch.optim.SGD(torch.nn.Linear(5, 2).parameters(), lr=0.1, momentum=0.99),
                                       path) is None  # buffers of another shape


class _IdentityQC:
    """Stands in for R in unit tests: the reconstruction is the prediction itself."""

    target_spacing, image_size = [1.0, 1.0], 64

    @staticmethod
    def reconstruct(soft):
        return soft.clone()


@pytest.mark.parametrize("schedule", ["paper", "code"])
def test_refinement_iteration_trains_under_cpu_amp(schedule, tmp_path):
    """The custom refinement iteration in a MONAI SupervisedTrainer with AMP on (CPU autocast):
    finite losses, the right terms for each schedule, weights updated."""
    from ignite.engine import Events

    s = _scripts()
    torch.manual_seed(0)
    net = s["net"].CardiacSegmenter(filters=(8, 16, 32, 64), deep_supr_num=2)
    label = torch.zeros(4, 1, 64, 64)
    label[:, :, 20:40, 20:40] = 1
    label[:, :, 25:35, 42:50] = 3
    labelled = [{"image": label / 3 + 0.1 * torch.randn_like(label), "label": label}]
    ref = s["refine"].QCRefinement(net, torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9), s["losses"].SegmenterLoss(),
                                   labelled, [], _IdentityQC(), str(tmp_path), str(tmp_path), amp=True, alpha_schedule=schedule)
    ref._labelled = s["refine"]._reshuffled(labelled)
    ref._k = 2
    before = [p.detach().clone() for p in net.parameters()]
    batch = {"image": torch.randn(3, 1, 64, 64), "case": "x", "best": torch.softmax(torch.randn(3, 4, 64, 64), 1)}
    steps = []
    engine = ref._trainer([batch, batch], iteration_update=ref._semi_iteration)
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: steps.append(e.state.output))
    engine.run()
    assert engine.amp and len(steps) == 2 and all(math.isfinite(x["loss"]) for x in steps)
    if schedule == "paper":
        assert all(x["alpha"] == 0.5 and x["sup"] > 0 for x in steps)
    else:
        assert all(x["alpha"] == pytest.approx(201 / 250) and x["sup"] == 0 for x in steps)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_layout_reader_nested_flat_and_unlabelled(tmp_path):
    data = _scripts()["data"]
    root = make_phantoms("cardiac", tmp_path / "mnm2", cwd=tmp_path, subjects=4, ood_subjects=1, sa_shape="(32,32,2)",
                         flat_copy=True)
    nested = data.find_mnms2_cases(str(root), "SA")
    assert len(nested) == 10 and all("/data/" not in c["image"] for c in nested)  # the nested copy wins
    assert {c["vendor"] for c in nested} == {"SIEMENS", "PHILIPS", "GE"}
    assert [c["case"] for c in nested if not c["label"]] == ["005_SA_ED", "005_SA_ES"]
    flat = data.find_mnms2_cases(str(root / "data"), "LA")
    assert len(flat) == 10 and sum(bool(c["label"]) for c in flat) == 8 and flat[0]["vendor"] == "SIEMENS"
    assert nib.load(flat[0]["image"]).shape == (32, 32, 1)  # LA: one slice
    assert [d["case"] for d in data.list_unlabelled(str(root), "SA")] == ["005_SA_ED", "005_SA_ES"]
    names = [Path(d["image"]).name for d in data.inference_datalist(str(root / "001"))]
    assert names == ["001_LA_ED.nii.gz", "001_LA_ES.nii.gz", "001_SA_ED.nii.gz", "001_SA_ES.nii.gz"]


# --------------------------------------------------------------------------------------- chain
def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    """Phantoms -> segmenter -> QC module -> evaluation, through the CLI."""
    work = tmp_path_factory.mktemp("cardiac")
    data = make_phantoms("cardiac", work / "mnm2", cwd=work, subjects=8, ood_subjects=3, sa_shape="(64,64,4)")
    root = work / "bundle"
    common = dict(bundle_root=str(root), dataset_dir=str(data), **SMALL)
    # augmentation off: 10 epochs on clean phantoms (test_random_transforms checks the augmentation itself)
    bundle_run(BUNDLE, ["train.json"], cwd=work, run_id="training", epochs=10, batch_size=4, m_best=3, optimizer=ADAM,
               augment=False, **common)
    bundle_run(BUNDLE, ["train.json", "train_qc.json"], cwd=work, run_id="training", epochs=6, batch_size=4,
               learning_rate=0.002, **common)
    shutil.copytree(root / "models", work / "supervised_models")
    proc = bundle_run(BUNDLE, ["train.json", "evaluate.json"], cwd=work, run_id="evaluating", **common)
    assert_progress_eta(proc.stdout, "evaluating")
    return {"work": work, "data": data, "root": root, "common": common}


def test_training_keeps_m_best_checkpoints_with_scores(chain):
    models = chain["root"] / "models"
    index = json.loads((models / "candidates" / "candidates.json").read_text())
    entries = index["candidates"]
    assert index["metric"] == "val_loss" and len(entries) == 3
    losses = [e["val_loss"] for e in entries]
    assert losses == sorted(losses) and len({e["epoch"] for e in entries}) == 3
    assert sorted(p.name for p in (models / "candidates").glob("*.pt")) == sorted(e["file"] for e in entries)
    assert _same(_state(models / "model.pt"), _state(models / "candidates" / entries[0]["file"]))  # best = model.pt
    curves = (chain["root"] / "eval" / "learning_curves.csv").read_text().splitlines()
    assert min(float(r.split(",")[-2]) for r in curves[1:]) == pytest.approx(losses[0], rel=1e-4)
    assert json.loads((models / "preprocessing.json").read_text())["target_spacing"] == pytest.approx([1.375, 1.375])
    # every .pt holds tensors only; auxiliary weights live in subfolders of models/
    assert sorted(p.name for p in models.glob("*.pt")) == ["model.pt"]
    for p in models.rglob("*.pt"):
        torch.load(p, map_location="cpu", weights_only=True)


def test_qc_module_trained_on_ground_truth_and_calibrated(chain):
    models = chain["root"] / "models"
    ae = _scripts()["net"].QCAutoencoder(4)
    ae.load_state_dict(_state(models / "qc" / "model.pt"))
    cal = json.loads((models / "qc" / "calibration.json").read_text())
    vols = cal["volumes"]
    assert cal["n_volumes"] == len(vols) >= 4 and all(len(v["pDC"]) == len(v["pHD"]) == 3 for v in vols)  # every candidate
    assert {v["phase"] for v in vols} <= {"ED", "ES"}
    assert float(cal["th_up"]) > 0
    datalist = json.loads((chain["root"] / "eval" / "datalist_SA.json").read_text())
    label = nib.load(datalist["training"][0]["label"]).get_fdata()
    assert set(np.unique(label)) == {0, 1, 2, 3}


def test_evaluation_dice_and_hd_per_class_rv_first(chain):
    metrics = json.loads((chain["root"] / "eval" / "metrics.json").read_text())
    keys = [k for k in metrics if k.startswith("mean_dice_")]
    assert keys == ["mean_dice_RV", "mean_dice_LV", "mean_dice_MYO"]
    assert metrics["n_cases"] == 4 and metrics["mean_dice_RV"] > 0.5  # the segmenter learnt the phantom
    assert all(math.isfinite(metrics[f"mean_hd_mm_{c}"]) for c in ("RV", "LV", "MYO"))
    assert list(metrics["cases"][0])[:3] == ["case", "dice_RV", "hd_mm_RV"]
    raw = list(csv.DictReader(open(chain["root"] / "eval" / "dice_raw.csv")))  # MONAI MetricsSaver's per-case file
    assert [r["filename"] for r in raw] == [c["case"] for c in metrics["cases"]] and list(raw[0])[1:4] == ["RV", "LV", "MYO"]
    assert [float(r["RV"]) for r in raw] == pytest.approx([c["dice_RV"] for c in metrics["cases"]], abs=1e-4)
    reports = sorted((chain["root"] / "eval" / "qc_reports").glob("*_qc.json"))
    assert len(reports) == 4
    assert sorted(p.stem for p in (chain["root"] / "eval" / "overlays").glob("*.png")) == sorted(
        r["case"] for r in metrics["cases"])  # the RV overlay of each of the 4 cases
    report = json.loads(reports[0].read_text())
    assert report["threshold_source"].startswith("IQR over the 4")


def test_multi_gpu_evaluate_matches_one_process(chain, tmp_path):
    """multi_gpu_evaluate.json in 2 CPU processes: each rank screens the whole set (the same IQR thresholds),
    evaluates its share of the volumes; the per-case table, OOD flags and chosen models are those of one process."""
    assert_ddp_evaluation_matches(BUNDLE, chain["root"] / "eval", tmp_path, ["metrics.json"], **chain["common"])


def test_inference_masks_and_qc_reports_ood_flagged_more_often(chain, tmp_path):
    data = chain["data"]
    datalist = json.loads((chain["root"] / "eval" / "datalist_SA.json").read_text())
    new = tmp_path / "new"
    new.mkdir()
    in_dist = [Path(c["image"]) for c in datalist["test"]]
    ood = sorted(p for p in data.rglob("*_SA_E?.nii.gz") if p.parent.name in {"009", "010", "011"})
    for p in in_dist + ood:
        shutil.copy(p, new / p.name)
    shutil.copy(Path(datalist["test"][0]["label"]), new / Path(datalist["test"][0]["label"]).name)  # _gt: not read
    img = nib.load(data / "001" / "001_LA_ED.nii.gz")
    nib.save(img, new / "001_LA_ED.nii")  # .nii read too; one LA slice
    out = tmp_path / "out"
    bundle_run(BUNDLE, ["inference.json"], cwd=tmp_path, bundle_root=str(chain["root"]), dataset_dir=str(new),
               output_dir=str(out), threshold_source="calibration", **SMALL)
    stems = [p.name.split(".nii")[0] for p in in_dist + ood] + ["001_LA_ED"]
    assert sorted(p.name for p in out.glob("*_qc.json")) == sorted(f"{s}_qc.json" for s in stems)
    flags = {}
    for s in stems:
        src = nib.load(next(new.glob(f"{s}.nii*")))
        pred = nib.load(out / f"{s}_seg.nii.gz")
        assert pred.shape == src.shape and pred.get_data_dtype() == np.uint8
        np.testing.assert_allclose(pred.affine, src.affine, atol=1e-5)
        assert set(np.unique(np.asanyarray(pred.dataobj)).tolist()) <= {0, 1, 2, 3}
        report = json.loads((out / f"{s}_qc.json").read_text())
        assert {"pDC", "pHD", "pHD_mm", "th_low", "th_up", "ood", "selected_model"} <= set(report)
        assert len(report["pDC"]) == 3 and report["selection_rule"] in ("ranked", "average")
        flags[s] = report["ood"]
    ood_rate = np.mean([flags[p.name.split(".nii")[0]] for p in ood])
    id_rate = np.mean([flags[p.name.split(".nii")[0]] for p in in_dist])
    assert ood_rate > id_rate, flags
    id_folder = tmp_path / "in_distribution"  # unlabelled in-distribution volumes for the refinement test
    id_folder.mkdir()
    for p in in_dist:
        shutil.copy(p, id_folder / p.name)
    chain["id_folder"] = id_folder


def test_refinement_updates_only_when_flagged(chain, tmp_path):
    """One refinement iteration on the unlabelled OoD phantoms: screened before anything changes,
    then supervised epoch -> screening -> OoD steps -> validation, which keeps the refined models
    as the new candidates; on in-distribution volumes the weights change exactly when something is flagged."""
    before = _state(chain["work"] / "supervised_models" / "model.pt")
    runs = {}
    for name, folder, schedule in (("ood", chain["data"], "paper"), ("id", chain.get("id_folder"), "paper"),
                                   ("code", chain["data"], "code")):
        if folder is None:
            pytest.skip("needs the inference test's in-distribution folder")
        root = tmp_path / name
        shutil.copytree(chain["work"] / "supervised_models", root / "models")
        bundle_run(BUNDLE, ["train.json", "refine.json"], cwd=tmp_path, run_id="refining", bundle_root=str(root),
                   dataset_dir=str(chain["data"]), unlabelled_dir=str(folder), K_semi=1, batch_size=8, alpha_schedule=schedule,
                   threshold_source="calibration", optimizer=ADAM, refine_learning_rate=0.002, **SMALL)
        log = json.loads((root / "eval" / "refine" / "refine_log.json").read_text())
        runs[name] = (log, _state(root / "models" / "model.pt"), root)
    log, after, root = runs["ood"]
    first = log["iterations"][0]
    assert len(log["unlabelled"]) == 6 and log["initial"]["ood"], "the OoD phantoms are flagged before refinement"
    # the segmenter's optimiser continues from its saved state, with the weights of that epoch
    assert log["optimizer_state_loaded"] and log["start_weights"].startswith("resume checkpoint")
    assert {"th_low", "th_up"} <= set(first["thresholds"]) and first["supervised_loss"] > 0
    assert first["ood"], "still flagged when screened after the supervised epoch"
    assert len(first["semi_steps"]) == 6 and all(s["alpha"] == 1.0 and s["sup"] > 0 for s in first["semi_steps"])
    assert math.isfinite(first["val_loss"])
    assert log["updated"] and not _same(before, after)
    assert set(log["final"]) == {"thresholds", "ood", "measures"}  # the set screened again after K_semi iterations
    index = json.loads((root / "models" / "candidates" / "candidates.json").read_text())
    assert [c["file"] for c in index["candidates"]] == ["refined_k1.pt"]  # the refined models replace the supervised ones
    assert _same(after, _state(root / "models" / "candidates" / "refined_k1.pt"))
    assert not (root / "models" / "refined").exists()  # the staging folder is gone once installed
    assert _same(before, _state(root / "models" / "supervised" / "model.pt"))  # the supervised model is kept
    assert len(list((root / "models" / "supervised" / "candidates").glob("*.pt"))) == 3
    assert list((root / "eval" / "refine" / "tensorboard").glob("events.out.tfevents.*"))
    log, after, _ = runs["code"]  # the authors' code: α = 200/250, QC-selected pseudo-label, RV only, no L_SUP
    steps = log["iterations"][0]["semi_steps"]
    assert len(steps) == 6 and all(s["alpha"] == pytest.approx(0.8) and s["sup"] == 0 for s in steps) and log["updated"]
    assert all("selected" in m for m in log["iterations"][0]["measures"] if m["ood"])
    log, after, _ = runs["id"]
    assert len(log["unlabelled"]) == 4 and not any(c.startswith(("009", "010", "011")) for c in log["unlabelled"])
    flagged = bool(log["initial"]["ood"])
    assert log["updated"] == flagged and _same(before, after) == (not flagged)


# --------------------------------------------------------------------------------------- tooling

def test_monai_label_style_inference_single_volume(chain, tmp_path):
    """MONAI Label reads only inference.json and calls inferer(inputs, network) per volume: the QC
    step runs inside the inferer with the thresholds saved from the validation set, and the verdict
    reaches the /infer result JSON (MONAI Label's Writer returns data["result"]). The inference
    network (no deep-supervision heads) loads the trained checkpoint strictly and scripts."""
    image = chain["data"] / "009" / "009_SA_ED.nii.gz"
    check = textwrap.dedent(
        f"""
        import sys, json, torch
        sys.path.insert(0, {str(ROOT)!r})
        from monai.bundle import ConfigParser
        p = ConfigParser()
        p.read_config({str(ROOT / 'configs' / 'inference.json')!r})
        p.update({{'bundle_root': {str(chain['root'])!r}, 'output_dir': {str(tmp_path / 'ml')!r}, 'image_size': 64,
                  'filters': [8, 16, 32, 64], 'deep_supr_num': 2, 'device': torch.device('cpu')}})
        net = p.get_parsed_content('network_def')
        state = torch.load({str(chain['root'] / 'models' / 'model.pt')!r}, weights_only=True)
        assert any('super_head' in k for k in state)  # trained with deep supervision
        net.load_state_dict(state)  # strict
        net.eval()
        x = torch.rand(1, 1, 64, 64)
        with torch.no_grad():
            assert torch.allclose(torch.jit.script(net)(x), net(x), atol=1e-5)
        data = p.get_parsed_content('preprocessing')({{'image': {str(image)!r}, 'image_path': {str(image)!r}}})
        data['pred'] = p.get_parsed_content('inferer')(data['image'][None], net)[0]
        from monai.transforms import SaveImaged
        post = [t for t in p.get_parsed_content('postprocessing').transforms if not isinstance(t, SaveImaged)]
        assert len(post) == 3  # MONAI Label drops the writer (a SaveImaged subclass) and adds its own
        for t in post:
            data = t(data)
        assert data['pred'].dtype == torch.uint8 and data['pred'].shape[1:] == data['image'].shape[1:]
        report = json.load(open({str(tmp_path / 'ml' / '009_SA_ED_qc.json')!r}))
        assert report['threshold_source'].startswith('validation set'), report['threshold_source']
        qc = json.loads(json.dumps(data['result'], allow_nan=False))['qc']  # what /infer returns
        for k in ('ood', 'pDC', 'pHD', 'th_low', 'th_up', 'selected_model', 'threshold_source'):
            assert qc[k] == report[k], k
        assert qc['report_file'].endswith('009_SA_ED_qc.json')
        print('ML_OK', report['ood'])
        """
    )
    assert "ML_OK" in run([sys.executable, "-c", check], cwd=tmp_path).stdout


def test_ddp_two_cpu_processes(chain, tmp_path):
    configs = ROOT / "configs"
    files = json.dumps([str(configs / "train.json"), str(configs / "multi_gpu_train.json")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29547",
           "-m", "monai.bundle", "run", "training", "--config_file", files, "--bundle_root", str(tmp_path),
           "--dataset_dir", str(chain["data"]), "--epochs", "1", "--image_size", "64", "--filters", "[8,16,32,64]",
           "--deep_supr_num", "2", "--batch_size", "8", "--m_best", "2"]
    run(cmd, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    saved = sorted(str(p.relative_to(tmp_path / "models")) for p in (tmp_path / "models").rglob("*.pt"))
    assert saved == ["candidates/model_epoch1.pt", "model.pt", "resume/checkpoint.pt"]
