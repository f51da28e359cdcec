"""The ablation of the paper's Fig. 3 with the cardiac bundle: M, {M}+QC and full, per view.

For each view (SA, LA) on an M&Ms-2-layout DATA_ROOT, through the bundle's documented CLI:
train segmenter M (keeping the m_best checkpoints), train the QC module R, then evaluate three
ways, on the held-out test split (``test``) and, where ``DATA_ROOT/hidden_labels`` holds the
unlabelled volumes' reference labels (the phantoms write them), on the refinement set itself
(``refinement set``: the out-of-distribution volumes the method is meant to fix):

- ``M``: the best checkpoint alone (``use_qc=False``);
- ``{M}+QC``: QC-based candidate selection among the m_best checkpoints, no refinement (K_semi = 0);
- ``full``: semi-supervised refinement on DATA_ROOT's unlabelled images, then QC selection.

Writes ``ablation.csv`` / ``ablation.md`` (RV, LV, MYO Dice and HD in mm per view, set and
configuration) beside the paper's RV numbers (the authors' Codalab submissions; METHODS §3),
``selection.csv`` / ``selection.md`` (per volume: OoD verdict, ``selected_model``, RV Dice), and
each run's outputs under ``OUT_DIR/<view>/``.

    python scripts/phantoms.py cardiac /tmp/mnm2 --subjects 12
    python scripts/cardiac_ablation.py /tmp/mnm2 /tmp/ablation --small True --epochs 20
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fire
from bundle_cli import bundle_cmd, run_logged
from phantoms import HIDDEN_LABELS
from tables import write_csv

BUNDLE = "cardiac_qc_refinement"
#: RV Dice / HD (mm) of the authors' code on the M&Ms-2 test set (Codalab), METHODS §3
PAPER = {
    ("SA", "M"): (0.9037, 13.35), ("LA", "M"): (0.8997, 7.40),
    ("SA", "{M}+QC"): (0.8980, 12.19), ("LA", "{M}+QC"): (0.9043, 7.52),
    ("SA", "full"): (0.9008, 12.27), ("LA", "full"): (0.8992, 7.02),
}
SMALL = {"image_size": 64, "filters": [8, 16, 32, 64], "deep_supr_num": 2}


def main(data_root: str, out_dir: str, views: list[str] = ("SA", "LA"), epochs: int = 1000, qc_epochs: int = 500,
         k_semi: int = 5, m_best: int = 3, small: bool = False, batch_size: int = 20, adam: bool = False,
         threshold_source: str = "set", augment: bool = True) -> list[dict]:
    """Run M, {M}+QC and full for each view and write the comparison table.

    Args:
        data_root: M&Ms-2 layout (labelled subjects + unlabelled ones for refinement).
        out_dir: one bundle root per view, logs and the tables.
        views: "SA" and/or "LA".
        epochs, qc_epochs: training epochs of M and R (paper: 1000 / 500).
        k_semi: refinement iterations K_semi.
        m_best: checkpoints kept.
        small: 64² grid, 4 levels of 8-16-32-64 (CPU smoke runs); default the paper's sizes.
        adam: train M with Adam lr 1e-3 instead of the paper's SGD (short runs converge).
        threshold_source: "set" (IQR over the screened set) or "calibration" (validation thresholds).
        augment: the segmenter's train#random_transforms (mirroring, rotation, scaling); default on.
    """
    out = Path(out_dir).resolve()
    rows, selections = [], []
    for view in views:
        root = out / view
        log = root / "ablation.log"
        size = SMALL if small else {}
        common = dict(bundle_root=str(root), dataset_dir=str(Path(data_root).resolve()), view=view, **size)
        train_extra = {"optimizer": "$torch.optim.Adam(@network.parameters(), lr=0.001)"} if adam else {}
        refine_extra = {"refine_learning_rate": 0.001} if adam else {}  # refinement continues M's optimiser
        run_logged(bundle_cmd(BUNDLE, ["train.json"], "training", epochs=epochs, m_best=m_best, batch_size=batch_size,
                              resume=False, augment=augment, **train_extra, **common), log)
        run_logged(bundle_cmd(BUNDLE, ["train.json", "train_qc.json"], "training", epochs=qc_epochs,
                              batch_size=batch_size, resume=False, **common), log)
        sets = {"test": None}
        refset = refinement_set(data_root, view, root / "refinement_set.json")
        if refset is not None:
            sets["refinement set"] = refset
        results: dict[tuple, dict] = {}

        def evaluate(name: str, use_qc: bool) -> None:
            for set_name, datalist in sets.items():
                eval_dir = root / "eval" / (_slug(name) + ("" if datalist is None else "_refinement_set"))
                extra = {} if datalist is None else {"validate#dataset#data": f"$json.load(open({str(datalist)!r}))"}
                run_logged(bundle_cmd(BUNDLE, ["train.json", "evaluate.json"], "evaluating", output_dir=str(eval_dir),
                                      use_qc=use_qc, threshold_source=threshold_source, **extra, **common), log)
                results[(set_name, name)] = json.loads((eval_dir / "metrics.json").read_text())

        evaluate("M", False)
        evaluate("{M}+QC", True)
        shutil.rmtree(root / "models" / "supervised", ignore_errors=True)  # a previous run's backup is stale
        run_logged(bundle_cmd(BUNDLE, ["train.json", "refine.json"], "refining", K_semi=k_semi, batch_size=batch_size, augment=augment,
                              threshold_source=threshold_source, **train_extra, **refine_extra, **common), log)
        evaluate("full", True)
        refine_log = json.loads((root / "eval" / "refine" / "refine_log.json").read_text())
        flagged = [len(refine_log["initial"]["ood"])] + [len(it["ood"]) for it in refine_log["iterations"]]
        for (set_name, name), m in results.items():
            paper_dc, paper_hd = PAPER[(view, name)] if set_name == "test" else ("", "")  # the paper scores the test set
            for case in m["cases"]:
                selections.append({"view": view, "set": set_name, "configuration": name, "case": case["case"],
                                   "ood": case.get("ood", ""), "selected_model": case.get("selected_model", "model.pt"),
                                   "RV_dice": round(case["dice_RV"], 4)})
            rows.append({
                "view": view, "set": set_name, "configuration": name, "cases": m["n_cases"],
                "RV_dice": round(m["mean_dice_RV"], 4), "RV_hd_mm": round(m["mean_hd_mm_RV"], 2),
                "LV_dice": round(m["mean_dice_LV"], 4), "LV_hd_mm": round(m["mean_hd_mm_LV"], 2),
                "MYO_dice": round(m["mean_dice_MYO"], 4), "MYO_hd_mm": round(m["mean_hd_mm_MYO"], 2),
                "paper_RV_dice": paper_dc, "paper_RV_hd_mm": paper_hd,
                "ood_per_refinement_iteration": "-".join(map(str, flagged)) if name == "full" else "",
            })
        _write_tables(rows, selections, out)  # after every view, so a finished view is kept if a later one fails
    return rows


def _num(value, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _slug(name: str) -> str:
    return {"M": "M", "{M}+QC": "M_QC", "full": "full"}[name]


def refinement_set(data_root: str, view: str, path: Path) -> Path | None:
    """The unlabelled ``view`` volumes of ``data_root`` paired with their hidden reference labels
    (``HIDDEN_LABELS/NNN_<view>_<phase>_gt_hidden.nii.gz``, written by the cardiac phantom), as a
    datalist JSON (None when there are none)."""
    hidden = Path(data_root).resolve() / HIDDEN_LABELS
    pairs = []
    for label in sorted(hidden.glob(f"*_{view}_*_gt_hidden.nii.gz")):
        stem = label.name.removesuffix("_gt_hidden.nii.gz")
        images = sorted(p for p in Path(data_root).resolve().rglob(f"{stem}.nii*") if HIDDEN_LABELS not in p.parts)
        if images:
            pairs.append({"image": str(images[0]), "label": str(label)})
    if not pairs:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(pairs, indent=1))
    return path


def _write_tables(rows: list[dict], selections: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "ablation.csv")
    write_csv(selections, out / "selection.csv")
    sel = ["| view | set | configuration | case | OoD | selected_model | RV Dice |", "|---|---|---|---|---|---|---:|"]
    sel += [f"| {r['view']} | {r['set']} | {r['configuration']} | {r['case']} | {r['ood']} | {r['selected_model']} | "
            f"{r['RV_dice']:.4f} |" for r in selections]
    (out / "selection.md").write_text("\n".join(sel) + "\n")
    lines = ["| view | set | configuration | RV Dice | RV HD mm | LV Dice | MYO Dice | paper RV Dice | paper RV HD mm | "
             "OoD before/after each refinement iteration |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['view']} | {r['set']} | {r['configuration']} | {r['RV_dice']:.4f} | {r['RV_hd_mm']:.2f} | {r['LV_dice']:.4f} | "
              f"{r['MYO_dice']:.4f} | {_num(r['paper_RV_dice'], 4)} | {_num(r['paper_RV_hd_mm'], 2)} | {r['ood_per_refinement_iteration']} |"
              for r in rows]
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'ablation.csv'}, {out / 'ablation.md'}, {out / 'selection.csv'} and {out / 'selection.md'}")


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda r: None)
