import random

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import DATASETS, Source, TrainingFrames, VideoFrames, scan
from transforms import TrainTransform, resize_mask
from utils.errors import UserError
from utils.palette import DAVIS_PALETTE, read_mask, read_mask_grey8, read_mask_levels, save_palette_mask


def test_every_layout_scans(toy_root):
    davis = scan(DATASETS["davis"], toy_root / "DAVIS")
    assert [v.name for v in davis] == ["davis_00", "davis_01"]
    assert all(len(v.frames) == 8 and len(v.annotated) == 8 for v in davis)
    assert [v.name for v in scan(DATASETS["davis_train"], toy_root / "DAVIS")] == ["davis_train_00", "davis_train_01"]
    fbms = scan(DATASETS["fbms"], toy_root / "FBMS")
    assert len(fbms[0].annotated) == 8  # a mask file for every frame, blank where the frame is not annotated
    ytobj = scan(DATASETS["ytobj"], toy_root / "YTOBJ")
    assert len(ytobj) == 11
    assert ("aeroplane", "0002") in {(v.group, v.name) for v in ytobj}
    assert "aeroplane/0002" in {v.key for v in ytobj}
    assert len(scan(DATASETS["lvid"], toy_root / "LVID")) == 2
    assert len(scan(DATASETS["ytvos"], toy_root / "YTVOS18")) == 2
    duts = scan(DATASETS["duts"], toy_root / "DUTSv2")
    assert len(duts) == 16 and all(len(v.frames) == 1 for v in duts)


def test_frames_pair_by_stem_in_natural_order(toy_copy):
    for video in scan(DATASETS["ytobj"], toy_copy / "YTOBJ"):
        for frame in video.frames:
            assert frame.image.stem == frame.flow.stem == frame.stem
            assert frame.mask is None or frame.mask.stem == frame.stem
    folder = toy_copy / "LVID"
    for sub in ("JPEGImages", "JPEGFlows", "Annotations"):
        for path in sorted((folder / sub / "lvid_00").iterdir()):
            path.rename(path.with_name(f"{int(path.stem)}{path.suffix}"))  # 0.jpg ... 7.jpg, then 10.jpg below
        last = sorted((folder / sub / "lvid_00").iterdir())[-1]
        last.rename(last.with_name(f"10{last.suffix}"))
    video = scan(DATASETS["lvid"], folder)[0]
    assert [f.stem for f in video.frames] == ["0", "1", "2", "3", "4", "5", "6", "10"]


def test_video_frames_are_read_as_decoded(toy_root):
    videos = scan(DATASETS["fbms"], toy_root / "FBMS")
    frames = VideoFrames(videos)
    assert len(frames) == 16 and frames.sizes == [((64, 96), (64, 96))] * 2
    item = frames[1, 4]
    assert [t.shape for t in item] == [(64, 96, 3)] * 2 and all(t.dtype == torch.uint8 for t in item)
    frame = videos[1].frames[4]
    for decoded, path in zip(item, (frame.image, frame.flow)):
        assert np.array_equal(decoded.numpy(), np.array(Image.open(path).convert("RGB")))


def test_a_video_whose_frames_change_size_is_refused(toy_copy):
    videos = scan(DATASETS["davis"], toy_copy / "DAVIS")
    frame = videos[0].frames[1]
    for path in (frame.image, frame.flow):
        Image.open(path).resize((48, 32)).save(path)
    with pytest.raises(UserError, match=f"{frame.image} is 48x32, .*00000.jpg of the same video is 96x64"):
        VideoFrames(videos)[0, 1]


def _save(array: np.ndarray, mode: str, path):
    """`array` as a PNG of `mode` (16-bit arrays become I;16 PNGs)."""
    image = Image.fromarray(array)
    image = image.convert(mode) if mode in ("1", "LA", "RGBA") else image
    if mode == "P":
        image = Image.fromarray(array, mode="P")
    image.save(path)
    assert Image.open(path).mode == mode
    return path


@pytest.mark.parametrize(("encoding", "values"), [
    ("1", [0, 255]), ("L", [0, 1]), ("L", [0, 255]), ("P", [0, 1]), ("P", [0, 3]), ("I;16", [0, 65535]),
    ("I;16", [0, 1]), ("RGB", [0, 255]), ("LA", [0, 255]), ("RGBA", [0, 255])])
def test_a_binary_mask_reads_as_its_object_in_every_encoding(tmp_path, encoding, values):
    """1-bit, 0/1 and 0/255 grey, palette indices, 16-bit and colour PNGs: the object is the object under both
    rules (grey: DUTS, FBMS, YouTube-Objects; nonzero: DAVIS, YouTube-VOS, Long-Videos)."""
    truth = np.zeros((6, 9), np.uint8)
    truth[1:4, 2:7] = 1
    array = np.where(truth == 1, values[1], values[0]).astype(np.uint16 if encoding == "I;16" else np.uint8)
    if encoding == "RGB" or encoding == "RGBA":
        array = np.repeat(array[..., None], 3, axis=2)
    path = _save(array, encoding, tmp_path / "m.png")
    for rule in ("grey", "nonzero"):
        assert np.array_equal(read_mask(path, rule), truth), (encoding, values, rule)


def test_grey_levels_keep_their_rule_and_odd_modes_are_refused(tmp_path):
    levels = np.array([[0, 1, 100], [127, 128, 255]], np.uint8)
    path = _save(levels, "L", tmp_path / "grey.png")
    assert read_mask(path, "nonzero").tolist() == [[0, 1, 1], [1, 1, 1]]
    assert read_mask(path, "grey").tolist() == [[0, 0, 0], [0, 1, 1]]
    assert np.allclose(read_mask_levels(path), levels / 255)
    cmyk = tmp_path / "cmyk.png"
    Image.new("CMYK", (4, 4)).save(cmyk, format="TIFF")  # a TIFF under a PNG name: PIL opens it by content
    with pytest.raises(UserError, match=f"mask {cmyk} is a CMYK image"):
        read_mask(cmyk, "grey")


def test_training_reads_one_bit_duts_masks_as_objects(toy_copy):
    """DUTSv2 masks saved as 1-bit PNGs train on their objects, not on empty targets."""
    for mask in (toy_copy / "DUTSv2/Annotations").glob("*.png"):
        Image.open(mask).convert("1").save(mask)
    data = TrainingFrames([Source(DATASETS["duts"], scan(DATASETS["duts"], toy_copy / "DUTSv2"), 8)], size=32)
    assert all(data[0, i]["mask"].any() for i in range(8))


def _png_bit_depth(path) -> int:
    return path.read_bytes()[24]  # IHDR: 8-byte signature, 8 bytes of chunk header, width, height, bit depth


@pytest.mark.parametrize("labels", [1, 2, 4, 16, 200])
def test_palette_masks_keep_labels_and_colours_in_few_bits(tmp_path, labels):
    rng = np.random.default_rng(labels)
    mask = rng.integers(0, labels + 1, (37, 53)).astype(np.uint8)
    mask[0, 0] = labels  # the largest label is present
    save_palette_mask(mask, tmp_path / "m.png")
    img = Image.open(tmp_path / "m.png")
    assert img.mode == "P" and np.array_equal(np.asarray(img), mask)
    assert img.getpalette()[:3 * (labels + 1)] == DAVIS_PALETTE[:3 * (labels + 1)]
    assert _png_bit_depth(tmp_path / "m.png") == {1: 1, 2: 2, 4: 4, 16: 8, 200: 8}[labels]


def test_mask_resize_rules():
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 3:6] = 1
    assert resize_mask(mask, 16, "nearest").sum() == 4 * mask.sum()
    soft = resize_mask(mask * 255, 4, "bicubic")
    assert soft.dtype == np.uint8 and set(np.unique(soft)) <= {0, 1}
    assert resize_mask(mask * 255, 16, "bicubic")[4:10, 6:12].all()
    with pytest.raises(ValueError, match="unknown mask resize"):
        resize_mask(mask, 4, "bilinear")


def test_flips_are_joint():
    rgb = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    flow = rgb[::-1].copy()
    mask = np.zeros((4, 6), np.uint8)
    mask[0, :2] = 1
    plain = TrainTransform(4, hflip_p=0, vflip_p=0)(rgb, flow, mask, random.Random(0))
    both = TrainTransform(4, hflip_p=1, vflip_p=1)(rgb, flow, mask, random.Random(0))
    for a, b in zip(plain, both):
        assert torch.equal(a.flip(-1).flip(-2), b)
    assert both[2][-1, -1] == 1 and both[2][0, 0] == 0


def test_training_epoch_mixes_sources_deterministically(toy_root):
    duts = Source(DATASETS["duts"], scan(DATASETS["duts"], toy_root / "DUTSv2"), 6)
    davis = Source(DATASETS["davis_train"], scan(DATASETS["davis_train"], toy_root / "DAVIS"), 2)
    data = TrainingFrames([duts, davis], size=32, seed=3)
    assert len(data) == 8
    item = data[0, 7]
    assert item["image"].shape == item["flow"].shape == (3, 32, 32)
    assert item["image"].dtype == item["flow"].dtype == item["mask"].dtype == torch.uint8
    assert item["mask"].shape == (32, 32) and set(item["mask"].unique().tolist()) == {0, 1}
    again = TrainingFrames([duts, davis], size=32, seed=3)[0, 7]
    assert all(torch.equal(item[k], again[k]) for k in item)
    assert any(not torch.equal(data[1, i]["image"], data[0, i]["image"]) for i in range(8))


def test_epoch_draws_random_videos_and_frames(toy_root):
    davis = Source(DATASETS["davis_train"], scan(DATASETS["davis_train"], toy_root / "DAVIS"), 64)
    data = TrainingFrames([davis], size=32, seed=0)
    flips = [data[0, i]["image"][:, 0, 0].sum().item() for i in range(64)]
    assert len(set(flips)) > 16, "samples should vary across videos, frames and flips"


def _error(spec, root):
    with pytest.raises(UserError) as err:
        scan(DATASETS[spec], root)
    return str(err.value)


def test_validation_errors_name_the_path(toy_copy):
    root = toy_copy
    assert str(root / "nope") in _error("davis", root / "nope")
    (root / "DAVIS/ImageSets/2016/val.txt").write_text("davis_00\nghost\n")
    assert "ghost" in _error("davis", root / "DAVIS") and "val.txt" in _error("davis", root / "DAVIS")
    (root / "DAVIS/ImageSets/2016/val.txt").write_text("davis_00\ndavis_01\n")
    missing_flow = root / "DAVIS/JPEGFlows/480p/davis_01/00003.jpg"
    missing_flow.unlink()
    message = _error("davis", root / "DAVIS")
    assert "no flow for frame" in message and str(root / "DAVIS/JPEGImages/480p/davis_01/00003.jpg") in message
    (root / "FBMS/TestSet/Annotations/fbms_00/99999.png").write_bytes(b"png")
    assert "has no frame" in _error("fbms", root / "FBMS")
    (root / "FBMS/TestSet/Annotations/fbms_00/99999.png").unlink()
    (root / "FBMS/TestSet/JPEGImages/fbms_01/00002.jpg").write_bytes(b"")
    assert "empty file" in _error("fbms", root / "FBMS")
    for sub in ("JPEGImages", "JPEGFlows", "Annotations"):
        (root / "LVID" / sub / "lvid_01").rename(root / "LVID" / sub / "old")
        (root / "LVID" / sub / "lvid_01").mkdir()
    assert "no frames in" in _error("lvid", root / "LVID")
    import shutil

    shutil.rmtree(root / "YTOBJ/JPEGFlows")
    assert str(root / "YTOBJ/JPEGFlows") in _error("ytobj", root / "YTOBJ")
    (root / "DUTSv2/Annotations/duts_00003.png").unlink()
    assert "no mask for frame" in _error("duts", root / "DUTSv2")


def test_truncated_and_sixteen_bit_frames_name_the_file(toy_copy):
    videos = scan(DATASETS["davis"], toy_copy / "DAVIS")
    path = videos[0].frames[2].image
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match=str(path)):
        VideoFrames(videos)[0, 2]
    flow = videos[0].frames[3].flow.with_suffix(".png")
    videos[0].frames[3].flow.unlink()
    Image.fromarray(np.full((64, 96), 40000, np.uint16)).save(flow)
    videos = scan(DATASETS["davis"], toy_copy / "DAVIS")
    with pytest.raises(UserError, match=f"{flow} is a I;16 image; expected an 8-bit RGB"):
        VideoFrames(videos)[0, 3]


def test_duts_masks_resize_as_the_authors_resize_them(tmp_path):
    """A soft-edged 8-bit grey mask resized to the training size: PIL's bicubic filter on the 8-bit image, then
    level / 255 > 0.5, pixel for pixel as the authors' DUTSv2 loader makes its targets."""
    rng = np.random.default_rng(0)
    levels = (cv2_blur(rng.random((53, 71)) > 0.6) * 255).round().astype(np.uint8)
    path = tmp_path / "soft.png"
    Image.fromarray(levels).save(path)
    authors = np.asarray(Image.open(path).convert("L").resize((64, 64), Image.BICUBIC)) / 255 > 0.5
    ours = resize_mask(read_mask_grey8(path), 64, "bicubic")
    assert 0 < authors.sum() < authors.size and np.array_equal(ours, authors.astype(np.uint8))


def cv2_blur(binary: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(binary.astype(np.float32), (7, 7), 2)


def test_void_label_255_is_background_in_palette_datasets(tmp_path):
    """Palette index 255 (DAVIS's void) reads as background where any label is the object, as the authors'
    loaders turn it; grey datasets keep their rule."""
    labels = np.array([[0, 1, 2, 255]], np.uint8)
    path = tmp_path / "p.png"
    image = Image.fromarray(labels, mode="P")
    image.putpalette(DAVIS_PALETTE)
    image.save(path)
    assert read_mask(path, "nonzero").tolist() == [[0, 1, 1, 0]]


def test_flows_of_another_size_than_their_frames_are_read_as_the_authors_read_them(toy_copy):
    """Each of image and flow is resized to the square input on its own, so a flow archive at half size tests
    and trains."""
    videos = scan(DATASETS["davis"], toy_copy / "DAVIS")
    for frame in videos[0].frames:
        Image.open(frame.flow).resize((48, 32)).save(frame.flow)
    data = VideoFrames(videos)
    assert data.sizes[0] == ((64, 96), (32, 48))
    image, flow = data[0, 3]
    assert image.shape == (64, 96, 3) and flow.shape == (32, 48, 3)
    train = TrainingFrames([Source(DATASETS["davis_train"], videos, 4)], size=32)
    assert train[0, 0]["flow"].shape == (3, 32, 32)
