"""Federated multi-site prostate training on NVIDIA FLARE, with the prostate_mri_transfer bundle.

The paper's privacy setting: hospitals cannot pool their images. ``run`` builds a FLARE job
(server: :class:`fl_prostate.ProstateFLController`; every site: ``fl_prostate_client.py``,
which trains with the bundle's own ``train.json``), exports it, and runs it in the FL simulator
with one client process per site. ``compare`` trains the central baselines through the bundle's
CLI and both FL workflows, and tests all of them on the same test split.

    python scripts/federated_prostate.py run DATASET_DIR OUT --sites "['RUNMC','BMC','I2CVB']" \\
        --workflow fedavg --rounds 20 --local_epochs 10
    python scripts/federated_prostate.py compare DATASET_DIR OUT --rounds 2 --local_epochs 1 --image_size 64 \\
        --overrides "{'encoder': 'efficientnet-b0'}"

``run`` writes into OUT: ``model.pt`` (the global model; ``inference.json`` takes it unchanged
as ``models/model.pt``), ``rounds/round_NNN.pt``, ``metrics.json``, ``val_dice.csv`` and
``val_dice.png`` (per-round, per-site validation Dice of the global model), ``job/`` (the FLARE
job, deployable to real sites) and ``workspace/`` (the simulator's server and client folders and
logs) and ``sites/<site>/`` (each site's bundle outputs). Needs ``pip install -e .[fl]``.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
from pathlib import Path

import fire
from bundle_cli import BUNDLES, bundle_cmd, run_logged
from prostate_transfer_grid import Grid
from shared_transforms.datalist import PROSTATE_SITES
from tables import write_csv

HERE = Path(__file__).resolve().parent
BUNDLE = "prostate_mri_transfer"
CLIENT_SCRIPT = HERE / "fl_prostate_client.py"
SITES = tuple(PROSTATE_SITES.values())
LETTER = {folder: letter for letter, folder in PROSTATE_SITES.items()}


def _require_nvflare():
    try:
        import nvflare  # noqa: F401
    except ImportError as e:
        raise SystemExit("federated training needs NVIDIA FLARE: pip install -e '.[fl]'") from e


def build_job(dataset_dir: Path, out: Path, sites: list[str], workflow: str, rounds: int, local_epochs: int,
              order: str, seed: int, keep_optimizer_state: bool, initial_ckpt: str | None, threads: int,
              overrides: dict):
    """The FLARE job: the controller on the server, the client script (external process) on every site."""
    from fl_prostate import ProstateFLController
    from nvflare.job_config.api import FedJob
    from nvflare.job_config.script_runner import FrameworkType, ScriptRunner

    job = FedJob(name=f"prostate_{workflow}", min_clients=len(sites))
    job.to_server(ProstateFLController(workflow=workflow, num_rounds=rounds, sites=sites, order=order, seed=seed,
                                       initial_ckpt=initial_ckpt))
    for site in sites:
        args = ["--bundle_root", str(BUNDLES / BUNDLE), "--dataset_dir", str(dataset_dir),
                "--work_dir", str(out / "sites" / site), "--local_epochs", str(local_epochs), "--rounds", str(rounds),
                "--keep_optimizer_state", str(bool(keep_optimizer_state)), "--threads", str(threads)]
        for key, value in overrides.items():  # one flag each: FLARE reads "{...}" in its configs as an expression
            args += [f"--{key}", value if isinstance(value, str) else repr(value)]
        runner = ScriptRunner(script=str(CLIENT_SCRIPT), script_args=args, launch_external_process=True,
                              framework=FrameworkType.NUMPY)
        job.to(runner, site)
    return job


def plot_val_dice(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for site in dict.fromkeys(r["site"] for r in rows):
        pts = [(r["round"], r["val_dice"]) for r in rows if r["site"] == site]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=site)
    ax.set(xlabel="round", ylabel="validation Dice % (global model)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(
    dataset_dir: str,
    out: str,
    sites: list[str] = SITES,
    workflow: str = "fedavg",
    rounds: int = 2,
    local_epochs: int = 1,
    image_size: int = 384,
    order: str = "fixed",
    seed: int = 0,
    keep_optimizer_state: bool = False,
    initial_ckpt: str | None = None,
    threads: int = 0,
    overrides: dict | None = None,
) -> dict:
    """Build the FLARE job, export it to OUT/job and run it in the FL simulator (one process per site).

    Args:
        dataset_dir: the multi-site layout (RUNMC/, BMC/, I2CVB/ with CaseNN[_segmentation].nii.gz).
        out: output folder (see the module help).
        sites: site folders, one FL client each (also the fixed cyclic order).
        workflow: ``cyclic`` (the model visits the sites one after another each round) or
            ``fedavg`` (average weighted by each site's training slices).
        rounds: global rounds.
        local_epochs: local epochs per site and round.
        image_size: the bundle's ``image_size``.
        order: cyclic order, ``fixed`` or ``random`` (reshuffled every round).
        seed: the bundle's seed (split, initialisation) and the random order's.
        keep_optimizer_state: keep each site's Adam moments across global updates (default: fresh each round).
        initial_ckpt: start from this ``state_dict`` (e.g. a previous stage's ``models/model.pt``).
        threads: torch threads per client (0: the machine's cores shared between the sites).
        overrides: further ``train.json`` overrides for every site, e.g. ``{'encoder': 'efficientnet-b0'}``.

    Returns:
        A summary: output paths and the last round's validation Dice per site.
    """
    _require_nvflare()
    if workflow not in ("cyclic", "fedavg"):
        raise ValueError(f"--workflow must be cyclic or fedavg, got {workflow!r}")
    data, out_dir = Path(dataset_dir).resolve(), Path(out).resolve()
    sites = [str(s) for s in ([sites] if isinstance(sites, str) else sites)]
    for site in sites:
        if not (data / site).is_dir():
            raise FileNotFoundError(f"site folder not found: {data / site} (sites are folders of {data})")
    if initial_ckpt and not Path(initial_ckpt).is_file():
        raise FileNotFoundError(f"initial checkpoint not found: {initial_ckpt}")
    threads = int(threads) or max(1, (os.cpu_count() or 1) // len(sites))
    options = {"image_size": int(image_size), "seed": int(seed), **(overrides or {})}
    job = build_job(data, out_dir, sites, workflow, int(rounds), int(local_epochs), order, int(seed),
                    keep_optimizer_state, str(Path(initial_ckpt).resolve()) if initial_ckpt else None, threads, options)
    shutil.rmtree(out_dir / "job", ignore_errors=True)
    job.export_job(str(out_dir / "job"))
    workspace = out_dir / "workspace"
    shutil.rmtree(workspace, ignore_errors=True)
    # the clients are started as `python3 -u custom/fl_prostate_client.py`: this interpreter's python3
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    print(f"[fl] {workflow}: {rounds} rounds x {local_epochs} local epochs on {sites}; job in {out_dir / 'job'}",
          flush=True)
    job.simulator_run(str(workspace), threads=len(sites))
    results = sorted(workspace.glob("server/**/prostate_fl/metrics.json"))
    if not results:
        raise SystemExit(f"the FL job wrote no global model: see the logs under {workspace} (server/, {sites[0]}/ ...)")
    server_out = results[-1].parent
    metrics = json.loads(results[-1].read_text())
    if len(metrics["rounds"]) != int(rounds):
        raise SystemExit(f"the FL job finished {len(metrics['rounds'])} of {rounds} rounds: see the logs under {workspace}")
    shutil.copy2(server_out / "model.pt", out_dir / "model.pt")
    shutil.copy2(server_out / "metrics.json", out_dir / "metrics.json")
    shutil.rmtree(out_dir / "rounds", ignore_errors=True)
    shutil.copytree(server_out / "rounds", out_dir / "rounds")
    rows = [{"round": r["round"], "site": site, "val_dice": round(100 * d, 2)}
            for r in metrics["rounds"] for site, d in r["val_mean_dice"].items()]
    write_csv(rows, out_dir / "val_dice.csv")
    plot_val_dice(rows, out_dir / "val_dice.png", f"FL {workflow}: {rounds} rounds x {local_epochs} local epochs")
    last = metrics["rounds"][-1]["val_mean_dice"]
    print(f"[fl] global model {out_dir / 'model.pt'}; last round's validation Dice {last}", flush=True)
    return {"model": str(out_dir / "model.pt"), "val_dice_csv": str(out_dir / "val_dice.csv"),
            "job": str(out_dir / "job"), "last_val_dice": last}


def _evaluate(model_root: Path, data: Path, split: str, common: dict, log: Path) -> dict[str, float]:
    """Dice % per site of ``model_root/models/model.pt`` on one split of all three sites (one bundle run)."""
    out = model_root / f"{split}_all"
    args = {k: v for k, v in common.items() if k != "epochs"}
    args.update(bundle_root=str(model_root), dataset_dir=str(data), sites=list(SITES), output_dir=str(out))
    if split != "test":
        args["validate#dataset#data"] = f"$@datalist['{split}']"
    run_logged(bundle_cmd(BUNDLE, ["train.json", "evaluate.json"], "evaluating", **args), log, echo=False)
    cases = json.loads((out / "metrics.json").read_text())["cases"]
    per_site = {}
    for site in SITES:
        dice = [c["dice"] for c in cases if c["case"].split("/")[0] == site]
        per_site[site] = sum(dice) / len(dice) if dice else float("nan")
    per_site["mean"] = sum(c["dice"] for c in cases) / len(cases)
    return per_site


def compare(
    dataset_dir: str,
    out: str,
    rounds: int = 2,
    local_epochs: int = 1,
    image_size: int = 384,
    seed: int = 0,
    fold: int = 0,
    overrides: dict | None = None,
) -> list[dict]:
    """Each site alone, the best sequential chain, All_Data, FL cyclic and FL fedavg on the same test split.

    Every method sees each of its sites' training slices ``rounds * local_epochs`` times: central
    stages train that many epochs, FL sites ``local_epochs`` per round. The best of the six
    three-site chains is chosen by its mean validation Dice over the three sites (the test split
    plays no part in choosing). Writes ``comparison.csv`` and ``comparison.md`` into OUT.
    """
    _require_nvflare()
    data, out_dir = Path(dataset_dir).resolve(), Path(out).resolve()
    epochs = int(rounds) * int(local_epochs)
    extra = {"image_size": int(image_size), **(overrides or {})}
    grid = Grid(str(data), str(out_dir / "central"), epochs, int(seed), extra, pretrained=False)
    common = dict(grid.common, fold=int(fold))
    log = out_dir / "compare.log"
    models: list[tuple[str, Path]] = []
    for site in SITES:
        models.append((f"Site {LETTER[site]} alone ({site})", grid.train((LETTER[site],), fold)))
    chains = []
    for perm in itertools.permutations("ABC"):
        root = grid.train(tuple(perm), fold)
        chains.append((_evaluate(root, data, "validation", common, log)["mean"], perm, root))
    val, perm, root = max(chains, key=lambda c: c[0])
    models.append((f"best chain {' → '.join(perm)} (val {val:.2f})", root))
    models.append(("All_Data (pooled)", grid.train(("All_Data",), fold)))
    for workflow in ("cyclic", "fedavg"):
        fl_out = out_dir / f"fl_{workflow}"
        run(str(data), str(fl_out), workflow=workflow, rounds=rounds, local_epochs=local_epochs, image_size=image_size,
            seed=seed, overrides={"cache_dir": common["cache_dir"], "fold": int(fold), **(overrides or {})})
        (fl_out / "models").mkdir(exist_ok=True)
        shutil.copy2(fl_out / "model.pt", fl_out / "models" / "model.pt")
        models.append((f"FL {workflow}", fl_out))
    rows = []
    for name, root in models:
        dice = _evaluate(root, data, "test", common, log)
        rows.append({"method": name, **{f"test_dice_{LETTER[s]}": round(dice[s], 2) for s in SITES},
                     "test_dice_mean": round(dice["mean"], 2)})
        print(f"==> {name}: test Dice {dice}", flush=True)
    write_csv(rows, out_dir / "comparison.csv")
    lines = [
        f"Test Dice % on each site's test split (fold {fold}, seed {seed}, {image_size}² slices); every method sees each "
        f"of its sites' training slices {epochs} times ({rounds} rounds × {local_epochs} local epochs in FL).",
        "",
        "| method | Site A (RUNMC) | Site B (BMC) | Site C (I2CVB) | all test cases |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['method']} | {r['test_dice_A']:.2f} | {r['test_dice_B']:.2f} | {r['test_dice_C']:.2f} | "
              f"{r['test_dice_mean']:.2f} |" for r in rows]
    (out_dir / "comparison.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    fire.Fire({"run": run, "compare": compare})
