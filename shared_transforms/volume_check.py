"""Cheap checks of one NIfTI volume (header, size of the stored data) before any network work.

:class:`VolumeCheck` raises :class:`~shared_transforms.inputs.InputError` (``"<file>: <reason>"``)
or returns warnings about problems the pipeline fixes.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .inputs import MIN_INPUT_SIZE, FileCheck, InputError, _size_problem, root_cause

__all__ = ["VolumeCheck"]


def _gzip_problem(path: Path, expected: int) -> str | None:
    """Why a .gz file does not hold ``expected`` uncompressed bytes; ``None`` when it does.

    The gzip trailer stores the uncompressed size (mod 2**32): when it matches, the file is whole
    (read in microseconds). Only otherwise is the stream decompressed, to name the problem.
    """
    if path.stat().st_size < 18:  # a gzip member's header and trailer alone take 18 bytes
        return f"truncated gzip: {path.stat().st_size} bytes"
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        stored = struct.unpack("<I", f.read(4))[0]
    if stored == expected % 2**32:
        return None
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 16):
                total += len(chunk)
    except EOFError:
        return f"truncated gzip: the compressed stream ends after {total} of {expected} bytes"
    except (OSError, zlib.error) as e:
        return f"corrupt gzip: {e}"
    if total < expected:
        return f"truncated data: {total} of {expected} bytes"
    return None


class VolumeCheck(FileCheck):
    """Check one NIfTI file (``.nii`` / ``.nii.gz``) from its header and the size of its data.

    Raises :class:`InputError` for: a missing or empty file, a file that is not NIfTI (or not gzip
    although named ``.gz``), truncated data, more than one volume (4D/5D with more than one
    frame), a 2D image, a singular affine, an in-plane size below ``min_size``, zero or non-finite
    voxel spacing (pixdim, when there is no sform). Other formats (NRRD, MHA...) pass to the reader. Returns warnings for a non-orthogonal (sheared) affine, which is processed
    in voxel order (the mask keeps the input's header). Voxel values (NaN, constant images) are
    checked after loading, by :class:`CheckIntensityd`.

    Args:
        what: what the bundle expects, for the messages: ``"3D T2 volume"``.
        min_size: smallest in-plane size.
        axcodes: the bundle's reorientation (``"RAS"``): the in-plane axes are the first two after it.
    """

    def __init__(self, what: str = "3D volume", min_size: int = MIN_INPUT_SIZE, axcodes: str | None = None) -> None:
        self.what, self.min_size, self.axcodes = what, int(min_size), axcodes

    def _in_plane(self, shape: Sequence[int], affine: np.ndarray) -> tuple[int, int]:
        """The sizes of the two axes the bundle slices across: the first two after reorienting to ``axcodes``
        (the bundle's ``Orientationd``), or the first two as stored when it does not reorient."""
        if not self.axcodes:
            return int(shape[0]), int(shape[1])
        import nibabel as nib

        to_target = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                                    nib.orientations.axcodes2ornt(tuple(self.axcodes)))
        reoriented = [0, 0, 0]
        for axis, (target, _) in enumerate(to_target):
            reoriented[int(target)] = int(shape[axis])
        return reoriented[0], reoriented[1]

    def check(self, path: Path) -> list[str]:
        import nibabel as nib

        path = Path(path)
        if problem := _size_problem(path):
            raise InputError(path, problem)
        name = path.name.lower()
        if not name.endswith((".nii", ".nii.gz")):
            return []  # another format (NRRD, MHA, DICOM...): the reader checks it, LoadCheckedImaged names the file
        if name.endswith(".gz"):
            with open(path, "rb") as f:
                if f.read(2) != b"\x1f\x8b":
                    raise InputError(path, "not an image file (no gzip stream although named .nii.gz)")
        try:  # the header as stored: nibabel's loader silently sets a zero pixdim to 1
            with (gzip.open(path, "rb") if name.endswith(".gz") else open(path, "rb")) as f:
                raw = nib.Nifti1Header.from_fileobj(f, check=False)
                # with an sform the spacing comes from it (as MONAI reads it); otherwise from pixdim
                stored_zooms = ([float(z) for z in raw["pixdim"][1:4]]
                                if int(raw["sizeof_hdr"]) == 348 and int(raw["sform_code"]) <= 0 else None)
        except Exception:
            stored_zooms = None  # NIfTI-2 or unreadable: nib.load below says which
        if stored_zooms is not None and not all(np.isfinite(z) and z > 0 for z in stored_zooms):
            raise InputError(path, f"zero or missing voxel spacing (pixdim {tuple(stored_zooms)})")
        try:
            img = nib.load(str(path))
            header = img.header
            shape = tuple(int(s) for s in img.shape)
            itemsize = np.dtype(header.get_data_dtype()).itemsize
            offset = int(getattr(img.dataobj, "offset", header["vox_offset"]))  # nibabel reports a stored 0 as 352
            affine = np.asarray(img.affine, dtype=float)
        except Exception as e:  # nibabel raises ImageFileError, HeaderDataError, EOFError, ...
            if name.endswith(".gz") and (problem := _gzip_problem(path, -1)):  # cut inside the header
                raise InputError(path, problem) from e
            raise InputError(path, f"not an image file (no valid NIfTI header: {type(root_cause(e)).__name__}: {root_cause(e)})") from e
        expected = offset + int(np.prod(shape)) * itemsize
        problem = _gzip_problem(path, expected) if name.endswith(".gz") else (
            f"truncated file: {path.stat().st_size} of {expected} bytes" if path.stat().st_size < expected else None)
        if problem:
            raise InputError(path, problem)
        if len(shape) > 3 and int(np.prod(shape[3:])) > 1:
            raise InputError(path, f"{len(shape)}D volume {shape}: expected one {self.what}")
        if len(shape) < 3:
            raise InputError(path, f"{len(shape)}D image {shape}: expected one {self.what} (a single slice is stored as (H, W, 1))")
        linear = affine[:3, :3]
        if not np.all(np.isfinite(linear)) or abs(np.linalg.det(linear)) < 1e-6 * np.prod(np.linalg.norm(linear, axis=0) + 1e-12):
            raise InputError(path, "singular affine (determinant 0): voxel positions cannot be mapped to the world")
        in_plane = self._in_plane(shape[:3], affine)
        if min(in_plane) < self.min_size:
            raise InputError(path, f"in-plane size {in_plane[0]}×{in_plane[1]} is smaller than the minimum {self.min_size}×{self.min_size}")
        axes = linear / np.linalg.norm(linear, axis=0)
        shear = float(np.abs(axes.T @ axes - np.eye(3)).max())
        if shear > 1e-3:
            return [f"non-orthogonal (sheared) affine (largest axis cosine {shear:.3f}): processed in voxel order, "
                    "the mask keeps the input's header"]
        return []
