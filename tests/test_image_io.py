"""Decoding and resizing frames: the fast paths against PIL, the library the method's numbers come from."""

import io
import warnings

import cv2
import numpy as np
import pytest
from PIL import Image

import utils.io
from transforms import resize_rgb
from utils.errors import UserError
from utils.io import read_rgb


def _photo_like(h=241, w=427, seed=0) -> np.ndarray:
    """Smooth structure, edges and noise: every DCT band in use, like a real frame."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    img = np.stack([(np.sin(x / 7.0) + np.cos(y / 5.0)) * 60 + 128, (x * 3) % 256, (y * 2 + x) % 256], -1)
    return np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)


def _jpeg_variants() -> dict[str, bytes]:
    img, out = _photo_like(), {}
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees": PIL leaves the pixels as stored, and so must we
    for subsampling in (0, 1, 2):  # 4:4:4, 4:2:2, 4:2:0
        for quality in (50, 95):
            for progressive in (False, True):
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, "JPEG", quality=quality, subsampling=subsampling,
                                          progressive=progressive)
                out[f"sub{subsampling}-q{quality}-prog{int(progressive)}"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", exif=exif.tobytes())
    out["exif-rotated"] = buf.getvalue()
    for mode in ("L", "CMYK"):
        buf = io.BytesIO()
        Image.fromarray(img).convert(mode).save(buf, "JPEG")
        out[mode] = buf.getvalue()
    out["restart-markers"] = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_RST_INTERVAL, 4])[1].tobytes()
    return out


@pytest.fixture
def fresh_check(monkeypatch):
    """Each test sees a process that has not compared the decoders yet."""
    monkeypatch.setattr(utils.io, "_fast_jpeg", None)


@pytest.mark.parametrize("variant", list(_jpeg_variants()))
def test_jpeg_decoding_gives_pils_pixels(variant, tmp_path, fresh_check):
    path = tmp_path / "frame.jpg"
    path.write_bytes(_jpeg_variants()[variant])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixels = read_rgb(path)
    # In use in this installation; a CMYK file goes to PIL without deciding anything.
    assert utils.io._fast_jpeg is (None if variant == "CMYK" else True)
    assert pixels.dtype == np.uint8 and np.array_equal(pixels, np.asarray(Image.open(path).convert("RGB")))


def test_a_decoder_that_disagrees_is_dropped_for_pil(tmp_path, fresh_check, monkeypatch):
    path = tmp_path / "frame.jpg"
    path.write_bytes(_jpeg_variants()["sub2-q95-prog0"])
    monkeypatch.setattr(utils.io, "_decode_jpeg", lambda path: np.zeros((241, 427, 3), np.uint8))
    with pytest.warns(UserWarning, match="decoding with PIL"):
        pixels = read_rgb(path)
    assert utils.io._fast_jpeg is False
    assert np.array_equal(pixels, np.asarray(Image.open(path).convert("RGB")))
    assert np.array_equal(read_rgb(path), pixels)  # and stays with PIL, without comparing again


def test_broken_jpegs_are_reported_by_name(tmp_path, fresh_check):
    good = _jpeg_variants()["sub2-q95-prog0"]
    for name, data in (("truncated.jpg", good[: len(good) // 2]), ("empty.jpg", b""), ("text.jpg", b"hello" * 9)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=str(tmp_path / name)):
            read_rgb(tmp_path / name)
    with pytest.raises(UserError, match="missing image"):
        read_rgb(tmp_path / "absent.jpg")


@pytest.mark.parametrize("size", [512, 160, 97])
def test_training_resize_is_pils_filter_within_two_levels(size):
    img = _photo_like(480, 854)
    ours = resize_rgb(img, size).permute(1, 2, 0).numpy()
    pil = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))
    diff = np.abs(ours.astype(int) - pil.astype(int))
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01
    assert resize_rgb(np.full((48, 64, 3), 77, np.uint8), size).eq(77).all()
