"""DAVIS palette masks: reading any annotation as a binary object mask, and writing predictions."""

import numpy as np
from PIL import Image

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

# How each dataset's annotation files become object masks (README, 'Data').
MASK_RULES = ("nonzero", "grey")


def read_label_image(path) -> np.ndarray:
    """HxW integer labels: palette indices for 'P' files, grey levels otherwise."""
    img = read_image(path)
    if img.mode in ("RGB", "RGBA"):
        return np.asarray(img.convert("RGB")).max(axis=2)
    if img.mode not in ("P", "L", "1", "I", "I;16"):
        img = img.convert("L")
    return np.asarray(img)


def binarise(labels: np.ndarray, rule: str) -> np.ndarray:
    """HxW uint8 0/1. 'nonzero': palette masks, object = label != 0. 'grey': 0/255 masks, object > 127."""
    if rule == "nonzero":
        return (labels != 0).astype(np.uint8)
    if rule == "grey":
        return (labels > 127).astype(np.uint8)
    raise ValueError(f"unknown mask rule {rule!r}; expected one of {MASK_RULES}")


def read_mask(path, rule: str) -> np.ndarray:
    return binarise(read_label_image(path), rule)


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
