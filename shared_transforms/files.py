"""Atomic file writing shared by the bundles' reports (no imaging libraries needed)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

#: name of the report of dropped cases that bundles write next to their outputs
BAD_CASES_FILE = "bad_cases.json"


def write_json(path: str | os.PathLike, obj: Any) -> str:
    """Write ``obj`` as indented JSON atomically (temporary file + rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=4, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(path)
