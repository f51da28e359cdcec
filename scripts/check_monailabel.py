"""Serve every bundle in a real MONAI Label 0.8.5 server and check it over REST.

Run through ``bash scripts/check_monailabel.sh`` (it builds MONAI Label's own virtual
environment and passes ``--monailabel``). Steps:

1. weights: the quick start trains every bundle briefly on phantoms (``quickstart.py``); each
   recipe reports the size overrides it trained with (small networks on CPU);
2. archives: ``package_bundles.py`` with those weights; every archive is extracted into the
   stock ``monaibundle`` app's ``model/`` folder and the recipe's overrides are written into
   the copied ``inference.json``/``train.json`` as their defaults (MONAI Label reads only the
   config files);
3. studies: one synthetic image per bundle, shaped by its ``network_data_format`` (RGB PNG
   for 3-channel RGB inputs, a NIfTI volume otherwise), plus labelled prostate phantoms for
   training;
4. ``monailabel start_server ... --conf models <all> --conf zoo_source github`` on 127.0.0.1;
   ``GET /info/`` lists every bundle with its labels and dimension; a bad upload (truncated NIfTI,
   text named .png) gets an ``InputError`` naming the file in the server log, and the server goes
   on serving; ``POST /infer/<bundle>``
   returns a label of the image's shape for every bundle; ``POST /train/<train_bundle>``
   with ``max_epochs`` 1 completes and writes a checkpoint.

Prints one PASS/FAIL line per check and exits non-zero on any failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
from bundle_archive import bundle_names, safe_extract
from bundle_cli import REPO, free_port
from PIL import Image

TIMEOUT_START_S = 300


def _request(url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 900):
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return response.read(), response.headers


def _multipart(fields: dict[str, str]) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    ) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def split_infer_response(body: bytes, content_type: str) -> tuple[dict, str, bytes]:
    """``/infer?output=all`` answers multipart/form-data: the result JSON (``params``) and the label
    file. Returns (result JSON, label file name, label bytes)."""
    from email.parser import BytesParser
    from email.policy import HTTP

    if content_type.startswith("application/json"):  # MONAI Label sends the JSON alone when there is no label file
        return json.loads(body), "", b""

    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    result, filename, label = {}, "", b""
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "params":
            result = json.loads(part.get_payload(decode=True) or b"{}")
        elif part.get_filename():
            filename, label = part.get_filename(), part.get_payload(decode=True)
    return result, filename, label


def sample_image(meta: dict, folder: Path, stem: str, rng: np.random.Generator) -> Path:
    """A synthetic study for a bundle: smooth blobs in the input format its metadata declares."""
    image = next(iter(meta["network_data_format"]["inputs"].values()))
    yy, xx = np.mgrid[0:96, 0:80]
    blob = np.exp(-(((yy - 48) / 20.0) ** 2 + ((xx - 40) / 16.0) ** 2))
    if int(image["num_channels"]) == 3 and str(image.get("format", "")).upper() == "RGB":
        rgb = np.stack([0.6 + 0.3 * blob, 0.3 + 0.2 * blob, 0.25 + 0.1 * blob], -1) + rng.normal(0, 0.03, (96, 80, 3))
        path = folder / f"{stem}.png"
        Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8)).save(path)
    else:
        volume = np.stack([blob * (1 + 0.1 * z) for z in range(10)], -1) * 500 + rng.normal(0, 10, (96, 80, 10))
        path = folder / f"{stem}.nii.gz"
        nib.save(nib.Nifti1Image(volume.astype(np.float32), np.diag([1.2, 1.2, 4.0, 1.0])), path)
    return path


def read_label(path: Path) -> np.ndarray:
    if path.name.endswith((".nii", ".nii.gz")):
        return np.asanyarray(nib.load(path).dataobj)
    return np.asarray(Image.open(path))


def image_shape(path: Path) -> tuple[int, ...]:
    if path.name.endswith((".nii", ".nii.gz")):
        return tuple(nib.load(path).shape)
    return tuple(np.asarray(Image.open(path)).shape[:2])


def set_defaults(config_file: Path, overrides: dict) -> list[str]:
    """Write ``overrides`` into a config's top-level keys that exist; returns the keys changed."""
    config = json.loads(config_file.read_text())
    changed = [k for k in overrides if k in config and k != "bundle_root"]
    for k in changed:
        config[k] = overrides[k]
    config_file.write_text(json.dumps(config, indent=4) + "\n")
    return changed


def main(monailabel: str, work_dir: str = "monailabel_check", epochs: int = 1, train_bundle: str = "prostate_mri_transfer",
         port: int = 0, names: list[str] | None = None) -> None:
    """Build the app and studies, start MONAI Label, check /info/, /infer for every bundle and /train.

    Args:
        monailabel: the ``monailabel`` executable of MONAI Label 0.8.5's virtual environment.
        work_dir: folder for weights, archives, the app, studies and the server log.
        epochs: quick-start training epochs per bundle (the weights served).
        train_bundle: the bundle trained through ``POST /train`` (prostate phantoms are its studies); "" skips it.
        port: server port (default: a free one).
        names: bundles to serve (default: every bundle in bundles/).
    """
    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # the monailabel launcher runs `python -m monailabel.main`: its environment's python must come first
    ml_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    ml_env["PATH"] = f"{Path(monailabel).parent}{os.pathsep}{ml_env.get('PATH', '')}"
    ml_env["PYTHONUNBUFFERED"] = "1"  # the server log is read while it runs
    names = list(names) if names else bundle_names()
    results: list[bool] = []

    def report(ok: bool, what: str) -> None:
        print(f"{'PASS' if ok else 'FAIL'} {what}", flush=True)
        results.append(ok)

    # 1. weights from a brief quick-start training of every bundle
    qs = work / "quickstart"
    results_file = qs / "quickstart_results.json"
    if not results_file.is_file():
        subprocess.run([sys.executable, str(REPO / "scripts" / "quickstart.py"), "--out_dir", str(qs), "--epochs", str(epochs),
                        "--names", f"[{','.join(names)}]"], check=True)
    trained = {r["bundle"]: r for r in json.loads(results_file.read_text())}

    # 2. archives with those weights, extracted into the stock monaibundle app
    dist = work / "dist"
    subprocess.run([sys.executable, str(REPO / "scripts" / "package_bundles.py"), str(dist), "--names", f"[{','.join(names)}]",
                    "--weights_dir", str(qs)], check=True)
    app = work / "apps" / "monaibundle"
    if not app.is_dir():
        subprocess.run([monailabel, "apps", "--download", "--name", "monaibundle", "--output", str(work / "apps")],
                       check=True, env=ml_env)
    shutil.rmtree(app / "model", ignore_errors=True)
    index = json.loads((dist / "index.json").read_text())
    for entry in index["bundles"]:
        root = safe_extract(dist / entry["file"], app / "model")
        overrides = trained[entry["name"]].get("overrides", {})
        for config in ("inference.json", "train.json"):
            changed = set_defaults(root / "configs" / config, overrides)
            print(f"{entry['name']}/configs/{config}: quick-start sizes {', '.join(f'{k}={overrides[k]}' for k in changed) or '-'}")

    # 3. studies: one synthetic image per bundle, labelled phantoms for the trained bundle
    studies = work / "studies"
    shutil.rmtree(studies, ignore_errors=True)
    (studies / "labels" / "final").mkdir(parents=True)
    rng = np.random.default_rng(0)
    samples = {}
    for name in names:
        meta = json.loads((app / "model" / name / "configs" / "metadata.json").read_text())
        samples[name] = sample_image(meta, studies, f"sample_{name}", rng)
    # bad uploads: a truncated NIfTI and a text file named .png must get the bundle's one-line reason in the log
    bad = {}
    for name in names:
        good = samples[name]
        if good.name.endswith(".nii.gz"):
            raw = good.read_bytes()
            bad[name] = studies / f"bad_upload_{name}.nii.gz"
            bad[name].write_bytes(raw[: len(raw) // 2])
        elif good.suffix == ".png":
            bad[name] = studies / f"bad_upload_{name}.png"
            bad[name].write_bytes(b"patient notes, not an image\n" * 8)
    prostate = qs / "data" / "prostate" / "RUNMC"
    for image in sorted(p for p in prostate.glob("*.nii.gz") if "_segmentation" not in p.name.lower())[:5]:
        stem = image.name[: -len(".nii.gz")]
        label = next(prostate.glob(f"{stem}_[Ss]egmentation.nii.gz"))
        shutil.copy(image, studies / f"train_{stem}.nii.gz")
        shutil.copy(label, studies / "labels" / "final" / f"train_{stem}.nii.gz")

    # 4. the server
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / "server.log", "w")
    cmd = [monailabel, "start_server", "--app", str(app), "--studies", str(studies), "--conf", "models", ",".join(names),
           "--conf", "zoo_source", "github", "--conf", "sam2", "false", "--host", "127.0.0.1", "--port", str(port)]
    print("$ " + " ".join(cmd), flush=True)
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=work, env=ml_env)
    try:
        info = None
        for _ in range(TIMEOUT_START_S):
            if server.poll() is not None:
                break
            try:
                info = json.loads(_request(f"{url}/info/", timeout=10)[0])
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        report(info is not None, f"server started on {url} (log: {work / 'server.log'})")
        if info is None:
            print("".join(open(work / "server.log").readlines()[-40:]))
            sys.exit(1)
        models = info.get("models", {})
        for name in names:
            meta = json.loads((app / "model" / name / "configs" / "metadata.json").read_text())
            pred = next(iter(meta["network_data_format"]["outputs"].values()))
            image = next(iter(meta["network_data_format"]["inputs"].values()))
            labels = {v.lower(): int(k) for k, v in pred["channel_def"].items() if v.lower() != "background"}
            listed = models.get(name, {})
            report(name in models and listed.get("labels") == labels and listed.get("dimension") == len(image["spatial_shape"]),
                   f"/info/ lists {name}: labels {listed.get('labels')} (expected {labels}), "
                   f"dimension {listed.get('dimension')} (expected {len(image['spatial_shape'])})")

        for name, path in bad.items():  # before the good requests: the server must go on serving
            image_id = path.name.split(".")[0]
            try:
                body, headers = _multipart({"params": "{}"})
                _request(f"{url}/infer/{name}?image={image_id}&output=all", body, headers)
                report(False, f"/infer/{name}?image={image_id}: a bad upload was answered as if it were good")
            except urllib.error.HTTPError as e:
                named = []
                for _ in range(20):  # the traceback reaches the log just after the answer
                    named = [ln.strip() for ln in open(work / "server.log") if f"{path.name}: " in ln and "InputError" in ln]
                    if named:
                        break
                    time.sleep(0.5)
                report(bool(named), f"/infer/{name}?image={image_id}: HTTP {e.code}; server log: "
                                    f"{named[-1][:300] if named else 'no InputError naming the file'}")
        for name in names:
            image_id = samples[name].name.split(".")[0]
            try:
                body, headers = _multipart({"params": "{}"})
                data, response_headers = _request(f"{url}/infer/{name}?image={image_id}&output=all", body, headers)
                result, filename, label_bytes = split_infer_response(data, response_headers.get("content-type", ""))
                suffix = ".png" if filename.endswith(".png") else ".nii.gz"
                out = work / "labels" / f"{name}{suffix}"
                out.parent.mkdir(exist_ok=True)
                out.write_bytes(label_bytes)
                label, expected = read_label(out), image_shape(samples[name])
                ok = tuple(label.shape[: len(expected)]) == expected and np.issubdtype(label.dtype, np.integer)
                report(ok, f"/infer/{name}?image={image_id}: label {label.shape} {label.dtype}, image {expected}, "
                           f"values {sorted(np.unique(label).tolist())[:5]}; result keys {sorted(result)}")
                if "QCResultd" in (app / "model" / name / "configs" / "inference.json").read_text():
                    qc = result.get("qc", {})
                    report(isinstance(qc.get("ood"), bool) and "selected_model" in qc and "th_up" in qc,
                           f"/infer/{name} result JSON carries the QC verdict: {json.dumps(qc)[:400]}")
            except urllib.error.HTTPError as e:
                report(False, f"/infer/{name}: HTTP {e.code} {e.read()[:500]!r}")

        if train_bundle:  # "" skips the /train check (e.g. serving one bundle that has no studies)
            checkpoint = app / "model" / train_bundle / "models" / "model.pt"
            before = checkpoint.stat().st_mtime if checkpoint.exists() else 0
            params = {"max_epochs": 1, "val_split": 0.2, "train_batch_size": 4, "val_batch_size": 4, "multi_gpu": False}
            try:
                data, _ = _request(f"{url}/train/{train_bundle}?run_sync=true", json.dumps(params).encode(),
                                   {"Content-Type": "application/json"}, timeout=1800)
                after = checkpoint.stat().st_mtime if checkpoint.exists() else 0
                log.flush()
                epochs_done = [ln.strip() for ln in open(work / "server.log") if "SupervisedTrainer" in ln and "Epoch[" in ln]
                report(after > before and bool(epochs_done),
                       f"/train/{train_bundle} max_epochs 1: {epochs_done[-1] if epochs_done else 'no trainer epoch in the log'}; "
                       f"checkpoint {checkpoint} {'rewritten' if after > before else 'NOT rewritten'}")
            except urllib.error.HTTPError as e:
                report(False, f"/train/{train_bundle}: HTTP {e.code} {e.read()[:500]!r}")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    print(f"\n{sum(results)}/{len(results)} checks passed; server log: {work / 'server.log'}")
    if not all(results):
        sys.exit(1)


if __name__ == "__main__":
    fire.Fire(main)
