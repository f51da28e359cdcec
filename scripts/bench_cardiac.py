"""Cost of the cardiac bundle's QC step relative to segmentation, per volume.

For one volume (``slices`` x ``image_size``² on the network grid) the script times:
- segmentation: segmenter M on every slice (one model, what a plain segmenter costs);
- QC step: what QC-based inference adds to it: the other ``m_best - 1`` candidate models'
  predictions, R's reconstruction of every candidate's prediction, pDC / pHD (pixels and mm) per
  class, and the selection rule;
and prints QC step ÷ segmentation (also split into its parts). Weights: a trained bundle root
(``--bundle_root``, its models/candidates and models/qc) or random ones (timing barely depends
on them; Hausdorff distances depend on the masks' surfaces).

``--parts train`` times the bundle's training iterations (train.json: the segmenter with its
deep-supervision loss, gradient-norm clipping, post-processing, training metric and handlers;
train.json + train_qc.json: the QC autoencoder R on one-hot labels) ÷ the same step written out in
plain PyTorch (bench_utils.clipped_hand_step, prepared_hand_step) on the same network, optimiser and
batch, timed in pairs after a warm-up epoch (bench_utils.training_iteration_ratio), on phantoms at
``train_size``² (CPU default 128²; augmentation off: it runs in the data loader, outside the timed
iterations).

    python scripts/bench_cardiac.py                                  # paper sizes: 7 levels, 256², 10 slices
    python scripts/bench_cardiac.py --image_size 64 --filters "[8,16,32,64]" --slices 4
    python scripts/bench_cardiac.py --parts train --train_size 256
"""

from __future__ import annotations

import copy
import platform
import sys
import tempfile
from pathlib import Path

import fire
import numpy as np
import torch
from bench_utils import (clipped_hand_step, describe_training, prepared_hand_step, selected_parts, timeit,
                         training_iteration_ratio, workflow)
from bundle_cli import BUNDLES, make_phantoms

BUNDLE = BUNDLES / "cardiac_qc_refinement"
PARTS = ("qc", "train")  # the benchmarks, in the order they run


def bench_training(size: int, batch_size: int, subjects: int, slices: int, epochs: int) -> dict:
    """Segmenter and QC-autoencoder training iterations ÷ their hand-written steps, in pairs (see the module)."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = make_phantoms("cardiac", work / "data", work / "phantoms.log", subjects=subjects, ood_subjects=1,
                             sa_shape=f"({size},{size},{slices})")
        common = dict(bundle_root=str(work), dataset_dir=str(data), image_size=size, augment=False, batch_size=batch_size,
                      epochs=1, resume=False, val_interval=10**6)
        stages = {"segmenter": (["train.json"], clipped_hand_step),
                  "qc_autoencoder": (["train.json", "train_qc.json"], prepared_hand_step)}
        for stage, (configs, hand) in stages.items():
            wf = workflow(BUNDLE, configs, **common)
            results[stage] = training_iteration_ratio(wf, batch_size, hand=hand, epochs=epochs)
    return results


def main(image_size: int = 256, slices: int = 10, m_best: int = 3, filters: list[int] | None = None,
         repeat: int = 3, threads: int = 2, bundle_root: str | None = None, seed: int = 0, parts: tuple = ("qc",),
         train_size: int = 128, train_batch: int = 20, train_subjects: int = 8, train_slices: int = 8,
         train_epochs: int = 4) -> dict:
    """Time segmentation and the QC step on one synthetic volume (``qc``), and the training iterations
    (``train``); print the ratios.

    Args:
        image_size: network grid size (divisible by 2^(levels-1)).
        slices: slices of the volume (an SA stack has ~10; LA has 1).
        m_best: candidate models.
        filters: segmenter widths (default: the paper's 32-64-128-256-480-480-480).
        repeat: timed repetitions (median reported) after one warm-up.
        threads: torch CPU threads.
        bundle_root: a trained bundle root to take weights from (optional).
        parts: which of qc, train to run (e.g. ``--parts qc,train``).
        train_size: slice size of the training benchmark (the paper's is 256; 7 levels need a multiple of 64).
        train_batch: its batch (paper: 20).
        train_subjects: its phantom subjects (SA stacks of ``train_slices`` slices, and LA images).
        train_slices: slices per phantom SA stack.
        train_epochs: its timed epochs (after one warm-up epoch).
    """
    parts = selected_parts(parts, PARTS)
    sys.path.insert(0, str(BUNDLE))
    torch.set_num_threads(threads)
    result = {"device": f"{platform.processor() or platform.machine()}, {threads} torch threads, torch {torch.__version__}"}
    print(f"{'device':32s} {result['device']}")
    if "qc" in parts:
        result.update(bench_qc(image_size, slices, m_best, filters, repeat, bundle_root, seed))
    if "train" in parts:
        result["train"] = trained = bench_training(train_size, train_batch, train_subjects, train_slices, train_epochs)
        for stage, r in trained.items():
            print(f"[train] {stage}, {describe_training(r)}", flush=True)
    return result


def bench_qc(image_size: int, slices: int, m_best: int, filters: list[int] | None, repeat: int,
             bundle_root: str | None, seed: int) -> dict:
    """The QC step ÷ one segmentation of one synthetic volume (see the module), printed and returned."""
    from scripts.data import invert_volume, preprocess_volume
    from scripts.net import CardiacSegmenter, QCAutoencoder
    from scripts.qc import QCInferer, is_ood, load_candidates, select_candidate

    torch.manual_seed(seed)
    filters = list(filters) if filters else [32, 64, 128, 256, 480, 480, 480]
    net = CardiacSegmenter(filters=filters, deep_supr_num=4).eval()
    nets = [net] + [copy.deepcopy(net).eval() for _ in range(m_best - 1)]
    qc_net = QCAutoencoder(4).eval()
    qc_ckpt = None
    if bundle_root:
        loaded, _ = load_candidates(net, f"{bundle_root}/models/candidates")
        nets = loaded[:m_best] or nets
        qc_ckpt = f"{bundle_root}/models/qc/model.pt"
    inferer = QCInferer(qc_net, qc_ckpt, None, [1.25, 1.25], image_size, slice_batch_size=16)
    volume = np.random.default_rng(seed).random((image_size, image_size, slices), dtype=np.float32) + 0.1
    x, _, info = preprocess_volume(volume, (1.25, 1.25), (1.25, 1.25), image_size)  # the inversion info of a real call

    def timed(fn):
        return timeit(fn, repeat)

    t_seg = timed(lambda: invert_volume(inferer.predict(nets[0], x), info))
    t_others = timed(lambda: [inferer.predict(n, x) for n in nets[1:]])
    softs = [inferer.predict(n, x) for n in nets]

    def qc_only():
        ms = [inferer.measures(s, 1.0) for s in softs]
        pdc, phd = [m["pDC"]["RV"] for m in ms], [m["pHD"]["RV"] for m in ms]
        is_ood(pdc, phd, 0.5, 10.0)
        select_candidate(pdc, phd, 10.0)

    t_recon = timed(lambda: [inferer.reconstruct(s) for s in softs])
    t_qc = timed(qc_only)
    result = {
        "volume": f"{slices} x {image_size}x{image_size}", "m_best": m_best, "filters": filters,
        "segmentation_s": t_seg, "other_candidates_s": t_others, "qc_reconstruction_s": t_recon,
        "qc_measures_and_selection_s": max(t_qc - t_recon, 0.0),
        "qc_step_s": t_others + t_qc,
    }
    result["ratio_qc_step_over_segmentation"] = result["qc_step_s"] / t_seg
    result["ratio_r_and_measures_only"] = t_qc / t_seg
    for k, v in result.items():
        print(f"{k:32s} {v:.4f}" if isinstance(v, float) else f"{k:32s} {v}")
    print(f"QC step / segmentation per volume = {result['ratio_qc_step_over_segmentation']:.2f} "
          f"(R + pDC/pHD + selection alone: {result['ratio_r_and_measures_only']:.2f})")
    return result


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda r: None)
