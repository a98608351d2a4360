"""Atomic file writing and image reading with errors that name the file."""

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from utils.errors import UserError


@contextlib.contextmanager
def atomic_path(path, durable: bool = True):
    """Yield a temporary path beside `path`; it replaces `path` only if the block finishes.

    Readers never see a half-written file, and an interrupted write leaves the old file intact. `durable`
    also flushes the file to disk first, so a power cut cannot leave an empty file under the final name;
    outputs that are cheap to make again (masks) skip it, as it costs more than writing them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    """HxWx3 uint8."""
    return np.asarray(read_image(path, "RGB"))


def image_is_complete(path) -> bool:
    """True if the file decodes fully; used to detect truncated outputs when resuming."""
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except (OSError, UnidentifiedImageError, SyntaxError):
        return False
