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


def hand_step(network, loss_fn, optimizer, device, amp: bool = False, clip_norm: float | None = None, prepare=None,
              scaler_like=None, set_to_none: bool = False):
    """A hand-written PyTorch training step: ``step(batch)`` moves the batch (a dict with ``image`` and ``label``,
    as the bundle's loader yields it) to ``device`` (as the trainer's ``prepare_batch`` does every iteration),
    runs forward, loss, backward (through a GradScaler and ``torch.autocast`` with ``amp``), optional
    gradient-norm clipping on the unscaled gradients, and the optimiser step.

    ``prepare(x, y) -> (x, y)``: for a bundle that transforms its batch on the way in (one-hot labels);
    ``scaler_like``: the trainer's GradScaler, whose current scale the step's own starts from (a fresh 2^16
    would skip other steps than the trainer's); ``set_to_none``: as the trainer's ``optim_set_to_none``.
    """
    import torch

    device_type = torch.device(device).type
    scaler = scaler_at(device, amp, scaler_like)

    def step(batch):
        x, y = batch["image"].to(device), batch["label"].to(device)
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


def trainer_hand_step(trainer, device, clip_norm: float | None = None, prepare=None):
    """:func:`hand_step` with a ``SupervisedTrainer``'s network, loss, optimiser, AMP setting, scaler and
    ``optim_set_to_none``."""
    return hand_step(trainer.network, trainer.loss_function, trainer.optimizer, device, amp=bool(trainer.amp),
                     clip_norm=clip_norm, prepare=prepare, scaler_like=getattr(trainer, "scaler", None),
                     set_to_none=trainer.optim_set_to_none)


def plain_hand_step(wf, trainer, device):
    """The plain hand-written step (:func:`trainer_hand_step`) of ``trainer``: forward, loss, backward, step."""
    return trainer_hand_step(trainer, device)


def clipped_hand_step(wf, trainer, device):
    """:func:`trainer_hand_step` clipping the unscaled gradient norm at the config's ``grad_clip`` (the cardiac
    segmenter's GradientClip handler does the same)."""
    return trainer_hand_step(trainer, device, clip_norm=wf.parser.get_parsed_content("grad_clip"))


def prepared_hand_step(wf, trainer, device):
    """:func:`trainer_hand_step` passing the batch through the trainer's own ``prepare_batch`` (the cardiac QC
    autoencoder trains on one-hot labels that OneHotLabelBatch makes on the way in)."""

    def prepare(x, y):
        return trainer.prepare_batch({"image": x, "label": y}, x.device, False)[:2]

    return trainer_hand_step(trainer, device, prepare=prepare)


def kdas_hand_step(wf, trainer, device):
    """The polyp bundle's multi-scale KDAS iteration (``train#step``, a MultiScaleKDStep) written out in plain
    PyTorch on the trainer's network, optimiser, KDAS loss and AMP setting: per rate, resize the batch, student
    (+ frozen teacher, read from the step when called: it loads the teacher at its first iteration), loss,
    (scaled) backward, unscale, gradient-value clamp, optimiser step."""
    import torch
    import torch.nn.functional as F

    step_fn = wf.parser.get_parsed_content("train#step")  # the trainer's iteration_update: sizes, teacher, clip
    amp = bool(trainer.amp)
    device_type = torch.device(device).type
    scaler = scaler_at(device, amp, getattr(trainer, "scaler", None))
    net, opt, loss_fn = trainer.network, trainer.optimizer, trainer.loss_function

    def step(batch):
        images, labels = batch["image"].to(device), batch["label"].to(device)
        net.train()
        for size in step_fn.sizes:
            if size != images.shape[-1] or size != images.shape[-2]:
                x = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=True)
                y = F.interpolate(labels, size=(size, size), mode="bilinear", align_corners=True)
            else:
                x, y = images, labels
            opt.zero_grad(set_to_none=trainer.optim_set_to_none)
            with torch.autocast(device_type, enabled=amp):
                student = net(x)
                teacher = None
                if step_fn.teacher is not None and loss_fn.needs_teacher:
                    with torch.no_grad():
                        teacher = step_fn.teacher(x)
                loss = loss_fn(student, y, teacher)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            if step_fn.clip_value is not None:
                torch.nn.utils.clip_grad_value_(net.parameters(), step_fn.clip_value)
            scaler.step(opt)
            scaler.update()

    return step


def full_batches(loader, size: int):
    """The batches of ``size`` items a hand-written ``for batch in loader`` loop gets, pass after pass (endless)."""
    while True:
        found = False
        for batch in loader:
            if batch_size(batch) == size:
                found = True
                yield batch
        if not found:
            raise ValueError(f"no full batch of {size}: use more data or a smaller batch")


def hand_loop_step(step, loader, size: int, device):
    """``timed()``: one iteration of a hand-written loop over ``loader``: the next full batch is loaded (not timed,
    as the bundle's iteration span leaves its data loading out), then ``step(batch)`` is timed.

    Loading the batch right before the step matters: a step repeated on one batch that is already in the
    caches ran about 5 % faster on 2 CPU cores than the same step after loading its batch (the cardiac
    segmenter at 128², batch 20), and a bundle iteration always follows its batch's loading.
    """
    batches = full_batches(loader, size)

    def timed() -> float:
        batch = next(batches)
        return timed_call(lambda: step(batch), device)

    return timed


def ratio_to_hand(timer: IterationTimer, batch_size: int, step, device, loader, iters: int | None = None) -> dict:
    """Median bundle iteration (from ``timer``) ÷ median hand-written loop iteration (``step(batch)`` on the full
    batches of ``loader``, after one warm-up), timed one after the other."""
    full = timer.full_batches(batch_size)
    if not full:
        raise ValueError(f"no full batch of {batch_size}: use more data or a smaller batch")
    timed = hand_loop_step(step, loader, batch_size, device)
    timed()  # warm-up
    hand = [timed() for _ in range(iters or len(full))]
    b, h = float(np.median(full)), float(np.median(hand))
    return {"bundle_iter_s": b, "hand_iter_s": h, "ratio": b / h, "iters": len(full)}


def training_iteration_ratio(wf, batch_size: int, before_run: tuple[str, ...] = (), warmup_epochs: int = 1,
                             epochs: int = 4, hand=None) -> dict:
    """Bundle ``SupervisedTrainer`` iteration ÷ an iteration of a hand-written PyTorch loop, same network,
    loader, batch size and AMP setting, measured in pairs.

    The trainer runs ``warmup_epochs + epochs`` epochs. After each full-batch iteration of the timed epochs
    (:class:`IterationTimer`: ITERATION_STARTED to the end of the bundle's ITERATION_COMPLETED handlers), one
    hand-written iteration (:func:`hand_loop_step`: its next batch from the same loader, then the step, only
    the step timed) runs right after it, outside the bundle's span. Pairing keeps both sides on the same warm
    process and the same minute of the machine: timed one after the other, the first epoch's allocations fell
    on the bundle side only and minutes of drift on a shared VM moved the ratio by more than the overhead
    being measured. The hand steps update the same network and optimiser (the training run is a benchmark,
    not a result).
    ``before_run``: config ids to evaluate first (as the bundle's ``run`` does, e.g. a transfer
    initialisation); ``hand(wf, trainer, device) -> step(batch)``: the hand-written step of a bundle whose
    iteration is not the plain one (default :func:`plain_hand_step`; :func:`kdas_hand_step`,
    :func:`clipped_hand_step`, :func:`prepared_hand_step`).
    """
    from ignite.engine import Events

    for item in before_run:
        wf.parser.get_parsed_content(item)
    trainer = wf.parser.get_parsed_content("train#trainer")
    trainer.state.max_epochs = warmup_epochs + epochs
    device = wf.parser.get_parsed_content("device")
    steps = []  # the hand step, built when the run starts: MONAI's Trainer.run() creates the AMP scaler it copies
    timer = IterationTimer(device)
    timer.attach(trainer)
    pairs: list[tuple[float, float]] = []

    @trainer.on(Events.STARTED)
    def build_hand_step(engine):
        step = (hand or plain_hand_step)(wf, trainer, device)
        steps.append(hand_loop_step(step, trainer.data_loader, batch_size, device))

    @trainer.on(Events.ITERATION_COMPLETED)
    def paired_hand_step(engine):
        record = timer.records[-1]
        if record["epoch"] <= warmup_epochs or record["images"] != batch_size:
            return
        pairs.append((record["seconds"], steps[-1]()))

    trainer.run()
    if not pairs:
        raise ValueError(f"no full batch of {batch_size}: use more data or a smaller batch")
    b, h = (float(np.median(x)) for x in zip(*pairs))
    shape = tuple(next(full_batches(trainer.data_loader, batch_size))["image"].shape)
    return {"bundle_iter_s": b, "hand_iter_s": h, "ratio": b / h, "iters": len(pairs),
            "pair_ratio_median": float(np.median([x / y for x, y in pairs])), "batch": shape}


def update_difference(wf, hand=None, iterations: int = 2, seed: int = 0) -> float:
    """How far a hand-written step is from the bundle's iteration it stands for.

    From one network, optimiser and RNG state (as the bundle's first iteration starts, after its STARTED
    handlers), ``iterations`` bundle iterations (the trainer run for one epoch
    of the loader's first ``iterations`` batches, its handlers included) and ``hand(wf, trainer, device)`` steps
    on the same batches update the network; returns the largest |difference| between the two updated states
    (parameters and buffers) ÷ the largest |change| the bundle's iterations made. Float rounding only (≪ 1)
    where both sides compute the same update, so the benchmark compares the bundle's overhead and nothing
    else. More than one iteration: an optimiser's first step can hide a difference (Adam's first update is
    about lr·sign(g), whatever the gradient's scale or clipping). Use on a fresh workflow.
    """
    import copy
    import itertools

    import torch
    from ignite.engine import Events

    trainer = wf.parser.get_parsed_content("train#trainer")
    device = wf.parser.get_parsed_content("device")
    net, opt = trainer.network, trainer.optimizer
    batches = list(itertools.islice(trainer.data_loader, iterations))
    if len(batches) < iterations:
        raise ValueError(f"the loader has {len(batches)} batches, fewer than {iterations} iterations")
    start = {}

    @trainer.on(Events.ITERATION_STARTED(once=1))
    def record_start(engine):  # after the STARTED handlers, which may set the weights (init, resume, transfer)
        start["net"], start["opt"] = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
        torch.manual_seed(seed)

    trainer.data_loader = batches
    trainer.state.max_epochs, trainer.state.epoch_length = 1, iterations
    trainer.run()
    start_net, start_opt = start["net"], start["opt"]
    bundle = {k: v.detach().clone() for k, v in net.state_dict().items()}
    net.load_state_dict(start_net)
    opt.load_state_dict(start_opt)  # the optimiser's state and learning rate before the bundle's iterations
    step = (hand or plain_hand_step)(wf, trainer, device)
    torch.manual_seed(seed)
    for batch in batches:
        step(batch)
    synchronize(device)
    change = max((bundle[k].double() - v.double()).abs().max().item() for k, v in start_net.items())
    diff = max((bundle[k].double() - v.double()).abs().max().item() for k, v in net.state_dict().items())
    if change == 0:
        raise ValueError("the bundle's iterations did not change the network")
    return diff / change
