"""Atomic file writing and image reading with errors that name the file."""

import contextlib
import errno
import hashlib
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from utils.errors import UserError

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once: setting it to read it is not thread-safe


@contextlib.contextmanager
def atomic_path(path, durable: bool = True):
    """Yield a temporary path beside `path`; it replaces `path` only if the block finishes.

    Readers never see a half-written file, and an interrupted write leaves the old file intact. The
    temporary name is fixed (`.NAME.tmp`), so a write killed outright leaves at most one stray file, which
    the next write of the same path replaces. The result gets the usual permissions (0666 less the umask).
    `durable` also flushes the file to disk first, so a power cut cannot leave an empty file under the
    final name; outputs that are cheap to make again (masks) skip it, as it costs more than writing them.
    Errors name `path`, not the temporary file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def save_torch_atomic(obj, path):
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:  # torch reports a full disk or an unwritable file as a RuntimeError
            reason = (str(err).strip().splitlines() or ["write failed"])[0]
            raise OSError(errno.EIO, reason, str(path)) from None


def save_image_atomic(image: Image.Image, path, durable: bool = True, **save_kwargs):
    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}[path.suffix.lower()]
    with atomic_path(path, durable) as tmp:
        image.save(tmp, format=fmt, **save_kwargs)


def write_text_atomic(text: str, path):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def check_outside(output, inputs, what: str) -> None:
    """Stop before any work if `output` (a file or folder to write) lies inside one of the input folders,
    where what it writes could land on the inputs."""
    out = Path(output).resolve()
    for folder in inputs:
        folder = Path(folder).resolve()
        if out.is_relative_to(folder):
            raise UserError(f"{what} {output} lies inside the input folder {folder}; outputs must go elsewhere")


def check_writable(folder) -> Path:
    """Create `folder` if needed and prove a file can be written there, before any long work starts."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test."):
            pass
    except OSError as err:
        raise UserError(f"cannot write to output folder {folder} ({err.strerror})") from None
    return folder


def read_image(path, mode=None) -> Image.Image:
    """Decode an image fully, so a truncated file fails here, naming the file."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode) if mode and img.mode != mode else img.copy()
    except FileNotFoundError:
        raise UserError(f"missing image: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise UserError(f"unreadable or truncated image: {path} ({err})") from None


# Modes whose conversion to 8-bit RGB keeps their values; 16-bit and float images would be clipped.
RGB_MODES = ("RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr")


def read_rgb(path) -> np.ndarray:
    """HxWx3 uint8, as PIL decodes it (the reference's decoder); images whose values do not fit 8-bit RGB
    stop with one line naming the file."""
    image = read_image(path)
    if image.mode not in RGB_MODES:
        raise UserError(f"{path} is a {image.mode} image; expected an 8-bit RGB or grey frame (JPEG or PNG)")
    return np.asarray(image.convert("RGB") if image.mode != "RGB" else image)


def image_size(path) -> tuple[int, int]:
    """(height, width) from the file's header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except FileNotFoundError:
        raise UserError(f"missing image: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise UserError(f"unreadable image: {path} ({err})") from None


def file_digest(path) -> str:
    """SHA-1 of a file's bytes: the identity of an input that an output was made from."""
    digest = hashlib.sha1()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        raise UserError(f"missing file: {path}") from None
    return digest.hexdigest()


def image_is_complete(path) -> bool:
    """True if the file decodes fully; used to detect truncated outputs when resuming."""
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except (OSError, UnidentifiedImageError, SyntaxError):
        return False


def natural_key(name: str) -> list:
    """Sort key that orders numbers by value: 2.jpg before 10.jpg, frame_9 before frame_10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def list_frames(folder) -> list[Path]:
    """The frames of a video folder (.jpg/.png), in natural name order; two files of one frame (00003.jpg and
    00003.png) stop the run, as one of them would overwrite the other's outputs."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"frame folder not found: {folder}")
    frames = sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS and p.is_file()),
                    key=lambda p: natural_key(p.name))
    if not frames:
        raise UserError(f"no frames (.jpg/.png) in {folder}")
    seen = {}
    for path in frames:
        if path.stem in seen:
            raise UserError(f"two files for frame {path.stem!r}: {seen[path.stem]} and {path} (expected one)")
        seen[path.stem] = path
    return frames


def frame_size(frames: list[Path], min_side: int = 1) -> tuple[int, int]:
    """(height, width) shared by every frame, read from the headers; a frame that is no image, smaller than
    `min_side`, or of another size stops the run before any work."""
    sizes = {}
    for path in frames:
        try:
            with Image.open(path) as img:
                sizes.setdefault(img.size, path)
        except (OSError, UnidentifiedImageError, SyntaxError) as err:
            raise UserError(f"unreadable frame {path} ({err})") from None
    if len(sizes) > 1:
        (a, pa), (b, pb) = list(sizes.items())[:2]
        raise UserError(f"frames differ in size: {pa} is {a[0]}x{a[1]}, {pb} is {b[0]}x{b[1]} "
                        f"(expected one size per video)")
    (w, h), path = next(iter(sizes.items()))
    if min(w, h) < min_side:
        raise UserError(f"frame {path} is {w}x{h}; expected at least {min_side}x{min_side} pixels")
    return h, w
