"""Benchmarks of the prostate_mri_transfer bundle, each a ratio measured side by side in one run.

1. training iteration: the bundle's SupervisedTrainer iteration (prepare batch, forward, loss,
   backward, step, post-processing, metric) ÷ a hand-written PyTorch loop on the same network
   and the same batch, timed in pairs after a warm-up epoch (each hand step right after a bundle
   iteration: bench_utils.training_iteration_ratio);
2. data loading: epoch 2 ÷ epoch 1 of the training data pipeline (epoch 1 runs N4 on every
   volume and fills the cache; epoch 2 reads cached slices), plus a new dataset built from the
   warm on-disk cache (what a second run or a fine-tuning stage pays);
3. inference: one volume through the bundle's inferer (inference.json: SliceInferer, 16 slices per
   batch) ÷ the same with one slice at a time, beside the bare network's own ratio (the slices as
   one batch ÷ one at a time, no inferer);
4. N4: seconds per volume at the bundle's default settings ÷ at full resolution (shrink 1),
   and the mean relative intensity difference between the two corrected volumes inside the
   gland.

    python scripts/bench_prostate.py                      # phantoms at 64×64 slices
    python scripts/bench_prostate.py --image_size 384 --n4_shape "(320,320,20)" --encoder efficientnet-b3
"""

from __future__ import annotations

import platform
import sys
import tempfile
import time
from pathlib import Path

import fire
import numpy as np
import torch
from bench_utils import describe_training, selected_parts, timeit, training_iteration_ratio, workflow
from bundle_cli import BUNDLES, make_phantoms

BUNDLE_ROOT = BUNDLES / "prostate_mri_transfer"
PARTS = ("data", "train", "infer", "n4")  # the four benchmarks, in the order they run


def bench_training(work: Path, data: Path, image_size: int, encoder: str, batch_size: int) -> dict:
    wf = workflow(BUNDLE_ROOT, ["train.json"], bundle_root=str(work), dataset_dir=str(data), sites=["RUNMC", "BMC"],
                  image_size=image_size, encoder=encoder, batch_size=batch_size, epochs=1, resume=False)
    return training_iteration_ratio(wf, batch_size)


def bench_data_loading(work: Path, data: Path, image_size: int) -> dict:
    from monai.data import DataLoader

    overrides = dict(bundle_root=str(work), dataset_dir=str(data), sites=["RUNMC", "BMC"], image_size=image_size,
                     cache_dir=str(work / "fresh_cache"), epochs=1)
    wf = workflow(BUNDLE_ROOT, ["train.json"], **overrides)
    start = time.perf_counter()
    dataset = wf.parser.get_parsed_content("train#dataset")  # builds slices: N4 on every volume, fills the cache
    loader = DataLoader(dataset, batch_size=16, shuffle=True, num_workers=0)
    n1 = sum(len(b["image"]) for b in loader)
    epoch1 = time.perf_counter() - start
    start = time.perf_counter()
    n2 = sum(len(b["image"]) for b in loader)
    epoch2 = time.perf_counter() - start
    # a new run over the same data: volumes come from the on-disk cache
    wf2 = workflow(BUNDLE_ROOT, ["train.json"], **overrides)
    start = time.perf_counter()
    dataset2 = wf2.parser.get_parsed_content("train#dataset")
    n3 = sum(len(b["image"]) for b in DataLoader(dataset2, batch_size=16, shuffle=True, num_workers=0))
    rerun = time.perf_counter() - start
    assert n1 == n2 == n3
    return {"epoch1_s": epoch1, "epoch2_s": epoch2, "ratio": epoch2 / epoch1, "warm_disk_s": rerun,
            "warm_ratio": rerun / epoch1, "slices": n1, "volumes": len(wf.parser.get_parsed_content("datalist")["training"])}


def bench_inference(work: Path, data: Path, image_size: int, encoder: str, repeat: int) -> dict:
    """The bundle's inferer (inference.json: slices batched by 16) ÷ MONAI's SliceInferer one slice at a time,
    after checking that both give the same logits; beside it, the bare network on the same slices as one
    batch ÷ one at a time (what batching can gain on this machine, with no inferer around it)."""
    from monai.inferers import SliceInferer
    from monai.utils import convert_to_tensor

    wf = workflow(BUNDLE_ROOT, ["inference.json"], bundle_root=str(work), dataset_dir=str(data / "RUNMC"),
                  image_size=image_size, encoder=encoder)
    network = wf.parser.get_parsed_content("network").eval()
    bundle = wf.parser.get_parsed_content("inferer")
    item = wf.parser.get_parsed_content("dataset")[0]
    volume = item["image"][None].to(next(network.parameters()).device)
    n_slices = volume.shape[-1]
    single = SliceInferer(roi_size=(image_size, image_size), sw_batch_size=1, spatial_dim=2, progress=False)
    with torch.no_grad():
        out_b, out_s = bundle(volume, network), single(volume, network)
        # same logits up to float reassociation of batched convolutions
        rel = float((out_b - out_s).abs().max() / out_s.abs().max())
        assert rel < 1e-4, f"batched and per-slice inference disagree (max relative difference {rel:.2e})"
        # (slices, channel, H, W) as a plain tensor, as MONAI's inferers hand the network its windows
        slices = convert_to_tensor(volume, track_meta=False)[0].permute(3, 0, 1, 2).contiguous()
        t_b = timeit(lambda: bundle(volume, network), repeat)
        t_s = timeit(lambda: single(volume, network), repeat)
        bare_b = timeit(lambda: network(slices), repeat)
        bare_s = timeit(lambda: [network(slices[i:i + 1]) for i in range(n_slices)], repeat)
    return {"batched_s": t_b, "per_slice_s": t_s, "ratio": t_b / t_s, "slices": n_slices,
            "inferer": f"{type(bundle).__name__} (sw_batch_size {bundle.sw_batch_size})",
            "bare_batched_s": bare_b, "bare_per_slice_s": bare_s, "bare_ratio": bare_b / bare_s}


def bench_n4(work: Path, shape: tuple[int, int, int]) -> dict:
    import nibabel as nib
    from monai.transforms import LoadImage
    from shared_transforms import N4BiasFieldCorrection

    data = make_phantoms("prostate", work / "n4_data", work / "n4.log", cases_per_site=1, shape=f"({shape[0]},{shape[1]},{shape[2]})", seed=7)
    image_file = data / "RUNMC" / "Case00.nii.gz"
    image = LoadImage(image_only=True, ensure_channel_first=True)(str(image_file)).float()
    gland = np.asanyarray(nib.load(str(data / "RUNMC" / "Case00_segmentation.nii.gz")).dataobj) > 0
    default = N4BiasFieldCorrection()
    full = N4BiasFieldCorrection(shrink_factor=1)
    start = time.perf_counter()
    out_default = default(image)
    t_default = time.perf_counter() - start
    start = time.perf_counter()
    out_full = full(image)
    t_full = time.perf_counter() - start
    a, b = np.asarray(out_default[0]), np.asarray(out_full[0])
    rel = float(np.mean(np.abs(a[gland] - b[gland]) / np.abs(b[gland])))
    return {"default_s": t_default, "full_s": t_full, "ratio": t_default / t_full, "mean_rel_diff": rel,
            "shape": tuple(image.shape[1:]), "default_shrink": default.shrink_factor}


def main(image_size: int = 64, encoder: str = "efficientnet-b3", batch_size: int = 16,
         repeat: int = 5, n4_shape: tuple = (320, 320, 20), cases_per_site: int = 6, phantom_shape: tuple = (64, 64, 16),
         parts: tuple = PARTS) -> None:
    """Run the four benchmarks (or those named in ``parts``) and print their ratios.

    Args:
        image_size: slice size the network sees.
        encoder: smp encoder of the UNet++ (the paper's is efficientnet-b3).
        batch_size: training batch (paper: 16).
        repeat: timed inference repetitions per side.
        n4_shape: phantom volume for the N4 benchmark (a real T2 volume is about 320×320×20).
        cases_per_site: phantom cases per site for the training/data-loading benchmarks.
        phantom_shape: phantom volume shape for those benchmarks.
        parts: which of data, train, infer, n4 to run (e.g. ``--parts train,infer``).
    """
    parts = selected_parts(parts, PARTS)
    torch.manual_seed(0)
    sys.path.insert(0, str(BUNDLE_ROOT))  # the bundle's scripts package, as the MONAI CLI would add it
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shape = tuple(phantom_shape)
        data = make_phantoms("prostate", work / "data", work / "phantoms.log", cases_per_site=cases_per_site,
                             shape=f"({shape[0]},{shape[1]},{shape[2]})")
        print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
              f"device {'cuda: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
        results = {}
        if "data" in parts:
            results["data"] = d = bench_data_loading(work, data, image_size)
            print(f"[data]      epoch 1 {d['epoch1_s']:.2f} s (N4 + cache fill, {d['volumes']} volumes, {d['slices']} slices), "
                  f"epoch 2 {d['epoch2_s']:.3f} s -> epoch-2 / epoch-1 = {d['ratio']:.4f}; "
                  f"new run on the warm disk cache {d['warm_disk_s']:.2f} s ({d['warm_ratio']:.3f} of epoch 1)")
        if "train" in parts:
            results["train"] = t = bench_training(work, data, image_size, encoder, batch_size)
            print(f"[train]     {describe_training(t)}")
        if "infer" in parts:
            results["infer"] = i = bench_inference(work, data, image_size, encoder, repeat)
            print(f"[inference] one volume of {i['slices']} slices: bundle's {i['inferer']} {i['batched_s']:.3f} s, "
                  f"one slice at a time {i['per_slice_s']:.3f} s -> batched / per-slice = {i['ratio']:.3f}; bare network, "
                  f"one batch {i['bare_batched_s']:.3f} s, one slice at a time {i['bare_per_slice_s']:.3f} s -> "
                  f"{i['bare_ratio']:.3f}")
        if "n4" in parts:
            results["n4"] = n = bench_n4(work, tuple(n4_shape))
            print(f"[n4]        volume {n['shape']}: default (shrink {n['default_shrink']}) {n['default_s']:.1f} s, full resolution "
                  f"{n['full_s']:.1f} s -> default / full = {n['ratio']:.3f}; mean relative gland intensity difference "
                  f"{100 * n['mean_rel_diff']:.2f} %")
    return None


if __name__ == "__main__":
    fire.Fire(main)
