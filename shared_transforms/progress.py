"""Progress bars with an ETA (``[elapsed<remaining]``) for the bundles' long work, on the main process only.

- :func:`progress`: a ``tqdm`` bar over any iterable (volume preparation, e.g. N4 over a site).
- :class:`ProgressBar`: ignite's tqdm ``ProgressBar`` as a bundle handler: iterations of each
  training epoch (with the loss), of an evaluation, of inference over a folder.

Both write to stdout, so a console or a captured log shows them beside the epoch summaries,
refresh at most every ``mininterval`` seconds (a log file does not fill with updates), and
are silent on ranks > 0 under DDP.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

from .utils import is_main_process

__all__ = ["progress", "ProgressBar"]

#: seconds between refreshes
MININTERVAL = 2.0


def progress(iterable: Iterable, desc: str, unit: str = "it", **kwargs: Any) -> tqdm:
    """``tqdm(iterable)`` on stdout with an ETA, silent on ranks > 0."""
    return tqdm(iterable, desc=desc, unit=unit, file=sys.stdout, mininterval=MININTERVAL, dynamic_ncols=True,
                disable=not is_main_process(), **kwargs)


class ProgressBar:
    """A handler for ``train#handlers`` / ``val_handlers``: ignite's ``ProgressBar`` with an ETA, rank 0 only.

    Args:
        desc: the bar's label; empty: ignite's ``Epoch [e/N]`` (training) or ``Iteration`` (one epoch).
        loss: show the iteration's ``loss`` (training) after the bar.
        persist: keep each epoch's finished bar on screen (default: the next epoch replaces it).
    """

    def __init__(self, desc: str = "", loss: bool = False, persist: bool = True) -> None:
        self.desc, self.loss, self.persist = desc, loss, persist

    def attach(self, engine) -> None:
        if not is_main_process():
            return
        from ignite.handlers import ProgressBar as IgniteProgressBar
        from monai.handlers import from_engine

        kwargs = {"desc": self.desc} if self.desc else {}
        bar = IgniteProgressBar(persist=self.persist, file=sys.stdout, mininterval=MININTERVAL, dynamic_ncols=True, **kwargs)
        bar.attach(engine, output_transform=(lambda out: {"loss": from_engine(["loss"], first=True)(out)})
                   if self.loss else None)
