"""Package bundles as Model Zoo-style archives: ``<name>_v<version>.zip`` + ``.sha256`` + ``index.json``.

    python scripts/package_bundles.py dist/                                  # every bundle, no weights
    python scripts/package_bundles.py dist/ --names "[prostate_mri_transfer]" --weights_dir quickstart_outputs

Each archive holds one top-level ``<name>/`` folder, carries the ``shared_transforms``
package the bundle imports (so it runs where this repository is not installed) and, with
``--weights_dir``, the trained weights found in ``<weights_dir>/<name>/models/`` (the bundle
root a training run used). Serve the output folder over HTTP and fetch a bundle with
``python -m monai.bundle download --name <name> --url <base_url>/<name>_v<version>.zip``
or, with the sha256 checked, ``python scripts/download_bundle.py``.
"""

from __future__ import annotations


import fire
from bundle_archive import build_archive, bundle_names, write_index


def main(out_dir: str, names: list[str] | None = None, weights_dir: str | None = None) -> None:
    """Write one archive per bundle and the index.

    Args:
        out_dir: output folder (created).
        names: bundle names (default: every bundle in bundles/).
        weights_dir: folder holding ``<name>/models/model.pt`` (+ auxiliary weights) per bundle;
            without it the archives carry no weights and their README says how to train.
    """
    available = bundle_names()
    names = list(names) if names else available
    unknown = sorted(set(names) - set(available))
    if unknown:
        raise SystemExit(f"unknown bundle(s) {unknown}; available: {available}")
    entries = []
    for name in names:
        entry = build_archive(name, out_dir, weights_dir)
        entries.append(entry)
        weights = f"{len(entry['weights'])} weight file(s)" if entry["weights"] else "no weights"
        print(f"{entry['file']}  {entry['size'] / 1e3:.1f} kB  sha256 {entry['sha256']}  ({weights})", flush=True)
    print(f"index: {write_index(out_dir, entries)}")


if __name__ == "__main__":
    fire.Fire(main)
