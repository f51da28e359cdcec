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


def selected_parts(parts, known: tuple[str, ...]) -> tuple[str, ...]:
    """A bench's ``--parts`` (one name, or several: fire gives ``a,b`` as a tuple) checked against ``known``."""
    parts = (parts,) if isinstance(parts, str) else tuple(parts)
    unknown = set(parts) - set(known)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}: choose from {', '.join(known)}")
    return parts


def torch_device_type(device) -> str:
    import torch

    return torch.device(device).type


def synchronize(device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously; wall times need it)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def batch_items(batch) -> int:
    """Items in an engine's batch: a dict of batched tensors, or the list of items MONAI decollates it into."""
    return len(batch) if isinstance(batch, (list, tuple)) else len(batch["image"])


class IterationTimer:
    """Wall time of each trainer iteration, from its batch's arrival (GET_BATCH_COMPLETED: the ITERATION_STARTED
    handlers included) to the end of the ITERATION_COMPLETED handlers (post-processing and metrics included,
    data loading not), with its batch size and loss.

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
                    "images": batch_items(e.state.batch),
                    "loss": float(loss),
                }
            )

        engine.add_event_handler(Events.GET_BATCH_COMPLETED, started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, completed)

    def full_batches(self, batch_size: int) -> list[float]:
        """Times of the full batches, the very first iteration (warm-up) left out."""
        return [r["seconds"] for r in self.records[1:] if r["images"] == batch_size]


class HandlerTimer:
    """Wall time of the handlers a bundle iteration runs and no hand-written step does: those on
    ITERATION_STARTED, MONAI's MODEL_COMPLETED (decollation, post-processing) and ITERATION_COMPLETED (metrics,
    loggers, progress bars, checkpoint bookkeeping), by handler, summed per iteration.

    :meth:`wrap` replaces each handler attached to those events by a timed call of it (ignite keeps them as
    ``(handler, args, kwargs)`` in ``engine._event_handlers``); call it when the run starts, once every handler
    is attached. ``skip``: the benchmark's own handlers. The handlers' sum measures the bundle's per-iteration
    overhead directly, without the noise of a difference of two whole iterations; it is a lower bound of the
    overhead (work a bundle does outside handlers, e.g. inside a custom iteration, is not in it). On CUDA an
    untimed synchronisation runs before the MODEL_COMPLETED handlers, so that the first handler that waits for
    the GPU (a loss ``.item()``) does not absorb the step's queued kernels; the handlers' own calls are not
    synchronised (host time; kernels they queue run after they return), and the bundle's side loses the
    overlap of its handlers with its queued kernels.
    """

    def __init__(self, device="cpu", skip=()) -> None:
        self.device, self.skip = device, tuple(skip)
        self.by_handler: dict[str, list[float]] = {}
        self._current = 0.0

    def wrap(self, engine) -> None:
        from ignite.engine import Events
        from monai.engines.utils import IterationEvents

        for event in (Events.ITERATION_STARTED, IterationEvents.MODEL_COMPLETED, Events.ITERATION_COMPLETED):
            handlers = engine._event_handlers[event]
            for i, (fn, args, kwargs) in enumerate(handlers):
                if not any(fn is s for s in self.skip):
                    handlers[i] = (self._timed(fn, _handler_name(fn)), args, kwargs)
        if torch_device_type(self.device) == "cuda":
            engine._event_handlers[IterationEvents.MODEL_COMPLETED].insert(0, (self._synchronize, (), {}))

    def _synchronize(self, *args) -> None:
        synchronize(self.device)

    def _timed(self, fn, name: str):
        times = self.by_handler.setdefault(name, [])

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - start
                times.append(seconds)
                self._current += seconds

        return timed

    def take(self) -> float:
        """The handlers' seconds since the last ``take()`` (one iteration's, called once per iteration)."""
        seconds, self._current = self._current, 0.0
        return seconds


def _handler_name(fn) -> str:
    owner = getattr(fn, "__self__", None)
    if owner is not None:  # a bound method: its object's class (a MeanDice, not the Metric base class)
        return f"{type(owner).__name__}.{fn.__name__}"
    qualname = getattr(fn, "__qualname__", None)  # a function (a closure: its own name), or a callable object
    return qualname.split("<locals>.")[-1] if qualname else type(fn).__name__


def scaler_at(device, amp: bool, like=None):
    """A GradScaler for ``device`` (enabled with ``amp``) starting from ``like``'s current scale: a fresh 2^16
    would skip other, overflowing steps than the trainer whose scaler ``like`` is."""
    import torch

    scale = like.get_scale() if like is not None and like.is_enabled() else 2.0**16
    return torch.amp.GradScaler(torch.device(device).type, init_scale=scale, enabled=amp)


def hand_step(network, loss_fn, optimizer, device, amp: bool = False, clip_norm: float | None = None,
              prepare_batch=None, scaler_like=None, set_to_none: bool = False):
    """A hand-written PyTorch training step: ``step(batch)`` moves the batch (a dict with ``image`` and ``label``,
    as the bundle's loader yields it) to ``device`` (as the trainer's ``prepare_batch`` does every iteration),
    runs forward, loss, backward (through a GradScaler, and ``torch.autocast`` with ``amp`` on CUDA: MONAI's
    ``SupervisedTrainer`` autocasts there only), optional gradient-norm clipping on the unscaled gradients, and
    the optimiser step.

    ``prepare_batch(batch, device) -> (x, y)``: instead of moving ``image`` and ``label``, for a bundle whose
    trainer transforms its batch on the way in (one-hot labels); ``scaler_like``: the trainer's GradScaler,
    whose current scale the step's own starts from (a fresh 2^16 would skip other steps than the trainer's);
    ``set_to_none``: as the trainer's ``optim_set_to_none``.
    """
    import torch

    device_type = torch.device(device).type
    scaler = scaler_at(device, amp, scaler_like)

    def step(batch):
        if prepare_batch is None:
            x, y = batch["image"].to(device), batch["label"].to(device)
        else:
            x, y = prepare_batch(batch, device)
        network.train()
        optimizer.zero_grad(set_to_none=set_to_none)
        with torch.autocast(device_type, enabled=amp and device_type == "cuda"):
            loss = loss_fn(network(x), y)
        scaler.scale(loss).backward()
        if clip_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(network.parameters(), clip_norm)
        scaler.step(optimizer)
        scaler.update()

    return step


def trainer_hand_step(trainer, device, clip_norm: float | None = None, prepare_batch=None):
    """:func:`hand_step` with a ``SupervisedTrainer``'s network, loss, optimiser, AMP setting, scaler and
    ``optim_set_to_none``."""
    return hand_step(trainer.network, trainer.loss_function, trainer.optimizer, device, amp=bool(trainer.amp),
                     clip_norm=clip_norm, prepare_batch=prepare_batch, scaler_like=getattr(trainer, "scaler", None),
                     set_to_none=trainer.optim_set_to_none)


def plain_hand_step(wf, trainer, device):
    """The plain hand-written step (:func:`trainer_hand_step`) of ``trainer``: forward, loss, backward, step."""
    return trainer_hand_step(trainer, device)


def clipped_hand_step(wf, trainer, device):
    """:func:`trainer_hand_step` clipping the unscaled gradient norm at the config's ``grad_clip`` (the cardiac
    segmenter's GradientClip handler does the same)."""
    return trainer_hand_step(trainer, device, clip_norm=wf.parser.get_parsed_content("grad_clip"))


def prepared_hand_step(wf, trainer, device):
    """:func:`trainer_hand_step` taking the loader's batch through the trainer's own ``prepare_batch`` (the cardiac
    QC autoencoder trains on one-hot labels that OneHotLabelBatch makes on the way in, and moves to the device)."""

    def prepare_batch(batch, device):
        return trainer.prepare_batch(batch, device, trainer.non_blocking)[:2]

    return trainer_hand_step(trainer, device, prepare_batch=prepare_batch)


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
            if batch_items(batch) == size:
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
    loader, batch size and AMP setting, measured in pairs, and the bundle's own handlers timed directly.

    The trainer runs ``warmup_epochs + epochs`` epochs. Each full-batch iteration of the timed epochs
    (:class:`IterationTimer`: its batch's arrival to the end of the bundle's ITERATION_COMPLETED handlers) is
    paired with one hand-written iteration (:func:`hand_loop_step`: its next batch from the same loader, then
    the step, only the step timed), outside the bundle's span, run in turn right before the bundle's iteration
    (before its batch is fetched, so that each side's step follows the loading of its own batch) and right
    after it. Pairing keeps both sides on the same warm process and the
    same minute of the machine: timed one after the other, the first epoch's allocations fell on the bundle
    side only and minutes of drift on a shared VM moved the ratio by more than the overhead being measured.
    Alternating the order pools what the order itself does into both sides: on 2 CPU cores the step that ran
    right after the other side's step ran 3-10 % faster (prostate, 64², batch 16: bundle ÷ hand 0.97-1.00
    with every hand step before, 1.11 with every one after). ``ratio_hand_before`` / ``ratio_hand_after``
    report the two halves. :class:`HandlerTimer` times the bundle's own handlers in the same iterations (``handlers_s``,
    ``handlers_over_hand``, ``handlers`` by name). The hand steps update the same network and optimiser (the
    training run is a benchmark, not a result).
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
    pairs: list[tuple[float, float, float, bool]] = []  # (bundle iteration, its handlers, hand iteration, before)
    pending: list[float | None] = [None]  # the hand time of a step run before this iteration's batch was fetched

    @trainer.on(Events.GET_BATCH_STARTED)  # before the batch is fetched: each side follows the loading of its batch
    def hand_step_before(engine):
        pending[0] = steps[-1]() if engine.state.epoch > warmup_epochs and len(pairs) % 2 == 0 else None

    timer = IterationTimer(device)
    timer.attach(trainer)

    @trainer.on(Events.ITERATION_COMPLETED)
    def hand_step_after(engine):
        record, handler_s, before = timer.records[-1], handlers.take(), pending[0]
        if record["epoch"] <= warmup_epochs or record["images"] != batch_size:
            return  # a partial batch: a hand step run before it is not paired
        pairs.append((record["seconds"], handler_s, steps[-1]() if before is None else before, before is not None))

    ours = [h for h, *_ in trainer._event_handlers[Events.ITERATION_COMPLETED][-2:]]  # timer.completed, hand_step_after
    handlers = HandlerTimer(device, skip=ours)

    @trainer.on(Events.STARTED)
    def build_hand_step(engine):
        step = (hand or plain_hand_step)(wf, trainer, device)
        steps.append(hand_loop_step(step, trainer.data_loader, batch_size, device))
        handlers.wrap(engine)

    trainer.run()
    if not pairs:
        raise ValueError(f"no full batch of {batch_size}: use more data or a smaller batch")

    def ratio(selected) -> float:
        if not selected:  # a single pair has no 'after' half
            return float("nan")
        return float(np.median([p[0] for p in selected]) / np.median([p[2] for p in selected]))

    b, hs, h = (float(np.median([p[i] for p in pairs])) for i in range(3))
    shape = tuple(next(full_batches(trainer.data_loader, batch_size))["image"].shape)
    return {"bundle_iter_s": b, "hand_iter_s": h, "ratio": b / h, "iters": len(pairs),
            "pair_ratio_median": float(np.median([p[0] / p[2] for p in pairs])), "batch": shape,
            "ratio_hand_before": ratio([p for p in pairs if p[3]]), "ratio_hand_after": ratio([p for p in pairs if not p[3]]),
            "handlers_s": hs, "handlers_over_hand": hs / h,
            "handlers": {k: float(np.median(v)) for k, v in handlers.by_handler.items() if v},
            "pairs": [list(p) for p in pairs]}


def describe_training(r: dict) -> str:
    """One line for a :func:`training_iteration_ratio` result: the ratio, its absolute figures and the handlers."""
    parts = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in sorted(r["handlers"].items(), key=lambda kv: -kv[1]) if v >= 1e-4)
    return (f"batch {r['batch']}: bundle iteration {r['bundle_iter_s']:.3f} s, hand-written loop {r['hand_iter_s']:.3f} s "
            f"(medians of {r['iters']} pairs, hand steps right before and right after bundle iterations in turn) -> "
            f"bundle / hand = {r['ratio']:.3f} (median of the pairs' ratios {r['pair_ratio_median']:.3f}; hand step "
            f"before {r['ratio_hand_before']:.3f}, after {r['ratio_hand_after']:.3f}); the bundle's own handlers "
            f"{r['handlers_s'] * 1e3:.1f} ms per iteration = {r['handlers_over_hand']:.3f} of the hand step "
            f"(medians, ms: {parts})")


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
        start["step"] = (hand or plain_hand_step)(wf, trainer, device)  # its GradScaler: the scale at the start
        torch.manual_seed(seed)

    trainer.data_loader = batches
    trainer.state.max_epochs, trainer.state.epoch_length = 1, iterations
    trainer.run()
    start_net, start_opt = start["net"], start["opt"]
    bundle = {k: v.detach().clone() for k, v in net.state_dict().items()}
    net.load_state_dict(start_net)
    opt.load_state_dict(start_opt)  # the optimiser's state and learning rate before the bundle's iterations
    step = start["step"]
    torch.manual_seed(seed)
    for batch in batches:
        step(batch)
    synchronize(device)
    change = max((bundle[k].double() - v.double()).abs().max().item() for k, v in start_net.items())
    diff = max((bundle[k].double() - v.double()).abs().max().item() for k, v in net.state_dict().items())
    if change == 0:
        raise ValueError("the bundle's iterations did not change the network")
    return diff / change
