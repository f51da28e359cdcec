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


def training_iteration_ratio(wf, batch_size: int, before_run: tuple[str, ...] = ()) -> dict:
    """Bundle ``SupervisedTrainer`` iteration ÷ a hand-written PyTorch step, same network and batch.

    The bundle side is timed from ITERATION_STARTED to the end of the ITERATION_COMPLETED
    handlers: the whole iteration (post-processing and metric included), no data loading, over
    two epochs of full batches. ``before_run``: config ids to evaluate first (as the bundle's
    ``run`` does, e.g. a transfer initialisation).
    """
    from ignite.engine import Events

    for item in before_run:
        wf.parser.get_parsed_content(item)
    trainer = wf.parser.get_parsed_content("train#trainer")
    trainer.state.max_epochs = 2
    marks, times = {}, []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: marks.__setitem__("t", time.perf_counter()))
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: times.append((time.perf_counter() - marks["t"], len(e.state.batch))),
    )
    trainer.run()
    network, loss_fn, optimizer = trainer.network, trainer.loss_function, trainer.optimizer
    batch = next(iter(trainer.data_loader))
    device = wf.parser.get_parsed_content("device")
    images, labels = batch["image"].to(device), batch["label"].to(device)

    def hand_iteration():
        network.train()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(network(images), labels)
        loss.backward()
        optimizer.step()

    full = [t for t, n in times[1:] if n == batch_size]  # first iteration is warm-up; partial batches differ
    if not full:
        raise ValueError(f"no full batch of {batch_size}: use more data or a smaller batch")
    hand = [timeit(hand_iteration, 1, warmup=0) for _ in range(len(full) + 1)][1:]
    b, h = float(np.median(full)), float(np.median(hand))
    return {"bundle_iter_s": b, "hand_iter_s": h, "ratio": b / h, "batch": tuple(images.shape), "iters": len(full)}
