"""Dataset scanning/splitting and the shared ignite handlers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.transforms import Transform
from shared_transforms.datalist import fold_datalist, list_images, scan_cases, split_cases
from shared_transforms.handlers import ResumeCheckpointLoader, ResumeCheckpointSaver, SegmentationReport, dice_iou


def _cases(site: str, n: int) -> list[dict]:
    return [{"case": f"{site}/Case{i:02d}", "site": site, "image": f"{site}{i}"} for i in range(n)]


def test_split_is_per_patient_deterministic_and_disjoint():
    cases = _cases("A", 30) + _cases("B", 30)
    # two files of one patient must stay together
    cases.append({"case": "A/Case00", "site": "A", "image": "A0-second-phase"})
    split = split_cases(cases, test_fraction=0.2, n_folds=5, seed=3, group_key="site")
    assert split == split_cases(cases, test_fraction=0.2, n_folds=5, seed=3, group_key="site")
    assert split != split_cases(cases, test_fraction=0.2, n_folds=5, seed=4, group_key="site")
    test_ids = {c["case"] for c in split["test"]}
    assert len(test_ids) == 12  # 20% of 30 patients per site
    fold_ids = [{c["case"] for c in f} for f in split["folds"]]
    for site in "AB":  # each site's 24 non-test patients spread evenly over the 5 folds
        assert sorted(len({c for c in f if c.startswith(site)}) for f in fold_ids) == [4, 5, 5, 5, 5]
    everything = set().union(*fold_ids, test_ids)
    assert len(everything) == 60 and sum(map(len, fold_ids)) + len(test_ids) == 60
    assert not any(test_ids & f for f in fold_ids)
    assert all(not (fold_ids[i] & fold_ids[j]) for i in range(5) for j in range(i + 1, 5))
    second_phase = [c for c in split["test"] + [c for f in split["folds"] for c in f] if c["case"] == "A/Case00"]
    assert len(second_phase) == 2
    assert len({("test" if c in split["test"] else "fold") for c in second_phase}) == 1
    d = fold_datalist(split, 2)
    assert {c["case"] for c in d["validation"]} == fold_ids[2]
    assert not ({c["case"] for c in d["training"]} & fold_ids[2])


def test_site_test_set_does_not_depend_on_merged_sites():
    alone = split_cases(_cases("A", 20), seed=0, group_key="site")
    merged = split_cases(_cases("A", 20) + _cases("C", 10), seed=0, group_key="site")
    assert {c["case"] for c in alone["test"]} == {c["case"] for c in merged["test"] if c["site"] == "A"}


def test_fold_with_too_few_patients_is_a_clear_error():
    split = split_cases(_cases("A", 3), test_fraction=0.0, n_folds=5)
    with pytest.raises(ValueError, match="too few patients"):
        fold_datalist(split, 4)


def _nii(path, shape):
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)), str(path))
    return str(path)


def test_scan_reports_each_broken_case_and_keeps_the_rest(tmp_path):
    good = {"case": "ok", "image": _nii(tmp_path / "a.nii.gz", (8, 8, 4)), "label": _nii(tmp_path / "a_l.nii.gz", (8, 8, 4))}
    trunc = tmp_path / "t.nii.gz"
    _nii(trunc, (32, 32, 16))
    trunc.write_bytes(trunc.read_bytes()[:200])
    truncated = {"case": "trunc", "image": str(trunc), "label": good["label"]}
    mismatch = {"case": "mm", "image": good["image"], "label": _nii(tmp_path / "m_l.nii.gz", (8, 8, 3))}
    unlabelled = {"case": "nolabel", "image": good["image"], "label": None}
    kept, bad = scan_cases([truncated, good, mismatch, unlabelled])
    assert [c["case"] for c in kept] == ["ok"] and kept[0]["axcodes"] == "RAS"
    by_case = {b["case"]: b for b in bad}
    assert by_case["trunc"]["file"] == str(trunc) and "cannot read" in by_case["trunc"]["reason"]
    assert "(8, 8, 4)" in by_case["mm"]["reason"] and "(8, 8, 3)" in by_case["mm"]["reason"]
    assert by_case["nolabel"]["reason"] == "no label file"


def test_list_images_only_direct_children(tmp_path):
    _nii(tmp_path / "x.nii.gz", (4, 4, 4))
    _nii(tmp_path / "x_segmentation.nii.gz", (4, 4, 4))
    (tmp_path / "sub").mkdir()
    _nii(tmp_path / "sub" / "y.nii", (4, 4, 4))
    assert list_images(tmp_path, exclude=["_segmentation"]) == [{"image": str(tmp_path / "x.nii.gz")}]
    with pytest.raises(FileNotFoundError, match="no "):
        list_images(tmp_path, patterns=["*.png"])


def test_dice_iou_by_hand():
    assert dice_iou(3, 1, 2) == pytest.approx((6 / 9, 3 / 6))
    assert dice_iou(0, 0, 0) == (1.0, 1.0)
    assert dice_iou(0, 5, 0) == (0.0, 0.0)


def test_segmentation_report_per_case_pixelwise(tmp_path):
    def item(case, pred, label):
        return {"case": case, "pred": torch.tensor(pred)[None].float(), "label": torch.tensor(label)[None].float(),
                "image": torch.rand(1, 2, 3)}

    # case A: two slices pooled: tp=3, fp=1, fn=1 -> Dice 6/8, IoU 3/5; case B: tp=0, fp=0, fn=2 -> 0
    outputs = [
        [item("A", [[1, 1, 0], [0, 0, 0]], [[1, 0, 0], [0, 0, 0]]), item("A", [[1, 1, 0], [0, 0, 0]], [[1, 1, 1], [0, 0, 0]])],
        [item("B", [[0, 0, 0], [0, 0, 0]], [[0, 0, 0], [1, 1, 0]])],
    ]
    engine = Engine(lambda e, b: outputs[e.state.iteration - 1])
    report = SegmentationReport(str(tmp_path), num_overlays=2)
    report.attach(engine)
    engine.run([0, 1], max_epochs=1)
    result = json.loads((tmp_path / "metrics.json").read_text())
    rows = {r["case"]: r for r in result["cases"]}
    assert rows["A"]["dice"] == pytest.approx(75.0) and rows["A"]["iou"] == pytest.approx(60.0)
    assert rows["A"]["slices"] == 2 and rows["B"]["dice"] == 0.0
    assert result["mean_dice"] == pytest.approx(37.5)
    assert result["pooled_dice"] == pytest.approx(100 * 6 / 10)
    assert [r["case"] for r in csv.DictReader(open(tmp_path / "metrics.csv"))] == ["A", "B"]
    assert "37.50" in (tmp_path / "metrics.md").read_text()
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 2


def test_overlay_colours_each_kind_of_pixel_by_hand():
    """overlay_rgb (blend_images): missed truth green, false positive red, agreement yellow, the rest the image."""
    from shared_transforms.handlers import overlay_rgb

    image = np.full((4, 4), 0.5)
    image[0, 0], image[3, 3] = 0.0, 1.0  # the percentile range
    gt, pred = np.zeros((4, 4)), np.zeros((4, 4))
    gt[1, 1] = gt[1, 2] = 1
    pred[1, 2] = pred[2, 2] = 1
    rgb = overlay_rgb(image, gt, pred, alpha=0.5)
    grey = np.clip((image - np.percentile(image, 1)) / (np.percentile(image, 99) - np.percentile(image, 1)), 0, 1)
    assert rgb.shape == (4, 4, 3)
    np.testing.assert_allclose(rgb[0, 1], [grey[0, 1]] * 3)  # untouched
    np.testing.assert_allclose(rgb[1, 1], 0.5 * grey[1, 1] + 0.5 * np.array([0.0, 1.0, 0.0]))  # lime
    np.testing.assert_allclose(rgb[2, 2], 0.5 * grey[2, 2] + 0.5 * np.array([1.0, 0.0, 0.0]))  # red
    np.testing.assert_allclose(rgb[1, 2], 0.5 * grey[1, 2] + 0.5 * np.array([1.0, 1.0, 0.0]))  # yellow
    photo = overlay_rgb(np.full((4, 4, 3), 255, np.uint8), None, pred, alpha=0.5)  # RGB 0-255, no truth
    np.testing.assert_allclose(photo[2, 2], [1.0, 0.5, 0.5])
    np.testing.assert_allclose(photo[0, 0], [1.0, 1.0, 1.0])


def _ddp_gather(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from monai.data import DistributedSampler
    from shared_transforms.utils import gather_in_order

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    mine = list(DistributedSampler(list(range(7)), even_divisible=False, shuffle=False, num_replicas=2, rank=rank))
    merged = gather_in_order(mine)
    # one case's slices split between the ranks: the report adds them up (the test above, split in two)
    def item(case, pred, label):
        return {"case": case, "pred": torch.tensor(pred)[None].float(), "label": torch.tensor(label)[None].float(),
                "image": torch.rand(1, 2, 3)}

    parts = [[item("A", [[1, 1, 0], [0, 0, 0]], [[1, 0, 0], [0, 0, 0]])],
             [item("A", [[1, 1, 0], [0, 0, 0]], [[1, 1, 1], [0, 0, 0]]), item("B", [[0, 0, 0], [0, 0, 0]], [[0, 0, 0], [1, 1, 0]])]]
    engine = Engine(lambda e, b: parts[rank])
    SegmentationReport(out, num_overlays=2).attach(engine)
    engine.run([0], max_epochs=1)
    if rank == 0:
        Path(out, "order.json").write_text(json.dumps({"mine": mine, "merged": merged}))
    dist.destroy_process_group()


def test_ddp_gather_restores_order_and_sums_a_split_case(tmp_path):
    """Under 2 gloo processes: gather_in_order gives the one-process order; SegmentationReport merges the ranks'
    counts before rank 0 alone writes (the same numbers as the one-process test above)."""
    import torch.multiprocessing as mp
    from bundle_cli import free_port

    mp.spawn(_ddp_gather, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    order = json.loads((tmp_path / "order.json").read_text())
    assert order == {"mine": [0, 2, 4, 6], "merged": list(range(7))}
    result = json.loads((tmp_path / "metrics.json").read_text())
    rows = {r["case"]: r for r in result["cases"]}
    assert rows["A"]["dice"] == pytest.approx(75.0) and rows["A"]["slices"] == 2 and rows["B"]["dice"] == 0.0
    assert result["pooled_dice"] == pytest.approx(100 * 6 / 10)
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 2
    # MONAI MetricsSaver's per-case files beside the table (fractions)
    raw = list(csv.DictReader(open(tmp_path / "dice_raw.csv")))
    assert [(r["filename"], float(r["foreground"])) for r in raw] == [("A", 0.75), ("B", 0.0)]
    summary = {r["class"]: r for r in csv.DictReader(open(tmp_path / "iou_summary.csv"), delimiter=",")}
    assert float(summary["foreground"]["mean"]) == pytest.approx(0.3) and float(summary["foreground"]["notnans"]) == 2


def _trainer(model, opt):
    def step(engine, batch):
        opt.zero_grad()
        loss = model(torch.ones(1, 2)).sum()
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    return Engine(step)


def _resume(engine, path, objects, **kwargs) -> ResumeCheckpointLoader:
    """The pair a train config attaches: MONAI's CheckpointLoader and CheckpointSaver for the resume file."""
    loader = ResumeCheckpointLoader(str(path), objects, **kwargs)
    loader.attach(engine)
    ResumeCheckpointSaver(str(path.parent), objects, filename=path.name, **kwargs).attach(engine)
    return loader


def test_resume_checkpoint_restores_state_and_respects_fingerprint(tmp_path):
    path = tmp_path / "resume" / "checkpoint.pt"
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = _trainer(model, opt)
    _resume(first, path, {"model": model, "optimizer": opt}, fingerprint="run-a")
    first.run([0, 0], max_epochs=2)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"], "one file, no temporary one left"

    # a new process: fresh objects, asked for 3 epochs -> resumes at epoch 2 and runs one more
    model2 = torch.nn.Linear(2, 1)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    second = _trainer(model2, opt2)
    seen = {}
    second.add_event_handler(Events.EPOCH_STARTED, lambda e: seen.setdefault("first_epoch", e.state.epoch))
    _resume(second, path, {"model": model2, "optimizer": opt2}, fingerprint="run-a")
    second.add_event_handler(Events.STARTED, lambda e: seen.setdefault("weights", {k: v.clone() for k, v in model2.state_dict().items()}))
    second.run([0, 0], max_epochs=3)
    assert seen["first_epoch"] == 3 and second.state.iteration == 6
    assert all(torch.equal(seen["weights"][k], saved[k]) for k in saved)
    after_three = {k: v.clone() for k, v in model2.state_dict().items()}

    # asked for fewer epochs than the checkpoint holds: nothing to train (MONAI's loader alone would raise)
    model_f = torch.nn.Linear(2, 1)
    fewer = _trainer(model_f, torch.optim.SGD(model_f.parameters(), lr=0.1))
    _resume(fewer, path, {"model": model_f}, fingerprint="run-a")
    fewer.run([0, 0], max_epochs=2)
    assert fewer.state.epoch == 3 and fewer.state.iteration == 6
    assert all(torch.equal(model_f.state_dict()[k], after_three[k]) for k in after_three)

    # another run's checkpoint is not resumed from
    model3 = torch.nn.Linear(2, 1)
    opt3 = torch.optim.SGD(model3.parameters(), lr=0.1)
    third = _trainer(model3, opt3)
    _resume(third, path, {"model": model3, "optimizer": opt3}, fingerprint="run-b")
    third.run([0, 0], max_epochs=1)
    assert third.state.iteration == 2

    # a checkpoint of an older version without an object added since: the rest resumes, the new object starts afresh
    class Counter:
        def __init__(self):
            self.n = 0

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, state):
            self.n = state["n"]

    model4 = torch.nn.Linear(2, 1)
    fourth = _trainer(model4, torch.optim.SGD(model4.parameters(), lr=0.1))
    counter = Counter()
    _resume(fourth, path, {"model": model4, "counter": counter}, fingerprint="run-b")
    fourth.run([0, 0], max_epochs=2)
    assert fourth.state.iteration == 4 and counter.n == 0
    # without the network itself the checkpoint is refused with its path in the message
    torch.save({"trainer": {"epoch": 1}, "fingerprint": "run-c"}, path)
    fifth = _trainer(torch.nn.Linear(2, 1), None)
    _resume(fifth, path, {"model": torch.nn.Linear(2, 1)}, fingerprint="run-c")
    with pytest.raises(ValueError, match="no 'model'"):
        fifth.run([0, 0], max_epochs=1)


def test_resume_from_a_checkpoint_written_before_0_4(tmp_path):
    """The former ResumeCheckpoint kept fingerprint, random states and best metric at the top level: all restored."""
    from shared_transforms.handlers import rng_state

    path = tmp_path / "resume" / "checkpoint.pt"
    path.parent.mkdir()
    model = torch.nn.Linear(2, 1)
    torch.manual_seed(3)
    expected = float(torch.rand(1))
    torch.manual_seed(3)
    old = {"model": model.state_dict(), "trainer": {"iteration": 4, "max_epochs": 2, "epoch_length": 2},
           "rng": rng_state(), "best": {"best_metric": 0.8, "best_metric_epoch": 2, "savers": []},
           "fingerprint": "run-a"}
    torch.save(old, path)
    torch.manual_seed(99)
    evaluator = Engine(lambda e, b: None)
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = -1.0, -1
    model2 = torch.nn.Linear(2, 1)
    trainer = _trainer(model2, torch.optim.SGD(model2.parameters(), lr=0.1))
    draws = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: draws.append(float(torch.rand(1))))
    _resume(trainer, path, {"model": model2}, fingerprint="run-a", evaluator=evaluator)
    trainer.run([0, 0], max_epochs=3)
    assert trainer.state.iteration == 6 and evaluator.state.best_metric == 0.8
    assert draws == [expected]  # the saved torch random state, not the seed set before the run


class _CountingSlicer(Transform):
    """A deterministic MONAI transform: (C, X, Y, Z) volume -> one dict per slice; counts its calls.

    (PersistentDataset caches MONAI ``Transform``s only: anything else counts as random.)
    """

    calls = 0

    def __call__(self, case):
        if case["image"] is None:
            raise ValueError("cannot read this case")
        type(self).calls += 1
        volume = torch.as_tensor(case["image"], dtype=torch.float32)
        return [{"image": volume[..., k], "case": case["case"]} for k in range(volume.shape[-1])]


def test_slice_dataset_flattens_caches_and_skips_broken_cases(tmp_path):
    from shared_transforms.datasets import SliceDataset

    rng = np.random.default_rng(0)
    data = [
        {"case": "a", "image": rng.normal(3.0, 2.0, (1, 4, 4, 3)).tolist()},
        {"case": "broken", "image": None},
        {"case": "b", "image": rng.normal(3.0, 2.0, (1, 4, 4, 2)).tolist()},
    ]
    _CountingSlicer.calls = 0
    ds = SliceDataset(data, _CountingSlicer(), cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 5 and [ds[i]["case"] for i in range(5)] == ["a", "a", "a", "b", "b"]
    assert [s["case"] for s in ds.skipped] == ["broken"] and "cannot read" in ds.skipped[0]["reason"]
    assert _CountingSlicer.calls == 2
    again = SliceDataset(data, _CountingSlicer(), cache_dir=str(tmp_path / "cache"))
    assert _CountingSlicer.calls == 2, "a warm cache must not rerun the volume transform"
    assert torch.equal(again[4]["image"], ds[4]["image"])
    pixels = np.concatenate([np.asarray(d["image"]).ravel() for d in data if d["image"] is not None])
    stats = ds.intensity_stats()
    assert stats["mean"] == pytest.approx(pixels.mean(), rel=1e-6) and stats["std"] == pytest.approx(pixels.std(), rel=1e-5)


def test_slice_cache_follows_files_settings_and_code_not_runtime_state(tmp_path):
    """The N4 cache key: a regenerated file or a changed setting recomputes; a reused chain hits."""
    from monai.transforms import Compose, LoadImaged
    from shared_transforms import N4BiasFieldCorrectiond, SelectSlicesd
    from shared_transforms.datasets import SliceDataset, transform_hash

    def chain(shrink: int = 2) -> Compose:
        return Compose([LoadImaged(["image", "label"], ensure_channel_first=True, image_only=True),
                        _Counting(), N4BiasFieldCorrectiond("image", shrink_factor=shrink),
                        SelectSlicesd(["image", "label"], label_key="label", min_area=0)])

    rng = np.random.default_rng(0)
    image, label = tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz"
    lab = np.zeros((24, 24, 3), np.uint8)
    lab[8:16, 8:16] = 1
    nib.save(nib.Nifti1Image(rng.uniform(50, 100, (24, 24, 3)).astype(np.float32), np.eye(4)), image)
    nib.save(nib.Nifti1Image(lab, np.eye(4)), label)
    data, cache = [{"image": str(image), "label": str(label)}], str(tmp_path / "cache")

    _Counting.calls = 0
    used = chain()
    before = transform_hash(used.flatten().transforms)
    first = SliceDataset(data, used, cache_dir=cache)
    assert _Counting.calls == 1
    assert transform_hash(used.flatten().transforms) == before, "running a chain must not change its key"
    SliceDataset(data, used, cache_dir=cache)  # the same, already used Compose: a cache hit
    SliceDataset(data, chain(), cache_dir=cache)  # an equal new Compose: a hit
    assert _Counting.calls == 1
    SliceDataset(data, chain(shrink=3), cache_dir=cache)  # another N4 setting: recomputed
    assert _Counting.calls == 2

    # the same path, regenerated with other content: recomputed, and the new content is served
    nib.save(nib.Nifti1Image(rng.uniform(150, 200, (24, 24, 3)).astype(np.float32), np.eye(4)), image)
    regenerated = SliceDataset(data, chain(), cache_dir=cache)
    assert _Counting.calls == 3
    assert float(regenerated[0]["image"].mean()) > 1.4 * float(first[0]["image"].mean())


class _Counting(Transform):
    """Identity, counting its calls (how often the cached chain really runs)."""

    calls = 0

    def __call__(self, data):
        type(self).calls += 1
        return data


def test_transform_hash_covers_project_code(monkeypatch):
    from shared_transforms import N4BiasFieldCorrectiond
    from shared_transforms import datasets

    chain = [N4BiasFieldCorrectiond("image")]
    before = datasets.transform_hash(chain)
    monkeypatch.setattr(datasets, "_code_version", lambda cls: "edited")
    assert datasets.transform_hash(chain) != before


def test_case_dice_pools_slices_per_case_like_the_report(tmp_path):
    """Validation's metric is the test table's: per case pooled over slices, then the mean over cases."""
    from shared_transforms.handlers import CaseDice

    def item(pred_px: int, label_px: int, overlap: int) -> dict:
        pred, label = torch.zeros(1, 10, 10), torch.zeros(1, 10, 10)
        pred.view(-1)[:pred_px] = 1
        label.view(-1)[pred_px - overlap: pred_px - overlap + label_px] = 1
        return {"pred": pred, "label": label, "image": label.clone()}

    # case a: a big slice matched exactly and a tiny slice missed; case b: half overlap
    iterations = [[("a", item(50, 50, 50)), ("a", item(2, 2, 0))], [("b", item(20, 20, 10))]]

    def step(engine, batch):
        engine.state.batch = [{"case": c} for c, _ in batch]
        return [i for _, i in batch]

    engine = Engine(step)
    CaseDice().attach(engine, "val_mean_dice")
    report = SegmentationReport(str(tmp_path))
    report.attach(engine)
    engine.run(iterations, max_epochs=1)
    case_a = 2 * 50 / (2 * 50 + 2 + 2)  # pooled: tp 50, fp 2, fn 2 -> 0.9615 (per-slice mean would be 0.5)
    expected = (case_a + 0.5) / 2
    assert engine.state.metrics["val_mean_dice"] == pytest.approx(expected)
    assert report.summary()["mean_dice"] == pytest.approx(100 * expected)


def test_learning_curves_keep_the_epochs_before_a_resume(tmp_path):
    from shared_transforms.handlers import LearningCurves

    def attempt(max_epochs: int) -> list[dict]:
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        trainer = _trainer(model, opt)
        _resume(trainer, tmp_path / "ckpt.pt", {"model": model, "optimizer": opt})
        LearningCurves(str(tmp_path / "eval"), optimizer=opt).attach(trainer)
        trainer.run([0, 0], max_epochs=max_epochs)
        return list(csv.DictReader(open(tmp_path / "eval" / "learning_curves.csv")))

    first = attempt(2)  # "killed" after epoch 2
    whole = attempt(4)  # the same command again resumes at epoch 3
    assert [int(r["epoch"]) for r in whole] == [1, 2, 3, 4]
    assert [r["train_loss"] for r in whole[:2]] == [r["train_loss"] for r in first]
    assert float(whole[3]["train_loss"]) < float(whole[0]["train_loss"])


def test_slice_dataset_caps_slices_and_reports_skipped_cases(tmp_path):
    from shared_transforms.datasets import SliceDataset

    rng = np.random.default_rng(0)
    data = [{"case": c, "image": rng.normal(size=(1, 4, 4, 3)).tolist()} for c in ("a", "b", "c")]
    data.insert(1, {"case": "broken", "image": None})
    report = tmp_path / "bad_cases.json"
    report.write_text(json.dumps([{"case": "x", "file": "x.nii.gz", "reason": "no label file"}]))
    _CountingSlicer.calls = 0
    capped = SliceDataset(data, _CountingSlicer(), max_slices=4, report_file=str(report))
    assert len(capped) == 4 and [capped[i]["case"] for i in range(4)] == ["a", "a", "a", "b"]
    assert _CountingSlicer.calls == 2, "volumes after the cap are not prepared"
    reported = json.loads(report.read_text())
    assert [r["case"] for r in reported] == ["x", "broken"] and "cannot read" in reported[1]["reason"]
    SliceDataset(data, _CountingSlicer(), report_file=str(report))  # once per case, however often it is built
    assert [r["case"] for r in json.loads(report.read_text())] == ["x", "broken"]
    with pytest.raises(ValueError, match="max_slices"):
        SliceDataset(data, _CountingSlicer(), max_slices=0)


def test_transform_hash_tells_functions_apart():
    from monai.transforms import Lambdad
    from shared_transforms.datasets import transform_hash

    def double(x):
        return 2 * x

    def triple(x):
        return 3 * x

    assert transform_hash([Lambdad("image", double)]) != transform_hash([Lambdad("image", triple)])
    assert transform_hash([Lambdad("image", lambda x: x + 1)]) != transform_hash([Lambdad("image", lambda x: x - 1)])
    assert transform_hash([Lambdad("image", double)]) == transform_hash([Lambdad("image", double)])
