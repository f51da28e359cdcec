"""The benchmarks' hand-written training steps compute the bundles' own updates (bench_utils.update_difference).

A bundle-iteration ÷ hand-written-step ratio measures the bundle's overhead only if both sides do the same
work: the hand step of each bundle must move the weights where the bundle's iteration moves them (float
rounding apart), and a hand step that leaves out the bundle's own part (multi-scale KD, gradient clipping,
one-hot labels) must not. Each bundle runs in its own process (each has its own ``scripts`` package).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

SAME = 1e-5  # hand step vs bundle iteration: the largest weight difference ÷ the largest weight change
DIFFERENT = 0.05  # what a hand step that leaves out a part of the bundle's iteration must exceed

ROOT = Path(__file__).resolve().parents[1]


def _differences(name: str, tmp: Path) -> dict[str, float]:
    """``{hand step: update difference}`` for bundle ``name``, at tiny sizes, on phantoms in ``tmp``."""
    import torch
    from bench_utils import (clipped_hand_step, kdas_hand_step, plain_hand_step, prepared_hand_step,
                             update_difference, workflow)
    from bundle_cli import BUNDLES, make_phantoms

    bundle = BUNDLES / name
    sys.path.insert(0, str(bundle))

    def diff(configs, hand, **overrides):
        torch.manual_seed(0)
        return update_difference(workflow(bundle, configs, **overrides), hand=hand)

    def twice(wf, trainer, device):  # a wrong step: two updates per batch
        step = plain_hand_step(wf, trainer, device)
        return lambda batch: (step(batch), step(batch))

    run = dict(bundle_root=str(tmp), batch_size=4, epochs=1, resume=False, val_interval=10**6)
    log = tmp / "phantoms.log"
    if name == "polyp_kdas_student":
        data = make_phantoms("polyp", tmp / "data", log, train=12, per_test_set=1, size=64, broken=False)
        # 64 with multiples of 16: rates 0.75 / 1 / 1.25 give 48 / 64 / 80, so the resizes run on both sides
        common = dict(dataset_dir=str(data), image_size=64, size_multiple=16, **run)
        teacher = workflow(bundle, ["train.json"], **common).parser.get_parsed_content("teacher_def")
        torch.save(teacher.state_dict(), tmp / "teacher.pt")
        common["teacher_ckpt"] = str(tmp / "teacher.pt")

        def one_scale(wf, trainer, device):  # a wrong step: the KDAS step at the base size only
            step_fn, step = wf.parser.get_parsed_content("train#step"), kdas_hand_step(wf, trainer, device)

            def run_one(batch):
                sizes, step_fn.sizes = step_fn.sizes, [batch["image"].shape[-1]]
                try:
                    step(batch)
                finally:
                    step_fn.sizes = sizes

            return run_one

        sizes = workflow(bundle, ["train.json"], **common).parser.get_parsed_content("train#step").sizes
        assert sorted(sizes) == [48, 64, 80], sizes
        return {"kdas": diff(["train.json"], kdas_hand_step, **common),
                "teacher kdas": diff(["train_teacher.json"], kdas_hand_step, **common),
                "one scale (wrong)": diff(["train.json"], one_scale, **common)}
    if name == "cardiac_qc_refinement":
        data = make_phantoms("cardiac", tmp / "data", log, subjects=6, ood_subjects=1, sa_shape="(64,64,3)")
        common = dict(dataset_dir=str(data), image_size=64, filters=[8, 16, 32, 64], deep_supr_num=2, augment=False,
                      **run)
        # grad_clip 1e-4 binds (12 may not at this size): the clipped step must follow it, the plain one must not
        return {"clipped": diff(["train.json"], clipped_hand_step, **common),
                "clipped, binding": diff(["train.json"], clipped_hand_step, grad_clip=1e-4, **common),
                "prepared": diff(["train.json", "train_qc.json"], prepared_hand_step, **common),
                "plain, binding clip (wrong)": diff(["train.json"], plain_hand_step, grad_clip=1e-4, **common)}
    if name == "prostate_mri_transfer":
        data = make_phantoms("prostate", tmp / "data", log, cases_per_site=4, shape="(48,48,6)")
        common = dict(dataset_dir=str(data), sites=["RUNMC"], image_size=32, encoder="efficientnet-b0", min_area=10,
                      **run)
    else:
        data = make_phantoms("liver_mri", tmp / "data", log, cases=8, shape="(48,40,8)")
        common = dict(dataset_dir=str(data), image_size=32, channels=[8, 16, 32, 64], **run)
    return {"plain": diff(["train.json"], plain_hand_step, **common),
            "twice (wrong)": diff(["train.json"], twice, **common)}


@pytest.mark.parametrize("name", ["polyp_kdas_student", "cardiac_qc_refinement", "prostate_mri_transfer",
                                  "liver_ct_mri_transfer"])
def test_hand_step_updates_the_weights_as_the_bundle_iteration_does(name, tmp_path):
    import subprocess

    out = tmp_path / "differences.json"
    proc = subprocess.run([sys.executable, __file__, name, str(out)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    found = json.loads(out.read_text())
    for hand, d in found.items():
        if "(wrong)" in hand:
            assert d > DIFFERENT, f"{name}: a wrong hand step ({hand}) updates the weights as the bundle does: {found}"
        else:
            assert d < SAME, f"{name}: the {hand} hand step's update differs from the bundle iteration's: {found}"


def test_training_ratio_times_the_bundle_handlers_and_leaves_them_out_of_the_hand_step():
    """Known answer: a trainer whose handlers sleep 5 ms (ITERATION_STARTED), 10 ms (MONAI's MODEL_COMPLETED) and
    20 ms (ITERATION_COMPLETED) per iteration, against a hand step that sleeps 40 ms: the bench attributes 35 ms
    to the handlers, by name, on the bundle side only, and 40 ms to the hand side (none of its own handlers,
    no hand step inside the bundle's span)."""
    import time
    from types import SimpleNamespace

    import torch
    from bench_utils import describe_training, training_iteration_ratio
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer
    from monai.engines.utils import IterationEvents

    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    data = [{"image": torch.rand(4, 1, 16, 16), "label": torch.rand(4, 1, 16, 16)} for _ in range(3)]
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=data, network=net,
                                optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=torch.nn.MSELoss())

    def slow_start(engine):
        time.sleep(0.005)

    def slow_postprocessing(engine):
        time.sleep(0.01)

    def slow_logger(engine):
        time.sleep(0.02)

    def sleeping_hand(wf, trainer, device):
        return lambda batch: time.sleep(0.04)

    trainer.add_event_handler(Events.ITERATION_STARTED, slow_start)
    trainer.add_event_handler(IterationEvents.MODEL_COMPLETED, slow_postprocessing)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, slow_logger)
    parsed = {"train#trainer": trainer, "device": torch.device("cpu")}
    wf = SimpleNamespace(parser=SimpleNamespace(get_parsed_content=parsed.__getitem__))
    r = training_iteration_ratio(wf, 4, epochs=2, hand=sleeping_hand)
    assert r["iters"] == 6 and sum(before for *_, before in r["pairs"]) == 3  # hand steps before and after, in turn
    sleepers = {"slow_start", "slow_postprocessing", "slow_logger"}
    assert sleepers <= set(r["handlers"]) <= sleepers | {"_decollate_data"}, r["handlers"]  # MONAI's own, not ours
    for name, seconds in [("slow_start", 0.005), ("slow_postprocessing", 0.01), ("slow_logger", 0.02)]:
        assert seconds <= r["handlers"][name] < seconds + 0.015, r["handlers"]
    assert 0.035 <= r["handlers_s"] < 0.06
    assert 0.04 <= r["hand_iter_s"] < 0.055
    # the handlers and the real step (its first op after the sleeps is slow on 2 cores: about 12 ms), no hand step
    assert 0.035 <= r["bundle_iter_s"] < r["handlers_s"] + 0.025
    assert "slow_logger 2" in describe_training(r)


if __name__ == "__main__":  # the worker: python test_bench_hand_steps.py <bundle> <out.json>
    sys.path.insert(0, str(ROOT / "scripts"))
    with tempfile.TemporaryDirectory() as work:
        result = _differences(sys.argv[1], Path(work))
    Path(sys.argv[2]).write_text(json.dumps(result))
    print(json.dumps(result))
