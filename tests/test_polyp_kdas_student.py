"""bundles/polyp_kdas_student: Polyp-PVT networks, KDAS losses (by hand), the mDice definition, the
PraNet layout reader, and teacher training -> student distillation -> evaluation -> inference
through the documented MONAI CLI on phantoms (subprocesses from a temporary directory)."""

from __future__ import annotations

import csv
import json
import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BUNDLES, REPO, assert_ddp_evaluation_matches, assert_progress_eta, bundle_run, make_phantoms, run

BUNDLE = "polyp_kdas_student"
ROOT = BUNDLES / BUNDLE
CONFIGS = ROOT / "configs"
# 64 px training; sizes rounded to multiples of 16 so the rates {0.75, 1, 1.25} give 48 / 64 / 80
SMALL = {"image_size": 64, "size_multiple": 16, "batch_size": 4}


def _bundle_module(name: str):
    """Import one of the bundle's scripts modules under a private name (no `scripts` clash)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"polyp_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


net_mod = _bundle_module("net")
losses = _bundle_module("losses")
evaluate = _bundle_module("evaluate")


# ------------------------------------------------------------------------------------------
# networks
# ------------------------------------------------------------------------------------------


def test_sum_inferer_feeds_a_plain_tensor_and_returns_the_input_trace():
    """The network runs on a plain tensor (no MetaTensor bookkeeping per op); the logits P1 + P2 come back
    carrying the input's metadata and transform trace, which Invertd needs to resize them back."""
    from monai.data import MetaTensor
    from monai.transforms import Resized

    net = net_mod.PolypPVT("pvt_v2_b0", return_both=True).eval()
    seen = []
    net.register_forward_pre_hook(lambda m, args: seen.append(type(args[0])))
    item = Resized("image", (64, 64))({"image": MetaTensor(torch.rand(3, 80, 96), meta={"filename_or_obj": "f.png"})})
    x = item["image"][None]
    with torch.no_grad():
        out = net_mod.PolypPVTSumInferer()(x, net)
        p1, p2 = net(torch.rand(1, 3, 64, 64).copy_(x.as_tensor()))
    assert seen[0] is torch.Tensor and isinstance(out, MetaTensor) and out.dtype == p1.dtype
    torch.testing.assert_close(out.as_tensor(), p1 + p2)
    assert out.applied_operations == x.applied_operations and out.meta["filename_or_obj"] == "f.png"


def test_parameter_counts_and_outputs():
    student = net_mod.PolypPVT("pvt_v2_b0", return_both=True)
    teacher = net_mod.PolypPVT("pvt_v2_b2")
    n_s = sum(p.numel() for p in student.parameters())
    n_t = sum(p.numel() for p in teacher.parameters())
    assert abs(n_s - 3_650_740) <= 0.005 * 3_650_740, n_s
    assert abs(n_t - 25_107_604) <= 0.005 * 25_107_604, n_t
    assert student.backbone.feature_info.channels() == [32, 64, 160, 256]
    assert teacher.backbone.feature_info.channels() == [64, 128, 320, 512]
    student.eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        p1, p2 = student(x)
        assert p1.shape == p2.shape == (2, 1, 64, 96)
        student.return_both = False
        assert torch.allclose(student(x), p1 + p2)  # the inference network: one tensor P1 + P2


def test_gmacs_at_352_with_flop_counter():
    """scripts/bench_polyp.py's count (FlopCounterMode, FLOPs / 2): ≈ 1.90 (student) and ≈ 10.8 (teacher)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_polyp_under_test", REPO / "scripts" / "bench_polyp.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.gmacs(net_mod.PolypPVT("pvt_v2_b0").eval(), 352) == pytest.approx(1.90, abs=0.01)
    assert bench.gmacs(net_mod.PolypPVT("pvt_v2_b2").eval(), 352) == pytest.approx(10.84, abs=0.05)


def test_pretrained_path_loads_local_imagenet_checkpoint(tmp_path):
    import timm

    torch.manual_seed(3)
    full = timm.create_model("pvt_v2_b0")  # a classification checkpoint, as timm distributes it
    path = tmp_path / "pvt_v2_b0_imagenet.pth"
    torch.save(full.state_dict(), path)
    net = net_mod.PolypPVT("pvt_v2_b0", pretrained_path=str(path))
    own = net.backbone.state_dict()
    src = full.state_dict()
    import re

    # timm's features_only wrapper names `stages.0.` `stages_0.`
    assert all(torch.equal(v, src[re.sub(r"^stages_(\d+)\.", r"stages.\1.", k)]) for k, v in own.items()), \
        "backbone weights differ from the file"
    bad = tmp_path / "b2.pth"
    torch.save(timm.create_model("pvt_v2_b2").state_dict(), bad)
    with pytest.raises(ValueError, match="missing or of another shape"):
        net_mod.PolypPVT("pvt_v2_b0", pretrained_path=str(bad))
    with pytest.raises(ValueError):
        net_mod.PolypPVT("pvt_v2_b0", pretrained=True, pretrained_path=str(path))


# ------------------------------------------------------------------------------------------
# losses, against values computed by hand
# ------------------------------------------------------------------------------------------


def _sig(v):
    return 1 / (1 + math.exp(-v))


def test_structure_loss_by_hand():
    logits = [[2.0, -1.0], [0.0, 1.0]]
    g = [[1.0, 0.0], [0.0, 0.0]]
    # 31x31 mean with zero padding counted: on a 2x2 image every window sums the whole mask
    pooled = 1.0 / 961
    w = [[1 + 5 * abs(pooled - g[i][j]) for j in range(2)] for i in range(2)]
    assert w[0][0] != w[0][1]  # the weights really differ
    cells = [(i, j) for i in range(2) for j in range(2)]
    bce = {c: -(g[c[0]][c[1]] * math.log(_sig(logits[c[0]][c[1]])) + (1 - g[c[0]][c[1]]) * math.log(1 - _sig(logits[c[0]][c[1]]))) for c in cells}
    wbce = sum(w[i][j] * bce[(i, j)] for i, j in cells) / sum(w[i][j] for i, j in cells)
    p = {c: _sig(logits[c[0]][c[1]]) for c in cells}
    inter = sum(w[i][j] * p[(i, j)] * g[i][j] for i, j in cells)
    union = sum(w[i][j] * (p[(i, j)] + g[i][j]) for i, j in cells)
    wiou = 1 - (inter + 1) / (union - inter + 1)
    got = losses.structure_loss(torch.tensor(logits)[None, None], torch.tensor(g)[None, None])
    assert got.item() == pytest.approx(wbce + wiou, rel=1e-5)
    # and it is weighted: the unweighted BCE differs
    assert wbce != pytest.approx(sum(bce.values()) / 4, rel=1e-4)


def _softmax(v):
    m = max(v)
    e = [math.exp(x - m) for x in v]
    return [x / sum(e) for x in e]


def _attention_by_hand(x):
    """A = softmax_row(X X^T / sqrt(W)) X for a 2x2 X."""
    w = len(x[0])
    scores = [[sum(x[i][k] * x[j][k] for k in range(w)) / math.sqrt(w) for j in range(len(x))] for i in range(len(x))]
    s = [_softmax(r) for r in scores]
    return [[sum(s[i][j] * x[j][k] for j in range(len(x))) for k in range(w)] for i in range(len(x))]


def _kl_by_hand(student, teacher, t):
    ps = _softmax([v / t for v in student])
    pt = _softmax([v / t for v in teacher])
    return t * t * sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))


def test_attention_kd_and_sgm_by_hand():
    xs = [[0.5, -1.0], [2.0, 0.3]]
    xt = [[1.5, -0.2], [0.1, 1.0]]
    a_s, a_t = _attention_by_hand(xs), _attention_by_hand(xt)
    got_a = losses.attention_map(torch.tensor(xs)[None, None])
    assert torch.allclose(got_a[0], torch.tensor(a_s), atol=1e-6)
    t = 2.0
    flat = lambda m: [v for row in m for v in row]  # noqa: E731
    expected_at = _kl_by_hand(flat(a_s), flat(a_t), t)
    got_at = losses.kl_with_temperature(got_a, losses.attention_map(torch.tensor(xt)[None, None]), t)
    assert got_at.item() == pytest.approx(expected_at, rel=1e-5)
    c_s = [[sum(a_s[i][k] * a_s[j][k] for k in range(2)) for j in range(2)] for i in range(2)]
    c_t = [[sum(a_t[i][k] * a_t[j][k] for k in range(2)) for j in range(2)] for i in range(2)]
    assert c_s[0][1] == pytest.approx(c_s[1][0])  # symmetric
    got_c = losses.symmetric_structure(got_a, "none")  # the raw Gram matrix
    assert torch.allclose(got_c[0], torch.tensor(c_s), atol=1e-6)
    assert torch.allclose(losses.symmetric_structure(got_a)[0], torch.tensor(c_s) / 2, atol=1e-6)  # default: / W
    c_s, c_t = [[v / 2 for v in row] for row in c_s], [[v / 2 for v in row] for row in c_t]
    # batchmean: a batch of the same image twice gives the same value (sum / B)
    s2 = torch.tensor([xs, xs])[:, None]
    t2 = torch.tensor([xt, xt])[:, None]
    # the full loss on one output pair: (1 - λ)·Σ L_seg + λ·(L_AT + L_SGM), P1 = P2 here
    label = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]] * 2)
    loss = losses.KDASLoss("attention_sgm", temperature=t, kd_weight=0.2)
    total = loss((s2, s2), label, (t2, t2))
    seg = 2 * losses.structure_loss(s2, label).item()
    expected = 0.8 * seg + 0.2 * (2 * expected_at + _kl_by_hand(flat(c_s), flat(c_t), t))
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert losses.KDASLoss("none")((s2, s2), label).item() == pytest.approx(seg, rel=1e-6)
    kl = losses.KDASLoss("kl", temperature=4.0)((s2, s2), label, (t2, t2)).item()
    assert kl == pytest.approx(0.8 * seg + 0.2 * 2 * _kl_by_hand(flat(xs), flat(xt), 4.0), rel=1e-5)
    assert losses.KDASLoss("attention")((s2, s2), label, (t2, t2)).item() == pytest.approx(0.8 * seg + 0.2 * 2 * expected_at, rel=1e-5)
    with pytest.raises(ValueError):
        losses.KDASLoss("released_code")


@pytest.mark.parametrize("term", ["kl", "at", "sgm"])
def test_each_kd_term_sends_gradient_to_student_only(term):
    torch.manual_seed(0)
    student = net_mod.PolypPVT("pvt_v2_b0", return_both=True).train()
    teacher = net_mod.PolypPVT("pvt_v2_b2", return_both=True).eval()
    x = torch.rand(2, 3, 64, 64)
    s_out = student(x)
    t_out = teacher(x)  # deliberately WITH autograd: the loss itself must stop the gradient
    kd = losses.KDASLoss("kl" if term == "kl" else "attention_sgm", temperature=2.0)
    value = kd.kd_terms(s_out, t_out)[term]
    assert torch.isfinite(value) and value.item() > 0
    value.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0, "no gradient reached the student"
    assert all(p.grad is None for p in teacher.parameters()), "gradient reached the teacher"


def _configured_loss() -> "losses.KDASLoss":
    """train.json's ``loss``, its @references resolved against train.json's top-level values."""
    config = json.loads((CONFIGS / "train.json").read_text())
    spec = dict(config["loss"])
    assert spec.pop("_target_") == "scripts.losses.KDASLoss"
    return losses.KDASLoss(**{k: config[v[1:]] if isinstance(v, str) and v.startswith("@") else v for k, v in spec.items()})


def _logit_maps(size: int, amplitude: float, shift: int = 0, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A soft-edged disk as logits of ±amplitude, and the (unshifted) disk mask."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    r = size / 5
    inside = lambda dy: (((yy - size / 2 - dy) ** 2 + (xx - size / 2) ** 2) < r**2).float()[None, None]  # noqa: E731
    soft = torch.nn.functional.avg_pool2d(inside(shift), 9, 1, 4)
    return (amplitude * (2 * soft - 1)).repeat(batch, 1, 1, 1), inside(0).repeat(batch, 1, 1, 1)


@pytest.mark.parametrize("size", [352, 448])
def test_kd_terms_stay_comparable_to_segmentation_at_paper_sizes(size):
    """Teacher logits ±8, student ±4 (shifted): each KD term of train.json's loss is at most 10 × Σ_k L_seg and
    sends a finite, non-zero gradient to the student. The raw Gram matrix (sgm_norm none) does not stay bounded."""
    loss = _configured_loss()
    assert loss.kd == "attention_sgm" and loss.sgm_norm == "width"
    teacher, gt = _logit_maps(size, 8.0)
    student_map, _ = _logit_maps(size, 4.0, shift=size // 20)
    teacher = (teacher, teacher + 0.5)
    student = tuple(student_map.clone().requires_grad_(True) for _ in range(2))
    seg = sum(losses.structure_loss(s, gt) for s in student).item()
    terms = loss.kd_terms(student, teacher)
    assert set(terms) == {"at", "sgm"}
    for name, value in terms.items():
        assert torch.isfinite(value) and 0 < value.item() <= 10 * seg, (name, value.item(), seg)
        grads = torch.autograd.grad(value, student, retain_graph=True, allow_unused=True)
        norm = sum(float(g.norm()) for g in grads if g is not None)
        assert math.isfinite(norm) and norm > 0, (name, norm)
    raw = losses.KDASLoss("attention_sgm", sgm_norm="none").kd_terms(student, teacher)["sgm"].item()
    assert raw > 10 * seg, (raw, seg)  # the defect the normalisation removes


def test_sgm_normalisations_by_hand():
    a = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 1.0, -1.0]]])  # H = 2 rows observed over W = 3 columns
    gram = [[14.0, -1.0], [-1.0, 2.0]]
    assert torch.allclose(losses.symmetric_structure(a, "none")[0], torch.tensor(gram))
    assert torch.allclose(losses.symmetric_structure(a, "width")[0], torch.tensor(gram) / 3)
    # centred: row means (2, 0) -> rows (-1, 0, 1) and (0, 1, -1)
    assert torch.allclose(losses.symmetric_structure(a, "centred")[0], torch.tensor([[2.0, -1.0], [-1.0, 2.0]]) / 3)
    with pytest.raises(ValueError):
        losses.symmetric_structure(a, "trace")
    with pytest.raises(ValueError):
        losses.KDASLoss(sgm_norm="gram")


def test_kd_loss_is_fp32_under_fp16_autocast():
    """448², teacher logits ±14: X·Xᵀ exceeds fp16's 65504, yet the loss under CPU fp16 autocast (network outputs in
    fp16, as AMP produces them) is finite and within 1% of the fp32 value."""
    loss = _configured_loss()
    teacher, gt = _logit_maps(448, 14.0, batch=1)
    student, _ = _logit_maps(448, 4.0, shift=20, batch=1)
    reference = loss((student, student), gt, (teacher, teacher)).item()
    assert math.isfinite(reference)
    with torch.autocast("cpu", dtype=torch.float16):
        x = teacher[:, 0]
        assert not torch.isfinite(torch.bmm(x, x.transpose(1, 2))).all()  # what fp16 bmm would give
        value = loss((student.half(), student.half()), gt, (teacher.half(), teacher.half()))
    assert value.dtype == torch.float32 and math.isfinite(value.item())
    assert value.item() == pytest.approx(reference, rel=0.01)
    assert all(math.isfinite(float(v)) for v in loss.last_terms.values())


class _ReferenceSAM(torch.nn.Module):
    """Polyp-PVT's SAM + GCN rebuilt from the published structure (nn.AdaptiveAvgPool2d priors, matmul),
    independently of the bundle's implementation."""

    def __init__(self, num_in: int = 32, plane_mid: int = 16, mids: int = 4) -> None:
        super().__init__()
        self.num_s, self.num_n = plane_mid, mids * mids
        self.priors = torch.nn.AdaptiveAvgPool2d((mids + 2, mids + 2))
        self.conv_state = torch.nn.Conv2d(num_in, plane_mid, 1)
        self.conv_proj = torch.nn.Conv2d(num_in, plane_mid, 1)
        self.gcn_conv1 = torch.nn.Conv1d(self.num_n, self.num_n, 1)
        self.gcn_conv2 = torch.nn.Conv1d(plane_mid, plane_mid, 1, bias=False)
        self.conv_extend = torch.nn.Conv2d(plane_mid, num_in, 1, bias=False)

    def forward(self, x, edge):
        n, _, h, w = x.shape
        edge = torch.softmax(edge, dim=1)[:, 1, :, :].unsqueeze(1)
        x_state = self.conv_state(x).view(n, self.num_s, -1)
        x_proj = self.conv_proj(x)
        x_anchor = self.priors(x_proj * edge)[:, :, 1:-1, 1:-1].reshape(n, self.num_s, -1)
        affinity = torch.softmax(torch.matmul(x_anchor.permute(0, 2, 1), x_proj.reshape(n, self.num_s, -1)), dim=1)
        nodes = torch.matmul(x_state, affinity.permute(0, 2, 1))
        rel = torch.relu(self.gcn_conv2(self.gcn_conv1(nodes.permute(0, 2, 1)).permute(0, 2, 1) - nodes))
        return x + self.conv_extend(torch.matmul(rel, affinity).view(n, self.num_s, h, w))


def test_sam_matches_published_module():
    torch.manual_seed(0)
    sam = net_mod.SAM(32, num_state=16, grid=4).eval()
    ref = _ReferenceSAM().eval()
    for mine, theirs in [(sam.conv_state, ref.conv_state), (sam.conv_proj, ref.conv_proj), (sam.gcn.node_conv, ref.gcn_conv1),
                         (sam.gcn.state_conv, ref.gcn_conv2), (sam.conv_extend, ref.conv_extend)]:
        theirs.load_state_dict(mine.state_dict())
    for h, w in [(11, 13), (44, 44)]:
        x, edge = torch.randn(2, 32, h, w), torch.randn(2, 32, h, w) * 3
        with torch.no_grad():
            assert torch.allclose(sam(x, edge), ref(x, edge), atol=1e-5, rtol=1e-5), (h, w)


def test_sam_edge_is_t1_halved_with_aligned_corners():
    """Polyp-PVT downsamples t1 with nn.Upsample(scale_factor=0.5, bilinear, align_corners=True) before SAM."""
    net = net_mod.PolypPVT("pvt_v2_b0", return_both=True).eval()
    seen = {}
    net.t1.register_forward_hook(lambda m, a, out: seen.update(t1=out))  # hooks must return None
    net.sam.register_forward_pre_hook(lambda m, args: seen.update(edge=args[1]))
    with torch.no_grad():
        net(torch.rand(1, 3, 96, 96))
        expected = torch.nn.functional.interpolate(seen["t1"], scale_factor=0.5, mode="bilinear", align_corners=True)
    assert seen["edge"].shape == expected.shape == (1, 32, 12, 12)
    assert torch.allclose(seen["edge"], expected, atol=1e-6)


def test_default_evaluation_is_the_published_pipeline(tmp_path):
    """Default maps: sigmoid, min-max to [0, 1], written as an 8-bit PNG and read back / 255 (Polyp-PVT Test.py)."""
    from PIL import Image

    torch.manual_seed(0)
    logits = torch.randn(1, 12, 10) - 6  # all negative: raw sigmoid < 0.5 everywhere
    report = evaluate.PolypReport(str(tmp_path), num_overlays=0)
    assert report.minmax and report.quantise_uint8 and "paper-comparable" in report.evaluation
    prob = report.probability(logits, (24, 20))
    x = torch.nn.functional.interpolate(logits[None].double(), size=(24, 20), mode="bilinear", align_corners=False)
    res = torch.sigmoid(x)[0, 0].numpy()
    res = (res - res.min()) / (res.max() - res.min() + 1e-8)
    Image.fromarray(np.rint(res * 255).astype(np.uint8)).save(tmp_path / "pred.png")
    saved = np.asarray(Image.open(tmp_path / "pred.png"), dtype=np.float64) / 255
    assert np.abs(prob - saved).max() < 1e-12 and len(np.unique(prob)) <= 256
    gt = res > 0.6
    dice_default = evaluate.threshold_dice_iou(prob, gt)[0]
    assert dice_default.mean() == pytest.approx(_direct_mdice([saved], [gt])[0], abs=1e-12)
    raw = evaluate.PolypReport(str(tmp_path), num_overlays=0, minmax=False, quantise_uint8=False)
    assert "not the published pipeline" in raw.evaluation
    raw_prob = raw.probability(logits, (24, 20))
    assert raw_prob.max() < 0.5 and evaluate.dice_iou_at(raw_prob, gt)[0] == 0.0 < evaluate.dice_iou_at(prob, gt)[0]


# ------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------


def _direct_mdice(probs, gts):
    """The 256-threshold definition written out: loops over thresholds and images."""
    dices, ious = [], []
    for t in [k / 255 for k in range(255, -1, -1)]:  # exactly k/255: uint8 maps sit on these values
        d_t, i_t = [], []
        for p, g in zip(probs, gts):
            b, g = p >= t, g > 0.5
            tp = np.sum(b & g)
            fp, fn = np.sum(b & ~g), np.sum(~b & g)
            d_t.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
            i_t.append(0.0 if tp == 0 else tp / (tp + fp + fn))
        dices.append(np.mean(d_t))
        ious.append(np.mean(i_t))
    return float(np.mean(dices)), float(np.mean(ious))


def test_mdice_equals_direct_definition(tmp_path):
    rng = np.random.default_rng(0)
    probs = [rng.random((17, 23)) for _ in range(4)] + [np.round(rng.random((9, 9)) * 255) / 255]
    gts = [rng.random((17, 23)) > 0.6 for _ in range(3)] + [np.zeros((17, 23), bool), rng.random((9, 9)) > 0.5]
    probs[1] = probs[1] * 0.3  # TP = 0 for every threshold above 0.3
    curves = [evaluate.threshold_dice_iou(p, g) for p, g in zip(probs, gts)]
    assert np.all(curves[3][0] == 0)  # empty ground truth: TP = 0, Dice 0 at every threshold
    assert np.all(curves[1][0][evaluate.THRESHOLDS > 0.31] == 0)
    mdice = float(np.mean([c[0] for c in curves]))
    miou = float(np.mean([c[1] for c in curves]))
    expected = _direct_mdice(probs, gts)
    assert mdice == pytest.approx(expected[0], abs=1e-12) and miou == pytest.approx(expected[1], abs=1e-12)
    # the report handler aggregates the same way (logits in, sigmoid inside)
    report = evaluate.PolypReport(str(tmp_path), num_overlays=0, minmax=False, quantise_uint8=False)  # raw sigmoid
    for p, g in zip(probs[:3], gts[:3]):
        logits = torch.logit(torch.tensor(p, dtype=torch.float64).clamp(1e-9, 1 - 1e-9))[None]
        prob = report.probability(logits, g.shape)
        d, i = evaluate.threshold_dice_iou(prob, g)
        report.curves["Kvasir"].append((d, i))
        report.rows.append({"set": "Kvasir", "case": "x", "mdice": d.mean(), "miou": i.mean(), "dice@0.5": 0.0, "iou@0.5": 0.0})
    result = report.write()
    direct = _direct_mdice(probs[:3], gts[:3])
    assert result["sets"][0]["mDice"] == pytest.approx(direct[0], abs=1e-5)
    assert result["sets"][0]["paper_mDice"] == 0.913
    d05, _ = evaluate.dice_iou_at(probs[0], gts[0])
    b, g = probs[0] >= 0.5, gts[0]
    assert d05 == pytest.approx(2 * np.sum(b & g) / (b.sum() + g.sum()))


# ------------------------------------------------------------------------------------------
# data layout
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("polyp_data")
    return make_phantoms("polyp", work / "polyp", cwd=work, train=12, per_test_set=2, size=64)


def test_layout_reader_reports_and_skips_broken_pairs(phantom, tmp_path):
    data = _bundle_module("data")
    result = data.polyp_datalist(str(phantom), str(tmp_path), val_fraction=0.1)
    assert len(result["training"]) + len(result["validation"]) == 12 and len(result["validation"]) == 1
    assert result["test_sets"] == ["Kvasir", "CVC-ClinicDB", "CVC-ColonDB", "ETIS-LaribPolypDB", "CVC-300"]
    assert len(result["test"]) == 10
    assert any(c["label"].endswith(".tif") for c in result["test"]) and any(c["image"].endswith(".jpg") for c in result["test"])
    bad = {b["case"]: b for b in json.loads((tmp_path / "bad_cases.json").read_text())}
    assert set(bad) == {"train/unmatched", "train/truncated"}
    assert bad["train/unmatched"]["reason"] == "no mask with this stem"
    assert bad["train/truncated"]["reason"].startswith("cannot read") and bad["train/truncated"]["file"].endswith("masks/truncated.png")
    sizes = {__import__("PIL.Image").Image.open(c["image"]).size for c in result["training"]}
    assert len(sizes) > 1  # mixed image sizes


# ------------------------------------------------------------------------------------------
# the documented CLI chain on phantoms
# ------------------------------------------------------------------------------------------


def test_train_fraction_keeps_a_seeded_subset(phantom, tmp_path):
    data = _bundle_module("data")
    full = data.polyp_datalist(str(phantom), val_fraction=0.1, seed=3)
    quarter = data.polyp_datalist(str(phantom), val_fraction=0.1, seed=3, train_fraction=0.25)
    assert quarter["validation"] == full["validation"] and quarter["test"] == full["test"]
    assert len(quarter["training"]) == max(1, round(0.25 * len(full["training"])))
    assert {c["image"] for c in quarter["training"]} < {c["image"] for c in full["training"]}
    assert quarter == data.polyp_datalist(str(phantom), val_fraction=0.1, seed=3, train_fraction=0.25)  # seeded
    other = data.polyp_datalist(str(phantom), val_fraction=0.1, seed=4, train_fraction=0.25)
    assert other["training"] != quarter["training"]
    with pytest.raises(ValueError, match="train_fraction"):
        data.polyp_datalist(str(phantom), train_fraction=0.0)


@pytest.fixture(scope="module")
def chain(phantom, tmp_path_factory) -> dict:
    """Teacher training, then the student distilled from it and the student without KD."""
    work = tmp_path_factory.mktemp("polyp_chain")
    root = work / "bundle"
    bundle_run(BUNDLE, ["train_teacher.json"], cwd=work, run_id="training", bundle_root=str(root),
               dataset_dir=str(phantom), epochs=1, **SMALL)
    teacher = root / "models" / "teacher" / "model.pt"
    proc = bundle_run(BUNDLE, ["train.json"], cwd=work, run_id="training", bundle_root=str(root), dataset_dir=str(phantom),
                      epochs=2, teacher_ckpt=str(teacher), **SMALL)
    return {"work": work, "root": root, "teacher": teacher, "data": phantom, "student_log": proc.stdout + proc.stderr}


def test_teacher_and_student_checkpoints(chain):
    root = chain["root"]
    saved = sorted(str(p.relative_to(root / "models")) for p in (root / "models").rglob("*.pt"))
    assert saved == ["model.pt", "resume/checkpoint.pt", "teacher/model.pt", "teacher/resume/checkpoint.pt"]
    teacher = torch.load(chain["teacher"], map_location="cpu", weights_only=True)
    student = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert sum(v.numel() for k, v in teacher.items() if "running" not in k and "num_batches" not in k) == 25_107_604
    assert sum(v.numel() for k, v in student.items() if "running" not in k and "num_batches" not in k) == 3_650_740
    curves = list(csv.DictReader(open(root / "eval" / "learning_curves.csv")))
    assert len(curves) == 2 and all(math.isfinite(float(r["train_loss"])) for r in curves)


def test_loss_terms_logged_per_iteration_and_random_init_warned(chain):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = chain["student_log"]
    for tag in ("train_loss", "train_loss_seg", "train_loss_at", "train_loss_sgm"):
        assert f"{tag}: " in log, tag
    assert "NOT comparable to the paper" in log  # phantom runs start from random backbone weights
    events = EventAccumulator(str(chain["root"] / "eval" / "tensorboard")).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train_loss", "train_loss_seg", "train_loss_at", "train_loss_sgm"} <= scalars, scalars
    assert len(events.Scalars("train_loss_sgm")) == len(events.Scalars("train_loss")) >= 2  # every iteration


def test_distillation_changes_student_not_teacher(chain, tmp_path):
    """One epoch of train.json's trainer: student weights move, the teacher's (and its BN stats) do not;
    the network sees the three multi-scale sizes; MONAI Label-style data overrides are accepted."""
    data = [{"image": c["image"], "label": c["label"]}
            for c in json.loads((chain["root"] / "eval" / "datalist.json").read_text())["training"]]
    check = textwrap.dedent(
        f"""
        import sys, torch
        from monai.bundle import ConfigWorkflow
        sys.path.insert(1, {str(ROOT)!r})
        wf = ConfigWorkflow(config_file={str(CONFIGS / 'train.json')!r}, workflow_type='train', logging_file=False,
                            bundle_root={str(tmp_path)!r}, dataset_dir={str(chain['data'])!r},
                            teacher_ckpt={str(chain['teacher'])!r}, epochs=1, image_size=64, size_multiple=16,
                            batch_size=4, **{{'train#dataset#data': {data!r}}})
        wf.initialize()
        trainer = wf.parser.get_parsed_content('train#trainer')
        student = wf.parser.get_parsed_content('network')
        teacher = wf.parser.get_parsed_content('train#step').load_teacher()  # otherwise loaded at the first iteration
        s0 = {{k: v.clone() for k, v in student.state_dict().items()}}
        t0 = {{k: v.clone() for k, v in teacher.state_dict().items()}}
        sizes = []
        student.register_forward_pre_hook(lambda m, a: sizes.append(tuple(a[0].shape[-2:])))
        trainer.run()
        saved = torch.load({str(chain['teacher'])!r}, map_location='cpu', weights_only=True)
        print('TEACHER_SAME', all(torch.equal(v, t0[k]) and torch.equal(v, saved[k]) for k, v in teacher.state_dict().items()))
        print('TEACHER_FROZEN', (not teacher.training) and not any(p.requires_grad for p in teacher.parameters()))
        changed = [k for k, v in student.state_dict().items() if k.endswith('weight') and not torch.equal(v, s0[k])]
        print('STUDENT_CHANGED', len(changed), sum(k.endswith('weight') for k in s0))
        print('SIZES', sorted(set(sizes)))
        """
    )
    out = run([sys.executable, "-c", check], cwd=tmp_path).stdout
    assert "TEACHER_SAME True" in out and "TEACHER_FROZEN True" in out, out
    changed, total = map(int, out.split("STUDENT_CHANGED ")[1].split()[:2])
    assert changed > 0.9 * total, out
    assert "(48, 48)" in out and "(64, 64)" in out and "(80, 80)" in out, out


def test_evaluation_per_test_set(chain):
    root = chain["root"]
    proc = bundle_run(BUNDLE, ["train.json", "evaluate.json"], cwd=chain["work"], run_id="evaluating",
                      bundle_root=str(root), dataset_dir=str(chain["data"]), image_size=64)
    assert_progress_eta(proc.stdout, "evaluating")
    rows = list(csv.DictReader(open(root / "eval" / "test" / "metrics.csv")))
    assert [r["set"] for r in rows] == ["Kvasir", "CVC-ClinicDB", "CVC-ColonDB", "ETIS-LaribPolypDB", "CVC-300"]
    assert all(r["images"] == "2" and 0 <= float(r["mDice"]) <= 1 and 0 <= float(r["Dice@0.5"]) <= 1 for r in rows)
    assert rows[0]["paper_mDice"] == "0.9130" and rows[3]["paper_mIoU"] == "0.6770"
    md = (root / "eval" / "test" / "metrics.md").read_text()
    assert "paper mDice" in md and "threshold-averaged" in md
    assert "min-max normalised, uint8-quantised (as Polyp-PVT Test.py, paper-comparable)" in md
    metrics = json.loads((root / "eval" / "test" / "metrics.json").read_text())
    assert metrics["minmax_normalise"] is True and metrics["quantise_uint8"] is True
    assert all(r["evaluation"].endswith("paper-comparable)") for r in rows)
    assert len(list((root / "eval" / "test" / "overlays").glob("*.png"))) == 10
    raw = list(csv.DictReader(open(root / "eval" / "test" / "mdice_raw.csv")))  # MONAI MetricsSaver's per-image file
    assert len(raw) == 10 and raw[0]["filename"].startswith("Kvasir/") and (root / "eval" / "test" / "mdice_summary.csv").is_file()


def test_multi_gpu_evaluate_matches_one_process(chain, tmp_path):
    """multi_gpu_evaluate.json in 2 CPU processes: the same per-set table, the sets in the same order."""
    root = chain["root"]
    args = dict(bundle_root=str(root), dataset_dir=str(chain["data"]), image_size=64)
    if not (root / "eval" / "test" / "metrics.json").is_file():  # run alone: the one-process evaluation first
        bundle_run(BUNDLE, ["train.json", "evaluate.json"], cwd=chain["work"], run_id="evaluating", **args)
    assert_ddp_evaluation_matches(BUNDLE, root / "eval", tmp_path, ["test/metrics.json"], "test/overlays", **args)


def test_inference_any_size_to_binary_png(chain, tmp_path):
    from PIL import Image

    new = tmp_path / "new"
    new.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((70, 101, 3)) * 255).astype(np.uint8)).save(new / "wide.jpg")
    Image.fromarray((rng.random((90, 50)) * 255).astype(np.uint8)).save(new / "grey.png")  # grey: repeated to RGB
    src = chain["data"] / "TestDataset" / "CVC-300" / "images" / "1.png"
    (new / "frame.png").write_bytes(src.read_bytes())
    (new / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    bundle_run(BUNDLE, ["inference.json"], cwd=tmp_path, bundle_root=str(chain["root"]), dataset_dir=str(new),
               output_dir=str(out), image_size=64, save_probabilities=True)
    for stem, size in (("wide", (101, 70)), ("grey", (50, 90)), ("frame", Image.open(src).size)):
        mask = Image.open(out / f"{stem}.png")
        assert mask.size == size and mask.mode == "L"
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
        assert Image.open(out / f"{stem}_prob.png").size == size
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{s}.png" for s in ("wide", "grey", "frame")] + [f"{s}_prob.png" for s in ("wide", "grey", "frame")]
        + ["inference_report.json"])



def test_ddp_two_cpu_processes(chain, tmp_path):
    """multi_gpu_train.json under torchrun (gloo): distillation in 2 processes saves one model."""
    files = json.dumps([str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29547",
           "-m", "monai.bundle", "run", "training", "--config_file", files, "--bundle_root", str(tmp_path),
           "--dataset_dir", str(chain["data"]), "--teacher_ckpt", str(chain["teacher"]), "--epochs", "1",
           "--image_size", "64", "--size_multiple", "16", "--batch_size", "2",
           "--val_fraction", "0.2"]  # 2 validation images: one per rank
    run(cmd, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    saved = sorted(str(p.relative_to(tmp_path / "models")) for p in (tmp_path / "models").rglob("*.pt"))
    assert saved == ["model.pt", "resume/checkpoint.pt"]
