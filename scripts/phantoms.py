"""Synthetic "phantom" datasets in the exact layouts of the real datasets.

Each kind writes a small dataset that a bundle can be trained, evaluated and run on without
the real data: same folders, file names, dtypes, label values and NIfTI headers as the
real thing, with images a small network can learn to segment.

    python scripts/phantoms.py prostate OUT_DIR                       # 3 sites x 6 cases, 64x64x16
    python scripts/phantoms.py prostate OUT_DIR --cases_per_site 2 --shape "(48,48,10)" --seed 3
    python scripts/phantoms.py prostate --help

Kinds: ``prostate`` (multi-site prostate T2 MRI: RUNMC / BMC / I2CVB).

Everything is deterministic for a seed: every case draws from its own random generator
seeded by (seed, kind, site, case), so a case does not change when other cases are added.
The shared helpers (seeded generators, shape parsing, smooth noise and bias fields, Rician
noise, NIfTI writing with a proper affine) are meant to be reused by further kinds.
"""

from __future__ import annotations

import ast
import zlib
from collections.abc import Sequence
from pathlib import Path

import fire
import nibabel as nib
import numpy as np

# ----------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------


def rng_for(seed: int, *keys: str | int) -> np.random.Generator:
    """A generator for one (seed, key, key, ...) combination, e.g. ``rng_for(0, "prostate", "BMC", 3)``.

    String keys are hashed with CRC-32 (stable across runs and platforms, unlike ``hash``),
    so a case's content depends only on the seed and its own keys.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    words = [int(seed)] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return np.random.default_rng(words)


def parse_shape(shape: Sequence[int] | str, ndim: int = 3, minimum: Sequence[int] | None = None) -> tuple[int, ...]:
    """``(64, 64, 16)``, ``[64, 64, 16]``, ``"(64,64,16)"``, ``"64,64,16"`` or ``"64x64x16"`` -> ``(64, 64, 16)``.

    Raises ``ValueError`` for the wrong number of dimensions or sizes below ``minimum``.
    """
    value = shape
    if isinstance(value, str):
        text = value.strip().lower().replace("x", ",")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError) as err:
            raise ValueError(f"cannot read a shape from {shape!r}; use e.g. \"(64,64,16)\"") from err
    if isinstance(value, (int, np.integer)):
        value = (value,)
    try:
        dims = tuple(int(v) for v in value)
        if any(float(v) != int(v) for v in value):
            raise ValueError
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot read a shape from {shape!r}; use e.g. \"(64,64,16)\"") from err
    if len(dims) != ndim:
        raise ValueError(f"shape {shape!r} must have {ndim} sizes, got {len(dims)}")
    minimum = tuple(minimum) if minimum is not None else (1,) * ndim
    if any(d < m for d, m in zip(dims, minimum)):
        raise ValueError(f"shape {dims} is too small; each size must be at least {minimum}")
    return dims


def centred_grid(shape: Sequence[int]) -> list[np.ndarray]:
    """Voxel-centre coordinates per axis, -1..1 across the field of view (0 at the centre).

    Broadcastable (sparse) arrays, ``indexing="ij"``: ``grid[0]`` varies along axis 0.
    Geometry written in these units scales with the image size.
    """
    return np.meshgrid(*[(np.arange(n) - (n - 1) / 2.0) / (n / 2.0) for n in shape], indexing="ij", sparse=True)


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma: Sequence[float]) -> np.ndarray:
    """Gaussian-smoothed white noise (std 1, mean 0); ``sigma`` in voxels per axis (0 = no smoothing).

    Smoothed in the Fourier domain (periodic boundaries), so it needs numpy only and is fast.
    """
    shape = tuple(int(s) for s in shape)
    white = rng.standard_normal(shape)
    spectrum = np.fft.rfftn(white)
    kernel = np.ones(spectrum.shape)
    for axis, (n, s) in enumerate(zip(shape, sigma)):
        freqs = np.fft.rfftfreq(n) if axis == len(shape) - 1 else np.fft.fftfreq(n)
        k = np.exp(-2.0 * (np.pi * float(s) * freqs) ** 2)
        kernel = kernel * k.reshape([-1 if a == axis else 1 for a in range(len(shape))])
    out = np.fft.irfftn(spectrum * kernel, s=shape, axes=range(len(shape)))
    out -= out.mean()
    std = out.std()
    return out / std if std > 0 else out


def gaussian_spot(coords: Sequence[np.ndarray], centre: Sequence[float], sigma: Sequence[float]) -> np.ndarray:
    """exp(-sum((c - centre)^2 / (2 sigma^2))) on (broadcastable) coordinates: a smooth bump, 1 at ``centre``."""
    d2 = 0.0
    for c, m, s in zip(coords, centre, sigma):
        d2 = d2 + ((c - m) / s) ** 2
    return np.exp(-0.5 * d2)


def polynomial_field(coords: Sequence[np.ndarray], linear: Sequence[float], quadratic: Sequence[float] = (),
                     cross: float = 0.0) -> np.ndarray:
    """exp(sum(l_i x_i) + sum(q_i x_i^2) + cross * x_0 x_1): a smooth positive multiplicative field."""
    log = 0.0
    for c, a in zip(coords, linear):
        log = log + a * c
    for c, a in zip(coords, quadratic):
        log = log + a * c * c
    if cross and len(coords) > 1:
        log = log + cross * coords[0] * coords[1]
    return np.exp(log)


def rician(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise: Rician, positive, Rayleigh in the background."""
    real = signal + rng.normal(0.0, sigma, signal.shape)
    imag = rng.normal(0.0, sigma, signal.shape)
    return np.hypot(real, imag)


def affine_for(spacing: Sequence[float], orientation: str = "RAS", origin: Sequence[float] | None = None) -> np.ndarray:
    """4x4 voxel-to-world (RAS mm) affine: ``diag(sx, sy, sz)`` ("RAS") or ``diag(-sx, -sy, sz)`` ("LPS").

    ``origin`` is the world position of voxel (0, 0, 0); default: zero.
    """
    orientation = orientation.upper()
    if orientation not in ("RAS", "LPS"):
        raise ValueError(f"orientation must be 'RAS' or 'LPS', got {orientation!r}")
    signs = (1.0, 1.0, 1.0) if orientation == "RAS" else (-1.0, -1.0, 1.0)
    affine = np.eye(4)
    affine[:3, :3] = np.diag([s * float(v) for s, v in zip(signs, spacing)])
    if origin is not None:
        affine[:3, 3] = [float(o) for o in origin]
    return affine


def oblique(affine: np.ndarray, degrees: float) -> np.ndarray:
    """``affine`` with its voxel axes rotated by ``degrees`` about the world z axis (an oblique scan), origin kept."""
    if not degrees:
        return affine
    t = np.deg2rad(degrees)
    rotation = np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])
    out = affine.copy()
    out[:3, :3] = rotation @ affine[:3, :3]
    return out


def to_dtype(array: np.ndarray, dtype: np.dtype | str) -> np.ndarray:
    """Cast like a scanner would store it: round and clip to the range of integer dtypes."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(array), info.min, info.max).astype(dtype)
    return np.asarray(array, dtype=dtype)


def save_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray, dtype: np.dtype | str | None = None) -> Path:
    """Write ``array`` (cast to ``dtype``) as NIfTI-1 with qform and sform both set to ``affine`` (codes 1, mm).

    No intensity scaling (slope 1, intercept 0), so the file holds exactly the stored values.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = to_dtype(array, dtype) if dtype is not None else np.asarray(array)
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units(xyz="mm")
    img.header.set_slope_inter(1.0, 0.0)
    nib.save(img, str(path))
    return path


def ellipse(u: np.ndarray, v: np.ndarray, centre: Sequence[float], axes: Sequence[float]) -> np.ndarray:
    """Boolean mask of the ellipse ((u-cu)/au)^2 + ((v-cv)/av)^2 < 1."""
    return ((u - centre[0]) / axes[0]) ** 2 + ((v - centre[1]) / axes[1]) ** 2 < 1.0


def _summary_line(result: object) -> object:
    """How the CLI prints what a kind returns: its ``summary`` line when it has one."""
    if isinstance(result, dict) and "summary" in result:
        return result["summary"]
    return result


# ----------------------------------------------------------------------------------------
# prostate: multi-site T2 MRI (NCI-ISBI 2013 RUNMC / BMC and I2CVB)
# ----------------------------------------------------------------------------------------

#: per site: folder -> appearance. Spacing is the real in-plane spacing at the real 384-pixel
#: in-plane size; the phantom keeps the field of view, so in-plane spacing is scaled by
#: 384 / size (slice thickness kept). Orientation: the header's axes ("LPS" = diag(-sx, -sy, sz)).
#: Every header is anatomically true: the arrays of the RAS sites are stored flipped in x and y
#: against the LPS site (as two DICOM converters store one scan), so only a pipeline that
#: reorients by the header sees the same anatomy at every site. Case 01 of each site has an
#: oblique header (rotated by ``PROSTATE_OBLIQUE_DEGREES`` about the scanner's z axis).
PROSTATE_SITES = {
    "RUNMC": dict(  # site A: 3T, external phased-array surface coil
        letter="A", spacing=(0.6, 0.6, 3.6), orientation="RAS", origin=(-112.0, -131.0, -35.0),
        dtype="int16", scale=900.0, noise=0.025, bias="surface", zones=True,
    ),
    "BMC": dict(  # site B: 1.5T, endorectal coil
        letter="B", spacing=(0.5, 0.5, 3.0), orientation="LPS", origin=(95.0, 108.0, -27.0),
        dtype="uint16", scale=380.0, noise=0.04, bias="endorectal", zones=True,
    ),
    "I2CVB": dict(  # site C: 3T, no endorectal coil
        letter="C", spacing=(0.7, 0.7, 3.0), orientation="RAS", origin=(-130.0, -150.0, -20.0),
        dtype="float32", scale=150.0, noise=0.03, bias="mild", zones=False,
    ),
}
#: in-plane size of the real multi-site copy, at which ``spacing`` above holds
PROSTATE_REAL_SIZE = 384
#: the oblique case's in-plane rotation of the voxel axes (an oblique acquisition)
PROSTATE_OBLIQUE_DEGREES = 12.0
PROSTATE_OBLIQUE_CASE = 1
#: T2 intensities of the tissues (before the site's scale, bias field and noise)
PROSTATE_TISSUE = dict(body=0.33, fat=0.52, muscle=0.2, rectum_wall=0.3, rectum_lumen=0.05,
                       capsule=0.15, pz=0.86, cg=0.78, bladder=1.1)


def _prostate_bias(kind: str, rng: np.random.Generator, u: np.ndarray, v: np.ndarray, t: np.ndarray,
                   coil: tuple[float, float]) -> np.ndarray:
    """The site's multiplicative receive field on the centred grid (u right-left, v anterior-posterior, t slices)."""
    if kind == "surface":  # phased array: a strong gradient (brighter anterior-left) and brighter periphery
        angle = -0.6 * np.pi + rng.uniform(-0.35, 0.35)
        strength = rng.uniform(0.35, 0.5)
        return polynomial_field((u, v, t), (strength * np.cos(angle), strength * np.sin(angle), rng.uniform(-0.12, 0.12)),
                                (rng.uniform(0.05, 0.15), rng.uniform(0.05, 0.15)))
    if kind == "endorectal":  # a bright spot around the coil in the rectum, posterior to the gland
        spot = gaussian_spot((u, v, t), (coil[0], coil[1] - 0.08, rng.uniform(-0.2, 0.2)),
                             (rng.uniform(0.2, 0.26), rng.uniform(0.16, 0.2), 1.4))
        wide = polynomial_field((u, v), (rng.uniform(-0.1, 0.1), rng.uniform(0.1, 0.25)))
        return (0.75 + rng.uniform(2.0, 3.0) * spot) * wide
    if kind == "mild":  # body coil: a wide, weak field
        a = rng.normal(0.0, 0.12, 5)
        return polynomial_field((u, v, t), a[:3], (a[3], -a[3]), cross=a[4])
    raise ValueError(f"unknown bias field kind {kind!r}")


def _prostate_case(shape: tuple[int, int, int], site: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One phantom T2 volume (float, before casting) and its label (uint8: 0, CG 1, PZ 2 or gland 1)."""
    nx, ny, nz = shape
    u, v, _ = centred_grid(shape)  # u: right-left, v: anterior (-) to posterior (+)
    z = np.arange(nz, dtype=float).reshape(1, 1, -1)
    t = (z - (nz - 1) / 2.0) / (nz / 2.0)
    tissue = PROSTATE_TISSUE
    contrast = rng.uniform(0.95, 1.05)  # per-case T2 contrast

    # gland geometry: semi-axes (left-right, anterior-posterior) in field-of-view units, centre,
    # craniocaudal half-length in slices (spanning most but not all slices)
    au, av = 0.44 * rng.uniform(0.9, 1.1), 0.35 * rng.uniform(0.9, 1.1)
    gu, gv = rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)
    half = max(0.8, 0.4 * nz * rng.uniform(0.92, 1.0))
    slack = max(0.0, (nz - 1) / 2.0 - half - 0.6)  # keep the first and last slices free of gland
    cz = (nz - 1) / 2.0 + rng.uniform(-1.0, 1.0) * min(slack, 0.6)
    w = (z - cz) / half  # -1 apex (inferior) .. +1 base (superior)
    radius = np.sqrt(np.clip(1.0 - w**2, 0.0, None)) * (1.0 + 0.12 * w)  # wider base, tapering apex
    radius = np.where(np.abs(w) < 1.0, radius, 0.0)
    # slight drift of the centre through the slices
    su, sv = gu + rng.uniform(-0.03, 0.03) * w, gv + rng.uniform(-0.03, 0.03) * w
    du, dv = (u - su) / au, (v - sv) / av
    dv = np.where(dv > 0, dv * 1.15, dv)  # flatter posterior surface against the rectum
    theta = np.arctan2(dv, du)
    wobble = 0.0
    for k in (2, 3, 4, 5):  # slightly irregular boundary, changing smoothly through the slices
        wobble = wobble + rng.uniform(0.0, 0.05) * np.cos(k * theta + rng.uniform(0, 2 * np.pi) + rng.uniform(-1, 1) * w)
    rho = np.sqrt(du**2 + dv**2) / np.maximum(radius, 1e-6)
    gland = (rho < 1.0 + wobble) & (radius > 0)
    capsule = (rho < 1.0 + wobble + 0.12 / np.maximum(radius, 0.3)) & (radius > 0) & ~gland
    # central gland: an inner, anterior ellipsoid, larger towards the base, absent at the apex
    frac = 0.6 + 0.1 * w
    cu, cv = du / frac, (dv + 0.3 * radius) / (0.85 * frac)
    cg = gland & (np.sqrt(cu**2 + cv**2) / np.maximum(radius, 1e-6) < 1.0 + 0.5 * wobble) & (w > -0.8)
    pz = gland & ~cg

    # surrounding anatomy (constant through the slices except the bladder)
    body = ellipse(u, v, (0.0, 0.02), (0.9, 0.72))
    fat = body & ~ellipse(u, v, (0.0, 0.02), (0.84, 0.66))
    muscles = ellipse(u, v, (gu - au - 0.2, gv), (0.11, 0.26)) | ellipse(u, v, (gu + au + 0.2, gv), (0.11, 0.26))
    coil = (gu, gv + av / 1.15 + 0.14)
    lumen_r = 0.1 if site["bias"] == "endorectal" else 0.06  # the endorectal coil's balloon distends it
    rectum = ellipse(u, v, coil, (0.14, 0.12))
    lumen = ellipse(u, v, coil, (lumen_r * 1.2, lumen_r))
    bladder_r = 0.36 * np.sqrt(np.clip((w - 0.7) / 0.6, 0.0, 1.0))
    bladder = ((u - gu) / 1.15) ** 2 + (v - gv + 0.08) ** 2 < bladder_r**2

    spatial = np.broadcast_shapes(u.shape, v.shape, z.shape)
    texture = smooth_noise(rng, shape, (1.2 * nx / 64, 1.2 * ny / 64, 0.7))
    coarse = smooth_noise(rng, shape, (3.0 * nx / 64, 3.0 * ny / 64, 1.0))
    img = np.zeros(spatial)
    img = np.where(body, tissue["body"] * (1.0 + 0.08 * coarse), img)
    img = np.where(fat, tissue["fat"] * (1.0 + 0.06 * texture), img)
    img = np.where(muscles & body, tissue["muscle"] * (1.0 + 0.08 * texture), img)
    img = np.where(rectum & body, tissue["rectum_wall"], img)
    img = np.where(lumen & body, tissue["rectum_lumen"], img)
    img = np.where(bladder & body, tissue["bladder"] * (1.0 + 0.03 * texture), img)
    img = np.where(capsule, tissue["capsule"], img)
    img = np.where(pz, tissue["pz"] * contrast * (1.0 + 0.07 * texture), img)
    img = np.where(cg, tissue["cg"] * contrast * (1.0 + 0.08 * texture + 0.04 * coarse), img)  # nodular

    field = _prostate_bias(site["bias"], rng, u, v, t, coil)
    gain = site["scale"] * rng.uniform(0.92, 1.08)  # per-case receiver gain
    img = rician(rng, img * field * gain, site["noise"] * site["scale"])

    label = np.zeros(spatial, np.uint8)
    if site["zones"]:
        label[cg] = 1
        label[pz] = 2
    else:
        label[gland] = 1
    return img, label


def prostate(out_dir: str, cases_per_site: int = 6, shape: Sequence[int] | str = (64, 64, 16), seed: int = 0) -> dict:
    """Write a multi-site prostate T2 MRI phantom in the real layout (NCI-ISBI 2013 + I2CVB copy).

    Layout: OUT_DIR/{RUNMC,BMC,I2CVB}/CaseNN.nii.gz and CaseNN_segmentation.nii.gz, NN = 00, 01, ...
    RUNMC is site A (int16, surface-coil gradient), BMC site B (uint16, endorectal-coil bright
    spot behind the gland, LPS header), I2CVB site C (float32, mild field). RAS sites store the
    arrays flipped in-plane against BMC (every header is true); Case01 of each site is oblique. Labels (uint8):
    0 background, 1 central gland and 2 peripheral zone at RUNMC and BMC, 1 whole gland at
    I2CVB. Each site has its own voxel spacing, intensity scale, noise and bias field. The gland
    spans most slices and tapers towards its ends, so some of its slices have fewer than 200
    pixels (64x64 slices: about 300-700 in the middle).

    Args:
        out_dir: folder to write into (created; existing cases are overwritten).
        cases_per_site: number of cases per site.
        shape: volume size (x, y, slices), e.g. "(64,64,16)" or "64,64,16".
        seed: random seed; the same seed writes identical files.

    Returns:
        A summary: output folder, shape, seed, per-site cases, spacing, orientation and dtype,
        and a one-line ``summary`` (what the command line prints).
    """
    dims = parse_shape(shape, 3, minimum=(16, 16, 3))
    cases_per_site = int(cases_per_site)
    if cases_per_site < 1:
        raise ValueError(f"cases_per_site must be at least 1, got {cases_per_site}")
    out = Path(out_dir).expanduser().resolve()
    sites = {}
    for name, site in PROSTATE_SITES.items():
        spacing = (
            round(site["spacing"][0] * PROSTATE_REAL_SIZE / dims[0], 6),
            round(site["spacing"][1] * PROSTATE_REAL_SIZE / dims[1], 6),
            float(site["spacing"][2]),
        )
        for case in range(cases_per_site):
            rng = rng_for(seed, "prostate", name, case)
            img, label = _prostate_case(dims, site, rng)  # anatomy laid out as an LPS array
            if site["orientation"] == "RAS":  # the same anatomy, stored as an RAS array
                img, label = img[::-1, ::-1], label[::-1, ::-1]
            tilt = PROSTATE_OBLIQUE_DEGREES if case == PROSTATE_OBLIQUE_CASE else 0.0
            affine = oblique(affine_for(spacing, site["orientation"], site["origin"]), tilt)
            stem = out / name / f"Case{case:02d}"
            save_nifti(f"{stem}.nii.gz", img, affine, site["dtype"])
            save_nifti(f"{stem}_segmentation.nii.gz", label, affine, np.uint8)
            areas = np.count_nonzero(label, axis=(0, 1))
            present = np.flatnonzero(areas)
            print(f"{name}/Case{case:02d}: gland {int(areas.sum())} voxels in slices {present.min()}-{present.max()}"
                  f" (max {int(areas.max())} px/slice, {int((areas > 200).sum())} slices > 200 px)", flush=True)
        sites[name] = dict(site=site["letter"], cases=cases_per_site, spacing=spacing,
                           orientation=site["orientation"], dtype=site["dtype"])
    n = cases_per_site * len(sites)
    per_site = ", ".join(f"{name} {info['cases']}" for name, info in sites.items())
    line = f"prostate phantom: {n} cases ({per_site}), shape {dims}, seed {seed} -> {out}"
    return dict(kind="prostate", out_dir=str(out), shape=dims, seed=seed, sites=sites, summary=line)


# ----------------------------------------------------------------------------------------
# liver: LiTS CT (source) and arterial-phase liver MRI (target)
# ----------------------------------------------------------------------------------------


def _liver_anatomy(shape: tuple[int, int, int], rng: np.random.Generator, z_extent: tuple[float, float],
                   n_tumours: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Body, liver and tumour masks on a ``shape`` grid; the liver spans ``z_extent`` (-1..1 units)."""
    u, v, t = centred_grid(shape)
    body = ellipse(u, v, (0.0, 0.0), (0.85, 0.65)) & np.ones(shape, bool)
    cu, cv = rng.uniform(-0.35, -0.25), rng.uniform(-0.1, 0.1)
    au, av = rng.uniform(0.35, 0.45), rng.uniform(0.3, 0.38)
    zc, zh = (z_extent[0] + z_extent[1]) / 2, (z_extent[1] - z_extent[0]) / 2
    taper = np.clip(1.0 - ((t - zc) / zh) ** 2, 0.0, None) ** 0.5
    liver = (((u - cu) / au) ** 2 + ((v - cv) / av) ** 2 < taper ** 2) & body
    tumour = np.zeros(shape, bool)
    coords = np.argwhere(liver)
    for _ in range(n_tumours):
        centre = coords[rng.integers(len(coords))] if len(coords) else np.array(shape) // 2
        radius = rng.uniform(0.06, 0.11) * shape[0]
        zz = np.arange(shape[2]).reshape(1, 1, -1)
        xx, yy = np.arange(shape[0]).reshape(-1, 1, 1), np.arange(shape[1]).reshape(1, -1, 1)
        scale_z = shape[0] / shape[2] * 0.5
        ball = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 + ((zz - centre[2]) * scale_z) ** 2 < radius ** 2
        tumour |= ball & liver
    return body, liver, tumour


def liver_ct(out_dir: str, cases: int = 4, shape: Sequence[int] | str = (64, 64, 40), seed: int = 0) -> dict:
    """Write a LiTS-layout CT phantom: ``Training Batch 1|2/volume-N.nii`` + ``segmentation-N.nii``.

    CT in Hounsfield units (int16): air, soft tissue, a spine, a liver (labels 1) spanning the
    middle of the stack (so slices above and below have no liver) with hypodense tumours (2).

    Args:
        out_dir: dataset root to create.
        cases: number of volumes (the first half in ``Training Batch 1``, the rest in ``Training Batch 2``).
        shape: ``(X, Y, Z)`` of each volume.
        seed: random seed; the same seed gives identical files.
    """
    shape = parse_shape(shape, minimum=(16, 16, 8))
    out = Path(out_dir)
    for n in range(cases):
        rng = rng_for(seed, "liver_ct", n)
        body, liver, tumour = _liver_anatomy(shape, rng, (rng.uniform(-0.5, -0.3), rng.uniform(0.3, 0.5)), int(rng.integers(1, 4)))
        u, v, _ = centred_grid(shape)
        hu = np.full(shape, -1000.0)
        hu[body] = 40.0 + 15.0 * smooth_noise(rng, shape, (3, 3, 1))[body]
        spine = ellipse(u, v, (0.0, 0.45), (0.1, 0.1)) & np.ones(shape, bool)
        hu[spine] = 700.0
        hu[liver] = 60.0 + rng.uniform(-5, 5)
        hu[tumour] = 15.0 + rng.uniform(-5, 5)
        hu += rng.normal(0.0, 12.0, shape)
        label = np.where(tumour, 2, np.where(liver, 1, 0)).astype(np.uint8)
        folder = out / ("Training Batch 1" if n < (cases + 1) // 2 else "Training Batch 2")
        affine = affine_for((0.8 * 512 / shape[0], 0.8 * 512 / shape[1], 2.5), "RAS")
        save_nifti(folder / f"volume-{n}.nii", hu, affine, np.int16)
        save_nifti(folder / f"segmentation-{n}.nii", label, affine, np.uint8)
        print(f"{folder.name}/volume-{n}: liver in {int(liver.any(axis=(0, 1)).sum())}/{shape[2]} slices, "
              f"{int(tumour.sum())} tumour voxels", flush=True)
    summary = f"liver_ct phantom: {cases} volumes, shape {shape}, seed {seed} -> {out}"
    return {"summary": summary, "root": str(out), "cases": cases}


#: one MRI case with an oblique header (voxel axes rotated about the scanner's z axis)
LIVER_OBLIQUE_CASE = 3
LIVER_OBLIQUE_DEGREES = 12.0


def liver_mri(out_dir: str, cases: int = 10, shape: Sequence[int] | str = (64, 52, 24), seed: int = 0) -> dict:
    """Write an arterial-phase liver MRI phantom: ``<case>/artery.nii.gz`` + ``label.nii.gz`` (tumour = 1).

    A contrast unlike CT (liver mid-grey, bright enhancing tumours, smooth coil shading, Rician
    noise). Two cases are broken on purpose, as in the real collection: ``case_001``'s label
    has one slice fewer than its image, and ``case_002`` has no label. The MRI is stored as LPS
    (the CT as RAS) with true headers, so its arrays are flipped in-plane against the CT's;
    ``case_003`` has an oblique header.

    Args:
        out_dir: dataset root to create.
        cases: number of case folders (``case_000`` ...), including the two broken ones.
        shape: ``(X, Y, Z)`` of each volume (the real scans are 320×260×72).
        seed: random seed; the same seed gives identical files.
    """
    shape = parse_shape(shape, minimum=(16, 16, 8))
    if cases < 3:
        raise ValueError("liver_mri needs at least 3 cases (two are deliberately broken)")
    out = Path(out_dir)
    for n in range(cases):
        rng = rng_for(seed, "liver_mri", n)
        body, liver, tumour = _liver_anatomy(shape, rng, (-0.8, 0.8), int(rng.integers(1, 4)))
        coords = centred_grid(shape)
        img = np.where(body, 0.35, 0.0) + 0.05 * smooth_noise(rng, shape, (3, 3, 1)) * body
        img = np.where(liver, 0.5, img)
        img = np.where(tumour, 0.95, img)
        img = img * polynomial_field(coords, (rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), 0.0))
        img = rician(rng, 1000.0 * img, 25.0)
        # the anatomy is laid out as an RAS array (as the CT's): stored as LPS, its header stays true
        img, label = img[::-1, ::-1].copy(), tumour[::-1, ::-1].astype(np.uint8)
        folder = out / f"case_{n:03d}"
        affine = oblique(affine_for((1.25 * 320 / shape[0], 1.25 * 260 / shape[1], 3.0), "LPS"),
                         LIVER_OBLIQUE_DEGREES if n == LIVER_OBLIQUE_CASE else 0.0)
        save_nifti(folder / "artery.nii.gz", img, affine, np.float32)
        if n == 1:  # image/label shape mismatch
            save_nifti(folder / "label.nii.gz", label[..., :-1], affine, np.uint8)
        elif n != 2:  # case_002 has no label
            save_nifti(folder / "label.nii.gz", label, affine, np.uint8)
        print(f"{folder.name}: {int(tumour.sum())} tumour voxels" + {1: " (label shape mismatch)", 2: " (no label)"}.get(n, ""), flush=True)
    summary = f"liver_mri phantom: {cases} cases (2 broken on purpose), shape {shape}, seed {seed} -> {out}"
    return {"summary": summary, "root": str(out), "cases": cases}


# ----------------------------------------------------------------------------------------
# polyp: PraNet layout of colonoscopy frames (RGB .png/.jpg) and binary masks
# ----------------------------------------------------------------------------------------

#: the PraNet test sets and the file formats their public copies use
POLYP_TEST_SETS = {
    "Kvasir": ".jpg", "CVC-ClinicDB": ".png", "CVC-ColonDB": ".png", "ETIS-LaribPolypDB": ".png", "CVC-300": ".png",
}


def _polyp_frame(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One endoscopy-like RGB frame (uint8, H×W×3) and its polyp mask (bool, H×W)."""
    v, u = centred_grid((height, width))
    # mucosa: pink-red, smooth folds, fine vessel-like texture, dark lumen, vignetting
    folds = smooth_noise(rng, (height, width), (height / 8, width / 8))
    texture = smooth_noise(rng, (height, width), (1.0, 1.0))
    vessels = np.abs(smooth_noise(rng, (height, width), (2.0, 2.0))) < 0.12
    lumen = gaussian_spot((v, u), (rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5)), (0.35, 0.35))
    shade = (1.0 - 0.45 * (u**2 + v**2)) * (1.0 - 0.6 * lumen) * (1.0 + 0.12 * folds)
    base = np.array([0.82, 0.42, 0.36]) + rng.uniform(-0.06, 0.06, 3)
    img = base[None, None, :] * shade[..., None] + 0.03 * texture[..., None]
    img[vessels] *= np.array([0.85, 0.6, 0.62])
    # polyps: 1-2 raised blobs of varied size with irregular edges, paler and more yellow, shaded
    mask = np.zeros((height, width), bool)
    for _ in range(int(rng.integers(1, 3))):
        radius = rng.uniform(0.12, 0.45)
        centre = rng.uniform(-0.55, 0.55, 2)
        angle = np.arctan2(v - centre[0], u - centre[1])
        wobble = 1.0 + 0.12 * np.sin(3 * angle + rng.uniform(0, 6.3)) + 0.06 * np.sin(5 * angle + rng.uniform(0, 6.3))
        ecc = rng.uniform(0.7, 1.3)
        r = np.sqrt(((v - centre[0]) * ecc) ** 2 + ((u - centre[1]) / ecc) ** 2) / (radius * wobble)
        blob = r < 1.0
        mask |= blob
        dome = np.clip(1.0 - r**2, 0.0, 1.0)
        tint = np.array([0.95, 0.62, 0.45]) + rng.uniform(-0.05, 0.05, 3)
        img = np.where(blob[..., None], tint[None, None, :] * (0.8 + 0.3 * dome[..., None]) + 0.02 * texture[..., None], img)
    # specular highlights: small saturated white spots, on polyps and mucosa alike
    for _ in range(int(rng.integers(3, 8))):
        spot = gaussian_spot((v, u), rng.uniform(-0.8, 0.8, 2), (rng.uniform(0.01, 0.04),) * 2)
        img = img + 1.5 * spot[..., None]
    img = img + rng.normal(0.0, 0.015, img.shape)
    return (np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8), mask


def polyp(out_dir: str, train: int = 12, per_test_set: int = 2, size: int = 64, seed: int = 0, broken: bool = True) -> dict:
    """Write a polyp phantom in the PraNet layout (Kvasir-SEG + CVC-ClinicDB training, five test sets).

    ``TrainDataset/{images,masks}`` and ``TestDataset/<set>/{images,masks}`` with RGB
    endoscopy-like frames (textured pink mucosa, dark lumen, specular highlights, 1-2 polyps
    of varied size) and binary masks (0/255). Sizes vary per image between ``size`` and about
    1.5·``size``; Kvasir and a third of the training images are .jpg, the rest .png; one
    CVC-ClinicDB mask is a .tif. With ``broken`` the training folder also holds an image
    without a mask and a truncated mask, which the bundle reports and skips.

    Args:
        out_dir: dataset root to create.
        train: number of (usable) training pairs.
        per_test_set: pairs per test set.
        size: smallest image side in pixels.
        seed: random seed; the same seed gives identical files.
        broken: add the two deliberately unusable training files.
    """
    from PIL import Image

    if size < 32:
        raise ValueError("size must be at least 32")
    out = Path(out_dir)

    def write(folder: Path, stem: str, suffix: str, mask_suffix: str, rng: np.random.Generator) -> int:
        h, w = (int(size * rng.uniform(1.0, 1.5)) for _ in range(2))
        img, mask = _polyp_frame(rng, h, w)
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / "images" / f"{stem}{suffix}", **({"quality": 92} if suffix == ".jpg" else {}))
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / f"{stem}{mask_suffix}")
        return int(mask.sum())

    for n in range(train):
        rng = rng_for(seed, "polyp", "train", n)
        write(out / "TrainDataset", f"{n + 1}", ".jpg" if n % 3 == 0 else ".png", ".png", rng)
    for name, suffix in POLYP_TEST_SETS.items():
        for n in range(per_test_set):
            rng = rng_for(seed, "polyp", name, n)
            mask_suffix = ".tif" if (name == "CVC-ClinicDB" and n == 0) else ".png"
            write(out / "TestDataset" / name, f"{n + 1}", suffix, mask_suffix, rng)
    if broken:
        rng = rng_for(seed, "polyp", "broken")
        img, _ = _polyp_frame(rng, size, size)
        Image.fromarray(img).save(out / "TrainDataset" / "images" / "unmatched.png")  # no mask
        write(out / "TrainDataset", "truncated", ".png", ".png", rng)
        mask_file = out / "TrainDataset" / "masks" / "truncated.png"
        mask_file.write_bytes(mask_file.read_bytes()[: 40])  # unreadable
    summary = (f"polyp phantom: {train} training pairs, {per_test_set} per test set x {len(POLYP_TEST_SETS)}"
               f"{' (+2 broken training files)' if broken else ''}, sizes {size}-{int(1.5 * size)} px, seed {seed} -> {out}")
    return {"summary": summary, "root": str(out), "train": train, "test_sets": list(POLYP_TEST_SETS)}


# ----------------------------------------------------------------------------------------
# cardiac: M&Ms-2 layout (SA stacks, single-slice LA, ED/ES, LV / MYO / RV)
# ----------------------------------------------------------------------------------------

#: vendor -> appearance. Two labelled "vendors" differ in contrast and spacing; the third is
#: folder (inside the cardiac phantom root) of the unlabelled subjects' reference labels
HIDDEN_LABELS = "hidden_labels"
#: the unlabelled out-of-distribution group (inverted contrast, or heavy noise).
CARDIAC_VENDORS = {
    "SIEMENS": dict(scanner="Avanto", field="1.5", spacing=1.25, blood=1.0, myo=0.30, tissue=0.45, noise=0.04),
    "PHILIPS": dict(scanner="Achieva", field="3.0", spacing=1.5, blood=0.8, myo=0.20, tissue=0.55, noise=0.06),
    "GE": dict(scanner="Signa", field="1.5", spacing=1.4, blood=1.0, myo=0.30, tissue=0.45, noise=0.04),
}


def _cardiac_slice(u: np.ndarray, v: np.ndarray, rng: np.random.Generator, scale: float, lv_r: float, myo_t: float,
                   long_axis: bool) -> np.ndarray:
    """Label of one slice on (u, v) in mm: 1 LV blood pool, 2 myocardium ring, 3 RV crescent."""
    cu, cv = rng.uniform(-4, 4), rng.uniform(-4, 4)
    stretch = 1.9 if long_axis else 1.0  # the long axis shows an elongated ventricle
    lv = ellipse(u, v, (cu, cv), (lv_r * scale, lv_r * scale * stretch))
    wall = ellipse(u, v, (cu, cv), ((lv_r + myo_t) * scale, (lv_r + myo_t) * scale * stretch))
    rv_c = (cu - (lv_r + myo_t + 0.3 * lv_r) * scale, cv)
    rv = ellipse(u, v, rv_c, (1.15 * lv_r * scale, 1.45 * lv_r * scale * stretch)) & ~ellipse(
        u, v, (cu, cv), ((lv_r + myo_t + 2.0) * scale, (lv_r + myo_t + 2.0) * scale * stretch))
    label = np.zeros(np.broadcast(u, v).shape, np.uint8)
    label[rv] = 3
    label[wall] = 2
    label[lv] = 1
    return label


def cardiac(out_dir: str, subjects: int = 8, ood_subjects: int = 3, sa_shape: Sequence[int] | str = (64, 64, 6),
            seed: int = 0, ood_mode: str = "invert", flat_copy: bool = False) -> dict:
    """Write an M&Ms-2-layout cardiac MRI phantom: ``NNN/NNN_{SA,LA}_{ED,ES}.nii.gz`` (+ ``_gt``) and
    ``dataset_information.csv`` (SUBJECT_CODE, DISEASE, VENDOR, SCANNER, FIELD).

    SA: a stack of ``sa_shape[2]`` slices (the ventricles shrink towards the apex); LA: one slice
    (elongated ventricles). Labels 1 LV blood pool, 2 myocardium ring, 3 RV crescent; ES smaller
    than ED. Labelled subjects alternate between two vendors with different contrast and
    spacing (SIEMENS 1.25 mm, PHILIPS 1.5 mm); the last ``ood_subjects`` are unlabelled (no
    ``_gt``) from a third vendor (GE), out of distribution: ``ood_mode`` "invert" (dark blood,
    bright myocardium) or "noise" (heavy noise). Their reference labels are kept out of the
    layout's reach as ``hidden_labels/NNN_{SA,LA}_{ED,ES}_gt_hidden.nii.gz`` (for scoring the
    refinement set only; no reader treats them as training labels).

    Args:
        out_dir: dataset root to create.
        subjects: labelled subjects (001 ...).
        ood_subjects: unlabelled out-of-distribution subjects after them.
        sa_shape: ``(X, Y, Z)`` of the SA stacks; LA images are ``(X, Y, 1)``.
        seed: random seed; the same seed gives identical files.
        ood_mode: "invert" or "noise".
        flat_copy: also write the flattened ``data/NNN_...`` copy of every file.
    """
    shape = parse_shape(sa_shape, minimum=(32, 32, 1))
    if ood_mode not in ("invert", "noise"):
        raise ValueError(f"ood_mode must be 'invert' or 'noise', got {ood_mode!r}")
    out = Path(out_dir)
    rows = []
    for n in range(1, subjects + ood_subjects + 1):
        ood = n > subjects
        vendor = "GE" if ood else ("SIEMENS" if n % 2 else "PHILIPS")
        look = CARDIAC_VENDORS[vendor]
        code = f"{n:03d}"
        rng = rng_for(seed, "cardiac", n)
        rows.append({"SUBJECT_CODE": n, "DISEASE": ["NOR", "DLV", "HCM", "ARR"][n % 4], "VENDOR": vendor,
                     "SCANNER": look["scanner"], "FIELD": look["field"]})
        sp = look["spacing"] * 64.0 / shape[0]  # field of view kept when the phantom is smaller or larger
        lv_r = rng.uniform(9.0, 12.0)
        for view in ("SA", "LA"):
            vshape = shape if view == "SA" else (shape[0], shape[1], 1)
            u = ((np.arange(vshape[0]) - (vshape[0] - 1) / 2.0) * sp)[:, None]
            v = ((np.arange(vshape[1]) - (vshape[1] - 1) / 2.0) * sp)[None, :]
            body = ellipse(u, v, (0.0, 0.0), (0.42 * vshape[0] * sp, 0.38 * vshape[1] * sp))
            for phase, scale in (("ED", 1.0), ("ES", 0.78)):
                label = np.zeros(vshape, np.uint8)
                for z in range(vshape[2]):
                    taper = 1.0 - 0.5 * z / max(vshape[2], 2) if view == "SA" else 1.0
                    label[..., z] = _cardiac_slice(u, v, rng, scale * taper, lv_r, rng.uniform(3.5, 5.0) / scale, view == "LA")
                tissue = look["tissue"] * (1 + 0.15 * smooth_noise(rng, vshape, (4, 4, 0)))
                img = np.where(body[..., None], tissue, 0.02)
                img = np.where(label == 2, look["myo"], img)
                img = np.where((label == 1) | (label == 3), look["blood"], img)
                noise = look["noise"]
                if ood and ood_mode == "invert":
                    img = np.where(body[..., None], 1.2 - img, img)
                elif ood:
                    noise = 0.35
                img = rician(rng, 800.0 * img, 800.0 * noise)
                affine = affine_for((sp, sp, 10.0 if view == "SA" else 8.0))
                names = {"": img.astype(np.float32)} if ood else {"": img.astype(np.float32), "_gt": label}
                if ood:
                    save_nifti(out / HIDDEN_LABELS / f"{code}_{view}_{phase}_gt_hidden.nii.gz", label, affine, np.uint8)
                for suffix, data in names.items():
                    name = f"{code}_{view}_{phase}{suffix}.nii.gz"
                    dtype = np.uint8 if suffix else np.float32
                    save_nifti(out / code / name, data, affine, dtype)
                    if flat_copy:
                        save_nifti(out / "data" / name, data, affine, dtype)
        print(f"{code}: {vendor}{' (unlabelled, out of distribution: ' + ood_mode + ')' if ood else ''}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "dataset_information.csv", "w", newline="") as f:
        import csv

        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = (f"cardiac phantom: {subjects} labelled + {ood_subjects} unlabelled OoD ({ood_mode}) subjects, "
               f"SA {shape}, seed {seed} -> {out}")
    return {"summary": summary, "root": str(out), "subjects": subjects, "ood_subjects": ood_subjects}


def bad_inputs(out_dir: str, source: str, kind: str = "volume") -> dict:
    """Write an inference corpus of 2 good inputs and malformed copies of ``source``, all in one folder.

    ``kind="volume"`` (``source``: one 3D NIfTI): ``good.nii.gz``, ``bön case 2.nii.gz`` (good,
    non-ASCII name with spaces), and ``truncated``, ``zero_size``, ``not_an_image`` (text),
    ``nan_voxels``, ``constant``, ``four_d`` (2 frames), ``single_slice`` (H, W, 1), ``tiny_8x8``,
    ``zero_spacing`` (pixdim 0, no qform/sform), ``singular_affine`` (a zero column) and
    ``sheared`` (non-orthogonal affine). ``kind="rgb"`` (``source``: one RGB PNG/JPEG):
    ``good.png``, ``bön frame 2.jpg`` and ``rgba``, ``grey16`` (16-bit), ``grey8``, ``palette``,
    ``constant``, ``truncated.jpg``, ``zero_size``, ``not_an_image`` (text), ``tiny_4x4``.

    Returns ``{"expected": {file name: "ok" | "fixed" | "skipped"}}`` and writes it to ``expected.json``
    beside the folder: "fixed" inputs get a mask and a warning, "skipped" ones only a reason.
    """
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = b"patient notes, not an image\n" * 8
    expected: dict[str, str] = {}
    if kind == "volume":
        import nibabel as nib

        img = nib.load(source)
        data = np.asanyarray(img.dataobj).astype(np.float32)
        if data.ndim != 3:
            raise ValueError(f"{source}: a 3D volume is needed to derive the corpus, got shape {data.shape}")
        aff = img.affine

        def put(name: str, array: np.ndarray, affine: np.ndarray, status: str) -> None:
            save_nifti(out / name, array, affine, np.float32)
            expected[name] = status

        put("good.nii.gz", data, aff, "ok")
        put("bön case 2.nii.gz", data[::-1].copy(), aff, "ok")
        raw = (out / "good.nii.gz").read_bytes()
        (out / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
        (out / "zero_size.nii.gz").write_bytes(b"")
        (out / "not_an_image.nii.gz").write_bytes(text)
        expected.update({"truncated.nii.gz": "skipped", "zero_size.nii.gz": "skipped", "not_an_image.nii.gz": "skipped"})
        nan = data.copy()
        nan[: data.shape[0] // 4, : data.shape[1] // 4] = np.nan
        put("nan_voxels.nii.gz", nan, aff, "fixed")
        put("constant.nii.gz", np.full_like(data, 100.0), aff, "fixed")
        put("four_d.nii.gz", np.stack([data, data], axis=-1), aff, "skipped")
        put("single_slice.nii.gz", data[..., data.shape[2] // 2: data.shape[2] // 2 + 1], aff, "ok")
        put("tiny_8x8.nii.gz", data[:8, :8], aff, "skipped")
        flat = nib.Nifti1Image(data, None)  # no qform/sform: the affine comes from pixdim, here 0
        flat.header.set_zooms((0.0, 0.0, 0.0))
        nib.save(flat, str(out / "zero_spacing.nii.gz"))
        expected["zero_spacing.nii.gz"] = "skipped"
        singular = aff.copy()
        singular[:3, 2] = 0.0
        broken = nib.Nifti1Image(data, None)  # an sform that maps every slice to the same place; no qform
        broken.set_sform(singular, code=1)
        broken.set_qform(None, code=0)
        nib.save(broken, str(out / "singular_affine.nii.gz"))
        expected["singular_affine.nii.gz"] = "skipped"
        sheared = aff.copy()
        sheared[:3, 1] += 0.3 * aff[:3, 0]
        put("sheared.nii.gz", data, sheared, "fixed")
    elif kind == "rgb":
        from PIL import Image

        with Image.open(source) as im:
            rgb = im.convert("RGB")
        w, h = rgb.size
        rgb.save(out / "good.png")
        rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(out / "bön frame 2.jpg", quality=95)
        expected.update({"good.png": "ok", "bön frame 2.jpg": "ok"})
        rgba = rgb.copy()
        rgba.putalpha(200)
        rgba.save(out / "rgba.png")
        grey = np.asarray(rgb.convert("L"), dtype=np.uint16)
        Image.fromarray(grey * 257).save(out / "grey16.png")  # 16-bit grey (mode I;16)
        rgb.convert("L").save(out / "grey8.png")
        rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(out / "palette.png")
        Image.new("RGB", (w, h), (90, 60, 50)).save(out / "constant.png")
        expected.update({n: "fixed" for n in ("rgba.png", "grey16.png", "grey8.png", "palette.png", "constant.png")})
        rgb.save(out / "whole.jpg", quality=95)
        raw = (out / "whole.jpg").read_bytes()
        (out / "whole.jpg").unlink()
        (out / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
        (out / "zero_size.png").write_bytes(b"")
        (out / "not_an_image.png").write_bytes(text)
        rgb.resize((4, 4)).save(out / "tiny_4x4.png")
        expected.update({n: "skipped" for n in ("truncated.jpg", "zero_size.png", "not_an_image.png", "tiny_4x4.png")})
    else:
        raise ValueError(f"kind must be 'volume' or 'rgb', got {kind!r}")
    (out.parent / f"{out.name}_expected.json").write_text(json.dumps(expected, indent=4, ensure_ascii=False))
    counts = {k: sum(v == k for v in expected.values()) for k in ("ok", "fixed", "skipped")}
    return {"summary": f"bad-input corpus ({kind}): {counts} -> {out}", "expected": expected}


if __name__ == "__main__":
    fire.Fire({"prostate": prostate, "liver_ct": liver_ct, "liver_mri": liver_mri, "polyp": polyp, "cardiac": cardiac,
               "bad_inputs": bad_inputs}, serialize=_summary_line)
