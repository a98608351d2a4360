"""GPU paths: faithfulness on CUDA, mixed precision, torch.compile, `--test` on the GPU, AMP training.
Skipped without a GPU.

What "faithful on a GPU" means here (utils/device.py, the precision policy): with TF32 off
(--strict-fp32), the released-format network gives the reference network's logits to 1e-3, as on the CPU.
The default runs float32 matrix products and convolutions in TF32 (10-bit mantissa, about 5e-4
relative), which moves logits by about 1e-3; that flips only pixels whose two logits are that close, so
masks must still agree on 99.5% of pixels. The random-weight networks of these tests have many such
near-ties; a trained network has far fewer.
"""

import contextlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import run
from dataset import DATASETS, scan
from inference import InferenceOptions, Segmenter
from model.checkpoints import load_depthflow, save_project_checkpoint
from model.depthflow import DepthFlow, class_masks
from utils.device import configure

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _restore_gpu_settings():
    """Every test leaves the precision policy, cuDNN's settings and the current device as it found them (the
    commands under test set them for their process), so the file passes in any order and under xdist."""
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
             torch.backends.cuda.matmul.allow_tf32, os.environ.get("CUDNN_CONV_WSCAP_DBG"),
             torch.cuda.current_device())
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1], saved[2]
    torch.backends.cuda.matmul.allow_tf32 = saved[3]
    if saved[4] is None:
        os.environ.pop("CUDNN_CONV_WSCAP_DBG", None)
    else:
        os.environ["CUDNN_CONV_WSCAP_DBG"] = saved[4]
    torch.cuda.set_device(saved[5])


def _reference_net():
    """tools.reference_net needs transformers 4.x (the released files' module names); skip without it."""
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip(f"the reference network needs transformers 4.x (installed: {transformers.__version__})")
    from tools import reference_net

    return reference_net


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    ref = _reference_net().random_reference("mitb2", seed=2)
    path = tmp_path_factory.mktemp("gpu") / "DepthFlow_mitb2.pth"
    torch.save(ref.state_dict(), path)
    return ref.to(CUDA).eval(), load_depthflow(path, backbone="mitb2").to(CUDA).eval()


def _frames():
    gen = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 480, 854, generator=gen).to(CUDA), torch.rand(4, 3, 480, 854, generator=gen).to(CUDA)


@contextlib.contextmanager
def tf32(enabled: bool):
    """The project's precision policy, TF32 (the default) or strict float32."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    configure(CUDA, strict_fp32=not enabled)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def test_released_checkpoint_on_gpu_matches_reference_without_tf32(released):
    ref, model = released
    image, flow = _frames()
    with torch.inference_mode(), tf32(False):
        expected, got = ref(image, flow), model(image, flow)
    assert (expected - got).abs().max().item() <= 1e-3
    assert (expected.argmax(1) == class_masks(got)).float().mean().item() >= 0.999


def test_released_checkpoint_on_gpu_with_default_tf32_keeps_the_masks(released):
    ref, model = released
    image, flow = _frames()
    with torch.inference_mode(), tf32(False):
        expected = ref(image, flow)
    with torch.inference_mode(), tf32(True):
        got = model(image, flow)
    assert (expected.argmax(1) == class_masks(got)).float().mean().item() >= 0.995


# bf16 keeps 8 mantissa bits (about 4e-3 relative), fp16 11; measured IoU on an H100 with these random
# weights: bf16 0.988.
@pytest.mark.parametrize(("dtype", "min_iou"), [(torch.bfloat16, 0.98), (torch.float16, 0.99)])
def test_autocast_masks_agree_with_float32(released, dtype, min_iou):
    _, model = released
    image, flow = _frames()
    with torch.inference_mode():
        plain = class_masks(model(image, flow)).bool()
        with torch.autocast("cuda", dtype=dtype):
            fast = class_masks(model(image, flow)).bool()
    iou = ((plain & fast).sum() / (plain | fast).sum()).item()
    assert iou >= min_iou, iou


def test_compile_masks_agree_with_eager(released):
    _, model = released
    image, flow = _frames()
    compiled = torch.compile(model, dynamic=False)
    with torch.inference_mode():
        plain, fast = model(image, flow), compiled(image, flow)
    assert (class_masks(plain) == class_masks(fast)).float().mean().item() >= 0.999


@pytest.mark.parametrize("flags", [[], ["--amp", "bf16", "--compile"]])
def test_test_command_on_gpu_agrees_with_cpu(toy_root, tmp_path, flags):
    """The streaming GPU path (uint8 transfers, padded batches, masks made on the device, helper processes)
    writes the CPU path's masks, up to the arithmetic differences above."""
    torch.manual_seed(0)
    model = DepthFlow("mitb0", size=64)
    with torch.no_grad():
        model.decoder.predictor.conv.weight.mul_(50)  # margins like a trained network's
    save_project_checkpoint(tmp_path / "m.pth", model)
    common = ["--test", "--checkpoint", tmp_path / "m.pth", "--data-root", toy_root, "--datasets", "davis,fbms",
              "--batch-size", "3", "--workers", "2"]
    for device, extra in (("cpu", []), ("cuda", flags)):
        assert run.main([*map(str, common), "--device", device, "--output", str(tmp_path / device), *extra]) is None
    pngs = sorted((tmp_path / "cpu").rglob("*.png"))
    agree = [np.mean(np.asarray(Image.open(p)) == np.asarray(Image.open(tmp_path / "cuda" /
                                                                         p.relative_to(tmp_path / "cpu"))))
             for p in pngs]
    assert len(pngs) == 32 and np.mean(agree) >= (0.99 if flags else 0.999)
    gpu = json.loads((tmp_path / "cuda/results.json").read_text())["datasets"]
    assert gpu["davis"]["speed"]["frames"] == 16 and gpu["davis"]["speed"]["forward_fps"] > 0


def _toy_training(toy_root, out, amp, *extra):
    run.main(["--train", "--backbone", "mitb0", "--size", "64", "--stage", "2", "--datasets",
              "duts:32,davis_train:32", "--batch-size", "8", "--lr", "5e-4", "--workers", "2", "--device", "cuda",
              "--amp", amp, "--epochs", "12", "--val-every", "12", "--data-root", str(toy_root), "--output",
              str(out), *extra])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_mixed_precision_training_follows_float32(toy_root, tmp_path):
    """The recipe in bf16 or fp16 (and bf16 with a compiled step) learns as in float32 on toy data: the same
    fall of the loss (final loss within 30% of float32's) and a toy DAVIS J&F within 0.1 of float32's."""
    runs = {amp: _toy_training(toy_root, tmp_path / amp, amp) for amp in ("off", "bf16", "fp16")}
    runs["bf16 compiled"] = _toy_training(toy_root, tmp_path / "compiled", "bf16", "--compile")
    base = runs["off"]
    assert base[-1]["loss"] < 0.6 * base[0]["loss"]
    for amp in ("bf16", "fp16", "bf16 compiled"):
        log = runs[amp]
        assert abs(log[-1]["loss"] - base[-1]["loss"]) <= 0.3 * base[-1]["loss"], (amp, log[-1], base[-1])
        assert abs(log[-1]["davis_jf"] - base[-1]["davis_jf"]) <= 0.1, (amp, log[-1], base[-1])


def _model():
    torch.manual_seed(0)
    model = DepthFlow("mitb0", size=64)
    with torch.no_grad():
        model.decoder.predictor.conv.weight.mul_(50)
    return model


def test_compile_compiles_the_network_once_per_run(toy_root):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    segmenter = Segmenter(_model(), InferenceOptions(CUDA, batch_size=3, compile=True, workers=2))
    for name in ("davis", "fbms", "ytobj"):
        videos = scan(DATASETS[name], toy_root / DATASETS[name].folder)
        assert len(list(segmenter.frames(videos, progress=False))) == sum(len(v.frames) for v in videos)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_the_engine_on_the_second_gpu_gives_the_first_ones_masks(toy_root):
    videos = scan(DATASETS["davis"], toy_root / "DAVIS")
    masks = {}
    for index in (0, 1):
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
        segmenter = Segmenter(_model(), InferenceOptions(device, batch_size=3, workers=2))
        masks[index] = {(f.video.key, f.index): f.mask for f in segmenter.frames(videos, progress=False)}
    assert masks[0].keys() == masks[1].keys()
    assert all(np.array_equal(masks[0][k], masks[1][k]) for k in masks[0])


def test_peak_gpu_memory_is_set_by_the_batch_not_the_video(tmp_path):
    """A video four times as long needs no more device memory: only the batch in flight is on the device."""
    from tools.toydata import generate

    peaks = {}
    for frames in (24, 96):
        root = generate(tmp_path / str(frames), size=(240, 427), videos=1, frames=frames, datasets=("davis",))
        videos = scan(DATASETS["davis"], root / "DAVIS")
        segmenter = Segmenter(_model(), InferenceOptions(CUDA, batch_size=8, workers=2))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        assert len(list(segmenter.frames(videos, progress=False))) == frames
        peaks[frames] = torch.cuda.max_memory_allocated()
    assert peaks[96] <= 1.05 * peaks[24], peaks


@pytest.mark.parametrize(("first", "then"), [("off", "fp16"), ("fp16", "off"), ("bf16", "fp16")])
def test_resume_on_the_gpu_with_another_precision(toy_root, tmp_path, first, then):
    """--amp may change on resume: a run saved without loss scaling resumes with it (the scale starts afresh)
    and the other way round, on the GPU, to the end."""
    out = tmp_path / "run"
    common = ["--train", "--backbone", "mitb0", "--size", "64", "--stage", "2", "--datasets", "duts:16,davis_train:16",
              "--batch-size", "8", "--lr", "5e-4", "--workers", "2", "--device", "cuda", "--selection", "last",
              "--checkpoint-every", "1", "--data-root", str(toy_root), "--output", str(out)]
    assert run.main([*common, "--amp", first, "--epochs", "1"]) is None
    assert run.main([*common, "--amp", then, "--epochs", "2", "--resume"]) is None
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)


def test_pinned_staging_keeps_two_buffers_and_the_values(toy_root):
    """Batches of several sizes through the staging: the device gets them exactly, and page-locked memory
    holds two buffers, not one per batch in flight."""
    from utils.device import PinnedStaging

    staging = PinnedStaging(CUDA)
    for i in range(12):
        batch = torch.randint(0, 256, (8, 64 + 8 * (i % 3), 96, 3), dtype=torch.uint8)
        (on_device,) = staging(batch)
        assert torch.equal(on_device.cpu(), batch)
    assert len([b for b, _ in staging.slots if b is not None]) == 2


def test_fp16_overflow_skips_the_step_instead_of_stopping(toy_root, tmp_path, monkeypatch):
    """A forward pass that overflows fp16 (an infinite logit) gives an infinite loss: GradScaler skips that
    step and lowers its scale, as designed; training goes on and counts the step as skipped."""
    import model.depthflow as depthflow

    forward, calls = depthflow.DepthFlow.forward_square, []

    def overflow_once(self, image, flow):
        logits = forward(self, image, flow)
        calls.append(1)
        return logits * float("inf") if self.training and len(calls) == 3 else logits

    monkeypatch.setattr(depthflow.DepthFlow, "forward_square", overflow_once)
    log = _toy_training(toy_root, tmp_path / "fp16", "fp16", "--epochs", "1", "--selection", "last")
    assert log[0]["skipped"] == 1 and np.isfinite(log[0]["loss"])
