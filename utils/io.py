"""Files: atomic writes that no planted link can redirect, one program per output folder, and image reading
with errors that name the file."""

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
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
def atomic_file(path, durable: bool = True):
    """Yield a binary file to write; it replaces `path` only if the block finishes.

    Readers never see a half-written file, and an interrupted write leaves the old file intact. The
    temporary file beside `path` has an unpredictable name and is created exclusively (O_EXCL), and it is
    written through its own descriptor, so nothing planted in the folder (a link at a guessable temporary
    name) can redirect the write; the rename then replaces `path` itself, even if `path` is a link,
    never the file a link points to. The result gets the usual permissions (0666 less the umask).
    `durable` also flushes the file to disk first, so a power cut cannot leave an empty file under the
    final name; outputs that are cheap to make again (masks) skip it, as it costs more than writing them.
    Errors name `path`, not the temporary file.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~UMASK)
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def save_torch_atomic(obj, path):
    with atomic_file(path) as f:
        try:
            torch.save(obj, f)
        except RuntimeError as err:  # torch reports a full disk or an unwritable file as a RuntimeError
            raise _disk_error(err, path) from None


def _disk_error(err: Exception, path) -> OSError:
    """A write error from a library's internals, as the OSError it is: a full disk says so."""
    try:
        free = shutil.disk_usage(Path(path).parent).free
    except OSError:
        free = None
    if free is not None and free < 64 << 20:
        return OSError(errno.ENOSPC, "no space left on device", str(path))
    reason = (str(err).strip().splitlines() or ["write failed"])[0]
    return OSError(errno.EIO, reason, str(path))


def save_image_atomic(image: Image.Image, path, durable: bool = True, **save_kwargs):
    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}[path.suffix.lower()]
    with atomic_file(path, durable) as f:
        image.save(f, format=fmt, **save_kwargs)


def write_text_atomic(text: str, path):
    with atomic_file(path) as f:
        f.write(text.encode())


def strict_json(obj):
    """`obj` with every float that is not a number (NaN, infinities) replaced by None: JSON has no NaN, and a
    file with one is not JSON that other tools read. Callers say in words which figure was undefined."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    return obj


def json_text(obj, **dumps_options) -> str:
    """Strict JSON text: an undefined figure is null, and anything else JSON cannot hold raises."""
    return json.dumps(strict_json(obj), allow_nan=False, **dumps_options)


def write_json_atomic(obj, path, **dumps_options) -> None:
    """Strict JSON (see json_text) and a newline, atomically; indented by two unless told otherwise."""
    write_text_atomic(json_text(obj, **{"indent": 2, **dumps_options}) + "\n", path)


def copy_file_atomic(source, path, durable: bool = True):
    with atomic_file(path, durable) as f, open(source, "rb") as src:
        shutil.copyfileobj(src, f)


def append_line(path, line: str, durable: bool = False) -> None:
    """Append one line to a log (flushed to disk if `durable`); a link at `path` is refused, never followed
    (O_NOFOLLOW)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UserError(f"{path} is a symbolic link; refusing to append to what it points to (remove it)") \
                from None
        raise OSError(err.errno, err.strerror, str(path)) from None
    with os.fdopen(fd, "a") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        if durable:
            os.fsync(f.fileno())


class FolderLock:
    """One program at a time in an output folder: an exclusive lock on FOLDER/.depthflow.lock, held while
    the program runs and released by the kernel when it ends, however it ends (a killed program never
    leaves a stale lock). The file names the holder, so a second program says which run is in the way."""

    NAME = ".depthflow.lock"

    def __init__(self, folder, what: str):
        self.folder, self.what, self.handle = Path(folder), what, None

    def acquire(self) -> "FolderLock":
        check_writable(self.folder)
        path = self.folder / self.NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as err:
            raise UserError(f"cannot lock {self.folder} ({path}: {err.strerror})") from None
        handle = os.fdopen(fd, "r+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read().strip() or "another program"
            handle.close()
            raise UserError(f"{self.folder} is in use by {holder}; wait for it to finish, or choose another "
                            f"{self.what}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                     f"{' '.join(sys.argv)}\n")
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing the descriptor releases the lock
            self.handle = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def check_outside(output, inputs, what: str) -> None:
    """Stop before any work if `output` (a file or folder to write) lies inside one of the input folders,
    where what it writes could land on the inputs."""
    out = Path(output).resolve()
    for folder in inputs:
        folder = Path(folder).resolve()
        if out == folder:
            raise UserError(f"{what} {output} is {folder}, which this run reads; outputs must go elsewhere")
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


def file_digest(path, algorithm: str = "sha1") -> str:
    """Hex digest of a file's bytes (SHA-1 by default): the identity of an input that an output was made from."""
    digest = hashlib.new(algorithm)
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        raise UserError(f"missing file: {path}") from None
    return digest.hexdigest()


def file_digest_sha256(path) -> str:
    return file_digest(path, "sha256")


def read_json(path):
    """A JSON file's content; one line naming the file if it is not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not a JSON file this project wrote ({err}); move it away") from None


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
