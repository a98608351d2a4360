"""DAVIS palette masks: reading any annotation as a binary object mask, and writing predictions."""

import numpy as np
from PIL import Image

from utils.errors import UserError
from utils.io import read_image, save_image_atomic


def davis_palette() -> list[int]:
    """The PASCAL VOC / DAVIS colour map: index 0 black, 1 dark red, 2 dark green, ..."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


DAVIS_PALETTE = davis_palette()

# How each dataset's annotation files become object masks (docs/data.md, 'Masks'): "nonzero" (DAVIS, YouTube-VOS,
# Long-Videos: any label is the object) or "grey" (DUTS, FBMS, YouTube-Objects: the brighter half of the grey
# levels is the object).
MASK_RULES = ("nonzero", "grey")

# PNG modes that hold one value per pixel, and the value that means "all object" in each.
_FULL_SCALE = {"L": 255, "I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I": 65535, "F": 1.0}


VOID_INDEX = 255  # palette index of pixels that are neither object nor background (DAVIS); read as background


def read_mask_levels(path) -> np.ndarray:
    """HxW float32 object levels in [0, 1], from any encoding of a binary or soft mask: 1-bit ('1'), palette
    indices ('P': index 0 is background, any other index object), grey levels of 8 or 16 bits (0/1 label
    images included: a grey mask whose largest value is 1 holds labels, not levels) and RGB(A) (the
    brightest channel). Any other mode stops with one line naming the file."""
    return _levels(read_image(path), path)


def _levels(img: Image.Image, path) -> np.ndarray:
    if img.mode in ("1", "P", "PA"):
        indices = np.asarray(img if img.mode == "1" else img.getchannel(0))
        return (indices != 0).astype(np.float32)
    if img.mode in ("RGB", "RGBA", "LA"):
        img = img.convert("RGB" if img.mode != "LA" else "L")
        values = np.asarray(img).max(axis=2) if img.mode == "RGB" else np.asarray(img)
        full = 255
    elif img.mode in _FULL_SCALE:
        values, full = np.asarray(img), _FULL_SCALE[img.mode]
    else:
        raise UserError(f"mask {path} is a {img.mode} image; expected a binary, palette, grey or RGB PNG")
    values = values.astype(np.float32)
    top = float(values.max(initial=0))
    if top <= 1:  # 0/1 labels
        return (values > 0).astype(np.float32)
    return np.clip(values / full, 0, 1)


def read_mask_grey8(path) -> np.ndarray:
    """HxW uint8 object levels 0-255: an 8-bit grey mask's own values, any other encoding's levels scaled to
    255. DUTSv2's grey masks are resized as such 8-bit images, as the authors' loader resizes them."""
    img = read_image(path)
    if img.mode == "L" and np.asarray(img).max(initial=0) > 1:
        return np.asarray(img)
    return np.round(_levels(img, path) * 255).astype(np.uint8)


def read_mask(path, rule: str) -> np.ndarray:
    """HxW uint8 0/1 object mask under the dataset's rule. In "nonzero" datasets palette index 255 is the void
    label (DAVIS's convention), which the authors' loaders turn into background: so does this."""
    if rule == "nonzero":
        img = read_image(path)
        if img.mode in ("P", "PA"):
            indices = np.asarray(img.getchannel(0))
            return ((indices != 0) & (indices != VOID_INDEX)).astype(np.uint8)
        return (_levels(img, path) > 0).astype(np.uint8)
    if rule == "grey":
        return (read_mask_levels(path) > 0.5).astype(np.uint8)
    raise ValueError(f"unknown mask rule {rule!r}; expected one of {MASK_RULES}")


def palette_image(mask: np.ndarray) -> Image.Image:
    """A 'P' image of the labels with the DAVIS colours, its palette cut to the labels it uses: PIL then
    stores as few bits per pixel as they need (1 for an object mask), a smaller file written faster."""
    mask = np.asarray(mask, dtype=np.uint8)
    img = Image.fromarray(mask, mode="P")
    img.putpalette(DAVIS_PALETTE[:3 * (int(mask.max(initial=0)) + 1)])
    return img


def save_palette_mask(mask: np.ndarray, path) -> None:
    # zlib level 1: a third of the default's time for two-colour masks, files a few per cent larger.
    save_image_atomic(palette_image(mask), path, durable=False, compress_level=1)
