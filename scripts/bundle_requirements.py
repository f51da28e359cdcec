"""The third-party packages a bundle needs, derived from its code, checked against its metadata.

The Model Zoo installs a bundle from its ``metadata.json``: ``monai_version``,
``pytorch_version``, ``numpy_version`` and ``optional_packages_version`` (read as
``required_packages_version`` by monai >= 1.4). This tool derives what the bundle really
imports and reports every package that metadata lacks:

- every module of the bundle's ``scripts/`` (imports at any depth, parsed with ``ast``);
- the parts of ``shared_transforms`` the bundle reaches (named in its configs or imported by
  its scripts, then followed through the package's own imports): the archive ships the whole
  package, but its ``__init__`` loads submodules lazily, so only those parts run;
- ``$import`` lines and dotted ``_target_`` names in its configs;
- MONAI components whose optional packages MONAI imports for them (``MONAI_OPTIONAL``), named
  in its configs or its scripts (e.g. MONAI's Hausdorff distance runs on scipy.ndimage).

Module names map to distributions through the installed packages' metadata, so run it in
the project's environment. ``python scripts/bundle_requirements.py`` prints one table per
bundle and exits 1 when a metadata.json lacks a package.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import fire
from bundle_archive import bundle_names
from bundle_cli import BUNDLES, REPO

SHARED_PACKAGE = REPO / "shared_transforms"
#: packages with their own metadata fields, not listed in optional_packages_version
OWN_FIELDS = {"monai": "monai_version", "torch": "pytorch_version", "numpy": "numpy_version"}
#: config text (regex) -> distribution MONAI imports for it: these packages are never imported by
#: name in the bundle, but its configs do not run without them
MONAI_OPTIONAL = {
    r"\bTensorBoard\w*Handler\b": "tensorboard",
    r"\b(Supervised(Trainer|Evaluator)|\w+Handler)\b": "pytorch-ignite",
    r"\b(NibabelReader|\.nii(\.gz)?)\b": "nibabel",
    r"\b(PILReader|\.(png|jpe?g))\b": "pillow",
    r"\bMLFlowHandler\b": "mlflow",
    r"\b(compute_hausdorff_distance|HausdorffDistanceMetric|compute_average_surface_distance|SurfaceDistanceMetric)\b": "scipy",
}


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name (``SimpleITK`` -> ``simpleitk``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in ``path`` (relative imports are the package's own)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 1 and path.is_relative_to(SHARED_PACKAGE):
            base = f"shared_transforms.{node.module}" if node.module else "shared_transforms"
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _shared_definitions() -> dict[str, str]:
    """Every top-level name in shared_transforms -> the submodule defining it (``MergeLabelsd`` -> ``labels``)."""
    where = {}
    for path in sorted(SHARED_PACKAGE.glob("*.py")):
        if path.stem == "__init__":
            continue
        where[path.stem] = path.stem
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                where.setdefault(node.name, path.stem)
    return where


def _shared_modules(references: set[str]) -> set[str]:
    """The shared_transforms submodules that ``references`` (dotted names) reach, closed over their imports."""
    where = _shared_definitions()
    todo = {where[r.split(".")[1]] for r in references if r.startswith("shared_transforms.") and r.split(".")[1] in where}
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        seen.add(module)
        for name in _imports(SHARED_PACKAGE / f"{module}.py"):
            parts = name.split(".")
            if parts[0] == "shared_transforms" and len(parts) > 1 and parts[1] in where and where[parts[1]] not in seen:
                todo.add(where[parts[1]])
    return seen


def _config_references(text: str) -> set[str]:
    """Dotted names a config uses: ``$import x`` / ``$from x import`` lines, ``_target_`` values, names in expressions."""
    refs = set(re.findall(r"\$\s*import\s+([\w.]+)", text)) | set(re.findall(r"\$\s*from\s+([\w.]+)\s+import", text))
    refs |= set(re.findall(r'"_target_"\s*:\s*"([A-Za-z_][\w]*\.[\w.]+)"', text))
    refs |= set(re.findall(r"\bshared_transforms(?:\.\w+)+", text))
    return refs


def _add_monai_optional(text: str, where: str, extra: dict[str, set[str]]) -> None:
    """Record in ``extra`` the distributions MONAI imports for the components named in ``text``."""
    for pattern, dist in MONAI_OPTIONAL.items():
        if re.search(pattern, text):
            extra[dist].add(where)


def required_distributions(bundle_dir: str | Path) -> dict[str, set[str]]:
    """Distribution (canonical name) -> the files of the bundle (or shipped shared_transforms) that need it.

    ``monai``, ``torch`` and ``numpy`` are included (their metadata fields are separate).
    A module no installed distribution provides maps to ``?<module>``.
    """
    bundle_dir = Path(bundle_dir)
    used_by: dict[str, set[str]] = defaultdict(set)  # top-level module -> files
    shared_refs: set[str] = set()
    extra: dict[str, set[str]] = defaultdict(set)  # distributions implied by MONAI components
    for path in sorted((bundle_dir / "scripts").rglob("*.py")):
        rel = path.relative_to(bundle_dir).as_posix()
        _add_monai_optional(path.read_text(), rel, extra)
        for name in _imports(path):
            used_by[name.split(".")[0]].add(rel)
            if name.startswith("shared_transforms."):
                shared_refs.add(name)
    for path in sorted((bundle_dir / "configs").glob("*.json")):
        if path.name == "metadata.json":
            continue
        text = path.read_text()
        rel = path.relative_to(bundle_dir).as_posix()
        for name in _config_references(text):
            used_by[name.split(".")[0]].add(rel)
            if name.startswith("shared_transforms."):
                shared_refs.add(name)
        _add_monai_optional(text, rel, extra)
    for module in _shared_modules(shared_refs):
        for name in _imports(SHARED_PACKAGE / f"{module}.py"):
            used_by[name.split(".")[0]].add(f"shared_transforms/{module}.py")

    providers = importlib.metadata.packages_distributions()
    local = {"scripts", "shared_transforms", "__future__"}
    needed: dict[str, set[str]] = defaultdict(set)
    for module, files in used_by.items():
        if module in local or module in sys.stdlib_module_names:
            continue
        dists = providers.get(module)
        needed[canonical(dists[0]) if dists else f"?{module}"].update(files)
    for dist, files in extra.items():
        needed[canonical(dist)].update(files)
    return dict(needed)


def listed_packages(metadata: dict) -> dict[str, str]:
    """Canonical name -> version of every package a metadata.json pins (its own fields included)."""
    listed = {canonical(k): v for k, v in (metadata.get("required_packages_version") or {}).items()}
    listed.update({canonical(k): v for k, v in (metadata.get("optional_packages_version") or {}).items()})
    listed.update({pkg: metadata[field] for pkg, field in OWN_FIELDS.items() if field in metadata})
    return listed


def _unlisted(required: dict[str, set[str]], listed: dict[str, str]) -> dict[str, set[str]]:
    return {dist: files for dist, files in required.items() if not re.match(r"^\d+(\.\d+)*", str(listed.get(dist, "")))}


def _listed_in(bundle_dir: str | Path) -> dict[str, str]:
    return listed_packages(json.loads((Path(bundle_dir) / "configs" / "metadata.json").read_text()))


def missing_from_metadata(bundle_dir: str | Path) -> dict[str, set[str]]:
    """The required distributions that the bundle's metadata.json does not list with a version."""
    return _unlisted(required_distributions(bundle_dir), _listed_in(bundle_dir))


def _installed_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main(names: list[str] | None = None, bundles_dir: str = str(BUNDLES)) -> None:
    """Print, per bundle, every package its code needs, the installed version, what metadata.json lists and who needs it.

    Args:
        names: bundles to check (default: every bundle in ``bundles_dir``).
        bundles_dir: folder holding the bundles.
    Exits 1 when a bundle's metadata.json lacks a package.
    """
    root = Path(bundles_dir)
    names = list(names) if names else bundle_names(root)
    failed = []
    for name in names:
        required, listed = required_distributions(root / name), _listed_in(root / name)
        missing = _unlisted(required, listed)
        print(f"\n{name}\n| package | installed | metadata.json | needed by |\n|---|---|---|---|")
        for dist, files in sorted(required.items()):
            print(f"| {dist} | {_installed_version(dist)} | {listed.get(dist, 'MISSING')} | {', '.join(sorted(files))} |")
        if missing:
            failed.append(name)
            print(f"{name}: configs/metadata.json lacks {sorted(missing)} (add them to optional_packages_version)")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    fire.Fire(main)
