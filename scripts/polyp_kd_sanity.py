"""KD sanity experiment for the polyp_kdas_student bundle: can distillation help a data-starved student?

A teacher (``configs/train_teacher.json``, PVTv2-B2) is trained on the full training set; then,
for every seed, one student (``configs/train.json``, PVTv2-B0) per ``kd`` ∈ {none, kl,
attention, attention_sgm} is trained on the same ``train_fraction`` of the training pairs
(chosen by the seed, shared by the four variants) with the same initialisation, and evaluated
on every test set (``evaluate.json``, the published min-max + uint8 pipeline). Writes
``kd_sanity.md`` / ``kd_sanity.csv``: mDice (mean over all test images) as mean ± std over
the seeds per variant, and the loss terms' magnitudes in the students' last epoch (from their
TensorBoard logs), so a variant that does not help shows which term dominated.

    python scripts/phantoms.py polyp /tmp/polyp --train 48 --per_test_set 8 --size 64
    python scripts/polyp_kd_sanity.py /tmp/polyp /tmp/kd_sanity --image_size 64 --size_multiple 16 \\
        --teacher_epochs 40 --epochs 30 --batch_size 8

Runs are logged to ``OUT_DIR/<run>/run.log``; finished runs are reused.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import fire
from bundle_cli import bundle_cmd, run_logged
from tables import write_csv

BUNDLE = "polyp_kdas_student"
VARIANTS = ("none", "kl", "attention", "attention_sgm")
TERMS = ("train_loss", "train_loss_seg", "train_loss_kl", "train_loss_at", "train_loss_sgm")


def last_epoch_terms(tensorboard_dir: Path, iterations_per_epoch: int) -> dict[str, float]:
    """Mean of each logged loss term over the last ``iterations_per_epoch`` iterations."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0}).Reload()
    tags = set(events.Tags()["scalars"])
    out = {}
    for tag in TERMS:
        if tag in tags:
            values = [e.value for e in events.Scalars(tag)][-iterations_per_epoch:]
            out[tag] = sum(values) / len(values)
    return out


def main(data_root: str, out_dir: str, seeds: list[int] = (0, 1, 2), train_fraction: float = 0.25,
         epochs: int = 30, teacher_epochs: int = 40, variants: list[str] = VARIANTS, image_size: int = 352,
         size_multiple: int = 32, batch_size: int = 16, pretrained_path: str | None = None) -> dict:
    """Train the teacher once and the students of every (seed, variant); write the tables.

    Args:
        data_root: PraNet-layout dataset (TrainDataset/, TestDataset/<set>/).
        out_dir: one folder per run plus kd_sanity.md / kd_sanity.csv.
        seeds: one student per variant and seed (the seed picks the training subset and the init).
        train_fraction: share of the training pairs the students see (the teacher sees all).
        epochs, teacher_epochs: training epochs of each student and of the teacher.
        variants: ``kd`` values to compare.
        image_size, size_multiple, batch_size: training overrides (small values for phantoms).
        pretrained_path: a local ImageNet checkpoint for the backbones of the teacher and the students
            (timm's PVTv2 state_dict; default: random init, recorded as not comparable to the paper).
    """
    data, out = str(Path(data_root).resolve()), Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = dict(dataset_dir=data, image_size=image_size, size_multiple=size_multiple, batch_size=batch_size)
    start = time.perf_counter()
    teacher_root = out / "teacher"
    teacher_ckpt = teacher_root / "models" / "teacher" / "model.pt"
    init = {"pretrained_path": str(Path(pretrained_path).resolve())} if pretrained_path else {}
    if not teacher_ckpt.is_file():
        run_logged(bundle_cmd(BUNDLE, ["train_teacher.json"], "training", bundle_root=str(teacher_root),
                              epochs=teacher_epochs, seed=0, resume=False, **init, **common), teacher_root / "run.log")
    rows = []
    for seed in seeds:
        for kd in variants:
            root = out / f"seed{seed}_kd_{kd}"
            metrics_file = root / "eval" / "test" / "metrics.json"
            overrides = dict(bundle_root=str(root), kd=kd, seed=seed, train_fraction=train_fraction,
                             teacher_ckpt=str(teacher_ckpt), **init, **common)
            if not metrics_file.is_file():
                run_logged(bundle_cmd(BUNDLE, ["train.json"], "training", epochs=epochs, resume=False, **overrides),
                           root / "run.log")
                run_logged(bundle_cmd(BUNDLE, ["train.json", "evaluate.json"], "evaluating", **overrides), root / "run.log")
            metrics = json.loads(metrics_file.read_text())
            n_train = len(json.loads((root / "eval" / "datalist.json").read_text())["training"])
            iterations = max(1, -(-n_train // batch_size))
            rows.append({"seed": seed, "kd": kd, "train_pairs": n_train, "mDice": metrics["mean_dice"] / 100,
                         "evaluation": metrics.get("evaluation", ""),
                         **last_epoch_terms(root / "eval" / "tensorboard", iterations)})
    write_csv(rows, out / "kd_sanity.csv")
    init = f"ImageNet ({pretrained_path})" if pretrained_path else "random (NOT comparable to the paper)"
    lines = [f"# KD sanity experiment on {data}", "",
             f"Teacher: {teacher_epochs} epochs on the full training set. Students: {epochs} epochs on "
             f"{train_fraction:.0%} of it ({rows[0]['train_pairs'] if rows else '?'} pairs), seeds {list(seeds)}; "
             f"image size {image_size}, batch {batch_size}; backbone init: {init}. "
             f"mDice: threshold-averaged, mean over all test images; maps: {rows[0]['evaluation'] if rows else '?'}.", "",
             "| `kd` | mDice mean ± std | per seed | Σ L_seg | L_KL | L_AT | L_SGM | total |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]

    def avg(values):
        values = [v for v in values if v is not None]
        return f"{sum(values) / len(values):.3f}" if values else "–"

    for kd in variants:
        mine = [r for r in rows if r["kd"] == kd]
        d = [r["mDice"] for r in mine]
        std = statistics.stdev(d) if len(d) > 1 else 0.0
        lines.append(f"| `{kd}` | {statistics.mean(d):.3f} ± {std:.3f} | {', '.join(f'{v:.3f}' for v in d)} | "
                     + " | ".join(avg([r.get(t) for r in mine]) for t in
                                  ("train_loss_seg", "train_loss_kl", "train_loss_at", "train_loss_sgm", "train_loss"))
                     + " |")
    lines += ["", "Loss terms: means over each student's last epoch (TensorBoard), averaged over the seeds; the total is "
              "(1 − λ)·Σ L_seg + λ·(KD terms), λ = 0.2.",
              "", f"Time of this invocation (finished runs are reused): {(time.perf_counter() - start) / 60:.1f} min."]
    (out / "kd_sanity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"table": str(out / "kd_sanity.md"), "rows": rows}


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda r: None)
