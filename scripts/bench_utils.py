"""Timing helpers shared by the bundle benchmarks (scripts/bench_*.py)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def timeit(fn, repeat: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def workflow(bundle_dir: Path, config_files: list[str], **overrides):
    """A bundle's ConfigWorkflow, initialised, as the MONAI CLI builds it (logging left alone)."""
    from monai.bundle import ConfigWorkflow

    files = [str(Path(bundle_dir) / "configs" / f) for f in config_files]
    wf = ConfigWorkflow(config_file=files, workflow_type=None, logging_file=False, **overrides)
    wf.initialize()
    return wf


def synchronize(device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously; wall times need it)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def batch_size(batch) -> int:
    """Items in an engine's batch: a dict of batched tensors, or the list of items MONAI decollates it into."""
    return len(batch) if isinstance(batch, (list, tuple)) else len(batch["image"])


class IterationTimer:
    """Wall time of each trainer iteration, ITERATION_STARTED to the end of the ITERATION_COMPLETED
    handlers (post-processing and metrics included, data loading not), with its batch size and loss.

    Attach after the bundle's own handlers so that they are inside the timed span.
    """

    def __init__(self, device="cpu") -> None:
        self.device = device
        self.records: list[dict] = []  # {"epoch", "seconds", "images", "loss"}

    def attach(self, engine) -> None:
        from ignite.engine import Events
        from monai.handlers import from_engine

        def started(e):
            synchronize(self.device)
            self._t = time.perf_counter()

        def completed(e):
            synchronize(self.device)
            loss = from_engine(["loss"], first=True)(e.state.output)
            self.records.append(
                {
                    "epoch": e.state.epoch,
                    "seconds": time.perf_counter() - self._t,
                    "images": batch_size(e.state.batch),
                    "loss": float(loss),
                }
            )

        engine.add_event_handler(Events.ITERATION_STARTED, started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, completed)

    def full_batches(self, batch_size: int) -> list[float]:
        """Times of the full batches, the very first iteration (warm-up) left out."""
        return [r["seconds"] for r in self.records[1:] if r["images"] == batch_size]


def hand_step(network, loss_fn, optimizer, images, labels, amp: bool = False, clip_norm: float | None = None):
    """A hand-written PyTorch training step: ``step()`` runs forward, loss, backward (through a
    GradScaler and ``torch.autocast`` with ``amp``), optional gradient-norm clipping on the unscaled
    gradients, and the optimiser step."""
    import torch

    device_type = images.device.type
    scaler = torch.amp.GradScaler(device_type, enabled=amp)

    def step():
        network.train()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, enabled=amp):
            loss = loss_fn(network(images), labels)
        scaler.scale(loss).backward()
        if clip_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(network.parameters(), clip_norm)
        scaler.step(optimizer)
        scaler.update()

    return step


def ratio_to_hand(timer: IterationTimer, batch_size: int, step, device, iters: int | None = None) -> dict:
    """Median bundle iteration (from ``timer``) ÷ median of ``step()`` (after one warm-up), side by side."""
    full = timer.full_batches(batch_size)
    if not full:
        raise ValueError(f"no full batch of {batch_size}: use more data or a smaller batch")

    def timed():
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        return time.perf_counter() - start

    timed()  # warm-up
    hand = [timed() for _ in range(iters or len(full))]
    b, h = float(np.median(full)), float(np.median(hand))
    return {"bundle_iter_s": b, "hand_iter_s": h, "ratio": b / h, "iters": len(full)}


def training_iteration_ratio(wf, batch_size: int, before_run: tuple[str, ...] = ()) -> dict:
    """Bundle ``SupervisedTrainer`` iteration ÷ a hand-written PyTorch step, same network and batch.

    The bundle side is timed by :class:`IterationTimer` over two epochs of full batches.
    ``before_run``: config ids to evaluate first (as the bundle's ``run`` does, e.g. a transfer
    initialisation).
    """
    for item in before_run:
        wf.parser.get_parsed_content(item)
    trainer = wf.parser.get_parsed_content("train#trainer")
    trainer.state.max_epochs = 2
    device = wf.parser.get_parsed_content("device")
    timer = IterationTimer(device)
    timer.attach(trainer)
    trainer.run()
    batch = next(iter(trainer.data_loader))
    images, labels = batch["image"].to(device), batch["label"].to(device)
    step = hand_step(trainer.network, trainer.loss_function, trainer.optimizer, images, labels)
    result = ratio_to_hand(timer, batch_size, step, device)
    return {**result, "batch": tuple(images.shape)}
