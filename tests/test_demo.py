import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import run
from model import DepthFlow
from model.checkpoints import save_project_checkpoint
from tests.conftest import assert_one_line_error, run_main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Seeded here: a module fixture is made before the per-test seeding, so its weights would otherwise
    depend on which tests ran first (and one draw gave a frame-0 mask with no background)."""
    path = tmp_path_factory.mktemp("ckpt") / "small.pth"
    torch.manual_seed(0)
    save_project_checkpoint(path, DepthFlow("mitb0", size=32))
    return path


def _video_frames(path):
    """(frame count, width, height) of a video file."""
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    return n, int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))


@pytest.mark.slow
def test_demo_on_a_video_file(toy_root, checkpoint, tmp_path, capsys):
    frames = sorted((toy_root / "DAVIS/JPEGImages/480p/davis_01").glob("*.jpg"))
    clip = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 10, (96, 64))
    for f in frames:
        writer.write(cv2.imread(str(f)))
    writer.release()
    out = tmp_path / "demo"
    code, stdout, err = run_main(run.main, "--demo", clip, "--checkpoint", checkpoint, "--output", out, "--device",
                                 "cpu", "--workers", "0", capsys=capsys)
    assert code == 0, err
    assert "optical flow: DIS (OpenCV)" in stdout
    masks = sorted((out / "masks").glob("*.png"))
    assert len(masks) == len(frames) == 8
    assert all(Image.open(m).size == (96, 64) and Image.open(m).mode == "P" for m in masks)
    assert len(list((out / "flows").glob("*.jpg"))) == 8 and len(list((out / "frames").glob("*.jpg"))) == 8
    assert _video_frames(out / "overlay.mp4") == (8, 192, 64)
    sheet = np.asarray(Image.open(out / "contact_sheet.png"))
    assert sheet.shape == (2 * 64, 4 * 192, 3)
    assert not (out / "overlay.partial.mp4").exists()


@pytest.mark.slow
def test_demo_on_a_frame_folder(toy_root, checkpoint, tmp_path, capsys):
    folder = toy_root / "LVID/JPEGImages/lvid_00"
    code, _, err = run_main(run.main, "--demo", folder, "--checkpoint", checkpoint, "--output", tmp_path / "d",
                            "--device", "cpu", "--workers", "0", capsys=capsys)
    assert code == 0, err
    assert sorted(p.stem for p in (tmp_path / "d/masks").glob("*.png")) == [f"{i:05d}" for i in range(8)]
    assert not (tmp_path / "d/frames").exists()
    # The first contact-sheet tile is frame 0 beside its flow: untinted where the mask (and its edge) is background.
    frame = np.asarray(Image.open(folder / "00000.jpg").convert("RGB"))
    flow = np.asarray(Image.open(tmp_path / "d/flows/00000.jpg").convert("RGB"))
    mask = np.asarray(Image.open(tmp_path / "d/masks/00000.png"))
    tile = np.asarray(Image.open(tmp_path / "d/contact_sheet.png"))[:64, :192]
    background = cv2.dilate(mask, np.ones((3, 3), np.uint8)) == 0
    assert background.any()
    assert np.array_equal(tile[:, :96][background], frame[background])
    assert np.array_equal(tile[:, 96:], flow)


def test_demo_errors(toy_root, checkpoint, tmp_path, capsys):
    def check(path, *expect, ckpt=checkpoint):
        code, _, err = run_main(run.main, "--demo", path, "--checkpoint", ckpt, "--output", tmp_path / "o",
                                "--device", "cpu", capsys=capsys)
        assert_one_line_error(code, err, *expect)

    fake = tmp_path / "fake.mp4"
    fake.write_text("not a video")
    check(fake, "not a readable video file", str(fake))
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    check(notes, "not a video file", str(notes))
    empty = tmp_path / "empty"
    empty.mkdir()
    check(empty, "no frames", str(empty))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (64, 48)).save(mixed / "00000.jpg")
    Image.new("RGB", (60, 48)).save(mixed / "00001.jpg")
    check(mixed, "frames differ in size", "00001.jpg")
    check(toy_root / "LVID/JPEGImages/lvid_00", "checkpoint not found", ckpt=tmp_path / "none.pth")


@pytest.mark.slow
def test_toy_pipeline_runs_every_step(tmp_path):
    """`make demo`'s pipeline, with one epoch per stage: every step runs and the last line is the J&F."""
    from tests.conftest import run_cli

    out = tmp_path / "toy_demo"
    rc, stdout, err = run_cli("-m", "tools.toy_demo", "--out", out, "--stage1-epochs", "1", "--stage2-epochs", "1",
                              "--videos", "2", "--frames", "6", "--frame-size", "64x96", timeout=900)
    assert rc == 0, err[-2000:]
    assert stdout.strip().splitlines()[-1].startswith("toy DAVIS 2016 val J&F: ")
    assert "python -m flow_synthesis --duts" in stdout and "toy data" in stdout
    manifest = (out / "data/DUTSv2-synth/manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 16, "the DUTSv2 used for training is synthesised, not the toy flows"
    for folder in ("DAVIS16_val", "FBMS_test", "YTOBJ", "LVID"):
        assert any((out / "test" / folder).rglob("*.png"))


@pytest.mark.slow
def test_unwritable_outputs_are_one_line_errors(toy_root, checkpoint, tmp_path, capsys):
    from evaluator import main as evaluator_main
    from flow_synthesis.__main__ import main as synth_main
    from flow_synthesis.video_flow import main as flow_main
    from tools.toydata import main as toydata_main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad = blocker / "out"  # a folder inside a regular file can never be created
    commands = [
        (toydata_main, [bad]),
        (synth_main, ["--duts", toy_root / "DUTS-TR", "--out", bad, "--depth-dir", toy_root / "DUTS-TR/DUTS-TR-Depth"]),
        (flow_main, ["--frames", toy_root / "LVID/JPEGImages/lvid_00", "--out", bad]),
        (run.main, ["--demo", toy_root / "LVID/JPEGImages/lvid_00", "--checkpoint", checkpoint, "--output", bad,
                    "--device", "cpu"]),
        (evaluator_main, ["--dataset", "fbms", "--data-root", toy_root, "--results",
                          toy_root / "FBMS/TestSet/Annotations", "--json", bad / "m.json", "--workers", "1"]),
    ]
    for main, argv in commands:
        code, _, err = run_main(main, *argv, capsys=capsys)
        assert_one_line_error(code, err, str(bad))
        assert "cannot write to output folder" in err or "cannot use" in err
