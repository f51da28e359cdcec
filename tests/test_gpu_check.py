"""scripts/gpu_check.py: its ``--device cpu --smoke True`` mode runs the GPU check's whole flow on CPU, so
that the one command prepared for a scarce GPU machine cannot rot; and a check that fails makes it exit
non-zero with the reason in the report."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU_CHECK = REPO / "scripts" / "gpu_check.py"
BUNDLES = ["prostate_mri_transfer", "polyp_kdas_student", "cardiac_qc_refinement", "liver_ct_mri_transfer"]


def _run(out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(GPU_CHECK), "--device", "cpu", "--smoke", "True", "--out", str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent, timeout=900)


@pytest.mark.slow
def test_smoke_mode_runs_every_bundle_and_writes_the_report(tmp_path):
    out = tmp_path / "gc"
    proc = _run(out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "gpu_report.json").read_text())
    assert report["ok"] and not report["failures"]
    assert report["machine"]["device"] == "cpu" and report["machine"]["smoke"] is True
    assert list(report["bundles"]) == BUNDLES
    expected_training = {
        "prostate_mri_transfer": ["train"],
        "polyp_kdas_student": ["teacher", "student_kd"],
        "cardiac_qc_refinement": ["segmenter", "qc_autoencoder", "refine (1 iteration)"],
        "liver_ct_mri_transfer": ["ct_pretrain", "mri_transfer"],
    }
    for name, result in report["bundles"].items():
        stages = {s["stage"]: s for s in result["stages"]}
        assert list(stages) == expected_training[name] + ["evaluate", "inference"], name
        for stage in expected_training[name]:
            s = stages[stage]
            changed, total = map(int, s["weights_changed"].split("/"))
            assert 0 < changed <= total, (name, stage)
            assert s["amp"] is False  # MONAI's trainers autocast on CUDA only
            if "iterations" in s:  # trained through the bundle's SupervisedTrainer
                assert s["iterations"] >= 2 and math.isfinite(s["first_loss"]) and math.isfinite(s["last_loss"])
                assert s["train_images_per_s"] > 0
                hand = s["vs_hand_written"]
                assert hand["bundle_iter_s"] > 0 and hand["hand_iter_s"] > 0
                assert hand["ratio"] == pytest.approx(hand["bundle_iter_s"] / hand["hand_iter_s"])
        assert stages["evaluate"]["metrics"] and all(math.isfinite(v) for v in stages["evaluate"]["metrics"].values())
        inference = stages["inference"]
        assert inference["masks"] >= inference["inputs"] >= 1 and inference["infer_images_per_s"] > 0
    refine = report["bundles"]["cardiac_qc_refinement"]["stages"][2]
    assert refine["refinement_iterations"] == 1 and refine["ood_flagged"] > 0 and refine["start_weights"].startswith("resume")
    assert all(math.isfinite(v) for v in refine["losses"])
    kd = report["bundles"]["polyp_kdas_student"]["kdas_throughput"]
    assert kd["student_img_s"] > 0 and kd["student_over_teacher"] == pytest.approx(kd["student_img_s"] / kd["teacher_img_s"])
    import torch

    assert report["ddp"]["ok"] and report["ddp"]["backend"] == ("nccl" if torch.cuda.is_available() else "gloo")
    assert report["finished"] and report["wall_s"] < report["budget_s"]
    md = (out / "gpu_report.md").read_text()
    assert "PASSED" in md and all(name in md for name in BUNDLES) and "student ÷ teacher" in md


def test_a_failed_check_exits_non_zero_naming_it(tmp_path):
    """A learning rate of 0 leaves every parameter as it was: the check must fail, not pass quietly."""
    out = tmp_path / "gc"
    stale = out / "liver_ct_mri_transfer"  # an earlier run's success must not count
    stale.mkdir(parents=True)
    (stale / "result.json").write_text(json.dumps({"bundle": "liver_ct_mri_transfer", "ok": True, "stages": []}))
    proc = _run(out, "--bundles", "liver_ct_mri_transfer", "--ddp_bundle", "None", "--overrides",
                "{'learning_rate': 0.0, 'augment': False}")
    assert proc.returncode == 1, proc.stdout[-3000:]
    report = json.loads((out / "gpu_report.json").read_text())
    assert not report["ok"]
    assert report["failures"] == ["liver_ct_mri_transfer: CheckFailed: ct_pretrain: training did not change the weights"]
    assert "FAILED" in (out / "gpu_report.md").read_text()
    # the worker process got the overrides as Python literals, booleans kept
    assert report["bundles"]["liver_ct_mri_transfer"]["overrides"] == {"learning_rate": 0.0, "augment": False}


def test_cuda_requested_without_a_gpu_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--out", str(tmp_path / "gc")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "sees no CUDA device" in proc.stderr and "--device cpu --smoke True" in proc.stderr
