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


def timed_call(fn, device) -> float:
    """Wall time of one ``fn()`` on ``device``, its queued GPU work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


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


def scaler_at(device, amp: bool, like=None):
    """A GradScaler for ``device`` (enabled with ``amp``) starting from ``like``'s current scale: a fresh 2^16
    would skip other, overflowing steps than the trainer whose scaler ``like`` is."""
    import torch

    scale = like.get_scale() if like is not None and like.is_enabled() else 2.0**16
    return torch.amp.GradScaler(torch.device(device).type, init_scale=scale, enabled=amp)


def hand_step(network, loss_fn, optimizer, images, labels, device, amp: bool = False, clip_norm: float | None = None,
              prepare=None, scaler_like=None, set_to_none: bool = False):
    """A hand-written PyTorch training step: ``step()`` moves the batch to ``device`` (as the trainer's
    ``prepare_batch`` does every iteration), runs forward, loss, backward (through a GradScaler and
    ``torch.autocast`` with ``amp``), optional gradient-norm clipping on the unscaled gradients, and the
    optimiser step.

    ``images``/``labels``: a batch of the bundle's loader, as it comes out of it; ``prepare(x, y) -> (x, y)``
    for a bundle that transforms its batch on the way in (one-hot labels); ``scaler_like``: the trainer's
    GradScaler, whose current scale the step's own starts from (a fresh 2^16 would skip other steps than
    the trainer's); ``set_to_none``: as the trainer's ``optim_set_to_none``.
    """
    import torch

    device_type = torch.device(device).type
    scaler = scaler_at(device, amp, scaler_like)

    def step():
        x, y = images.to(device), labels.to(device)
        if prepare is not None:
            x, y = prepare(x, y)
        network.train()
        optimizer.zero_grad(set_to_none=set_to_none)
        with torch.autocast(device_type, enabled=amp):
            loss = loss_fn(network(x), y)
        scaler.scale(loss).backward()
        if clip_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(network.parameters(), clip_norm)
        scaler.step(optimizer)
        scaler.update()

    return step


def trainer_hand_step(trainer, device, clip_norm: float | None = None, prepare=None, batch=None):
    """:func:`hand_step` with a ``SupervisedTrainer``'s network, loss, optimiser, AMP setting, scaler and
    ``optim_set_to_none``, on ``batch`` (default: the first batch of its loader)."""
    batch = next(iter(trainer.data_loader)) if batch is None else batch
    return hand_step(trainer.network, trainer.loss_function, trainer.optimizer, batch["image"], batch["label"], device,
                     amp=bool(trainer.amp), clip_norm=clip_norm, prepare=prepare,
                     scaler_like=getattr(trainer, "scaler", None), set_to_none=trainer.optim_set_to_none)


def ratio_to_hand(timer: IterationTimer, batch_size: int, step, device, iters: int | None = None) -> dict:
    """Median bundle iteration (from ``timer``) ÷ median of ``step()`` (after one warm-up), side by side."""
    full = timer.full_batches(batch_size)
    if not full:
        raise ValueError(f"no full batch of {batch_size}: use more data or a smaller batch")

    timed_call(step, device)  # warm-up
    hand = [timed_call(step, device) for _ in range(iters or len(full))]
    b, h = float(np.median(full)), float(np.median(hand))
    return {"bundle_iter_s": b, "hand_iter_s": h, "ratio": b / h, "iters": len(full)}


def training_iteration_ratio(wf, batch_size: int, before_run: tuple[str, ...] = (), warmup_epochs: int = 1,
                             epochs: int = 4) -> dict:
    """Bundle ``SupervisedTrainer`` iteration ÷ a hand-written PyTorch step, same network, batch and AMP setting,
    measured in pairs.

    The trainer runs ``warmup_epochs + epochs`` epochs. After each full-batch iteration of the timed epochs
    (:class:`IterationTimer`: ITERATION_STARTED to the end of the bundle's ITERATION_COMPLETED handlers), one
    hand-written step (:func:`trainer_hand_step`, on the loader's first batch) is timed right after it, outside
    the bundle's span. Pairing keeps both sides on the same warm process and the same minute of the machine:
    timed one after the other, the first epoch's allocations fell on the bundle side only and minutes of
    drift on a shared VM moved the ratio by more than the overhead being measured. The hand steps update the
    same network and optimiser (the training run is a benchmark, not a result).
    ``before_run``: config ids to evaluate first (as the bundle's ``run`` does, e.g. a transfer
    initialisation).
    """
    from ignite.engine import Events

    for item in before_run:
        wf.parser.get_parsed_content(item)
    trainer = wf.parser.get_parsed_content("train#trainer")
    trainer.state.max_epochs = warmup_epochs + epochs
    device = wf.parser.get_parsed_content("device")
    batch = next(iter(trainer.data_loader))
    steps = []  # the hand step, built when the run starts: MONAI's Trainer.run() creates the AMP scaler it copies
    timer = IterationTimer(device)
    timer.attach(trainer)
    pairs: list[tuple[float, float]] = []

    @trainer.on(Events.STARTED)
    def build_hand_step(engine):
        steps.append(trainer_hand_step(trainer, device, batch=batch))

    @trainer.on(Events.ITERATION_COMPLETED)
    def paired_hand_step(engine):
        record = timer.records[-1]
        if record["epoch"] <= warmup_epochs or record["images"] != batch_size:
            return
        pairs.append((record["seconds"], timed_call(steps[-1], device)))

    trainer.run()
    if not pairs:
        raise ValueError(f"no full batch of {batch_size}: use more data or a smaller batch")
    b, h = (float(np.median(x)) for x in zip(*pairs))
    return {"bundle_iter_s": b, "hand_iter_s": h, "ratio": b / h, "iters": len(pairs),
            "pair_ratio_median": float(np.median([x / y for x, y in pairs])), "batch": tuple(batch["image"].shape)}
