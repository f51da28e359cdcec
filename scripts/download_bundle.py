"""Download a bundle archive, check its sha256 and extract it safely into a bundle folder.

    python scripts/download_bundle.py prostate_mri_transfer --index http://HOST:PORT/index.json --bundle_dir bundles_dl
    python scripts/download_bundle.py prostate_mri_transfer --url URL --sha256 HEX --bundle_dir bundles_dl

Unlike a plain ``python -m monai.bundle download --url``, this refuses an archive whose
sha256 differs from the index's (or ``--sha256``), and an archive with members that would
extract outside ``bundle_dir`` (absolute paths, ``..``, links).
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import fire
from bundle_archive import download


def main(name: str, bundle_dir: str, index: str | None = None, url: str | None = None, sha256: str | None = None) -> str:
    """Fetch bundle ``name`` into ``bundle_dir/<name>``; prints that folder.

    Args:
        name: bundle name.
        bundle_dir: folder to extract into.
        index: URL (or file path) of the ``index.json`` written by package_bundles.py; its
            folder is the base URL of the archives.
        url: archive URL (instead of ``index``; needs ``sha256``).
        sha256: expected sha256 of the archive (instead of ``index``).
    """
    if isinstance(sha256, int):  # fire reads an all-digit hash as a number
        sha256 = str(sha256).zfill(64)
    if index:
        index_url = index if "://" in index else Path(index).resolve().as_uri()
        with urllib.request.urlopen(index_url) as response:
            entries = {e["name"]: e for e in json.load(response)["bundles"]}
        if name not in entries:
            raise SystemExit(f"{index}: no bundle {name!r}; listed: {sorted(entries)}")
        base_url = index_url.rsplit("/", 1)[0]
        url, sha256 = entries[name]["url"].format(base_url=base_url), entries[name]["sha256"]
    if not url or not sha256:
        raise SystemExit("give --index, or both --url and --sha256")
    return str(download(url, sha256, bundle_dir))


if __name__ == "__main__":
    fire.Fire(main)
