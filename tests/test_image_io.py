"""Reading frames and making training samples: PIL's pixels, as the reference reads them."""

import numpy as np
import pytest
from PIL import Image

from transforms import resize_rgb
from utils.errors import UserError
from utils.io import list_frames, read_rgb


def _photo_like(h=241, w=427, seed=0) -> np.ndarray:
    """Smooth structure, edges and noise: every DCT band in use, like a real frame."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    img = np.stack([(np.sin(x / 7.0) + np.cos(y / 5.0)) * 60 + 128, (x * 3) % 256, (y * 2 + x) % 256], -1)
    return np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK", "P", "RGBA"])
def test_frames_in_eight_bit_modes_read_as_pils_rgb(tmp_path, mode):
    image = Image.fromarray(_photo_like()).convert(mode)
    path = tmp_path / ("frame.jpg" if mode in ("RGB", "L", "CMYK") else "frame.png")
    image.save(path)
    pixels = read_rgb(path)
    assert pixels.shape == (241, 427, 3) and pixels.dtype == np.uint8
    assert np.array_equal(pixels, np.asarray(Image.open(path).convert("RGB")))


def test_broken_frames_are_reported_by_name(tmp_path):
    Image.fromarray(_photo_like()).save(tmp_path / "good.jpg")
    good = (tmp_path / "good.jpg").read_bytes()
    for name, data in (("truncated.jpg", good[: len(good) // 2]), ("empty.jpg", b""), ("text.jpg", b"hello" * 9)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=str(tmp_path / name)):
            read_rgb(tmp_path / name)
    with pytest.raises(UserError, match="missing image"):
        read_rgb(tmp_path / "absent.jpg")


@pytest.mark.parametrize("size", [512, 160, 97])
def test_training_resize_is_pils_bicubic(size):
    img = _photo_like(480, 854)
    ours = resize_rgb(img, size)
    assert ours.shape == (3, size, size) and ours.is_contiguous()
    assert np.array_equal(ours.permute(1, 2, 0).numpy(), np.asarray(Image.fromarray(img).resize((size, size),
                                                                                                   Image.BICUBIC)))


def test_frames_list_in_natural_order_and_one_file_per_frame(tmp_path):
    for name in ("1.jpg", "2.jpg", "10.jpg", "12.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_frames(tmp_path)] == ["1.jpg", "2.jpg", "10.jpg", "12.png"]
    (tmp_path / "2.png").write_bytes(b"x")
    with pytest.raises(UserError, match="two files for frame '2'"):
        list_frames(tmp_path)
