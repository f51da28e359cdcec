"""Atomic file writing shared by the bundles' reports (no imaging libraries needed)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: name of the report of dropped cases that bundles write next to their outputs
BAD_CASES_FILE = "bad_cases.json"


#: prefix of the temporary files :func:`atomic_path` writes (a stale one is an interrupted write)
PARTIAL_PREFIX = ".partial-"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder, with the same name ending (``.nii.gz``, ``.png``: writers
    choose the format by it), and rename it to ``path`` once the block succeeds; on failure it is removed.

    A reader never sees a half-written ``path``: an interrupted write leaves only a ``.partial-*`` file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{PARTIAL_PREFIX}{os.getpid()}-", suffix=f"-{path.name}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result gets a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_partials(folder: str | os.PathLike) -> list[Path]:
    """Remove the ``.partial-<pid>-*`` files in ``folder`` left by interrupted writes (their process is gone);
    files of a live process (another run writing to the same folder) are left alone. Returns the removed paths."""
    removed = []
    for stale in Path(folder).glob(f"{PARTIAL_PREFIX}*"):
        pid = stale.name[len(PARTIAL_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def write_json(path: str | os.PathLike, obj: Any) -> str:
    """Write ``obj`` as indented JSON atomically (temporary file + rename); returns the path."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=4, default=str)
    return str(path)
