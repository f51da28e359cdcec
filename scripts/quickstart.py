"""Quick start: phantom data -> brief training -> evaluation -> inference, for every bundle.

Generates small synthetic datasets in each method's real layout, runs each bundle in
``bundles/`` through the documented ``python -m monai.bundle run ...`` commands with small
sizes, and prints a table of test Dice per bundle with where its outputs were written.

    python scripts/quickstart.py                       # every bundle, outputs in ./quickstart_outputs
    python scripts/quickstart.py --names "[prostate_mri_transfer]" --out_dir /tmp/qs
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], log_file: Path) -> None:
    """Run a command, streaming its output to the console and to ``log_file``."""
    print("$ " + " ".join(cmd), flush=True)
    with open(log_file, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=log_file.parent)
        for line in proc.stdout:
            log.write(line)
            if " - INFO - " not in line or "Epoch[" in line or "metrics" in line or "Dice" in line:
                sys.stdout.write("    " + line)
        if proc.wait() != 0:
            raise SystemExit(f"command failed ({proc.returncode}); full log: {log_file}")


def _bundle_cmd(bundle: str, configs: list[str], run_id: str, **overrides) -> list[str]:
    files = [str(REPO / "bundles" / bundle / "configs" / c) for c in configs]
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", files[0] if len(files) == 1 else json.dumps(files)]
    for key, value in overrides.items():
        cmd += [f"--{key}", value if isinstance(value, str) else repr(value)]
    return cmd


def prostate_mri_transfer(out: Path, epochs: int) -> dict:
    """Train on phantom RUNMC (site A), evaluate on its held-out cases, segment the BMC volumes."""
    bundle = "prostate_mri_transfer"
    root = out / bundle
    root.mkdir(parents=True, exist_ok=True)
    log = root / "quickstart.log"
    data = out / "data" / "prostate"
    _run([sys.executable, str(REPO / "scripts" / "phantoms.py"), "prostate", str(data), "--cases_per_site", "8", "--shape", "(64,64,12)"], log)
    small = dict(bundle_root=str(root), dataset_dir=str(data), image_size=64, encoder="efficientnet-b0", batch_size=8)
    _run(_bundle_cmd(bundle, ["train.json"], "training", sites=["RUNMC"], epochs=epochs, resume=False, **small), log)
    _run(_bundle_cmd(bundle, ["train.json", "evaluate.json"], "evaluating", sites=["RUNMC"], **small), log)
    infer_out = root / "eval" / "inference"
    _run(
        _bundle_cmd(
            bundle, ["inference.json"], "run", bundle_root=str(root), dataset_dir=str(data / "BMC"),
            output_dir=str(infer_out), image_size=64, encoder="efficientnet-b0",
        ),
        log,
    )
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    return {
        "bundle": bundle,
        "dice": metrics["mean_dice"],
        "outputs": {
            "metrics": root / "eval" / "metrics.csv",
            "overlays": root / "eval" / "overlays",
            "masks": infer_out,
            "tensorboard": root / "eval" / "tensorboard",
            "learning curves": root / "eval" / "learning_curves.png",
        },
    }


#: one recipe per bundle; a bundle added to bundles/ adds its recipe here
RECIPES = {"prostate_mri_transfer": prostate_mri_transfer}


def main(out_dir: str = "quickstart_outputs", names: list[str] | None = None, epochs: int = 25) -> None:
    """Run every bundle (or ``names``) on phantoms and print the Dice table.

    Args:
        out_dir: folder for phantom data, checkpoints and all outputs.
        names: bundle names to run (default: every bundle in bundles/ that has a recipe).
        epochs: training epochs per bundle.
    """
    out = Path(out_dir).resolve()
    available = sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())
    names = list(names) if names else available
    missing = [n for n in names if n not in RECIPES]
    if missing:
        raise SystemExit(f"no quick-start recipe for {missing}; known: {sorted(RECIPES)}")
    results = []
    for name in names:
        start = time.perf_counter()
        print(f"\n=== {name} ===", flush=True)
        result = RECIPES[name](out, epochs)
        result["minutes"] = (time.perf_counter() - start) / 60
        results.append(result)
    print("\n| bundle | test Dice % (phantoms) | minutes |\n|---|---:|---:|")
    for r in results:
        print(f"| {r['bundle']} | {r['dice']:.2f} | {r['minutes']:.1f} |")
    for r in results:
        print(f"\n{r['bundle']} outputs:")
        for what, path in r["outputs"].items():
            print(f"  {what:<16} {path}")


if __name__ == "__main__":
    fire.Fire(main)
