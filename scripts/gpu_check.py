"""One prepared command that runs every bundle's GPU path and writes a report: ``gpu_report.json`` / ``.md``.

For each bundle, on phantoms at the paper's sizes, through the bundle's real configs (MONAI's
``ConfigWorkflow``, as ``python -m monai.bundle run`` builds them; one subprocess per bundle, so the
bundles' ``scripts`` packages never meet):

- prostate_mri_transfer: UNet++ / EfficientNet-B3 at 384², batch 16;
- polyp_kdas_student: the PVTv2-B2 teacher, then the B0 student distilled from it, 352² with the
  multi-scale steps (256 / 352 / 448), batch 16; KDAS student ÷ teacher inference throughput at
  352², batch 16;
- cardiac_qc_refinement: the 7-level segmenter at 256², the QC autoencoder, one refinement iteration;
- liver_ct_mri_transfer: CT pre-training, then the MRI fine-tuning from the CT weights (two levels frozen);

it trains 2 epochs (AMP on CUDA), asserts finite losses and that training changed the weights,
measures training images/s (epoch 2, iterations only), evaluates, runs ``inference.json`` on new
cases (images/s, one mask per input), and times the bundle's training iteration ÷ a hand-written
AMP PyTorch loop on the same network, loss, optimiser and loader (bench_utils' hand steps), with the
bundle's own per-iteration handlers timed directly (host time). Then one bundle trains under
``torchrun --nproc_per_node 1`` with ``multi_gpu_train.json`` (NCCL on CUDA, gloo on CPU).

The command exits non-zero when any check failed; the report says which and why.

    python scripts/gpu_check.py --out gpu_check_out                      # a GPU machine (--budget 480 s; not yet run on one)
    python scripts/gpu_check.py --device cpu --smoke True --out /tmp/gc   # the same flow, tiny sizes, CPU
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import fire
from bench_utils import (
    HandlerTimer,
    IterationTimer,
    clipped_hand_step,
    kdas_hand_step,
    plain_hand_step,
    prepared_hand_step,
    ratio_to_hand,
    synchronize,
    timeit,
    workflow,
)
from bundle_cli import BUNDLES, bundle_cmd, make_phantoms, torchrun_cmd

ORDER = ("prostate_mri_transfer", "polyp_kdas_student", "cardiac_qc_refinement", "liver_ct_mri_transfer")
EPOCHS = 2

#: phantom and network sizes: the paper's (``full``) and tiny ones for ``--smoke True``
SIZES = {
    "prostate_mri_transfer": {
        "full": {
            "phantoms": {"cases_per_site": 6, "shape": "(384,384,12)"},
            "net": {"image_size": 384, "encoder": "efficientnet-b3"},
            "batch_size": 16,
        },
        "smoke": {
            "phantoms": {"cases_per_site": 4, "shape": "(48,48,6)"},
            "net": {"image_size": 32, "encoder": "efficientnet-b0", "min_area": 10},
            "batch_size": 4,
        },
    },
    "polyp_kdas_student": {
        "full": {
            "phantoms": {"train": 40, "per_test_set": 2, "size": 352, "broken": False},
            "net": {"image_size": 352},
            "batch_size": 16,
            "throughput_batch": 16,
        },
        "smoke": {
            "phantoms": {"train": 8, "per_test_set": 1, "size": 64, "broken": False},
            "net": {"image_size": 32, "size_multiple": 16},
            "batch_size": 4,
            "throughput_batch": 2,
        },
    },
    "cardiac_qc_refinement": {
        "full": {
            "phantoms": {"subjects": 8, "ood_subjects": 2, "sa_shape": "(256,256,8)"},
            "net": {"image_size": 256},
            "batch_size": 20,
        },
        "smoke": {
            "phantoms": {"subjects": 6, "ood_subjects": 2, "sa_shape": "(64,64,3)"},
            "net": {"image_size": 64, "filters": [8, 16, 32, 64], "deep_supr_num": 2},
            "batch_size": 4,
        },
    },
    "liver_ct_mri_transfer": {
        "full": {
            "ct": {"cases": 4, "shape": "(256,256,40)"},
            "mri": {"cases": 10, "shape": "(256,208,24)"},
            "net": {"image_size": 256},
            "ct_batch_size": 10,
            "batch_size": 18,
        },
        "smoke": {
            "ct": {"cases": 3, "shape": "(48,48,12)"},
            "mri": {"cases": 8, "shape": "(48,40,8)"},
            "net": {"image_size": 32, "channels": [8, 16, 32, 64]},
            "ct_batch_size": 4,
            "batch_size": 4,
        },
    },
}


class CheckFailed(AssertionError):
    """A check of the run failed (the report names it)."""


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise CheckFailed(what)


def _phantoms(kind: str, out_dir: Path, log: Path, **options) -> Path:
    return make_phantoms(kind, out_dir, log, echo=False, **options)


class BundleCheck:
    """The stages of one bundle, run in this process (one bundle per process)."""

    def __init__(self, name: str, out: Path, device: str, amp: bool, train_overrides: dict | None = None):
        self.name, self.out, self.device, self.amp = name, out, device, amp
        self.train_overrides = dict(train_overrides or {})
        self.bundle = BUNDLES / name
        self.root = out / "bundle"  # bundle_root: models/, eval/, cache/
        self.log = out / "log.txt"
        self.stages: list[dict] = []
        sys.path.insert(0, str(self.bundle))  # the bundle's scripts package, as the MONAI CLI adds it

    def _wf(self, configs: list[str], **overrides):
        return workflow(
            self.bundle,
            configs,
            bundle_root=str(self.root),
            device=f"$torch.device('{self.device}')",
            amp=self.amp,
            **overrides,
        )

    def train(self, stage: str, configs: list[str], batch_size: int, hand=None, **overrides) -> dict:
        """Train ``EPOCHS`` epochs; finite losses, changed weights, images/s, ratio to a hand-written step.

        ``hand(wf, trainer, device)``: makes the hand-written step (default :func:`~bench_utils.plain_hand_step`;
        the bundles' own: ``bench_utils.kdas_hand_step``, ``clipped_hand_step``, ``prepared_hand_step``); ``False``: none.
        """
        import torch
        from ignite.engine import Events

        wf = self._wf(
            configs, epochs=EPOCHS, batch_size=batch_size, resume=False, **{**overrides, **self.train_overrides}
        )

        network = wf.parser.get_parsed_content("network")
        trainer = wf.parser.get_parsed_content("train#trainer")
        before = {}  # parameters (BN statistics move without training) when training starts: after the run
        # list's initialisation (transfer weights, intensity statistics) and any resume

        @trainer.on(Events.STARTED)
        def snapshot(engine):
            before.update({k: v.detach().clone() for k, v in network.named_parameters()})

        timer = IterationTimer(self.device)
        timer.attach(trainer)
        handler_s = []  # the bundle's own handlers (decollation, post-processing, metrics, loggers) per iteration

        @trainer.on(Events.ITERATION_COMPLETED)
        def take_handler_time(engine):
            handler_s.append((engine.state.epoch, handlers.take()))

        ours = [h for h, *_ in trainer._event_handlers[Events.ITERATION_COMPLETED][-2:]]  # timer, take_handler_time
        handlers = HandlerTimer(self.device, skip=ours)
        trainer.add_event_handler(Events.STARTED, handlers.wrap)
        start = time.perf_counter()
        wf.run()
        synchronize(self.device)
        wall = time.perf_counter() - start
        after = dict(network.named_parameters())
        losses = [r["loss"] for r in timer.records]
        changed = sum(not torch.equal(v, after[k]) for k, v in before.items())
        last = [r for r in timer.records if r["epoch"] == EPOCHS]
        result = {
            "stage": stage,
            "configs": configs,
            "wall_s": wall,
            "amp": self.amp,
            "iterations": len(losses),
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "weights_changed": f"{changed}/{len(before)}",
            "train_images_per_s": sum(r["images"] for r in last) / max(sum(r["seconds"] for r in last), 1e-9),
        }
        self.stages.append(result)
        _check(len(losses) > 0 and len(last) > 0, f"{stage}: no training iteration in epoch {EPOCHS}")
        _check(all(math.isfinite(v) for v in losses), f"{stage}: non-finite loss {losses}")
        _check(changed > 0, f"{stage}: training did not change the weights")
        if hand is not False:
            step = (hand or plain_hand_step)(wf, trainer, self.device)
            result["vs_hand_written"] = vs = ratio_to_hand(timer, batch_size, step, self.device, trainer.data_loader)
            vs["handlers_s"] = statistics.median(t for epoch, t in handler_s if epoch == EPOCHS)  # host time
            vs["handlers_over_hand"] = vs["handlers_s"] / vs["hand_iter_s"]
        wf.finalize()
        return result

    def evaluate(self, configs: list[str], metrics_json: Path, **overrides) -> dict:
        wf = self._wf(configs, **overrides)
        start = time.perf_counter()
        wf.run()
        wall = time.perf_counter() - start
        wf.finalize()
        _check(metrics_json.is_file(), f"evaluation wrote no {metrics_json}")
        metrics = json.loads(metrics_json.read_text())
        headline = {k: v for k, v in metrics.items() if k.startswith("mean_") and isinstance(v, (int, float))}
        result = {"stage": "evaluate", "configs": configs, "wall_s": wall, "metrics": headline}
        self.stages.append(result)
        _check(
            headline and all(math.isfinite(v) for v in headline.values()), f"evaluation metrics not finite: {headline}"
        )
        return result

    def infer(self, output_dir: Path, n_inputs: int, **overrides) -> dict:
        """``inference.json`` on new cases: images/s (2-D slices or frames; the inputs' screening, network,
        post-processing and writing timed) and one mask per input."""
        from ignite.engine import Events

        wf = self._wf(["inference.json"], output_dir=str(output_dir), **overrides)
        start = time.perf_counter()
        wf.parser.get_parsed_content("inputs")  # the inference report checks every input here
        screening = time.perf_counter() - start
        evaluator = wf.parser.get_parsed_content("evaluator")
        images = []

        def count(engine):  # decollated items; a volume (C, H, W, D) counts its D slices
            items = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]
            images.append(sum(int(x["image"].shape[-1]) if x["image"].ndim == 4 else 1 for x in items))

        evaluator.add_event_handler(Events.ITERATION_COMPLETED, count)
        start = time.perf_counter()
        wf.run()
        synchronize(self.device)
        wall = time.perf_counter() - start + screening
        wf.finalize()
        report = json.loads((Path(output_dir) / "inference_report.json").read_text())
        written = [e for e in report["inputs"] if e["status"] == "written" and Path(e["output"]).is_file()]
        result = {
            "stage": "inference",
            "wall_s": wall,
            "inputs": len(report["inputs"]),
            "masks": len(written),
            "images": sum(images),
            "infer_images_per_s": sum(images) / wall,
        }
        self.stages.append(result)
        _check(len(report["inputs"]) == n_inputs, f"inference saw {len(report['inputs'])} inputs, not {n_inputs}")
        _check(
            len(written) == n_inputs, f"inference wrote {len(written)} masks for {n_inputs} inputs: {report['counts']}"
        )
        return result


def _prostate(c: BundleCheck, s: dict) -> dict:
    data = _phantoms("prostate", c.out / "data", c.log, **s["phantoms"])
    common = dict(dataset_dir=str(data), sites=["RUNMC"], **s["net"])
    c.train("train", ["train.json"], s["batch_size"], **common)
    c.evaluate(["train.json", "evaluate.json"], c.root / "eval" / "metrics.json", **common)
    net = {k: v for k, v in s["net"].items() if k != "min_area"}
    c.infer(c.out / "masks", len(list((data / "BMC").glob("*.nii.gz"))) // 2, dataset_dir=str(data / "BMC"), **net)
    return {}


def _liver(c: BundleCheck, s: dict) -> dict:
    ct = _phantoms("liver_ct", c.out / "ct", c.log, **s["ct"])
    mri = _phantoms("liver_mri", c.out / "mri", c.log, **s["mri"])
    c.train(
        "ct_pretrain",
        ["train.json", "pretrain_ct.json"],
        s["ct_batch_size"],
        dataset_dir=str(ct),
        val_fraction=0.25,
        **s["net"],
    )
    common = dict(dataset_dir=str(mri), **s["net"])
    c.train(
        "mri_transfer",
        ["train.json"],
        s["batch_size"],
        transfer="finetune_freeze",
        source_ckpt=str(c.root / "models" / "ct" / "model.pt"),
        **common,
    )
    c.evaluate(["train.json", "evaluate.json"], c.root / "eval" / "metrics.json", **common)
    case = sorted(p for p in mri.iterdir() if p.is_dir())[-1]  # a case folder: artery.nii.gz (+ its label)
    c.infer(c.out / "masks", 1, dataset_dir=str(case), datalist=[{"image": str(case / "artery.nii.gz")}], **s["net"])
    return {}


def _polyp(c: BundleCheck, s: dict) -> dict:
    import torch

    data = _phantoms("polyp", c.out / "data", c.log, **s["phantoms"])
    common = dict(dataset_dir=str(data), **s["net"])
    c.train("teacher", ["train_teacher.json"], s["batch_size"], hand=kdas_hand_step, **common)
    c.train(
        "student_kd",
        ["train.json"],
        s["batch_size"],
        hand=kdas_hand_step,
        teacher_ckpt=str(c.root / "models" / "teacher" / "model.pt"),
        **common,
    )
    c.evaluate(["train.json", "evaluate.json"], c.root / "eval" / "test" / "metrics.json", **common)
    frames = data / "TestDataset" / "Kvasir" / "images"
    c.infer(
        c.out / "masks",
        len([p for p in frames.iterdir() if p.suffix in (".png", ".jpg")]),
        dataset_dir=str(frames),
        image_size=s["net"]["image_size"],
    )
    # KDAS student ÷ teacher inference throughput, same batch and size, AMP on CUDA
    wf = c._wf(["train.json"], **common)
    student, teacher = wf.parser.get_parsed_content("network").eval(), wf.parser.get_parsed_content("teacher").eval()
    size, batch = s["net"]["image_size"], s["throughput_batch"]
    x = torch.rand(batch, 3, size, size, device=c.device)

    def images_per_s(net):
        def forward():
            with torch.no_grad(), torch.autocast(x.device.type, enabled=c.amp):
                net(x)
            synchronize(c.device)

        return batch / timeit(forward, repeat=5, warmup=2)

    s_ips, t_ips = images_per_s(student), images_per_s(teacher)
    return {
        "kdas_throughput": {
            "size": size,
            "batch": batch,
            "amp": c.amp,
            "student_img_s": s_ips,
            "teacher_img_s": t_ips,
            "student_over_teacher": s_ips / t_ips,
        }
    }


def _cardiac(c: BundleCheck, s: dict) -> dict:
    import torch

    data = _phantoms("cardiac", c.out / "data", c.log, **s["phantoms"])
    common = dict(dataset_dir=str(data), augment=False, **s["net"])

    c.train("segmenter", ["train.json"], s["batch_size"], hand=clipped_hand_step, **common)

    c.train("qc_autoencoder", ["train.json", "train_qc.json"], s["batch_size"], hand=prepared_hand_step, **common)
    model = c.root / "models" / "model.pt"
    # refinement starts from the last epoch's weights (with its optimiser state), not from the best epoch's model.pt
    before = torch.load(c.root / "models" / "resume" / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    # After 2 epochs nothing need look out of distribution, and then the refinement iteration has no OoD step
    # to run: thresholds that fail every candidate (pDC < 2) flag every unlabelled volume for this stage only.
    calibration = c.root / "models" / "qc" / "calibration.json"
    saved = calibration.read_text()
    calibration.write_text(json.dumps({"th_low": 2.0, "th_up": 0.0}))
    try:
        wf = c._wf(
            ["train.json", "refine.json"],
            K_semi=1,
            batch_size=s["batch_size"],
            threshold_source="calibration",
            **common,
        )
        start = time.perf_counter()
        wf.run()
        wall = time.perf_counter() - start
        wf.finalize()
    finally:
        calibration.write_text(saved)
    after = torch.load(model, map_location="cpu", weights_only=True)
    changed = sum(not torch.equal(v, after[k]) for k, v in before.items() if v.is_floating_point())
    log = json.loads((c.root / "eval" / "refine" / "refine_log.json").read_text())
    losses = [v for it in log["iterations"] for v in (it["supervised_loss"], it["mean_semi_loss"], it["val_loss"])]
    losses += [step["loss"] for it in log["iterations"] for step in it["semi_steps"]]
    c.stages.append(
        {
            "stage": "refine (1 iteration)",
            "configs": ["train.json", "refine.json"],
            "wall_s": wall,
            "amp": c.amp,
            "start_weights": log["start_weights"],
            "weights_changed": f"{changed}/{sum(v.is_floating_point() for v in before.values())}",
            "ood_flagged": len(log["initial"]["ood"]),
            "refinement_iterations": len(log["iterations"]),
            "losses": losses,
        }
    )
    _check(log["start_weights"].startswith("resume"), f"refinement started from {log['start_weights']}")
    _check(len(log["initial"]["ood"]) > 0, "no unlabelled volume was flagged: the OoD steps did not run")
    _check(len(log["iterations"]) == 1, f"refinement ran {len(log['iterations'])} iterations, not 1")
    _check(len(losses) > 3 and all(math.isfinite(v) for v in losses), f"refinement losses not all finite: {losses}")
    _check(changed > 0, "refinement did not change the weights")
    c.evaluate(["train.json", "evaluate.json"], c.root / "eval" / "metrics.json", **common)
    subject = sorted(p for p in data.iterdir() if p.is_dir() and p.name.isdigit())[-1]  # an OoD subject
    c.infer(
        c.out / "masks",
        len([p for p in subject.glob("*.nii.gz") if "_gt" not in p.name]),  # SA and LA
        dataset_dir=str(subject),
        threshold_source="calibration",
        **s["net"],
    )
    return {}


RECIPES = {
    "prostate_mri_transfer": _prostate,
    "polyp_kdas_student": _polyp,
    "cardiac_qc_refinement": _cardiac,
    "liver_ct_mri_transfer": _liver,
}


def _worker(name: str, out: Path, device: str, smoke: bool, overrides: dict | None = None) -> dict:
    """One bundle's stages in this process; the result (with the failure, if any) as JSON in ``out``."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    amp = torch.device(device).type == "cuda"  # MONAI's trainers autocast on CUDA only
    check = BundleCheck(name, out, device, amp, overrides)
    result = {
        "bundle": name,
        "ok": False,
        "sizes": SIZES[name]["smoke" if smoke else "full"],
        "overrides": dict(overrides or {}),
    }
    start = time.perf_counter()
    try:
        result.update(RECIPES[name](check, result["sizes"]))
        result["ok"] = True
    except (Exception, SystemExit) as e:  # noqa: BLE001  (reported, and the command exits non-zero)
        import traceback

        from shared_transforms.inputs import root_cause

        root = root_cause(e)  # MONAI wraps the real error in "Failed to evaluate ConfigExpression"
        result["error"] = " ".join(f"{type(root).__name__}: {root}".split())
        traceback.print_exc()
    result["stages"] = check.stages
    result["wall_s"] = time.perf_counter() - start
    if torch.cuda.is_available() and torch.device(device).type == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def _ddp(name: str, data: Path, out: Path, smoke: bool, timeout: float) -> dict:
    """``torchrun --nproc_per_node 1`` training with ``train.json`` + ``multi_gpu_train.json``."""
    import torch

    s = SIZES[name]["smoke" if smoke else "full"]
    root, logs = out / "bundle", out / "torchrun_logs"
    out.mkdir(parents=True, exist_ok=True)
    cmd = bundle_cmd(
        name,
        ["train.json", "multi_gpu_train.json"],
        "training",
        bundle_root=str(root),
        dataset_dir=str(data),
        sites=["RUNMC"],
        epochs=1,
        batch_size=s["batch_size"],
        resume=False,
        cache_dir=str(out.parent / name / "bundle" / "cache"),  # the bundle's N4 cache: volumes are not corrected again
        **s["net"],
    )
    cmd = torchrun_cmd(cmd, 1, logs)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    start = time.perf_counter()
    with open(out / "log.txt", "wb") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=out, timeout=timeout)
    model = root / "models" / "model.pt"
    result = {"bundle": name, "backend": backend, "wall_s": time.perf_counter() - start, "returncode": proc.returncode}
    if proc.returncode != 0 or not model.is_file():
        result.update(
            ok=False,
            error=f"torchrun exited {proc.returncode}, model.pt {'written' if model.is_file() else 'missing'}; "
            f"logs in {logs}",
        )
    else:
        state = torch.load(model, map_location="cpu", weights_only=True)
        finite = all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
        result.update(ok=finite, **({} if finite else {"error": "model.pt has non-finite weights"}))
    return result


def _machine(device: str, smoke: bool) -> dict:
    import monai
    import torch

    info = {
        "device": device,
        "smoke": smoke,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count())
    return info


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# GPU check ({'smoke, ' if m['smoke'] else ''}{m.get('gpu', m['device'])})",
        "",
        f"torch {m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}, MONAI {m['monai']}, Python {m['python']}; "
        f"{m['cpu_count']} CPU cores. {report['started']}, {report['wall_s'] / 60:.1f} min in all. "
        f"**{'PASSED' if report['ok'] else 'FAILED'}**",
        "",
        "| bundle | stage | AMP | wall s | train img/s | infer img/s | first → last loss | weights changed "
        "| bundle iter ÷ hand-written AMP step (the bundle's own handlers, host time ÷ the step) | metrics |",
        "|---|---|---|---:|---:|---:|---|---|---|---|",
    ]
    for name, b in report["bundles"].items():
        for st in b.get("stages", []):
            hand = st.get("vs_hand_written")
            lines.append(
                f"| {name} | {st['stage']} | {st.get('amp', '')} | {st['wall_s']:.1f} | {_fmt(st.get('train_images_per_s'))} "
                f"| {_fmt(st.get('infer_images_per_s'))} | "
                + (f"{st['first_loss']:.4g} → {st['last_loss']:.4g}" if st.get("first_loss") is not None else "")
                + f" | {st.get('weights_changed', '')} | "
                + (
                    f"{hand['ratio']:.3f} ({hand['bundle_iter_s'] * 1000:.1f} vs {hand['hand_iter_s'] * 1000:.1f} ms; "
                    f"handlers {hand['handlers_s'] * 1000:.1f} ms = {hand['handlers_over_hand']:.3f})"
                    if hand
                    else ""
                )
                + " | "
                + ", ".join(f"{k} {v:.4f}" for k, v in st.get("metrics", {}).items())
                + " |"
            )
        if not b["ok"]:
            lines.append(f"| {name} | **FAILED** | | | | | | | | {b.get('error', '')} |")
    kd = report["bundles"].get("polyp_kdas_student", {}).get("kdas_throughput")
    if kd:
        lines += [
            "",
            f"KDAS inference throughput at {kd['size']}², batch {kd['batch']}, AMP {kd['amp']}: student "
            f"{kd['student_img_s']:.1f} img/s, teacher {kd['teacher_img_s']:.1f} img/s, "
            f"**student ÷ teacher = {kd['student_over_teacher']:.2f}**.",
        ]
    d = report.get("ddp")
    if d:
        lines += [
            "",
            f"`torchrun --nproc_per_node 1` ({d['backend']}) with `multi_gpu_train.json`, {d['bundle']}: "
            f"{'passed' if d['ok'] else 'FAILED: ' + d.get('error', '')} in {d['wall_s']:.1f} s.",
        ]
    if report["failures"]:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in report["failures"]]
    return "\n".join(lines) + "\n"


def _write_report(report: dict, out_dir: Path, start: float) -> None:
    """gpu_report.json (atomically) and gpu_report.md as they stand: a run stopped from outside keeps what it did."""
    report["wall_s"] = time.perf_counter() - start
    report["ok"] = bool(report["finished"]) and not report["failures"]
    tmp = out_dir / "gpu_report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, out_dir / "gpu_report.json")
    tmp = out_dir / "gpu_report.md.tmp"
    tmp.write_text(markdown(report))
    os.replace(tmp, out_dir / "gpu_report.md")


def main(
    out: str = "gpu_check_out",
    device: str = "cuda",
    smoke: bool = False,
    bundles: list[str] | None = None,
    ddp_bundle: str | None = "prostate_mri_transfer",
    budget: float = 480.0,
    overrides: dict | None = None,
    worker: str | None = None,
) -> None:
    """Run every bundle's GPU path (or ``--smoke True`` at tiny sizes) and write gpu_report.json / .md.

    Args:
        out: report and work folder (phantoms, checkpoints, logs per bundle; a bundle's folder is
            emptied when it starts).
        device: ``cuda`` (``cuda:N``) or ``cpu``; AMP is on exactly when it is CUDA.
        smoke: tiny phantoms and networks instead of the paper's sizes (what the test suite runs on CPU).
        bundles: bundle names (default: all four).
        ddp_bundle: the bundle trained under ``torchrun --nproc_per_node 1``; ``None`` skips it. Only
            prostate_mri_transfer is wired up (it reuses that bundle's phantoms).
        budget: seconds for the whole command; a stage still running when it is spent is stopped and
            reported as failed, and the report is rewritten after every stage.
        overrides: config overrides for every training stage, e.g. ``"{'num_workers': 4}"``.
        worker: internal: run one bundle in this process.
    """
    import torch

    out_dir = Path(out).resolve()
    if worker:
        result = _worker(worker, out_dir, device, bool(smoke), overrides)
        sys.exit(0 if result["ok"] else 1)
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        sys.exit(
            f"--device {device}: torch {torch.__version__} sees no CUDA device (use --device cpu --smoke True on CPU)"
        )
    names = [bundles] if isinstance(bundles, str) else list(bundles) if bundles else list(ORDER)
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        sys.exit(f"unknown bundle(s) {unknown}; known: {sorted(RECIPES)}")
    if ddp_bundle not in (None, "prostate_mri_transfer"):
        sys.exit(f"--ddp_bundle {ddp_bundle}: only prostate_mri_transfer (or None) is wired up")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": _machine(device, bool(smoke)),
        "overrides": dict(overrides or {}),
        "budget_s": budget,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "bundles": {},
        "failures": [],
        "finished": False,
    }
    start = time.perf_counter()

    def left() -> float:
        return budget - (time.perf_counter() - start)

    _write_report(report, out_dir, start)
    for name in names:
        t = time.perf_counter()
        folder = out_dir / name
        shutil.rmtree(folder, ignore_errors=True)  # nothing of an earlier run (kept masks, result.json) counts
        folder.mkdir(parents=True)
        print(f"[gpu_check] {name} ({left():.0f} s of the budget left) ...", flush=True)
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--out",
            str(folder),
            "--device",
            device,
            "--smoke",
            str(bool(smoke)),
            "--overrides",
            repr(dict(overrides or {})),
        ]  # fire reads Python literals
        try:
            if left() <= 0:
                raise TimeoutError(f"the budget of {budget:.0f} s was spent before it started")
            with open(folder / "worker.log", "wb") as f:
                proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=left(), cwd=folder)
            result = json.loads((folder / "result.json").read_text())
            if proc.returncode != 0 and result.get("ok"):
                result.update(ok=False, error=f"worker exited {proc.returncode} after reporting success")
        except (subprocess.TimeoutExpired, TimeoutError, FileNotFoundError, json.JSONDecodeError) as e:
            result = {"bundle": name, "ok": False, "error": f"{type(e).__name__}: {e}; see {folder / 'worker.log'}"}
        report["bundles"][name] = result
        if not result["ok"]:
            report["failures"].append(f"{name}: {result.get('error')}")
        status = "ok" if result["ok"] else "FAILED: " + str(result.get("error"))
        print(f"[gpu_check] {name}: {status} ({time.perf_counter() - t:.0f} s)", flush=True)
        _write_report(report, out_dir, start)
    if ddp_bundle:
        data = out_dir / ddp_bundle / "data"
        if not data.is_dir():
            report["failures"].append(f"ddp: no phantoms in {data} (run {ddp_bundle} in the same command)")
        elif left() <= 0:
            report["failures"].append(f"ddp: the budget of {budget:.0f} s was spent before it started")
        else:
            print(f"[gpu_check] torchrun --nproc_per_node 1: {ddp_bundle} ...", flush=True)
            shutil.rmtree(out_dir / "ddp", ignore_errors=True)
            try:
                report["ddp"] = d = _ddp(ddp_bundle, data, out_dir / "ddp", bool(smoke), left())
            except subprocess.TimeoutExpired as e:
                d = {"bundle": ddp_bundle, "ok": False, "backend": "?", "wall_s": e.timeout, "error": str(e)}
                report["ddp"] = d
            if not d["ok"]:
                report["failures"].append(f"ddp: {d.get('error')}")
    report["finished"] = True
    _write_report(report, out_dir, start)
    print(markdown(report), flush=True)
    print(f"[gpu_check] report: {out_dir / 'gpu_report.json'}, {out_dir / 'gpu_report.md'}", flush=True)
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    fire.Fire(main)
