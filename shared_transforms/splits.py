"""Per-patient splits of case lists into test, cross-validation folds and validation (NumPy only)."""

from __future__ import annotations

import zlib
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["split_cases", "fold_datalist"]


def _group_seed(seed: int, group: Hashable) -> int:
    # a stable per-group seed: a group's split must not depend on which other groups are present
    return (int(seed) * 1_000_003 + zlib.crc32(str(group).encode())) % (2**32)


def split_cases(
    cases: Sequence[Mapping[str, Any]],
    test_fraction: float = 0.2,
    n_folds: int = 5,
    seed: int = 0,
    patient_key: str = "case",
    group_key: str | None = None,
) -> dict[str, list]:
    """Split cases per patient into a held-out test set and ``n_folds`` cross-validation folds.

    All cases of one patient (same ``patient_key``) land in the same part. With ``group_key``
    (e.g. ``"site"``) each group is split on its own, so a site's test set is the same
    whether it is trained alone or merged with other sites. Deterministic for a seed.

    Returns:
        ``{"test": [case, ...], "folds": [[case, ...], ...]}`` (``n_folds`` lists).
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}.")
    if n_folds < 1:
        raise ValueError(f"n_folds must be >= 1, got {n_folds}.")
    groups: dict[Hashable, list[Mapping[str, Any]]] = {}
    for case in cases:
        groups.setdefault(case.get(group_key) if group_key else None, []).append(case)
    test: list[dict] = []
    folds: list[list[dict]] = [[] for _ in range(n_folds)]
    for group in sorted(groups, key=str):
        members = groups[group]
        patients = sorted({str(c[patient_key]) for c in members})
        order = np.random.default_rng(_group_seed(seed, group)).permutation(len(patients))
        patients = [patients[i] for i in order]
        n_test = int(round(len(patients) * test_fraction))
        if test_fraction > 0 and n_test == 0 and len(patients) > 1:
            n_test = 1
        test_ids = set(patients[:n_test])
        fold_of = {p: i % n_folds for i, p in enumerate(patients[n_test:])}
        for case in members:
            pid = str(case[patient_key])
            if pid in test_ids:
                test.append(dict(case))
            else:
                folds[fold_of[pid]].append(dict(case))
    return {"test": test, "folds": folds}


def fold_datalist(split: Mapping[str, Sequence], fold: int) -> dict[str, list]:
    """Training/validation/test lists for one fold of :func:`split_cases`'s result."""
    folds = split["folds"]
    if not 0 <= fold < len(folds):
        raise ValueError(f"fold must be in [0, {len(folds) - 1}], got {fold}.")
    validation = list(folds[fold])
    training = [c for i, f in enumerate(folds) if i != fold for c in f]
    if not training or not validation:
        raise ValueError(
            f"fold {fold} leaves {len(training)} training and {len(validation)} validation cases: "
            "the dataset has too few patients for this number of folds."
        )
    return {"training": training, "validation": validation, "test": list(split["test"])}
