"""Benchmark of the polyp_kdas_student bundle: size, compute and speed of student vs teacher.

Prints (and writes as JSON with ``--out_json``):

- parameters and GMACs at 352×352 of the student (Polyp-PVT / PVTv2-B0) and the teacher
  (PVTv2-B2), counted with torch's ``FlopCounterMode`` (GMACs = FLOPs / 2). timm's fused
  attention is switched to its explicit form for the count: ``FlopCounterMode`` does not
  see the CPU fused-attention kernel;
- images/s of each network's forward at 352² for batch 1 and 16, and student ÷ teacher;
- the bundle's inference (``configs/inference.json`` through ``ConfigWorkflow``: screening of the
  inputs, PNG reading, resizing, inverse resizing, thresholding, PNG writing) time per image ÷ the bare
  student forward at 352², on ``n_images`` synthetic RGB frames of ``frame_size``;
- the bundle's KDAS training iteration (train.json: the multi-scale MultiScaleKDStep with the frozen
  teacher, post-processing, training Dice, handlers) ÷ the same iteration written out in plain PyTorch
  (bench_utils.kdas_hand_step) on the same student, teacher, optimiser and batch, timed in pairs after a
  warm-up epoch (bench_utils.training_iteration_ratio), at ``train_size`` (CPU default 128²: three
  rates of a 352² batch of 16 with the teacher take tens of seconds an iteration on 2 cores).

    python scripts/bench_polyp.py                          # all of it (several minutes on 2 CPU cores)
    python scripts/bench_polyp.py --batch_sizes "[1]" --repeat 2 --parts infer
    python scripts/bench_polyp.py --parts train --train_size 352
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import fire
import numpy as np
import torch
from bench_utils import describe_training, kdas_hand_step, selected_parts, timeit, training_iteration_ratio, workflow
from bundle_cli import BUNDLES, make_phantoms

BUNDLE = BUNDLES / "polyp_kdas_student"
PARTS = ("model", "throughput", "infer", "train")  # the benchmarks, in the order they run


def _net_module():
    sys.path.insert(0, str(BUNDLE))
    from scripts.net import PolypPVT  # the bundle's own package

    return PolypPVT


def gmacs(net: torch.nn.Module, size: int = 352) -> float:
    """GMACs of one forward at ``size``² (FLOPs / 2 from FlopCounterMode), explicit attention."""
    from torch.utils.flop_counter import FlopCounterMode

    fused = {m: m.fused_attn for m in net.modules() if hasattr(m, "fused_attn")}
    for m in fused:
        m.fused_attn = False
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(torch.rand(1, 3, size, size))
    finally:
        for m, v in fused.items():
            m.fused_attn = v
    return counter.get_total_flops() / 2e9


def images_per_second(net: torch.nn.Module, batch: int, size: int, repeat: int) -> float:
    x = torch.rand(batch, 3, size, size)
    with torch.no_grad():
        seconds = timeit(lambda: net(x), repeat=repeat, warmup=1)
    return batch / seconds


def bundle_inference_ratio(student: torch.nn.Module, n_images: int, frame_size: tuple[int, int], size: int,
                           repeat: int) -> dict:
    """Bundle inference per image (inference.json: screening, loading, preprocessing, network, post-processing,
    mask written, the frame's report entry) ÷ bare forward of one 352² image. The run's start-up (loading the checkpoint, once
    per run, not per frame) is timed apart."""
    from ignite.engine import Events
    from monai.data import MetaTensor
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        root, images, out = Path(tmp) / "bundle", Path(tmp) / "images", Path(tmp) / "out"
        (root / "models").mkdir(parents=True)
        images.mkdir()
        torch.save(student.state_dict(), root / "models" / "model.pt")
        rng = np.random.default_rng(0)
        for i in range(n_images):
            frame = (rng.random((frame_size[1], frame_size[0], 3)) * 255).astype(np.uint8)
            Image.fromarray(frame).save(images / f"frame_{i:03d}.png")
        times, written, startups = [], [], []
        for run in range(repeat + 1):  # first run: warm-up; a new output folder each run (existing masks are kept)
            wf = workflow(BUNDLE, ["inference.json"], bundle_root=str(root), dataset_dir=str(images),
                          output_dir=str(out / str(run)), image_size=size)
            start = time.perf_counter()
            wf.parser.get_parsed_content("inputs")  # the screening of every input (header, size, file structure)
            screening = time.perf_counter() - start
            evaluator = wf.parser.get_parsed_content("evaluator")  # builds the network (once per run): not timed
            marks = {}  # the frames' loop: after the run's start-up handlers (checkpoint loading), to the end
            evaluator.add_event_handler(Events.STARTED, lambda e: marks.setdefault("loop", time.perf_counter()))
            evaluator.add_event_handler(Events.COMPLETED, lambda e: marks.setdefault("end", time.perf_counter()))
            start = time.perf_counter()
            evaluator.run()
            times.append((marks["end"] - marks["loop"] + screening) / n_images)
            startups.append(marks["loop"] - start)
            written.append(len(list((out / str(run)).glob("*.png"))))
        if written != [n_images] * len(written):
            raise RuntimeError(f"the bundle wrote {written} masks per run for {n_images} frames")
        written = written[0]
    bundle = float(np.median(times[1:]))
    x = torch.rand(1, 3, size, size)
    student = student.eval()
    meta = MetaTensor(x.clone(), meta={"filename_or_obj": "frame.png"})  # what MONAI's loader hands the inferer
    with torch.no_grad():
        bare = timeit(lambda: student(x), repeat=max(3, repeat), warmup=1)
        on_meta = timeit(lambda: student(meta), repeat=max(3, repeat), warmup=1)
    return {"bundle_s_per_image": bundle, "bare_forward_s": bare, "ratio": bundle / bare, "images": n_images,
            "frame_size": list(frame_size), "masks_written": written, "metatensor_forward_s": on_meta,
            "metatensor_ratio": on_meta / bare,
            "startup_s": float(np.median(startups[1:]))}


def bench_training(size: int, batch_size: int, frames: int, kd: str, epochs: int) -> dict:
    """The bundle's training iteration (train.json, ``kd``) ÷ :func:`~bench_utils.kdas_hand_step`, in pairs, on
    ``frames`` phantom training pairs (a tenth held out for validation, which is not run: it is outside the
    iterations). The teacher checkpoint is a random PVTv2-B2 (timing does not depend on its weights)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = make_phantoms("polyp", work / "data", work / "phantoms.log", train=frames, per_test_set=1, size=size,
                             broken=False)
        common = dict(bundle_root=str(work), dataset_dir=str(data), image_size=size)
        teacher = workflow(BUNDLE, ["train.json"], **common).parser.get_parsed_content("teacher_def")
        torch.save(teacher.state_dict(), work / "teacher.pt")
        wf = workflow(BUNDLE, ["train.json"], teacher_ckpt=str(work / "teacher.pt"), kd=kd, batch_size=batch_size,
                      epochs=1, resume=False, val_interval=10**6, **common)
        r = training_iteration_ratio(wf, batch_size, hand=kdas_hand_step, epochs=epochs)
        r["sizes"] = wf.parser.get_parsed_content("train#step").sizes
    return r


def main(size: int = 352, batch_sizes: list[int] = (1, 16), repeat: int = 3, n_images: int = 8,
         frame_size: tuple[int, int] = (622, 528), threads: int | None = None, out_json: str | None = None,
         parts: tuple = PARTS, train_size: int = 128, train_batch: int = 16, train_frames: int = 72,
         train_epochs: int = 4, kd: str = "attention_sgm") -> dict:
    """Run the benchmarks (or those named in ``parts``) and print the figures.

    Args:
        size: network input side (352).
        batch_sizes: batches for the images/s comparison.
        repeat: timed repeats (median) after one warm-up.
        n_images: frames for the bundle-inference measurement.
        frame_size: (width, height) of those frames (Kvasir-like 622×528 by default).
        threads: torch CPU threads (default: torch's choice).
        out_json: also write the figures to this file.
        parts: which of model (parameters, GMACs), throughput, infer, train to run (e.g. ``--parts train``).
        train_size: base training size of the training benchmark (the paper's is 352).
        train_batch: its batch (paper: 16).
        train_frames: its phantom training pairs.
        train_epochs: its timed epochs (after one warm-up epoch).
        kd: its distillation (train.json's ``kd``: attention_sgm, attention_kl, none).
    """
    parts = selected_parts(parts, PARTS)
    if threads:
        torch.set_num_threads(int(threads))
    PolypPVT = _net_module()
    torch.manual_seed(0)
    nets = {"student": PolypPVT("pvt_v2_b0").eval(), "teacher": PolypPVT("pvt_v2_b2").eval()}
    result: dict = {"device": "cpu", "threads": torch.get_num_threads(), "size": size}
    train_device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"  # train.json's
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; networks and "
          f"inference on cpu, training on {train_device}", flush=True)
    for name, net in nets.items() if "model" in parts else ():
        result[name] = {"parameters": sum(p.numel() for p in net.parameters()), "gmacs": gmacs(net, size)}
        print(f"{name}: {result[name]['parameters']:,} parameters, {result[name]['gmacs']:.2f} GMACs at {size}x{size}", flush=True)
    result["throughput"] = []
    for batch in batch_sizes if "throughput" in parts else ():
        s = images_per_second(nets["student"], int(batch), size, repeat)
        t = images_per_second(nets["teacher"], int(batch), size, repeat)
        row = {"batch": int(batch), "student_img_s": s, "teacher_img_s": t, "student_over_teacher": s / t}
        result["throughput"].append(row)
        print(f"batch {batch}: student {s:.2f} img/s, teacher {t:.2f} img/s, student / teacher = {s / t:.2f}", flush=True)
    if "infer" in parts:
        result["bundle_inference"] = inf = bundle_inference_ratio(nets["student"], n_images, tuple(frame_size), size, repeat)
        print(f"bundle inference {inf['bundle_s_per_image'] * 1000:.0f} ms/image ({inf['frame_size'][0]}x{inf['frame_size'][1]} PNG in, "
              f"mask PNG out) / bare forward {inf['bare_forward_s'] * 1000:.0f} ms = {inf['ratio']:.2f}; the same forward "
              f"on a MetaTensor {inf['metatensor_forward_s'] * 1000:.0f} ms ({inf['metatensor_ratio']:.2f}); once per run: start-up "
              f"(checkpoint loading) {inf['startup_s'] * 1000:.0f} ms", flush=True)
    if "train" in parts:
        result["train"] = t = bench_training(train_size, train_batch, train_frames, kd, train_epochs)
        print(f"[train] KDAS ({kd}), sizes {t['sizes']}, {describe_training(t)}", flush=True)
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(result, indent=4))
    return result


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda r: None)
