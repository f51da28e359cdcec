"""Inference over a folder that survives bad input and interruption, shared by the bundles.

An ``inference.json`` wires these together:

- :class:`InferenceReport` screens the datalist before any network work (cheap checks of
  :mod:`shared_transforms.inputs`), skips inputs whose mask already exists (``overwrite:
  false``), and records what happened to every input in ``<output_dir>/inference_report.json``
  (rewritten atomically after each input) and on the console.
- :class:`ReportingDataset` never raises: an input whose loading or preprocessing fails becomes
  an item naming the file and the reason; the fixes made on the way (``InputWarning``) travel
  with the item.
- :class:`SkippingEvaluator` is MONAI's ``SupervisedEvaluator`` that records those items as
  skipped, and an input whose inference or saving fails likewise, then goes on with the next.
  With ``strict`` the first bad input stops the run with the same message.
- :class:`AtomicNibabelWriter` / :class:`AtomicPILWriter`: MONAI writers that write to a
  temporary file and rename it, so an interrupted run never leaves a half-written mask.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.data import Dataset
from monai.data.image_writer import NibabelWriter, PILWriter
from monai.engines import SupervisedEvaluator

from .datalist_file import case_id
from .files import atomic_path, remove_stale_partials, write_json
from .inputs import InputError, InputWarning, root_cause
from .utils import as_bool

__all__ = ["REPORT_FILE", "InferenceReport", "ReportingDataset", "SkippingEvaluator", "AtomicNibabelWriter",
           "AtomicPILWriter", "reason_of"]

logger = logging.getLogger(__name__)

REPORT_FILE = "inference_report.json"


def reason_of(e: BaseException) -> str:
    """The words to report for an error: an :class:`InputError`'s reason, else the innermost error."""
    chain = e
    while chain is not None:  # the outermost InputError in the chain (MONAI wraps it; it wraps the reader's error)
        if isinstance(chain, InputError):
            return chain.reason
        chain = chain.__cause__
    cause = root_cause(e)
    return f"{type(cause).__name__}: {cause}"


class InferenceReport:
    """What an inference run did with each input: ``written``, ``kept`` (its mask exists), ``skipped`` (why).

    Args:
        output_dir: where the masks and ``inference_report.json`` go.
        check: the bundle's input check (``path -> [warnings]``, raising ``InputError``), run by :meth:`screen`.
        output_name: the mask's file name for an input, ``{stem}`` being the input's name without
            extension (as the bundle's ``SaveImaged`` names it), e.g. ``"{stem}_seg.nii.gz"``.
        strict: stop at the first bad input (raising its ``InputError``) instead of skipping it.
        overwrite: recompute inputs whose mask exists; by default they are kept and skipped.
        key: the datalist key of the input file.
    """

    def __init__(self, output_dir: str, check: Callable[[str], Sequence[str]] | None = None,
                 output_name: str = "{stem}_seg.nii.gz", strict: bool = False, overwrite: bool = False,
                 key: str = "image") -> None:
        self.output_dir = Path(output_dir)
        self.check, self.output_name, self.key = check, output_name, key
        self.strict, self.overwrite = as_bool(strict, "strict"), as_bool(overwrite, "overwrite")
        self.entries: dict[str, dict[str, Any]] = {}

    @property
    def path(self) -> Path:
        return self.output_dir / REPORT_FILE

    def output_path(self, file: str | os.PathLike) -> Path:
        return self.output_dir / self.output_name.format(stem=case_id(file))

    # ------------------------------------------------------------------ recording
    def _entry(self, file: str | os.PathLike) -> dict[str, Any]:
        return self.entries.setdefault(str(file), {"file": str(file), "status": "pending", "reason": "", "warnings": []})

    def warn(self, file: str | os.PathLike, messages: Sequence[str]) -> None:
        entry = self._entry(file)
        for m in messages:
            m = m.removeprefix(f"{file}: ")  # the checks' own words, whether or not a transform prefixed the file
            if m and m not in entry["warnings"]:
                entry["warnings"].append(m)
                logger.warning("%s: %s", file, m)

    def skip(self, file: str | os.PathLike, reason: str) -> None:
        entry = self._entry(file)
        entry.update(status="skipped", reason=reason)
        logger.warning("skipped %s: %s", file, reason)
        self.write()
        if self.strict:
            logger.error("stopping at %s (strict: true): %s", file, reason)
            raise InputError(file, reason)

    def done(self, file: str | os.PathLike, warnings_: Sequence[str] = ()) -> None:
        self.warn(file, warnings_)
        self._entry(file).update(status="written", output=str(self.output_path(file)))
        self.write()

    # ------------------------------------------------------------------ steps
    def screen(self, datalist: Sequence[Mapping[str, Any]]) -> list[dict]:
        """The inputs of ``datalist`` to run the network on: those that pass the check and have no mask yet.

        Stale ``.partial-*`` files of an interrupted earlier run are removed first. An input whose mask
        would land on another input's (same file name in another folder, e.g. ``case_1/artery.nii.gz``
        and ``case_2/artery.nii.gz`` in one datalist) is skipped, naming the first input that is
        processed or kept for that mask: its mask would overwrite that one's.
        """
        for stale in remove_stale_partials(self.output_dir):
            logger.info("removed %s (left by an interrupted run)", stale)
        todo, claimed = [], {}
        for item in datalist:
            file = str(item[self.key])
            out = self.output_path(file)
            if claimed.get(out, file) != file:
                self.skip(file, f"its mask {out} is also {claimed[out]}'s: give the inputs distinct file names, "
                                "or run them into separate output_dir")
                continue
            if not self.overwrite and out.is_file():
                self._entry(file).update(status="kept", output=str(out), reason="mask exists (overwrite: false)")
                claimed[out] = file
                continue
            try:
                found = list(self.check(file)) if self.check is not None else []
            except Exception as e:  # a check's InputError, or anything it did not foresee: never lose the run
                self.skip(file, reason_of(e))
                continue
            self._entry(file)
            self.warn(file, found)
            todo.append(dict(item))
            claimed[out] = file  # a bad input claims no mask: a good one of the same name still runs
        counts = self.counts()
        logger.info("%d inputs: %d to process, %d skipped, %d kept (mask exists)",
                    len(datalist), len(todo), counts["skipped"], counts["kept"])
        self.write()
        return todo

    def counts(self) -> dict[str, int]:
        out = {"written": 0, "kept": 0, "skipped": 0, "pending": 0}
        for e in self.entries.values():
            out[e["status"]] += 1
        return out

    def write(self) -> None:
        write_json(self.path, {"output_dir": str(self.output_dir), "strict": self.strict, "overwrite": self.overwrite,
                               "counts": self.counts(), "inputs": list(self.entries.values())})

    def finish(self) -> dict[str, int]:
        """Write the report, log the summary; raise when no input was processed (the run then exits non-zero)."""
        self.write()
        counts = self.counts()
        logger.info("inference: %d masks written, %d kept, %d inputs skipped -> %s",
                    counts["written"], counts["kept"], counts["skipped"], self.path)
        if counts["written"] + counts["kept"] == 0:
            raise RuntimeError(f"no input could be processed ({counts['skipped']} skipped): see {self.path}")
        return counts


class ReportingDataset(Dataset):
    """A MONAI ``Dataset`` whose items never raise (unless ``strict``).

    Every item carries ``input_file``; an input whose ``transform`` fails becomes
    ``{"input_file", "input_error"}`` (the reason in words); the ``InputWarning`` messages emitted
    while preparing it are joined in ``input_warnings`` (other warnings pass through).
    """

    def __init__(self, data: Sequence, transform: Callable | None = None, key: str = "image", strict: bool = False) -> None:
        super().__init__(data, transform)
        self.key, self.strict = key, as_bool(strict, "strict")

    def _transform(self, index: int):
        file = str(self.data[index].get(self.key, f"item {index}"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out = super()._transform(index)
            except Exception as e:
                if self.strict:
                    raise InputError(file, reason_of(e)) from e
                out = {"input_error": reason_of(e)}
        for w in caught:
            if not issubclass(w.category, InputWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if isinstance(out, dict):
            out["input_file"] = file
            out["input_warnings"] = "\n".join(str(w.message) for w in caught if issubclass(w.category, InputWarning))
        return out


class SkippingEvaluator(SupervisedEvaluator):
    """MONAI's ``SupervisedEvaluator`` (use batch size 1) that skips, and records in ``report``, each input
    that :class:`ReportingDataset` could not prepare or whose inference or postprocessing (saving) fails.

    ``report`` (an :class:`InferenceReport`) marks the others ``written`` with their warnings.
    All other arguments are ``SupervisedEvaluator``'s.
    """

    def __init__(self, *args, report: InferenceReport, **kwargs) -> None:
        self.report = report
        super().__init__(*args, **kwargs)

    def _iteration(self, engine, batchdata: dict[str, Any]) -> dict:
        files = list(batchdata.get("input_file", ["input"]))
        if "input_error" in batchdata:
            for file, reason in zip(files, batchdata["input_error"]):
                self.report.skip(file, reason)
            return {}
        notes = list(batchdata.get("input_warnings", [""] * len(files)))
        try:
            output = super()._iteration(engine, batchdata)
        except Exception as e:
            if self.report.strict:
                raise InputError(files[0], reason_of(e)) from e
            for file in files:
                self.report.skip(file, f"inference failed: {reason_of(e)}")
            return {}
        for file, note in zip(files, notes):
            self.report.done(file, [n for n in str(note).split("\n") if n])
        return output


class _AtomicWrite:
    """Writer mixin: write to a ``.partial-*`` file in the target folder, then rename it to the target."""

    def write(self, filename, verbose: bool = False, **kwargs):
        with atomic_path(filename) as tmp:
            super().write(str(tmp), verbose=False, **kwargs)
        if verbose:
            logger.info("wrote %s", filename)


class AtomicNibabelWriter(_AtomicWrite, NibabelWriter):
    """MONAI's ``NibabelWriter`` with an atomic write (``SaveImaged(writer=...)``).

    ``squeeze_end_dims`` drops only a single channel: a one-slice volume's mask stays ``(H, W, 1)``
    like its input (MONAI's writer would save it as a 2D ``(H, W)`` image).
    """

    def set_data_array(self, data_array, channel_dim: int | None = 0, squeeze_end_dims: bool = True, **kwargs) -> None:
        super().set_data_array(data_array, channel_dim=channel_dim, squeeze_end_dims=False, **kwargs)
        if squeeze_end_dims and channel_dim is not None and self.data_obj.shape[-1] == 1:
            self.data_obj = self.data_obj[..., 0]


class AtomicPILWriter(_AtomicWrite, PILWriter):
    """MONAI's ``PILWriter`` with an atomic write (``SaveImaged(writer=...)``)."""
