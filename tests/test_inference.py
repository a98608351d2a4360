"""The streaming inference engine: exactness of its fast host path, sharding over torchrun, and its errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
import evaluator
import run
import utils.device
from dataset import DATASETS, VideoFrames, scan
from inference import InferenceOptions, Segmenter, prepare_model
from model import DepthFlow
from model.checkpoints import save_project_checkpoint
from tests.conftest import NO_SHARED_MEMORY, ROOT, assert_one_line_error, run_main
from utils.errors import UserError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = DepthFlow("mitb0", size=64).eval()
    with torch.no_grad():
        net.decoder.predictor.conv.weight.mul_(50)  # margins like a trained network's
    return net


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "m.pth"
    save_project_checkpoint(path, model)
    return path


def _predict_directly(model, videos):
    """DepthFlow.predict on float frames decoded as the reference does: the masks the engine must equal."""
    frames = VideoFrames(videos)
    masks = []
    for i in range(len(frames)):
        image, flow = torch.from_numpy(np.stack(frames.read(i))).permute(0, 3, 1, 2)[:, None].float() / 255
        masks.append(model.predict(image, flow)[0].numpy())
    return masks


@pytest.mark.parametrize("width", [1, 8, 13, 854])
def test_masks_travel_to_helpers_packed_and_logits_as_they_are(width):
    rng = np.random.default_rng(width)
    masks = rng.integers(0, 2, (3, 5, width)).astype(np.uint8)
    packed = evaluator.packed_output(masks)
    assert packed.nbytes == 3 * 5 * -(-width // 8)
    assert np.array_equal(evaluator.unpacked_output(packed, (5, width)), masks)
    logits = rng.random((3, 2, 4, 4)).astype(np.float32)
    assert evaluator.packed_output(logits) is logits and evaluator.unpacked_output(logits, (5, width)) is logits


@pytest.mark.parametrize("fixed_shapes", [False, True])
def test_engine_masks_equal_depthflow_predict(model, toy_root, fixed_shapes):
    """uint8 frames, float conversion after the transfer, logits resized in the caller, padded last batches:
    bit for bit the masks of DepthFlow.predict on the CPU."""
    videos = scan(DATASETS["fbms"], toy_root / "FBMS")
    segmenter = Segmenter(model, InferenceOptions(CPU, batch_size=3, workers=2))
    segmenter.fixed_shapes = fixed_shapes  # as on a GPU: every batch padded to 3 frames
    batches = list(segmenter.batches(videos, progress=False))
    assert [len(b.frames) for b in batches] == [3, 3, 2, 3, 3, 2]
    assert all(b.output.shape[0] == len(b.frames) for b in batches)
    got = [m for b in batches for m in b.masks()]
    want = _predict_directly(model, videos)
    assert len(got) == 16 and all(np.array_equal(a, b) for a, b in zip(got, want))
    assert any(m.any() and not m.all() for m in want)


def test_masks_made_on_the_device_equal_masks_made_by_the_helpers(model, toy_root):
    videos = scan(DATASETS["davis"], toy_root / "DAVIS")
    on_host = Segmenter(model, InferenceOptions(CPU, batch_size=4))
    on_device = Segmenter(model, InferenceOptions(CPU, batch_size=4))
    on_device.masks_on_device = True
    a = [b.masks() for b in on_host.batches(videos, progress=False)]
    b = [b.output for b in on_device.batches(videos, progress=False)]
    assert all(x.ndim == 3 and x.dtype == np.uint8 for x in b)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def _run_test_command(toy_root, output, nproc=None, port=29531):
    command = [sys.executable, "run.py"] if nproc is None else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port", str(port),
         "run.py"]
    return command + ["--test", "--data-root", str(toy_root), "--datasets", "davis,ytobj", "--output", str(output),
                      "--device", "cpu", "--workers", "1", "--batch-size", "3"]


def test_torchrun_shards_videos_and_writes_what_one_process_writes(checkpoint, toy_root, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outputs = {}
    for nproc in (None, 2):
        out = tmp_path / f"n{nproc}"
        proc = subprocess.run([*_run_test_command(toy_root, out, nproc), "--checkpoint", str(checkpoint)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs[nproc] = (out, proc.stdout)
    (one, _), (two, two_out) = outputs[None], outputs[2]
    a, b = (json.loads((o / "results.json").read_text()) for o in (one, two))
    for name in ("davis", "ytobj"):
        assert a[name]["metrics"] == b[name]["metrics"] and a[name]["sequences"] == b[name]["sequences"]
        assert a[name]["speed"]["frames"] == b[name]["speed"]["frames"]
        assert (a[name]["speed"]["processes"], b[name]["speed"]["processes"]) == (1, 2)
    assert a["ytobj"]["classes"] == b["ytobj"]["classes"]
    pngs = sorted(p.relative_to(one) for p in one.rglob("*.png"))
    assert len(pngs) == 16 + 88 and pngs == sorted(p.relative_to(two) for p in two.rglob("*.png"))
    assert all((one / p).read_bytes() == (two / p).read_bytes() for p in pngs)
    assert two_out.count("== DAVIS 2016 val ==") == 1 and "(2 processes)" in two_out


def test_channels_last_and_compile_errors(monkeypatch):
    with pytest.raises(UserError, match="--channels-last is slower on a GPU"):
        prepare_model(DepthFlow("mitb0", size=64), InferenceOptions(torch.device("cuda"), channels_last=True))
    monkeypatch.setattr(utils.device.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="--compile on a CPU needs a C\\+\\+ compiler"):
        prepare_model(DepthFlow("mitb0", size=64), InferenceOptions(CPU, compile=True))


def test_out_of_memory_names_the_flag(model, toy_root, monkeypatch):
    videos = scan(DATASETS["davis"], toy_root / "DAVIS")
    segmenter = Segmenter(model, InferenceOptions(CPU, batch_size=4))

    def too_big(image, flow):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    segmenter.network = too_big
    with pytest.raises(UserError, match="out of GPU memory segmenting val00 \\(96x64 frames\\) with --batch-size 4; "
                                        "lower --batch-size"):
        next(segmenter.batches(videos, progress=False))


def test_a_loader_process_that_dies_is_named_by_its_frame(toy_root, checkpoint, tmp_path, capsys, monkeypatch):
    """A loader process killed while decoding one frame (as the kernel's OOM killer would) is named by it."""
    victim = toy_root / "DAVIS/JPEGImages/480p/val01/00005.jpg"
    decode = dataset.read_rgb

    def dies_on_the_victim(path):
        if path == victim:
            os._exit(1)
        return decode(path)

    monkeypatch.setattr(dataset, "read_rgb", dies_on_the_victim)
    code, _, err = run_main(run.main, "--test", "--checkpoint", checkpoint, "--data-root", toy_root, "--datasets",
                            "davis", "--output", tmp_path / "o", "--device", "cpu", "--workers", "2",
                            "--batch-size", "1", capsys=capsys)
    assert_one_line_error(code, err, "a data-loading process died while decoding", str(victim))


def _no_shared_memory(*args, **kwargs):
    raise RuntimeError(NO_SHARED_MEMORY)


def test_shared_memory_running_out_is_one_line(toy_root, checkpoint, tmp_path, capsys, monkeypatch):
    """As in a Docker container with the default 64 MB of /dev/shm: the loader processes cannot make buffers."""
    monkeypatch.setattr(torch.Tensor, "share_memory_", _no_shared_memory)  # the loader processes inherit it
    code, _, err = run_main(run.main, "--test", "--checkpoint", checkpoint, "--data-root", toy_root, "--datasets",
                            "davis", "--output", tmp_path / "o", "--device", "cpu", "--workers", "2", capsys=capsys)
    assert_one_line_error(code, err, "ran out of shared memory (/dev/shm", "--workers", "--shm-size")


def _dies(*job):
    os._exit(1)


def test_a_helper_process_that_dies_is_one_line(toy_root, checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluator, "finish_batch", _dies)
    code, _, err = run_main(run.main, "--test", "--checkpoint", checkpoint, "--data-root", toy_root, "--datasets",
                            "davis", "--output", tmp_path / "o", "--device", "cpu", "--workers", "1", capsys=capsys)
    assert_one_line_error(code, err, "a helper process died while writing or scoring the masks of")


def test_results_json_is_checked_before_the_work(toy_root, checkpoint, tmp_path, capsys):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    code, _, err = run_main(run.main, "--test", "--checkpoint", checkpoint, "--data-root", toy_root, "--json", folder,
                            "--output", tmp_path / "o", "--device", "cpu", capsys=capsys)
    assert_one_line_error(code, err, f"--json {folder} is a folder")
    assert not (tmp_path / "o/DAVIS16_val").exists()


def test_saved_masks_decode_to_what_was_scored(model, toy_root, tmp_path):
    """PNGs are written at zlib level 1 and without fsync: still the exact masks, read back by the scorer."""
    videos = scan(DATASETS["davis"], toy_root / "DAVIS")
    segmenter = Segmenter(model, InferenceOptions(CPU, batch_size=8, workers=2))
    result = evaluator.evaluate_dataset(segmenter, DATASETS["davis"], videos, out_dir=tmp_path, progress=False)
    want = _predict_directly(model, videos)
    got = [np.asarray(Image.open(tmp_path / v.key / f"{f.stem}.png")) for v in videos for f in v.frames]
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    rescored = evaluator.score_saved(DATASETS["davis"], videos, tmp_path, workers=1)
    assert rescored["metrics"] == result["metrics"]
