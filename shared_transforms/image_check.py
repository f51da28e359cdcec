"""Checks and conversion of 2D image files (PNG/JPEG/TIFF): :class:`ImageCheck` reads one frame's
structure (a PNG's chunks, a JPEG's end marker; other formats are decoded) and names what is wrong; :func:`to_rgb8` is the PIL converter that makes RGBA, grey,
palette and 16-bit images 8-bit RGB (``LoadImaged(converter=...)``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .inputs import MIN_INPUT_SIZE, FileCheck, InputError, _size_problem

__all__ = ["ImageCheck", "to_rgb8"]


def to_rgb8(img):
    """PIL image -> 8-bit RGB: alpha dropped, grey/palette expanded, 16-bit (and 32-bit) rescaled to 0-255."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or 255 < arr.max() <= 65535 else max(float(arr.max()), 255.0)
        img = Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8))
    return img.convert("RGB")


def _rgb_fix(mode: str) -> str | None:
    if mode == "RGB":
        return None
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        return f"{mode} image: alpha channel dropped, converted to RGB"
    if mode.startswith("I;16") or mode in ("I", "F"):
        return f"{'16' if mode.startswith('I;16') else '32'}-bit image (mode {mode}): rescaled to 8-bit RGB"
    return f"{mode} image (grey, palette or other colour model): converted to RGB"


def _complete_without_decoding(im, path: Path) -> bool:
    """Whether ``im`` (just opened) is shown complete by its file structure, without decoding the pixels.

    PNG: PIL's ``verify`` walks every chunk to IEND and checks its CRC (a fraction of a millisecond where
    decoding a frame takes milliseconds). JPEG: the file ends with
    the end-of-image marker (a truncated file does not; the marker cannot occur inside entropy-coded data).
    Anything else, a PNG that ``verify`` rejects, or a JPEG with trailing bytes, returns False: the frame is
    then decoded, and the decoder's verdict is the check's. A file whose structure is intact but whose
    compressed pixel data is corrupt (valid CRCs over bad deflate data, a damaged JPEG scan) passes here and
    is rejected when it is loaded (:class:`~shared_transforms.inputs.LoadCheckedImaged`: "cannot read",
    naming the file), so it is skipped during the run instead of at screening.
    """
    if im.format == "PNG":
        try:
            im.verify()
        except Exception:  # decoding decides (a PNG cut inside its IEND chunk still decodes, as it did before)
            return False
        return True
    if im.format == "JPEG":
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 64))
            return f.read().endswith(b"\xff\xd9")
    return False


class ImageCheck(FileCheck):
    """Check one 2D image file (PNG/JPEG/TIFF) without the network's work: header, size and structure.

    Raises :class:`InputError` for a missing or empty file, a file PIL cannot identify ("not an
    image file"), a truncated or corrupt file, or a size below ``min_size``. Returns a warning
    for images that :func:`to_rgb8` converts (RGBA, grey, palette, 16-bit).

    PNG and JPEG files are checked by their structure (:func:`_complete_without_decoding`), so that an
    inference run does not decode every frame twice (once screening, once loading); other formats, and
    files whose structure does not show them complete, are decoded. A file whose structure is intact but
    whose compressed pixel data is corrupt fails when it is loaded, and is skipped then with the reader's
    words.
    """

    def __init__(self, what: str = "RGB image", min_size: int = MIN_INPUT_SIZE) -> None:
        self.what, self.min_size = what, int(min_size)

    def check(self, path: Path) -> list[str]:
        from PIL import Image, UnidentifiedImageError

        path = Path(path)
        if problem := _size_problem(path):
            raise InputError(path, problem)
        try:
            with Image.open(path) as im:
                mode, size, frames = im.mode, im.size, getattr(im, "n_frames", 1)
                complete = _complete_without_decoding(im, path)
            if not complete:
                with Image.open(path) as im:  # verify leaves the image unusable: open it again to decode
                    im.load()
        except UnidentifiedImageError as e:
            raise InputError(path, f"not an image file (unrecognised format; one {self.what} expected)") from e
        except (OSError, SyntaxError, ValueError) as e:  # PIL: "image file is truncated", broken chunks, ...
            kind = "truncated image file" if "truncat" in str(e).lower() else "corrupt image file"
            raise InputError(path, f"{kind} ({e})") from e
        if min(size) < self.min_size:
            raise InputError(path, f"image size {size[0]}×{size[1]} is smaller than the minimum {self.min_size}×{self.min_size}")
        out = [fix] if (fix := _rgb_fix(mode)) else []
        if frames > 1:
            out.append(f"{frames} frames: only the first is used")
        return out
