"""Bundle archives: build them in the Model Zoo's shape, and download/verify/extract them safely.

Used by ``package_bundles.py`` (build), ``download_bundle.py`` (fetch) and the shipping tests.
An archive ``<name>_v<version>.zip`` holds one top-level ``<name>/`` folder: the bundle's
configs, docs, LICENSE and bundle-local ``scripts/``, a copy of the ``shared_transforms``
package when the bundle uses it (so the archive runs where this repository is not
installed) and, when given, trained weights under ``models/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from bundle_cli import BUNDLES, REPO

SHARED_PACKAGE = REPO / "shared_transforms"
#: run outputs and caches that a working copy of a bundle may hold; never shipped
EXCLUDED_DIRS = {"eval", "runs", "cache", "models", "__pycache__", ".pytest_cache", "shared_transforms"}
EXCLUDED_SUFFIXES = {".pyc", ".pyo"}
WEIGHT_SUFFIXES = {".pt", ".ts", ".json", ".yaml", ".yml"}
#: every member gets this timestamp so the same inputs give byte-identical archives
ZIP_DATE = (2020, 1, 1, 0, 0, 0)
URL_TEMPLATE = "{base_url}/{name}_v{version}.zip"
NO_WEIGHTS_NOTE = """

## Weights in this archive

This archive carries no trained weights (`models/` is empty). Train them with the commands
in the Usage section above (`python -m monai.bundle run training --config_file
{name}/configs/train.json --bundle_root {name} --dataset_dir ...`); the training writes
`models/model.pt` inside the bundle folder, which inference, MONAI Label and
`monai.bundle.load` then use.
"""


def bundle_names(bundles_dir: str | os.PathLike = BUNDLES) -> list[str]:
    """Every bundle in ``bundles_dir`` (a folder with ``configs/metadata.json``), sorted."""
    return sorted(p.name for p in Path(bundles_dir).iterdir() if (p / "configs" / "metadata.json").is_file())


def read_metadata(bundle_dir: Path) -> dict:
    """The bundle's metadata, with its version checked against its changelog."""
    path = Path(bundle_dir) / "configs" / "metadata.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (every bundle needs configs/metadata.json)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    version = meta.get("version")
    if not version:
        raise ValueError(f"{path}: no 'version'")
    if version not in meta.get("changelog", {}):
        raise ValueError(f"{path}: version {version!r} has no entry in 'changelog'")
    return meta


def uses_shared_transforms(bundle_dir: Path) -> bool:
    """Whether any config or bundle-local module of the bundle names ``shared_transforms``."""
    files = list((bundle_dir / "configs").glob("*.json")) + list((bundle_dir / "scripts").rglob("*.py"))
    return any("shared_transforms" in f.read_text(errors="ignore") for f in files)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _shipped_files(root: Path, excluded_dirs: set[str]) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in excluded_dirs and not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.suffix not in EXCLUDED_SUFFIXES and not name.startswith("."):
                files.append(path)
    return files


def _add(zf: zipfile.ZipFile, arcname: str, data: bytes) -> None:
    info = zipfile.ZipInfo(arcname, date_time=ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def build_archive(name: str, out_dir: str | os.PathLike, weights_dir: str | os.PathLike | None = None) -> dict:
    """Write ``<out_dir>/<name>_v<version>.zip`` and its ``.sha256``; return its index entry.

    ``weights_dir/<name>/models/`` (a bundle root's models folder, as training leaves it) is
    shipped as the archive's ``models/``: ``model.pt`` and any auxiliary weights in subfolders.
    """
    bundle_dir = BUNDLES / name
    meta = read_metadata(bundle_dir)
    version = meta["version"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    members: dict[str, bytes] = {}
    for path in _shipped_files(bundle_dir, EXCLUDED_DIRS):
        members[f"{name}/{path.relative_to(bundle_dir).as_posix()}"] = path.read_bytes()
    if uses_shared_transforms(bundle_dir):
        for path in _shipped_files(SHARED_PACKAGE, {"__pycache__"}):
            members[f"{name}/shared_transforms/{path.relative_to(SHARED_PACKAGE).as_posix()}"] = path.read_bytes()
    weights = []
    if weights_dir is not None:
        models = Path(weights_dir) / name / "models"
        if not (models / "model.pt").is_file():
            raise FileNotFoundError(f"{models / 'model.pt'}: missing (weights_dir/<name>/models/model.pt is shipped as the bundle's weights)")
        for path in _shipped_files(models, {"__pycache__", "resume"}):  # not the optimizer-state resume checkpoints
            if path.suffix in WEIGHT_SUFFIXES:
                arcname = f"{name}/models/{path.relative_to(models).as_posix()}"
                members[arcname] = path.read_bytes()
                weights.append(arcname)
    else:
        readme = f"{name}/docs/README.md"
        members[readme] = members.get(readme, b"") + NO_WEIGHTS_NOTE.format(name=name).encode()
    archive = out_dir / f"{name}_v{version}.zip"
    tmp = archive.with_suffix(".zip.part")
    with zipfile.ZipFile(tmp, "w") as zf:
        models_dir = zipfile.ZipInfo(f"{name}/models/", date_time=ZIP_DATE)
        models_dir.external_attr = (0o40755 << 16) | 0x10  # a directory, even when it ships no weights
        zf.writestr(models_dir, b"")
        for arcname in sorted(members):
            _add(zf, arcname, members[arcname])
    os.replace(tmp, archive)
    digest = sha256_file(archive)
    (out_dir / f"{archive.name}.sha256").write_text(f"{digest}  {archive.name}\n")
    return {
        "name": name,
        "version": version,
        "file": archive.name,
        "sha256": digest,
        "size": archive.stat().st_size,
        "url": URL_TEMPLATE.replace("{name}", name).replace("{version}", version),
        "weights": weights,
    }


def write_index(out_dir: str | os.PathLike, entries: list[dict]) -> Path:
    """``index.json``: the url template (``{base_url}`` = where the folder is served) and every archive."""
    path = Path(out_dir) / "index.json"
    path.write_text(json.dumps({"url_template": URL_TEMPLATE, "bundles": entries}, indent=4) + "\n")
    return path


def check_members(zf: zipfile.ZipFile, source: str) -> str:
    """The archive's single top-level folder; refuses members that would land outside it."""
    tops = set()
    for info in zf.infolist():
        member = info.filename
        parts = PurePosixPath(member.replace("\\", "/")).parts
        if member.startswith(("/", "\\")) or (parts and parts[0].endswith(":")) or ".." in parts:
            raise ValueError(f"{source}: member {member!r} would extract outside the target folder; refusing the archive")
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise ValueError(f"{source}: member {member!r} is a symbolic link; refusing the archive")
        if parts:
            tops.add(parts[0])
    if len(tops) != 1:
        raise ValueError(f"{source}: expected one top-level bundle folder, found {sorted(tops)}")
    return tops.pop()


def safe_extract(archive: str | os.PathLike, bundle_dir: str | os.PathLike) -> Path:
    """Extract a bundle archive into ``bundle_dir``; every member is checked before anything is written."""
    bundle_dir = Path(bundle_dir).resolve()
    with zipfile.ZipFile(archive) as zf:
        top = check_members(zf, str(archive))
        for info in zf.infolist():
            target = (bundle_dir / info.filename).resolve()
            if bundle_dir not in target.parents and target != bundle_dir:
                raise ValueError(f"{archive}: member {info.filename!r} resolves outside {bundle_dir}; refusing")
        bundle_dir.mkdir(parents=True, exist_ok=True)
        zf.extractall(bundle_dir)
    return bundle_dir / top


def download(url: str, sha256: str, bundle_dir: str | os.PathLike) -> Path:
    """Download the archive at ``url``, refuse it unless its sha256 is ``sha256``, extract it safely."""
    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=bundle_dir) as tmp:
        local = Path(tmp) / Path(url.split("?")[0]).name
        with urllib.request.urlopen(url) as response, open(local, "wb") as f:
            shutil.copyfileobj(response, f)
        actual = sha256_file(local)
        if actual != sha256.lower():
            raise ValueError(f"{url}: sha256 {actual} does not match the expected {sha256}; refusing the archive")
        return safe_extract(local, bundle_dir)
