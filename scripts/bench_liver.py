"""Benchmark of the liver_ct_mri_transfer bundle: its training iteration ÷ a hand-written loop.

Both sides run the same network (model C, the CT weights with two levels frozen, or any
``--transfer``), optimiser, loss and batch in one process, timed in pairs after a warm-up epoch
(each hand step right after a bundle iteration: bench_utils.training_iteration_ratio); the ratio is
printed.

    python scripts/bench_liver.py                                     # phantoms, 64×64 slices
    python scripts/bench_liver.py --image_size 256 --channels "[32,64,128,256]" --batch_size 18
"""

from __future__ import annotations

import platform
import sys
import tempfile
from pathlib import Path

import fire
import torch
from bench_utils import describe_training, training_iteration_ratio, workflow
from bundle_cli import BUNDLES, make_phantoms

BUNDLE_ROOT = BUNDLES / "liver_ct_mri_transfer"


def main(image_size: int = 64, channels: tuple = (32, 64, 128, 256), batch_size: int = 18, transfer: str = "finetune_freeze") -> None:
    """Print bundle iteration time ÷ hand-written iteration time.

    Args:
        image_size: slice size the network sees.
        channels: U-Net widths.
        batch_size: MRI batch (report: 18).
        transfer: scratch | finetune | finetune_freeze.
    """
    sys.path.insert(0, str(BUNDLE_ROOT))  # the bundle's scripts package, as the MONAI CLI would add it
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        mri = make_phantoms("liver_mri", work / "mri", work / "phantoms.log", cases=10, shape="(64,52,24)")
        net_args = dict(image_size=image_size, channels=list(channels))
        source = work / "ct.pt"
        ct_net = workflow(BUNDLE_ROOT, ["train.json"], bundle_root=str(work), out_channels=2, **net_args)
        torch.save(ct_net.parser.get_parsed_content("network_def").state_dict(), source)  # a CT-shaped checkpoint
        wf = workflow(BUNDLE_ROOT, ["train.json"], bundle_root=str(work), dataset_dir=str(mri), transfer=transfer,
                      source_ckpt=str(source), batch_size=batch_size, epochs=1, resume=False, **net_args)
        r = training_iteration_ratio(wf, batch_size, before_run=("train#transfer",))
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"device {'cuda: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    print(f"[train] model {transfer}, {describe_training(r)}")


if __name__ == "__main__":
    fire.Fire(main)
