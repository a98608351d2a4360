"""Atomic file writing and image reading with errors that name the file."""

import contextlib
import io
import os
import tempfile
import warnings
from pathlib import Path

import cv2
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
        torch.save(obj, tmp)


def save_image_atomic(image: Image.Image, path, durable: bool = True, **save_kwargs):
    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}[path.suffix.lower()]
    with atomic_path(path, durable) as tmp:
        image.save(tmp, format=fmt, **save_kwargs)


def write_text_atomic(text: str, path):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


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


def read_rgb(path) -> np.ndarray:
    """HxWx3 uint8: the pixels PIL decodes, by the fastest decoder that gives them.

    RGB and grey JPEGs go through OpenCV's libjpeg-turbo, which skips PIL's copies (about 2x faster on video
    frames) and gives the same pixels for every such JPEG variant tried (tests/test_image_io.py). Because
    that rests on two libraries' builds, the first JPEG each process reads is decoded both ways and
    compared; if they differ, the process warns once and keeps to PIL. CMYK JPEGs (whose colour conversion
    differs) and files OpenCV cannot read go to PIL, whose errors name the file.
    """
    if Path(path).suffix.lower() in (".jpg", ".jpeg") and _fast_jpeg_agrees(path):
        pixels = _decode_jpeg(path)
        if pixels is not None:
            return pixels
    return np.asarray(read_image(path, "RGB"))


_fast_jpeg: bool | None = None  # per process: None until a JPEG has been decoded both ways


def _decode_jpeg(path) -> np.ndarray | None:
    """OpenCV's decoding, or None where PIL must decode."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"missing image: {path}") from None
    except OSError as err:
        raise UserError(f"unreadable image: {path} ({err.strerror})") from None
    try:
        with Image.open(io.BytesIO(data)) as header:  # reads the markers, not the pixels
            if header.mode not in ("RGB", "L"):
                return None
    except (UnidentifiedImageError, OSError, SyntaxError):
        return None
    # OpenCV would turn the frame by its EXIF orientation; PIL, and so the method, does not.
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)


def _fast_jpeg_agrees(path) -> bool:
    global _fast_jpeg
    if _fast_jpeg is None:
        fast = _decode_jpeg(path)
        if fast is None:
            return False  # this file proves nothing either way; PIL reads it
        _fast_jpeg = np.array_equal(fast, np.asarray(read_image(path, "RGB")))
        if not _fast_jpeg:
            warnings.warn(f"OpenCV's JPEG decoder gives other pixels than PIL's for {path} in this "
                          "installation; decoding with PIL (slower, same results)", stacklevel=3)
    return _fast_jpeg


def image_is_complete(path) -> bool:
    """True if the file decodes fully; used to detect truncated outputs when resuming."""
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except (OSError, UnidentifiedImageError, SyntaxError):
        return False


def list_frames(folder) -> list[Path]:
    """The frames of a video folder (.jpg/.png), in name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"frame folder not found: {folder}")
    frames = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS)
    if not frames:
        raise UserError(f"no frames (.jpg/.png) in {folder}")
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
