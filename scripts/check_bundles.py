"""Run the Model Zoo's CI checks on bundles, each bundle in its own process.

    python scripts/check_bundles.py                                   # every bundle in bundles/
    python scripts/check_bundles.py --names "[prostate_mri_transfer]" --work_dir /tmp/checks

Per bundle: required files; ``version`` listed in ``changelog``; ``verify_metadata`` against
the vendored schema (``scripts/schemas``); ``verify_net_in_out`` from ``inference.json``;
``ckpt_export`` to TorchScript (scripted, or traced where the network cannot be scripted)
and the ``.ts`` loaded back with outputs equal to eager; ``onnx_export`` with outputs equal in
onnxruntime; a ``ConfigWorkflow`` per config whose ``check_properties()`` finds no missing
property. The networks get freshly initialised weights (the checks are about the bundle's
code and configs, not its training). Prints one PASS/FAIL line per check; exits non-zero on
any failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import fire
from bundle_archive import bundle_names, read_metadata
from bundle_cli import BUNDLES, REPO, free_port

SCHEMA = REPO / "scripts" / "schemas" / "meta_schema_20220324.json"
REQUIRED_FILES = (
    "LICENSE", "configs/metadata.json", "configs/inference.json", "configs/train.json", "configs/evaluate.json",
    "configs/multi_gpu_train.json", "configs/multi_gpu_evaluate.json", "configs/logging.conf", "docs/README.md",
    "docs/data_license.txt",
)
#: the data-list ids MONAI Label overrides (and the inference dataset's)
DATA_KEYS = ("train#dataset#data", "validate#dataset#data", "dataset#data")
#: shape-check sizes: ``"32*n"`` becomes 32 * N_SPATIAL
N_SPATIAL = 2


def input_shape(meta: dict, n: int = N_SPATIAL) -> list[int]:
    """``[1, channels, *spatial]`` for the network input declared in ``network_data_format``."""
    image = next(iter(meta["network_data_format"]["inputs"].values()))
    spatial = [int(eval(str(s), {"n": n})) for s in image["spatial_shape"]]  # "32*n" -> 64
    return [1, int(image["num_channels"]), *spatial]


def fresh_network(bundle: Path):
    """``network_def`` of the bundle's inference.json, freshly initialised (the bundle folder must be on sys.path)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    return parser.get_parsed_content("network_def")


def config_checks(bundle: Path) -> list[tuple[str, list[str], str]]:
    """(label, config files, workflow kind) for every config: standalone files alone, overlays on train.json."""
    configs = bundle / "configs"
    checks = []
    for path in sorted(configs.glob("*.json")):
        if path.name == "metadata.json":
            continue
        content = json.loads(path.read_text())
        files = [str(path)] if "bundle_root" in content else [str(configs / "train.json"), str(path)]
        if path.stem == "multi_gpu_evaluate":  # the DDP overlay of the evaluation overlay
            files.insert(1, str(configs / "evaluate.json"))
        if "evaluate" in path.stem:
            kind = "eval"
        elif path.stem.startswith("infer"):
            kind = "infer"
        else:
            kind = "train"
        checks.append((path.name, files, kind))
    # the DDP overlay last: once a process group existed, ignite keeps treating the process as distributed
    return sorted(checks, key=lambda c: "multi_gpu" in c[0])


def _check_properties(files: list[str], kind: str, bundle: Path, output_root: Path) -> list[str]:
    from monai.bundle import ConfigWorkflow
    from monai.bundle.properties import InferProperties, MetaProperties

    workflow = ConfigWorkflow(
        config_file=files if len(files) > 1 else files[0], meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"), workflow_type="train" if kind == "train" else "infer",
        bundle_root=str(output_root),  # outputs (logs, caches) go there, never into the bundle
    )
    if kind == "eval":  # an evaluation overlay runs the validation engine of train.json
        properties = {k: dict(v) for k, v in InferProperties.items()}
        for key in ("dataset", "evaluator", "inferer"):
            properties[key]["id"] = f"validate#{key}"
        workflow.properties = {**properties, **MetaProperties}
    # empty data lists (the ids MONAI Label overrides): properties are checked with no dataset on disk;
    # an empty list cannot be shuffled or split across ranks, so sampling is made sequential
    distributed = any("multi_gpu" in f for f in files)
    empty = {key: [] for key in DATA_KEYS} | {"train#dataloader#shuffle": False}
    if distributed:
        empty |= {"train#dataloader#sampler": None, "validate#dataloader#sampler": None}
    for key, value in empty.items():
        if key in workflow.parser:
            workflow.parser[key] = value
    if distributed:  # its initialize joins a process group: make it a one-process gloo group
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    try:
        workflow.initialize()
        return workflow.check_properties() or []
    finally:
        if distributed:
            if dist.is_initialized():
                dist.destroy_process_group()
            for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
                os.environ.pop(key, None)


def _outputs_equal(a, b, what: str, rtol: float = 1e-4, atol: float = 1e-4) -> None:
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise AssertionError(f"{what}: output shape {b.shape} != eager {a.shape}")
    if not np.allclose(a, b, rtol=rtol, atol=atol):
        raise AssertionError(f"{what}: max |difference| {np.abs(a - b).max():.3g} to eager")


def check_one(name: str, work_dir: Path, bundles_dir: Path = BUNDLES) -> bool:
    """All checks of one bundle in this process; prints PASS/FAIL lines, returns whether all passed."""
    import torch
    from monai.bundle import ckpt_export, onnx_export, verify_metadata, verify_net_in_out

    bundle = Path(bundles_dir).resolve() / name
    configs = bundle / "configs"
    meta_file, infer_file = str(configs / "metadata.json"), str(configs / "inference.json")
    work_dir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(bundle))  # as the Model Zoo's CI does: the bundle's scripts/ importable
    results: list[bool] = []
    state: dict = {}

    def step(label: str, fn) -> None:
        try:
            detail = fn()
            print(f"PASS {name}: {label}" + (f" ({detail})" if detail else ""), flush=True)
            results.append(True)
        except Exception as e:  # report every check, not only the first failure
            print(f"FAIL {name}: {label}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
            results.append(False)

    def required_files():
        missing = [f for f in REQUIRED_FILES if not (bundle / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{bundle}: missing {missing}")

    def version_in_changelog():
        state["meta"] = read_metadata(bundle)
        return f"version {state['meta']['version']}"

    def schema():
        verify_metadata(meta_file=meta_file, filepath=str(SCHEMA))

    def net_in_out():
        verify_net_in_out(net_id="network_def", meta_file=meta_file, config_file=infer_file, bundle_root=str(bundle))

    def fresh_weights():
        net = fresh_network(bundle).eval()
        ckpt = work_dir / "model.pt"
        torch.save(net.state_dict(), ckpt)
        shape = input_shape(state["meta"])
        torch.manual_seed(0)
        x = torch.rand(shape)
        with torch.no_grad():
            state.update(net=net, ckpt=ckpt, shape=shape, x=x, eager=net(x).numpy())
        return f"input {shape}"

    def torchscript():
        ts = work_dir / "model.ts"
        common = dict(net_id="network_def", filepath=str(ts), ckpt_file=str(state["ckpt"]), meta_file=meta_file,
                      config_file=infer_file, bundle_root=str(bundle))
        try:
            ckpt_export(**common)
            how = "scripted"
        except Exception as e:  # e.g. smp's UNet++ cannot be scripted; the Model Zoo then traces
            ckpt_export(**common, use_trace=True, input_shape=state["shape"])
            how = f"traced; scripting failed with {type(e).__name__}"
        with torch.no_grad():
            out = torch.jit.load(str(ts)).eval()(state["x"]).numpy()
        _outputs_equal(state["eager"], out, "TorchScript")
        return how

    def onnx():
        import onnxruntime

        path = work_dir / "model.onnx"
        onnx_export(net_id="network_def", filepath=str(path), ckpt_file=str(state["ckpt"]), meta_file=meta_file,
                    config_file=infer_file, bundle_root=str(bundle), use_trace=True, input_shape=state["shape"])
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = session.run(None, {session.get_inputs()[0].name: state["x"].numpy()})[0]
        _outputs_equal(state["eager"], out, "onnxruntime", rtol=1e-3, atol=1e-3)

    step("required files", required_files)
    step("version in changelog", version_in_changelog)
    step("verify_metadata (vendored schema)", schema)
    step("verify_net_in_out (inference.json)", net_in_out)
    step("fresh network_def weights", fresh_weights)
    if "ckpt" in state:
        step("ckpt_export -> TorchScript equals eager", torchscript)
        step("onnx_export -> onnxruntime equals eager", onnx)
    for label, files, kind in config_checks(bundle):
        def properties(files=files, kind=kind):
            missing = _check_properties(files, kind, bundle, work_dir / "bundle_root")
            if missing:
                raise AssertionError(f"missing properties {missing}")
            return f"{kind} workflow"
        step(f"ConfigWorkflow check_properties {label}", properties)
    return all(results)


def main(names: list[str] | None = None, work_dir: str | None = None, bundles_dir: str = str(BUNDLES),
         in_process: bool = False) -> None:
    """Check every bundle (or ``names``); exits with status 1 if any check fails.

    Args:
        names: bundle names (default: every bundle in bundles/).
        work_dir: folder for the exported files (default: a temporary folder).
        bundles_dir: folder holding the bundles (default: this repository's bundles/).
        in_process: check the single named bundle in this process (used internally: every
            bundle's ``scripts`` package is called ``scripts``, so bundles get a process each).
    """
    names = list(names) if names else bundle_names(bundles_dir)
    root = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="bundle_checks_"))
    if in_process:
        if len(names) != 1:
            raise SystemExit("--in_process checks exactly one bundle")
        sys.exit(0 if check_one(names[0], root / names[0], Path(bundles_dir)) else 1)
    failed = []
    for name in names:
        cmd = [sys.executable, __file__, "--names", f"[{name}]", "--work_dir", str(root), "--bundles_dir", bundles_dir,
               "--in_process", "True"]
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
    print(f"\nchecked {len(names)} bundle(s) in {root}; " + (f"FAILED: {failed}" if failed else "all checks passed"))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    fire.Fire(main)
