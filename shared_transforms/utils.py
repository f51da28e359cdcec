"""Small helpers used by several transforms, handlers and bundles."""

from __future__ import annotations

from typing import Any

__all__ = ["as_bool", "source_name", "unwrap_model"]


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
