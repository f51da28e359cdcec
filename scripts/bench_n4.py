"""N4 bias-field correction: settings chosen by measurement, and cost against plain SimpleITK N4.

Two commands (``python scripts/bench_n4.py settings --help``, ``... real --help``):

``settings``
    Prostate phantoms (3 sites x ``cases_per_site`` cases per seed, written in the real layout
    and read back with ``LoadImage``), and the real NCI-ISBI volumes in ``../shared/data/prostate``
    where present. For each setting: the between-case spread of the gland median per site
    (max/min over the site's cases; N4 must not make volumes less comparable, lower is
    better), the within-zone coefficient of variation (flatness; lower is better) and seconds
    per volume. Prints a Markdown table and writes ``n4_settings.csv``/``.md`` into ``--out``.

``real``
    The real bias-field volume ``../shared/data/n4/register_T2w.nii.gz`` (skipped with a
    message where absent). Quality: the default's corrected intensities against
    full-resolution N4 (shrink 1, same settings), each divided by its median inside the head,
    mean and 99th-percentile relative difference inside the head. Speed: the default transform
    against plain SimpleITK N4 at shrink 4 with 4x50 iterations (Otsu mask of the shrunk
    image, field evaluated at full resolution and divided out), run alternately, medians over
    ``repeat`` runs.

Usage::

    python scripts/bench_n4.py settings --out /tmp/n4 [--seeds "(0,1)"] [--shape "(96,96,16)"]
    python scripts/bench_n4.py real [--repeat 3]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import fire
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from phantoms import prostate  # noqa: E402
from tables import write_csv  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_PROSTATE = SHARED / "prostate" / "RUNMC"
REAL_N4 = SHARED / "n4" / "register_T2w.nii.gz"

#: name -> N4BiasFieldCorrection options (None: no correction)
SETTINGS = {
    "before N4": None,
    "Otsu mask, 4 levels": dict(mask="otsu", num_iterations=(50, 50, 50, 50)),
    "body mask, 1 level": dict(mask="body", num_iterations=(50,)),
    "body mask, 2 levels": dict(mask="body", num_iterations=(50, 50)),
    "body mask, 3 levels": dict(mask="body", num_iterations=(50, 50, 50)),
    "body mask, 4 levels": dict(mask="body", num_iterations=(50, 50, 50, 50)),
    "default (body mask, 2 levels x 40)": {},
}


def _load(image_file: Path, label_file: Path):
    from monai.transforms import LoadImage

    loader = LoadImage(image_only=True, ensure_channel_first=True)
    return loader(str(image_file)).float(), np.asarray(loader(str(label_file))[0]).astype(int)


def _zone_cv(image: np.ndarray, label: np.ndarray) -> float:
    """Mean over the labelled zones (1, 2: CG, PZ; or 1: gland) of std/mean inside the zone."""
    cvs = [float(image[label == z].std() / image[label == z].mean()) for z in np.unique(label) if z > 0]
    return float(np.mean(cvs))


def measure(groups: dict[str, list[tuple]], options: dict | None) -> dict:
    """Per group (a site's cases: one training set): gland-median spread (max/min), mean within-zone CV, seconds."""
    from shared_transforms import N4BiasFieldCorrection

    n4 = N4BiasFieldCorrection(**options) if options is not None else None
    result = {}
    for site, cases in groups.items():
        medians, cvs, seconds = [], [], []
        for image, label in cases:
            start = time.perf_counter()
            out = np.asarray(n4(image)[0]) if n4 is not None else np.asarray(image[0])
            seconds.append(time.perf_counter() - start)
            medians.append(float(np.median(out[label > 0])))
            cvs.append(_zone_cv(out, label))
        result[site] = {"spread": max(medians) / min(medians), "zone_cv": float(np.mean(cvs)),
                        "seconds": float(np.mean(seconds)) if n4 is not None else 0.0}
    return result


def settings(out: str | None = None, seeds: tuple = (0, 1), cases_per_site: int = 6, shape: tuple = (96, 96, 16)) -> list[dict]:
    """Measure every entry of ``SETTINGS`` on phantoms (and the real prostate cases where present).

    Args:
        out: folder for ``n4_settings.csv`` and ``n4_settings.md`` (nothing written when omitted).
        seeds: phantom seeds; each gives 3 sites x ``cases_per_site`` cases.
        cases_per_site: phantom cases per site (the spread is taken per site, as a site is one training set).
        shape: phantom volume size (x, y, slices).
    """
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        datasets = {}
        for seed in seeds:
            folder = Path(tmp) / f"seed{seed}"
            prostate(str(folder), cases_per_site=cases_per_site, shape=tuple(shape), seed=int(seed))
            datasets[f"phantoms seed {seed}"] = {
                site.name: [_load(f, f.with_name(f.name.replace(".nii.gz", "_segmentation.nii.gz")))
                            for f in sorted(site.glob("Case??.nii.gz"))]
                for site in sorted(folder.iterdir())
            }
        if REAL_PROSTATE.is_dir():
            datasets["real RUNMC (3 cases)"] = {"RUNMC": [_load(f, f.with_name(f.name.replace(".nii.gz", "_Segmentation.nii.gz")))
                                                          for f in sorted(REAL_PROSTATE.glob("Case??.nii.gz"))]}
        else:
            print(f"[settings] {REAL_PROSTATE} absent: phantoms only", flush=True)
        for data_name, groups in datasets.items():
            before = None
            for name, options in SETTINGS.items():
                per_site = measure(groups, options)
                before = before or per_site
                for site, m in per_site.items():
                    r = {"data": data_name, "site": site, "setting": name, **m,
                         "spread_ratio": m["spread"] / before[site]["spread"]}
                    rows.append(r)
                    print(f"[settings] {data_name:22s} {site:6s} {name:22s} spread {r['spread']:.3f} "
                          f"(x{r['spread_ratio']:.3f} of before N4)  zone CV {100 * r['zone_cv']:.2f} %  "
                          f"{r['seconds']:.2f} s/volume", flush=True)
    lines = ["| data | site | setting | gland-median spread (max/min) | ÷ before N4 | within-zone CV | s/volume |",
             "|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['data']} | {r['site']} | {r['setting']} | {r['spread']:.3f} | {r['spread_ratio']:.3f} | "
              f"{100 * r['zone_cv']:.2f} % | {r['seconds']:.2f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if out:
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_csv(rows, out_dir / "n4_settings.csv")
        (out_dir / "n4_settings.md").write_text(table + "\n")
    return rows


def _plain_sitk_n4(path: Path):
    """SimpleITK's own recipe: shrink 4 in-plane, Otsu mask of the shrunk image, 4x50 iterations."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    small = sitk.Shrink(image, [4, 4] + [1] * (image.GetDimension() - 2))
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([50] * 4)
    corrector.Execute(small, sitk.OtsuThreshold(small, 0, 1, 200))
    return image / sitk.Exp(corrector.GetLogBiasFieldAsImage(image))


def real(repeat: int = 3, path: str = str(REAL_N4)) -> dict | None:
    """Quality against full-resolution N4 and cost against plain SimpleITK N4 on a real T2 volume.

    Args:
        repeat: timed runs of each (alternating); medians are reported.
        path: the volume (default ``../shared/data/n4/register_T2w.nii.gz``).
    """
    from monai.transforms import LoadImage
    from shared_transforms import N4BiasFieldCorrection
    from shared_transforms.n4 import body_mask

    if not Path(path).is_file():
        print(f"[real] {path} is absent: nothing measured (see ../shared/data/n4/README.md)")
        return None
    image = LoadImage(image_only=True, ensure_channel_first=True)(path).float()
    default = N4BiasFieldCorrection()

    def run_default():
        return default(LoadImage(image_only=True, ensure_channel_first=True)(path).float())

    ours, plain = [], []
    for _ in range(int(repeat)):
        start = time.perf_counter()
        out = run_default()
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        _plain_sitk_n4(Path(path))
        plain.append(time.perf_counter() - start)
    start = time.perf_counter()
    full = N4BiasFieldCorrection(shrink_factor=1)(image)
    full_s = time.perf_counter() - start

    head = body_mask(np.asarray(image[0])) & (np.asarray(image[0]) > 0)  # zero voxels are not corrected
    a, b = np.asarray(out[0])[head], np.asarray(full[0])[head]
    a, b = a / np.median(a), b / np.median(b)
    rel = np.abs(a - b) / np.abs(b)
    t_ours, t_plain = float(np.median(ours)), float(np.median(plain))
    r = {"shape": tuple(image.shape[1:]), "default_s": t_ours, "plain_sitk_s": t_plain, "ratio": t_ours / t_plain,
         "full_resolution_s": full_s, "mean_rel_diff": float(rel.mean()), "p99_rel_diff": float(np.percentile(rel, 99)),
         "brightness_ratio": float(np.median(np.asarray(out[0])[head]) / np.median(np.asarray(image[0])[head]))}
    print(f"[real] {Path(path).name} {r['shape']}: default {t_ours:.2f} s, plain SimpleITK N4 (shrink 4, 4x50) "
          f"{t_plain:.2f} s -> ratio {r['ratio']:.3f} (medians of {repeat}); full resolution {full_s:.1f} s")
    print(f"[real] default vs full resolution inside the head (each / its median): mean {100 * r['mean_rel_diff']:.2f} %, "
          f"p99 {100 * r['p99_rel_diff']:.2f} %; head median after/before N4 {r['brightness_ratio']:.3f}")
    return r


if __name__ == "__main__":
    fire.Fire({"settings": settings, "real": real}, serialize=lambda r: None)
