"""Small helpers used by several transforms, handlers and bundles."""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["as_bool", "gather_in_order", "gather_objects", "is_main_process", "quiet_other_ranks", "source_name", "unwrap_model"]


def is_main_process() -> bool:
    """True outside DDP and on rank 0 (the process that writes files and shows progress)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def quiet_other_ranks(level: int = logging.WARNING) -> None:
    """On ranks > 0 under DDP, log only at ``level`` (WARNING) and above, as the Model Zoo's multi-GPU bundles do.

    One INFO stream per job, from rank 0; warnings and errors of every rank still show. A global
    ``logging.disable`` below ``level``: loggers and handlers created later (MONAI's
    ``StatsHandler`` sets its logger to INFO when it is built) cannot bring INFO back.
    """
    if not is_main_process():
        logging.disable(level - 1)


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order, on every process; ``[obj]`` outside DDP.

    How an evaluation handler under ``multi_gpu_evaluate.json`` merges what each rank's share
    of the test set gave before the main process writes the tables.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def gather_in_order(items: list[Any]) -> list[Any]:
    """Per-item records of every rank, merged into the dataset's order; ``items`` outside DDP.

    A non-shuffling ``DistributedSampler`` (``even_divisible=False``, as the bundles' evaluation
    uses) gives rank ``r`` the items ``r, r + W, r + 2W, ...``: taking the ranks' lists in turn
    restores the order one process would have seen.
    """
    parts = gather_objects(list(items))
    return [part[k] for k in range(max(map(len, parts), default=0)) for part in parts if k < len(part)]


def source_name(*imgs: Any) -> str:
    """The first file name found in the MONAI metadata of ``imgs``, for messages; ``"<array>"`` when unknown."""
    for img in imgs:
        meta = getattr(img, "meta", None) or {}
        if "filename_or_obj" in meta:
            return str(meta["filename_or_obj"])
    return "<array>"


def unwrap_model(obj: Any) -> Any:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (anything else unchanged)."""
    import torch

    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    return obj.module if isinstance(obj, wrappers) else obj


def as_bool(value: Any, name: str = "flag") -> bool:
    """A command-line flag as a bool: ``True``/``False`` arrive as bools, but ``--strict false`` arrives
    as the string ``"false"`` (which ``bool()`` calls true). Anything unrecognised is an error."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("true", "1", "yes", "on"):
            return True
        if word in ("false", "0", "no", "off", "none", ""):
            return False
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    return bool(value)
