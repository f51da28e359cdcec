"""Result tables and heatmaps written by the repository's experiment grids."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def best_val_dice(curves_csv: Path, metric: str = "val_mean_dice") -> float:
    """Best validation metric of a run, read from the ``learning_curves.csv`` its bundle wrote."""
    with open(curves_csv, newline="") as f:
        values = [float(r[metric]) for r in csv.DictReader(f) if r.get(metric) not in (None, "", "nan")]
    if not values:
        raise ValueError(f"{curves_csv}: no '{metric}' value (did validation run?)")
    return max(values)


def write_csv(rows: list[dict], path: Path) -> None:
    """Rows as CSV; the columns are every key of any row, in first-seen order (missing cells empty)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), restval="")
        writer.writeheader()
        writer.writerows(rows)


def heatmap(values: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], path: Path,
            title: str = "", colorbar_label: str = "") -> None:
    """PNG heatmap of a 2D array (NaN cells left blank), each cell annotated with its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.7 * len(col_labels) + 3, 0.5 * len(row_labels) + 1.5))
    im = ax.imshow(values, cmap="YlGnBu", aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels)
    ax.set_yticks(range(len(row_labels)), row_labels)
    middle = np.nanmean([np.nanmin(values), np.nanmax(values)])
    for i in range(len(row_labels)):
        for j in range(len(col_labels)):
            if not np.isnan(values[i, j]):
                color = "white" if values[i, j] > middle else "black"  # readable on dark cells
                ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", fontsize=8, color=color)
    fig.colorbar(im, ax=ax, label=colorbar_label)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
