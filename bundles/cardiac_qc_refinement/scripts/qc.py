"""QC pseudo-measures, IQR thresholds, OoD decision and candidate selection (METHODS §3).

Pure functions (unit-tested on hand-made lists) plus :class:`QCInferer`, the inferer that runs
the m_best candidate models and R inside ``inference.json``/``evaluate.json`` (and MONAI Label):
``inferer(inputs, network)``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.metrics import compute_dice, compute_hausdorff_distance

from shared_transforms.files import write_json
from shared_transforms.utils import as_bool

from .data import _stem, invert_volume, phase_of, preprocess_volume, spacing_from_meta

logger = logging.getLogger(__name__)

__all__ = [
    "dice",
    "hausdorff",
    "qc_measures",
    "iqr_thresholds",
    "pooled_measures",
    "set_thresholds",
    "thresholds_of",
    "is_ood",
    "select_candidate",
    "load_candidates",
    "QCInferer",
    "QCResultd",
    "calibrate",
    "RV",
]

RV = 3  # the class that drives the OoD decision and the selection
CLASS_NAMES = {1: "LV", 2: "MYO", 3: "RV"}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks (``monai.metrics.compute_dice``); 1.0 when both are empty (``ignore_empty=False``)."""
    a, b = np.ascontiguousarray(a, bool), np.ascontiguousarray(b, bool)  # a flipped view has negative strides
    return float(
        compute_dice(
            torch.from_numpy(a)[None, None].float(),
            torch.from_numpy(b)[None, None].float(),
            include_background=True,
            ignore_empty=False,
        )
    )


def hausdorff(
    a: np.ndarray, b: np.ndarray, spacing: Sequence[float] | None = None, percentile: float | None = None
) -> float:
    """Symmetric Hausdorff distance between the SURFACES of two binary masks (MONAI's
    ``compute_hausdorff_distance``), in units of ``spacing`` (default pixels); ``percentile``
    (e.g. 95) gives the robust variant.

    Both empty: 0.0. Exactly one empty: ``math.inf`` (callers treat an infinite distance as
    failing any threshold).
    """
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return math.inf
    if a.shape != b.shape:
        raise ValueError(f"masks of different shapes {a.shape} and {b.shape}")
    sampling = None if spacing is None else [float(s) for s in spacing][: a.ndim]
    # singleton axes (one slice, e.g. an LA view H×W×1) go: MONAI's 3-D erosion would erase the whole
    # mask there and turn the surface distance into a mask-to-mask one
    keep = [i for i, n in enumerate(a.shape) if n > 1]
    a, b = a.reshape([a.shape[i] for i in keep]), b.reshape([b.shape[i] for i in keep])
    if sampling is not None:
        sampling = [sampling[i] for i in keep]
    value = compute_hausdorff_distance(
        torch.from_numpy(a)[None, None],
        torch.from_numpy(b)[None, None],
        include_background=True,
        percentile=percentile,
        spacing=sampling,
    )
    return float(value.reshape(-1)[0])


def qc_measures(pred: np.ndarray, recon: np.ndarray, spacing: Sequence[float] | None = None) -> tuple[float, float]:
    """QC's (pDC, pHD) of one class between a prediction and R's reconstruction of it.

    An empty prediction scores pDC 0 and pHD ∞: "no RV" reconstructed as "no RV" would otherwise
    agree perfectly (1.0, 0) and rank first, though a missing structure is exactly what QC must catch.
    """
    if not np.asarray(pred, bool).any():
        return 0.0, math.inf
    return dice(pred, recon), hausdorff(pred, recon, spacing)


def iqr_thresholds(pdc: Sequence[float], phd: Sequence[float]) -> dict[str, float]:
    """th_low = Q1(pDC) - 1.5 IQR(pDC), th_up = Q3(pHD) + 1.5 IQR(pHD) over the finite values.

    Infinite pHD (an empty mask) is left out of the quartiles (it is an outlier by definition);
    with no finite value at all th_up is 0 (every candidate fails), with no pDC th_low is -inf.
    """
    d = np.asarray([v for v in pdc if np.isfinite(v)], float)
    h = np.asarray([v for v in phd if np.isfinite(v)], float)
    if len(d):
        q1, q3 = np.percentile(d, [25, 75])
        th_low = float(q1 - 1.5 * (q3 - q1))
    else:
        th_low = -math.inf
    if len(h):
        q1, q3 = np.percentile(h, [25, 75])
        th_up = float(q3 + 1.5 * (q3 - q1))
    else:
        th_up = 0.0
    return {"th_low": th_low, "th_up": th_up}


POOLINGS = ("all_pairs", "best_of")
OOD_RULES = ("every_candidate", "best_candidate")


def _check(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def pooled_measures(rows: Sequence[Mapping[str, Any]], pooling: str = "all_pairs") -> tuple[list[float], list[float]]:
    """The pDC and pHD values the IQR thresholds are computed over.

    ``rows``: one per volume, ``{"pDC": [per candidate], "pHD": [per candidate]}``.
    ``all_pairs``: every (volume, candidate) pair. ``best_of``: per volume the best pDC (max) and
    the best pHD (min) over the candidates, as in the authors' code. A pair with an infinite pHD
    (an empty prediction: pDC 0, pHD ∞) is a failure, not a sample of the distribution: it is
    left out of both lists, so it cannot drag Q1(pDC) down.
    """
    _check("threshold_pooling", pooling, POOLINGS)
    pairs = [[(d, h) for d, h in zip(r["pDC"], r["pHD"]) if math.isfinite(h)] for r in rows]
    if pooling == "all_pairs":
        return [d for p in pairs for d, _ in p], [h for p in pairs for _, h in p]
    pairs = [p for p in pairs if p]
    return [max(d for d, _ in p) for p in pairs], [min(h for _, h in p) for p in pairs]


def set_thresholds(
    rows: Sequence[Mapping[str, Any]], pooling: str = "all_pairs", split_by_phase: bool = False
) -> dict[str, Any]:
    """IQR thresholds over a screened set (:func:`pooled_measures`, :func:`iqr_thresholds`).

    With ``split_by_phase`` the rows' ``"phase"`` (ED/ES) also get their own thresholds under
    ``"by_phase"``; :func:`thresholds_of` picks them, the pooled ones stay the fallback.
    """
    th: dict[str, Any] = {**iqr_thresholds(*pooled_measures(rows, pooling)), "pooling": pooling}
    if split_by_phase:
        phases = sorted({r.get("phase") for r in rows} - {None})
        th["by_phase"] = {
            p: iqr_thresholds(*pooled_measures([r for r in rows if r.get("phase") == p], pooling)) for p in phases
        }
    return th


def thresholds_of(th: Mapping[str, Any], phase: str | None = None) -> tuple[float, float]:
    """(th_low, th_up) for a volume of ``phase``: its phase's thresholds when there are any, else the pooled ones."""
    per_phase = (th.get("by_phase") or {}).get(phase) if phase else None
    src = per_phase or th
    return float(src["th_low"]), float(src["th_up"])


def _fails(pdc: float, phd: float, th_low: float, th_up: float) -> bool:
    return pdc < th_low or phd > th_up or math.isinf(phd)


def is_ood(
    pdcs: Sequence[float], phds: Sequence[float], th_low: float, th_up: float, rule: str = "every_candidate"
) -> bool:
    """Is a volume out of distribution, given its candidates' pDC and pHD?

    ``every_candidate`` (paper): every candidate has pDC < th_low or pHD > th_up.
    ``best_candidate`` (authors' code): max pDC < th_low or min pHD > th_up.
    An infinite pHD (empty prediction) always fails.
    """
    _check("ood_rule", rule, OOD_RULES)
    if rule == "every_candidate":
        return all(_fails(d, h, th_low, th_up) for d, h in zip(pdcs, phds))
    return max(pdcs) < th_low or min(phds) > th_up or math.isinf(min(phds))


def select_candidate(pdcs: Sequence[float], phds: Sequence[float], th_up: float) -> dict[str, Any]:
    """Rank candidates by pDC (best first); take the first with a finite pHD < th_up; if none,
    average the best-by-pDC and best-by-pHD soft maps.

    Returns ``{"rule": "ranked", "model": i}`` or ``{"rule": "average", "models": [i_pdc, i_phd]}``.
    """
    order = sorted(range(len(pdcs)), key=lambda i: (-pdcs[i], phds[i]))
    for i in order:
        if math.isfinite(phds[i]) and phds[i] < th_up:
            return {"rule": "ranked", "model": i}
    best_hd = min(range(len(phds)), key=lambda i: (phds[i], -pdcs[i]))
    return {"rule": "average", "models": [order[0], best_hd]}


def load_candidates(network: torch.nn.Module, candidates_dir: str | Path) -> tuple[list[torch.nn.Module], list[str]]:
    """Copies of ``network`` holding each checkpoint listed in ``candidates_dir/candidates.json``
    (best validation loss first), or every ``*.pt`` there; ``([], [])`` when there is none."""
    folder = Path(candidates_dir)
    index = folder / "candidates.json"
    if index.is_file():
        files = [folder / e["file"] for e in json.loads(index.read_text())["candidates"]]
    else:
        files = sorted(folder.glob("*.pt"))
    nets, names = [], []
    for f in files:
        if not f.is_file():
            continue
        net = copy.deepcopy(network)
        net.load_state_dict(torch.load(f, map_location="cpu", weights_only=True))
        nets.append(net.eval())
        names.append(f.name)
    return nets, names


class QCInferer:
    """Inference with OoD detection and QC-based candidate selection, as ``inferer(inputs, network)``.

    ``inputs``: one loaded volume ``(1, 1, H, W, Z)`` (a MetaTensor with its affine). The volume is
    preprocessed (:func:`~scripts.data.preprocess_volume`), every candidate model (the m_best
    checkpoints of ``candidates_dir``; ``network`` alone when ``use_qc`` is False or there are none)
    predicts it slice by slice, R reconstructs each prediction, pDC/pHD are computed per class
    (RV decides), the OoD flag and the selection rule are applied, and the chosen soft map is
    returned on the input's grid ``(1, 4, H, W, Z)``. A ``<stem>_qc.json`` report goes to ``report_dir``.

    Thresholds: :meth:`screen` sets them over a whole set (IQR of its pDC/pHD, pooled as
    ``threshold_pooling`` says, optionally per phase); otherwise (one volume, as in MONAI Label) the
    validation-set thresholds saved in ``calibration_file`` are used. ``ood_rule`` decides the flag.
    ``use_qc=False`` predicts with ``network`` alone (no selection); R still scores that
    prediction, so the report (``selection_rule: "single"``) and the /infer summary are there.

    The set's thresholds are saved to ``report_dir/qc_thresholds.json``. With ``overwrite`` False
    (the inference default) a rerun over the same folder, which screens only the inputs whose mask
    is missing, reuses them: an interrupted run finishes with the verdicts of an uninterrupted one.
    """

    def __init__(
        self,
        qc_network: torch.nn.Module | None,
        qc_ckpt: str | None,
        candidates_dir: str | None,
        target_spacing: Sequence[float],
        image_size: int = 256,
        report_dir: str | None = None,
        calibration_file: str | None = None,
        use_qc: bool = True,
        slice_batch_size: int = 16,
        min_set_size: int = 4,
        threshold_source: str = "set",
        num_classes: int = 4,
        threshold_pooling: str = "all_pairs",
        ood_rule: str = "every_candidate",
        split_by_phase: bool = False,
        overwrite: bool = True,
    ) -> None:
        _check("threshold_source", threshold_source, ("set", "calibration"))
        self.threshold_pooling = _check("threshold_pooling", threshold_pooling, POOLINGS)
        self.ood_rule = _check("ood_rule", ood_rule, OOD_RULES)
        self.split_by_phase = bool(split_by_phase)
        self.qc_network, self.qc_ckpt = qc_network, qc_ckpt
        self.candidates_dir = candidates_dir
        self.target_spacing = [float(s) for s in target_spacing]
        self.image_size, self.slice_batch_size = int(image_size), int(slice_batch_size)
        self.report_dir = report_dir
        self.overwrite = as_bool(overwrite, "overwrite")
        self.calibration_file = calibration_file
        self.use_qc, self.min_set_size, self.threshold_source = use_qc, int(min_set_size), threshold_source
        self.num_classes = num_classes
        self.thresholds: dict[str, Any] | None = None
        self.last_report: dict[str, Any] | None = None  # the QC summary of the latest volume (for the /infer result)
        self._qc_loaded = False
        self._candidates: tuple[list, list] | None = None
        self.timings: dict[str, float] = {"segmentation_s": 0.0, "qc_s": 0.0}

    # ---------------------------------------------------------------- models
    def qc(self) -> torch.nn.Module | None:
        if not self._qc_loaded and self.qc_network is not None:
            if self.qc_ckpt and Path(self.qc_ckpt).is_file():
                self.qc_network.load_state_dict(torch.load(self.qc_ckpt, map_location="cpu", weights_only=True))
            else:
                logger.warning("QC weights %s not found: the QC module R is untrained", self.qc_ckpt)
            self.qc_network.eval()
            self._qc_loaded = True
        return self.qc_network

    def candidates(self, network: torch.nn.Module) -> tuple[list[torch.nn.Module], list[str]]:
        if not self.use_qc:
            return [network], ["model.pt"]
        if self._candidates is None:
            self._candidates = load_candidates(network, self.candidates_dir) if self.candidates_dir else ([], [])
        nets, names = self._candidates
        return (nets, names) if nets else ([network], ["model.pt"])

    # ---------------------------------------------------------------- steps
    @torch.no_grad()
    def predict(self, net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Softmax of ``net`` on (Z, 1, S, S) in slice batches -> (Z, C, S, S)."""
        was_training = net.training
        net.eval()
        device = next(net.parameters()).device
        out = [
            torch.softmax(net(x[i : i + self.slice_batch_size].to(device)), 1).float().cpu()
            for i in range(0, x.shape[0], self.slice_batch_size)
        ]
        net.train(was_training)
        return torch.cat(out)

    @torch.no_grad()
    def reconstruct(self, soft: torch.Tensor) -> torch.Tensor:
        qc = self.qc()
        device = next(qc.parameters()).device
        return torch.cat(
            [
                qc(soft[i : i + self.slice_batch_size].to(device)).float().cpu()
                for i in range(0, soft.shape[0], self.slice_batch_size)
            ]
        )

    def measures(self, soft: torch.Tensor, z_ratio: float = 1.0) -> dict[str, dict[str, float]]:
        """pDC and pHD (pixels of the network grid and mm) per class between the prediction and R's reconstruction."""
        recon = self.reconstruct(soft)
        # NumPy's argmax (first maximum on ties, as torch's): torch's CPU argmax over the channel axis
        # of a (Z, C, S, S) tensor is strided and took 10× longer (120 ms of a 10 × 256² volume)
        pred_lab, rec_lab = soft.numpy().argmax(1), recon.numpy().argmax(1)  # Z, S, S
        px = (z_ratio, 1.0, 1.0)
        mm = (z_ratio * self.target_spacing[0], self.target_spacing[0], self.target_spacing[1])
        # isotropic in-plane grid: mm spacing = px spacing × one factor, and so is every Euclidean distance
        # (one distance transform per class instead of two)
        scale = self.target_spacing[0] if self.target_spacing[0] == self.target_spacing[1] else None
        out: dict[str, dict[str, float]] = {"pDC": {}, "pHD": {}, "pHD_mm": {}}
        for c, name in CLASS_NAMES.items():
            a, b = pred_lab == c, rec_lab == c
            out["pDC"][name], out["pHD"][name] = qc_measures(a, b, px)
            out["pHD_mm"][name] = out["pHD"][name] * scale if scale is not None else qc_measures(a, b, mm)[1]
        return out

    def prepare(self, inputs: torch.Tensor) -> tuple[torch.Tensor, dict, float, str]:
        """A loaded volume ``(1, 1, H, W, Z)`` or ``(1, H, W, Z)`` -> network input, inversion info,
        z spacing in units of the in-plane target spacing, file name."""
        vol = inputs[0] if inputs.ndim == 5 else inputs  # (1, H, W, Z)
        spacing = spacing_from_meta(vol)
        meta = getattr(vol, "meta", {}) or {}
        name = str(meta.get("filename_or_obj", "volume"))
        x, _, info = preprocess_volume(np.asarray(vol.detach().cpu())[0], spacing, self.target_spacing, self.image_size)
        z_ratio = spacing[2] / self.target_spacing[0] if len(spacing) > 2 else 1.0
        return x, info, z_ratio, name

    def evaluate_candidates(self, inputs: torch.Tensor, network: torch.nn.Module) -> dict[str, Any]:
        x, info, z_ratio, name = self.prepare(inputs)
        nets, names = self.candidates(network)
        t0 = time.perf_counter()
        softs = [self.predict(n, x) for n in nets]
        t1 = time.perf_counter()
        per_model = [self.measures(s, z_ratio) for s in softs] if self.qc() is not None else []
        self.timings["segmentation_s"] += t1 - t0
        self.timings["qc_s"] += time.perf_counter() - t1
        return {"name": name, "info": info, "softs": softs, "names": names, "measures": per_model}

    # ---------------------------------------------------------------- thresholds
    def saved_thresholds(self) -> dict[str, Any] | None:
        if self.calibration_file and Path(self.calibration_file).is_file():
            cal = json.loads(Path(self.calibration_file).read_text())
            source = "validation set (saved with the model)"
            if cal.get("volumes"):  # the saved measures: pooled (and split) the way this inferer is configured
                num = lambda v: math.nan if v is None else float(v)  # noqa: E731  (null: NaN, see _json_safe)
                rows = [
                    {**r, "pDC": [num(v) for v in r["pDC"]], "pHD": [num(v) for v in r["pHD"]]} for r in cal["volumes"]
                ]
                return {**set_thresholds(rows, self.threshold_pooling, self.split_by_phase), "source": source}
            return {"th_low": float(cal["th_low"]), "th_up": float(cal["th_up"]), "source": source}
        return None

    def screen(
        self, data: Sequence[Mapping[str, Any]], network: torch.nn.Module | None = None, loader=None
    ) -> dict[str, Any]:
        """Compute pDC/pHD of every candidate on every volume of ``data`` and set the IQR thresholds over the set.

        ``data``: dicts whose ``"image"`` is a path (loaded with ``loader``) or an already loaded
        ``(1, H, W, Z)`` volume (a :class:`~shared_transforms.inference.ReportingDataset`'s items).
        Items that could not be prepared (``input_error``) or are constant images
        (``constant_input``) are left out of the set; the evaluator reports them. With fewer than
        ``min_set_size`` volumes (or ``threshold_source="calibration"``) the saved validation-set
        thresholds are used. Returns the thresholds and the per-volume measures.
        """
        from monai.transforms import EnsureChannelFirst, LoadImage

        saved = self.saved_thresholds()
        if self.threshold_source == "calibration" and saved is not None:
            self.thresholds = saved  # nothing to compute over the set
            return {**saved, "volumes": []}
        load = loader or (lambda p: EnsureChannelFirst()(LoadImage(image_only=True)(p)))
        names = [
            str(
                d.get(
                    "input_file",
                    d["image"]
                    if isinstance(d.get("image"), str)
                    else getattr(d.get("image"), "meta", {}).get("filename_or_obj", ""),
                )
            )
            for d in data
        ]
        earlier = self._earlier_set(
            [n for d, n in zip(data, names) if not (d.get("input_error") or d.get("constant_input"))]
        )
        if earlier is not None:
            self.thresholds = earlier["thresholds"]
            logger.info(
                "QC thresholds of the earlier run over %d volumes reused (%s; overwrite: false)",
                len(earlier["volumes"]),
                self._thresholds_file(),
            )
            return {**self.thresholds, "volumes": earlier["volumes"]}
        rows = []
        for d, name in zip(data, names):
            if d.get("input_error") or d.get("constant_input"):
                continue
            image = d["image"]
            try:
                res = self.evaluate_candidates((load(image) if isinstance(image, str) else image)[None], network)
            except Exception as e:  # left out of the set; the evaluator meets it again and reports it
                logger.warning("QC screening: %s left out of the set (%s: %s)", name, type(e).__name__, e)
                continue
            rows.append(
                {
                    "image": name,
                    "phase": phase_of(name),
                    "pDC": [m["pDC"]["RV"] for m in res["measures"]],
                    "pHD": [m["pHD"]["RV"] for m in res["measures"]],
                }
            )
        self.thresholds = self.thresholds_for(rows)
        if self.report_dir and rows:
            write_json(self._thresholds_file(), {"thresholds": self.thresholds, "volumes": rows})
        return {**self.thresholds, "volumes": rows}

    def _thresholds_file(self) -> Path:
        return Path(self.report_dir or ".") / "qc_thresholds.json"

    def _earlier_set(self, names: Sequence[str]) -> dict | None:
        """The saved set of an earlier run over a superset of ``names``, when ``overwrite`` is False."""
        path = self._thresholds_file()
        if self.overwrite or not self.report_dir or not path.is_file():
            return None
        saved = json.loads(path.read_text())
        screened = {v["image"] for v in saved.get("volumes", [])}
        return saved if screened and set(names) <= screened | {""} else None

    def thresholds_for(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        saved = self.saved_thresholds()
        if self.threshold_source == "calibration" or len(rows) < self.min_set_size:
            if saved is not None:
                return saved
        th = set_thresholds(rows, self.threshold_pooling, self.split_by_phase)
        return {**th, "source": f"IQR over the {len(rows)} screened volumes"}

    def flag(
        self, pdcs: Sequence[float], phds: Sequence[float], th: Mapping[str, Any], phase: str | None = None
    ) -> bool:
        """The OoD verdict for one volume's candidates under thresholds ``th`` and ``ood_rule``."""
        return bool(is_ood(pdcs, phds, *thresholds_of(th, phase), rule=self.ood_rule))

    def current_thresholds(self) -> dict[str, Any]:
        return self.thresholds or self.saved_thresholds() or {"th_low": -math.inf, "th_up": math.inf, "source": "none"}

    # ---------------------------------------------------------------- inference
    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
        res = self.evaluate_candidates(inputs, network)
        th = self.current_thresholds()
        th_up = thresholds_of(th, phase_of(res["name"]))[1]
        pdcs = [m["pDC"]["RV"] for m in res["measures"]]
        phds = [m["pHD"]["RV"] for m in res["measures"]]
        if pdcs and self.use_qc:
            choice = select_candidate(pdcs, phds, th_up)
            if choice["rule"] == "ranked":
                soft = res["softs"][choice["model"]]
                selected = res["names"][choice["model"]]
            else:
                i, j = choice["models"]
                soft = 0.5 * (res["softs"][i] + res["softs"][j])
                # one candidate can be best by both: the "average" is that candidate
                selected = res["names"][i] if i == j else f"average({res['names'][i]},{res['names'][j]})"
        else:
            choice, soft, selected = {"rule": "single"}, res["softs"][0], res["names"][0]
        out = invert_volume(soft, res["info"])[None].to(inputs.device)
        if isinstance(
            inputs, MetaTensor
        ):  # the input's geometry travels with the prediction (for SaveImaged / MONAI Label)
            out = MetaTensor(out)
            out.copy_meta_from(inputs, copy_attr=True)
        if res["measures"]:
            self.write_report(res, pdcs, phds, th, choice, selected)
        else:
            self.last_report = None
        return out

    def write_report(self, res, pdcs, phds, th, choice, selected) -> dict:
        phase = phase_of(res["name"])
        th_low, th_up = thresholds_of(th, phase)
        report = {
            "image": res["name"],
            "phase": phase,
            "candidates": res["names"],
            "pDC": pdcs,
            "pHD": phds,
            "pHD_mm": [m["pHD_mm"]["RV"] for m in res["measures"]],
            "per_class": [{"model": n, **m} for n, m in zip(res["names"], res["measures"])],
            "decision_class": "RV",
            "th_low": th_low,
            "th_up": th_up,
            "threshold_source": th.get("source", ""),
            "threshold_pooling": th.get("pooling", self.threshold_pooling),
            "ood_rule": self.ood_rule,
            "ood": self.flag(pdcs, phds, th, phase),
            "selection_rule": choice["rule"],
            "selected_model": selected,
        }
        self.last_report = report
        if self.report_dir:
            from shared_transforms.datalist import write_json

            write_json(Path(self.report_dir) / f"{_stem(res['name'])}_qc.json", _json_safe(report))
        return report


SUMMARY_KEYS = (
    "ood",
    "decision_class",
    "pDC",
    "pHD",
    "pHD_mm",
    "th_low",
    "th_up",
    "threshold_source",
    "threshold_pooling",
    "ood_rule",
    "selection_rule",
    "selected_model",
    "candidates",
)


class QCResultd:
    """Postprocessing: the QC summary of the volume just inferred goes into ``data[result_key]["qc"]``.

    MONAI Label returns ``data["result"]`` as the ``/infer`` result JSON (its ``Writer``), so the
    annotator gets the verdict (``ood``), the pDC/pHD of every candidate, the thresholds and the
    selected model with the label. ``inferer`` is the :class:`QCInferer` that produced ``pred``; a
    report about another image, or none (no QC module), adds nothing.
    """

    def __init__(self, inferer: QCInferer, result_key: str = "result", pred_key: str = "pred") -> None:
        self.inferer, self.result_key, self.pred_key = inferer, result_key, pred_key

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        report = self.inferer.last_report
        if not report:
            return d
        meta = getattr(d.get(self.pred_key), "meta", None) or {}
        source = meta.get("filename_or_obj")
        if source and str(source) != str(report["image"]):
            logger.warning("QC report is about %s, not %s: left out of the result", report["image"], source)
            return d
        summary = {k: report[k] for k in SUMMARY_KEYS if k in report}
        if self.inferer.report_dir:
            summary["report_file"] = str(Path(self.inferer.report_dir) / f"{_stem(report['image'])}_qc.json")
        result = dict(d.get(self.result_key) or {})
        result["qc"] = _json_safe(summary)
        d[self.result_key] = result
        return d


def _json_safe(obj):
    """Strict JSON: ±∞ as the strings "inf"/"-inf" (``float()`` reads them back), NaN as null."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else "-inf"
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def calibrate(inferer: QCInferer, network: torch.nn.Module, data: Sequence[Mapping[str, Any]], path: str) -> dict:
    """IQR thresholds over the validation volumes' pDC/pHD, saved with the model for single-volume screening."""
    from shared_transforms.datalist import write_json

    saved_source = inferer.threshold_source
    inferer.threshold_source, inferer.calibration_file = "set", None
    result = inferer.screen(data, network)
    inferer.threshold_source = saved_source
    out = {
        "th_low": result["th_low"],
        "th_up": result["th_up"],
        "pooling": result.get("pooling"),
        "n_volumes": len(data),
        "volumes": [{k: r[k] for k in ("image", "phase", "pDC", "pHD")} for r in result["volumes"]],
    }
    write_json(path, _json_safe(out))
    logger.info(
        "QC calibration on %d validation volumes: th_low %.4f, th_up %.3f -> %s",
        len(data),
        out["th_low"],
        out["th_up"],
        path,
    )
    return out
