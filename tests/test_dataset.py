import random

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import DATASETS, Source, TrainingFrames, VideoBatches, VideoFrames, scan, video_batches
from transforms import TrainTransform, resize_mask
from utils.errors import UserError
from utils.palette import DAVIS_PALETTE, binarise, read_mask, save_palette_mask
from utils.shared_batches import SharedBatches


def test_every_layout_scans(toy_root):
    davis = scan(DATASETS["davis"], toy_root / "DAVIS")
    assert [v.name for v in davis] == ["val00", "val01"]
    assert all(len(v.frames) == 8 and len(v.annotated) == 8 for v in davis)
    assert [v.name for v in scan(DATASETS["davis_train"], toy_root / "DAVIS")] == ["train00", "train01"]
    fbms = scan(DATASETS["fbms"], toy_root / "FBMS")
    assert [f.stem for f in fbms[0].annotated] == ["00000", "00004", "00007"]
    ytobj = scan(DATASETS["ytobj"], toy_root / "YTOBJ")
    assert len(ytobj) == 11
    assert ("aeroplane", "0002_b") in {(v.group, v.name) for v in ytobj}
    assert "aeroplane/0002_b" in {v.key for v in ytobj}
    assert len(scan(DATASETS["lvid"], toy_root / "LVID")) == 2
    ytvos = scan(DATASETS["ytvos"], toy_root / "YTVOS18")
    assert [f.stem for f in ytvos[0].frames][:3] == ["00000", "00005", "00010"]
    duts = scan(DATASETS["duts"], toy_root / "DUTSv2")
    assert len(duts) == 16 and all(len(v.frames) == 1 for v in duts)


def test_frames_pair_by_stem(toy_root):
    for video in scan(DATASETS["ytobj"], toy_root / "YTOBJ"):
        for frame in video.frames:
            assert frame.image.stem == frame.flow.stem == frame.stem
            assert frame.mask is None or frame.mask.stem == frame.stem


def test_video_frames_are_read_as_decoded(toy_root):
    videos = scan(DATASETS["fbms"], toy_root / "FBMS")
    frames = VideoFrames(videos)
    assert len(frames) == 16
    assert frames.index[12] == (1, 4)
    frame = videos[1].frames[4]
    for decoded, path in zip(frames.read(12), (frame.image, frame.flow)):
        assert decoded.shape == (64, 96, 3) and decoded.dtype == np.uint8
        assert np.array_equal(decoded, np.array(Image.open(path).convert("RGB")))


def test_batches_never_cross_videos(toy_root):
    videos = scan(DATASETS["fbms"], toy_root / "FBMS")
    batches = video_batches(videos, 3)
    assert batches == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9, 10], [11, 12, 13], [14, 15]]


@pytest.mark.parametrize("per_worker", [1, 5])
def test_loader_processes_stream_batches_through_reused_shared_memory(toy_root, per_worker):
    """One buffer per worker forces each batch into the buffer of one before it, and the worker to wait for the
    main process to hand it back: what was received must stay as it was read."""
    videos = scan(DATASETS["davis"], toy_root / "DAVIS")
    frames = VideoFrames(videos, workers=2)
    shared = SharedBatches(2, per_worker)
    batched = VideoBatches(frames, 3, shared)
    assert batched.plan == video_batches(videos, 3)
    loader = torch.utils.data.DataLoader(batched, batch_size=None, num_workers=2)
    received = [shared.receive(slot, pixels) for slot, pixels in loader]
    assert [len(b) for b in received] == [3, 3, 2, 3, 3, 2]
    assert [frames.index[i] for i in batched.plan[3]] == [(1, 0), (1, 1), (1, 2)]
    for batch, indices in zip(received, batched.plan):
        assert torch.equal(batch, torch.from_numpy(np.stack([np.stack(frames.read(i)) for i in indices])))


def test_a_video_whose_frames_change_size_is_refused(toy_copy):
    videos = scan(DATASETS["davis"], toy_copy / "DAVIS")
    frame = videos[0].frames[1]
    for path in (frame.image, frame.flow):
        Image.open(path).resize((48, 32)).save(path)
    with pytest.raises(UserError, match=f"{frame.image} is 48x32, frame .*00000.jpg of the same video is 96x64"):
        VideoBatches(VideoFrames(videos), 4, SharedBatches(0, 0))[0]


def test_binarisation_rules(tmp_path):
    labels = np.array([[0, 1, 2], [100, 128, 255]], np.uint8)
    assert binarise(labels, "nonzero").tolist() == [[0, 1, 1], [1, 1, 1]]
    assert binarise(labels, "grey").tolist() == [[0, 0, 0], [0, 1, 1]]
    save_palette_mask(np.array([[0, 2], [3, 0]], np.uint8), tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png", "nonzero").tolist() == [[0, 1], [1, 0]]
    assert Image.open(tmp_path / "m.png").mode == "P"


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
    soft = resize_mask(mask.astype(np.float32), 4, "bicubic")
    assert soft.dtype == np.uint8 and set(np.unique(soft)) <= {0, 1}
    assert resize_mask(mask.astype(np.float32), 16, "bicubic")[4:10, 6:12].all()
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
    (root / "DAVIS/ImageSets/2016/val.txt").write_text("val00\nghost\n")
    assert "ghost" in _error("davis", root / "DAVIS") and "val.txt" in _error("davis", root / "DAVIS")
    (root / "DAVIS/ImageSets/2016/val.txt").write_text("val00\nval01\n")
    missing_flow = root / "DAVIS/JPEGFlows/480p/val01/00003.jpg"
    missing_flow.unlink()
    message = _error("davis", root / "DAVIS")
    assert "no flow for frame" in message and str(root / "DAVIS/JPEGImages/480p/val01/00003.jpg") in message
    (root / "FBMS/TestSet/Annotations/fbms00/99999.png").write_bytes(b"png")
    assert "has no frame" in _error("fbms", root / "FBMS")
    (root / "FBMS/TestSet/Annotations/fbms00/99999.png").unlink()
    (root / "FBMS/TestSet/JPEGImages/fbms01/00002.jpg").write_bytes(b"")
    assert "empty file" in _error("fbms", root / "FBMS")
    for sub in ("JPEGImages", "JPEGFlows", "Annotations"):
        (root / "LVID" / sub / "lvid01").rename(root / "LVID" / sub / "old")
        (root / "LVID" / sub / "lvid01").mkdir()
    assert "no frames in" in _error("lvid", root / "LVID")
    import shutil

    shutil.rmtree(root / "YTOBJ/JPEGFlows")
    assert str(root / "YTOBJ/JPEGFlows") in _error("ytobj", root / "YTOBJ")
    (root / "DUTSv2/Annotations/ILSVRC2012_test_00000003.png").unlink()
    assert "no mask for frame" in _error("duts", root / "DUTSv2")


def test_truncated_image_names_the_file(toy_copy):
    videos = scan(DATASETS["davis"], toy_copy / "DAVIS")
    path = videos[0].frames[2].image
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match=str(path)):
        VideoFrames(videos).read(2)
