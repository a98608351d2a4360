"""The inference engine: exactness, batching, compilation, devices, sharding over torchrun, and its errors."""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import evaluator
import inference
import run
import utils.device
from dataset import DATASETS, scan
from inference import InferenceOptions, Segmenter, plan_batches, prepare_model
from model import DepthFlow
from model.checkpoints import save_project_checkpoint
from model.depthflow import class_masks
from tests.conftest import ROOT, assert_one_line_error, children, run_main
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
    masks = {}
    for v, video in enumerate(videos):
        for f, frame in enumerate(video.frames):
            image, flow = (torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)[None].float()
                           / 255 for p in (frame.image, frame.flow))
            masks[v, f] = model.predict(image, flow)[0].numpy()
    return masks


@pytest.mark.slow
def test_the_python_api_gives_the_engines_masks(checkpoint, toy_root, tmp_path):
    """api.segment (one frame) and api.segment_folder (a folder and its flow images) on the CPU: bit for bit
    the masks of DepthFlow.predict, which the engine and the command line equal."""
    import api

    segmenter = api.load(checkpoint, device="cpu")
    video = scan(DATASETS["fbms"], toy_root / "FBMS")[0]
    want = _predict_directly(segmenter.model, [video])
    first = video.frames[0]
    frame, flow = (np.array(Image.open(p).convert("RGB")) for p in (first.image, first.flow))
    assert np.array_equal(api.segment(segmenter, frame, flow), want[0, 0])
    masks = dict(api.segment_folder(segmenter, first.image.parent, first.flow.parent))
    assert list(masks) == [f.stem for f in video.frames]
    assert all(np.array_equal(masks[f.stem], want[0, i]) for i, f in enumerate(video.frames))
    assert any(m.any() and not m.all() for m in want.values())
    flows = tmp_path / "flows"
    shutil.copytree(first.flow.parent, flows)
    (flows / first.flow.name).unlink()
    with pytest.raises(UserError, match=f"no flow image for frame {first.image}"):
        dict(api.segment_folder(segmenter, first.image.parent, flows))


def test_batches_fill_across_videos_of_one_size():
    sizes, lengths = [(48, 64), (48, 64), (32, 32), (48, 64)], [3, 4, 5, 2]
    plan = plan_batches(sizes, lengths, 4)
    assert plan == [[(0, 0), (0, 1), (0, 2), (1, 0)], [(1, 1), (1, 2), (1, 3), (3, 0)], [(3, 1)],
                    [(2, 0), (2, 1), (2, 2), (2, 3)], [(2, 4)]]
    assert sorted(k for batch in plan for k in batch) == [(v, f) for v, n in enumerate(lengths) for f in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("fixed_shapes", [False, True])
def test_engine_masks_equal_depthflow_predict(model, toy_root, fixed_shapes):
    """uint8 frames, float conversion after the transfer, batches across videos, padded last batches: bit for
    bit the masks of DepthFlow.predict on the CPU, each frame once, with its own image and flow."""
    videos = scan(DATASETS["fbms"], toy_root / "FBMS")
    segmenter = Segmenter(model, InferenceOptions(CPU, batch_size=3, workers=2))
    segmenter.fixed_shapes = fixed_shapes  # as on a GPU: every batch padded to 3 frames
    got = {(videos.index(f.video), f.index): f for f in segmenter.frames(videos, progress=False)}
    want = _predict_directly(model, videos)
    assert got.keys() == want.keys() and all(np.array_equal(got[k].mask, want[k]) for k in want)
    assert any(m.any() and not m.all() for m in want.values())
    frame = got[1, 4]
    assert np.array_equal(frame.image, np.array(Image.open(videos[1].frames[4].image).convert("RGB")))


def test_padding_only_ends_a_run_of_one_frame_size(model, toy_copy):
    """Videos of three frame sizes through fixed shapes: the network sees one batch shape, and pads only the
    last batch of each size."""
    videos = _three_sizes(toy_copy)
    seen = []
    segmenter = Segmenter(model, InferenceOptions(CPU, batch_size=3))
    segmenter.fixed_shapes = True
    network = segmenter.network
    segmenter.network = lambda image, flow: seen.append(len(image)) or network(image, flow)
    frames = list(segmenter.frames(videos, progress=False))
    assert len(frames) == 24 and set(seen) == {3}
    assert len(seen) == 1 + 3 * 3  # one warm-up (the network's shape never changes), then per size 8 frames in 3


def _three_sizes(root):
    """Toy Long-Videos copies whose second and third videos have other frame sizes."""
    spec = DATASETS["lvid"]
    base = scan(spec, root / "LVID")[0]
    for name, size in (("small", (48, 32)), ("wide", (128, 48))):
        for sub in (spec.images, spec.flows, spec.masks):
            (root / "LVID" / sub / name).mkdir()
        for frame in base.frames:
            for sub, path in ((spec.images, frame.image), (spec.flows, frame.flow), (spec.masks, frame.mask)):
                if path is not None:
                    Image.open(path).resize(size).save(root / "LVID" / sub / name / path.name)
    return scan(spec, root / "LVID")[:3]


@pytest.mark.slow
def test_compile_compiles_the_network_once_for_every_frame_size(model, toy_copy, monkeypatch):
    """The resizes stay outside the compiled part, so three frame sizes make one graph, and compiling is not
    timed. (Dynamo's own backend keeps the test fast; the default compiles the same graphs into kernels.)"""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.setattr(inference, "check_compiler", lambda device: None)
    torch._dynamo.reset()
    counters.clear()
    segmenter = Segmenter(model, InferenceOptions(CPU, batch_size=4, compile=True))
    masks = {(f.video.key, f.index): f.mask for f in segmenter.frames(_three_sizes(toy_copy), progress=False)}
    assert len(masks) == 24
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_a_network_that_fails_to_compile_is_one_line(model, toy_root, monkeypatch):
    """A compiler error ends in one line with its first line and the way out, before any frame is timed."""
    def failing_compile(function, **options):
        def run(*inputs):
            raise RuntimeError("backend exploded\nits long report")
        return run

    monkeypatch.setattr(torch, "compile", failing_compile)
    monkeypatch.setattr(inference, "check_compiler", lambda device: None)
    segmenter = Segmenter(model, InferenceOptions(CPU, batch_size=2, compile=True))
    with pytest.raises(UserError) as err:
        next(segmenter.frames(scan(DATASETS["davis"], toy_root / "DAVIS")[:1], progress=False))
    assert str(err.value) == "--compile failed to compile the network (backend exploded); drop --compile"


def test_the_engine_waits_on_the_stream_of_its_own_device(monkeypatch):
    """cuda:1 outside torchrun: the device is made current (so the staging copies and the CUDA context are on it) and
    the events that tell when a batch is back are recorded on cuda:1's stream, not GPU 0's."""
    current, streams = [], []

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: f"stream of {device}")
    monkeypatch.setattr(torch.cuda, "Event", lambda enable_timing=False: SimpleNamespace(record=streams.append))
    device = utils.device.resolve_device("cuda:1")
    assert device == torch.device("cuda", 1) and current == [device]
    utils.device.DeviceQueue(device).mark(timing=True)
    assert streams == ["stream of cuda:1"]
    with pytest.raises(UserError, match="--device cuda:2: this machine has 2 GPU"):
        utils.device.resolve_device("cuda:2")


def _run_test_command(toy_root, output, nproc=None, port=29531):
    command = [sys.executable, "run.py"] if nproc is None else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port", str(port),
         "run.py"]
    return command + ["--test", "--data-root", str(toy_root), "--datasets", "davis,ytobj", "--output", str(output),
                      "--device", "cpu", "--workers", "1", "--batch-size", "3"]


@pytest.mark.slow
def test_torchrun_shards_videos_and_writes_what_one_process_writes(checkpoint, toy_root, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert run.main([*_run_test_command(toy_root, one)[2:], "--checkpoint", str(checkpoint)]) is None
    proc = subprocess.run([*_run_test_command(toy_root, two, 2), "--checkpoint", str(checkpoint)], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    two_out = proc.stdout
    a, b = (json.loads((o / "results.json").read_text())["datasets"] for o in (one, two))
    for name in ("davis", "ytobj"):
        assert a[name]["metrics"] == b[name]["metrics"] and a[name]["sequences"] == b[name]["sequences"]
        assert a[name]["speed"]["frames"] == b[name]["speed"]["frames"]
        assert (a[name]["speed"]["processes"], b[name]["speed"]["processes"]) == (1, 2)
    assert a["ytobj"]["classes"] == b["ytobj"]["classes"]
    pngs = sorted(p.relative_to(one) for p in one.rglob("*.png"))
    assert len(pngs) == 16 + 88 and pngs == sorted(p.relative_to(two) for p in two.rglob("*.png"))
    assert all((one / p).read_bytes() == (two / p).read_bytes() for p in pngs)
    assert two_out.count("== DAVIS 2016 val ==") == 1 and "(2 processes)" in two_out


def test_compile_without_a_compiler_is_one_line(monkeypatch):
    monkeypatch.setattr(utils.device.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="--compile on a CPU needs a C\\+\\+ compiler"):
        prepare_model(DepthFlow("mitb0", size=64), InferenceOptions(CPU, compile=True))


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                                                "can't allocate memory: you tried to allocate 21474836480 bytes")])
def test_out_of_memory_names_the_flag(model, toy_root, error):
    """Out of device or host memory: one line naming where and the setting to lower."""
    videos = scan(DATASETS["davis"], toy_root / "DAVIS")
    segmenter = Segmenter(model, InferenceOptions(CPU, batch_size=4))

    def too_big(image, flow):
        raise error

    segmenter.network = too_big
    with pytest.raises(UserError, match="out of host memory segmenting davis_00 \\(frames 00000 to 00003\\) "
                                        "\\(96x64 frames\\) with --batch-size 4; lower --batch-size"):
        next(segmenter.frames(videos, progress=False))


@pytest.mark.slow
def test_a_loader_process_that_dies_is_one_line(checkpoint, tmp_path):
    """A loader process killed (as the kernel's out-of-memory killer would) while the run goes on."""
    from tools.toydata import generate

    data = generate(tmp_path / "data", size=(64, 96), videos=2, frames=30, datasets=("davis",))
    proc = subprocess.Popen([sys.executable, "run.py", "--test", "--checkpoint", checkpoint, "--data-root", data,
                             "--datasets", "davis", "--output", tmp_path / "o", "--device", "cpu", "--workers", "1",
                             "--batch-size", "1"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Loader processes are the children of the fork server, itself a child of the program.
    loader = _wait_for(lambda: [p for server in children(proc.pid) for p in children(server)], proc)
    os.kill(loader[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert_one_line_error(proc.returncode, err, "data loading failed at davis_", "loader process ended unexpectedly",
                          "lower --workers")


def _wait_for(condition, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if found := condition():
            return found
        time.sleep(0.02)
    raise AssertionError(f"not seen in {timeout} s (exit code {proc.poll()})")


def test_loader_processes_that_cannot_start_are_one_line(toy_root, checkpoint, tmp_path, capsys, monkeypatch):
    """As in a Docker container whose /dev/shm is full: the loader cannot make its queues."""
    def no_room(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", no_room)
    code, _, err = run_main(run.main, "--test", "--checkpoint", checkpoint, "--data-root", toy_root, "--datasets",
                            "davis", "--output", tmp_path / "o", "--device", "cpu", "--workers", "2", capsys=capsys)
    assert_one_line_error(code, err, "cannot start the data-loading processes", "No space left", "--shm-size")


def test_an_error_in_a_helper_thread_is_one_line(toy_copy, checkpoint, tmp_path, capsys):
    """A ground-truth mask of the wrong size, found while scoring on a helper thread."""
    mask = toy_copy / "DAVIS/Annotations/480p/davis_01/00005.png"
    Image.open(mask).resize((48, 32)).save(mask)
    code, _, err = run_main(run.main, "--test", "--checkpoint", checkpoint, "--data-root", toy_copy, "--datasets",
                            "davis", "--output", tmp_path / "o", "--device", "cpu", "--workers", "1", capsys=capsys)
    assert_one_line_error(code, err, f"mask {mask} is 48x32", "expected equal sizes")


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
    for v, video in enumerate(videos):
        for f, frame in enumerate(video.frames):
            assert np.array_equal(np.asarray(Image.open(tmp_path / video.key / f"{frame.stem}.png")), want[v, f])
    rescored, _ = evaluator.score_saved(DATASETS["davis"], videos, tmp_path, workers=1)
    assert rescored["metrics"] == result["metrics"]


def test_reduced_precision_logits_are_resized_in_float32(model, toy_root):
    """bf16 logits (autocast on a GPU) become float32 before the bicubic resize to the frame: resizing in bf16
    would make ties that fall to the background."""
    videos = scan(DATASETS["davis"], toy_root / "DAVIS")[:1]
    seen = []

    def bf16_network(image, flow):
        logits = model.forward_square(image, flow).bfloat16()
        seen.append(logits)
        return logits

    segmenter = Segmenter(model, InferenceOptions(CPU, batch_size=8))
    segmenter.network = bf16_network
    masks = [f.mask for f in segmenter.frames(videos, progress=False)]
    want = class_masks(torch.nn.functional.interpolate(seen[0].float(), size=(64, 96), mode="bicubic"))
    assert all(np.array_equal(m, w) for m, w in zip(masks, want.numpy()))
    in_bf16 = class_masks(torch.nn.functional.interpolate(seen[0], size=(64, 96), mode="bicubic").float())
    assert not torch.equal(in_bf16, want), "the test needs logits whose bf16 resize differs"


@pytest.mark.parametrize("strict", [False, True])
def test_the_gpu_precision_policy_is_one_torch_compile_can_read(strict):
    """TF32 by default, full float32 with --strict-fp32, cuDNN autotuning with a bounded workspace; set
    through the switches torch.compile's code generation reads (set through torch's newer ones, its reads
    fail)."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    try:
        utils.device.configure(torch.device("cuda"), strict_fp32=strict)
        assert torch.get_float32_matmul_precision() == ("highest" if strict else "high")
        assert torch.backends.cuda.matmul.allow_tf32 is torch.backends.cudnn.allow_tf32 is (not strict)
        assert torch.backends.cudnn.benchmark and int(os.environ["CUDNN_CONV_WSCAP_DBG"]) > 0
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1:]
