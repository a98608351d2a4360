"""GPU paths: faithfulness on CUDA, mixed precision, torch.compile, AMP training. Skipped without a GPU."""

import json

import pytest
import torch

import run
from model.checkpoints import load_depthflow
from tests.reference_net import random_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    ref = random_reference("mitb2", seed=2)
    path = tmp_path_factory.mktemp("gpu") / "DepthFlow_mitb2.pth"
    torch.save(ref.state_dict(), path)
    return ref.to(CUDA).eval(), load_depthflow(path, backbone="mitb2").to(CUDA).eval()


def _frames():
    gen = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 480, 854, generator=gen).to(CUDA), torch.rand(4, 3, 480, 854, generator=gen).to(CUDA)


def test_released_checkpoint_on_gpu_matches_reference(released):
    ref, model = released
    image, flow = _frames()
    with torch.inference_mode():
        expected, got = ref(image, flow), model(image, flow)
    assert (expected - got).abs().max().item() <= 1e-3
    assert (expected.argmax(1) == got.argmax(1)).float().mean().item() >= 0.999


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_masks_agree_with_float32(released, dtype):
    _, model = released
    image, flow = _frames()
    with torch.inference_mode():
        plain = model(image, flow).argmax(1).bool()
        with torch.autocast("cuda", dtype=dtype):
            fast = model(image, flow).argmax(1).bool()
    iou = ((plain & fast).sum() / (plain | fast).sum()).item()
    assert iou >= 0.99, iou


def test_compile_masks_agree_with_eager(released):
    _, model = released
    image, flow = _frames()
    compiled = torch.compile(model, dynamic=False)
    with torch.inference_mode():
        plain, fast = model(image, flow), compiled(image, flow)
    assert (plain.argmax(1) == fast.argmax(1)).float().mean().item() >= 0.999


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_training_lowers_the_loss(toy_root, tmp_path, amp):
    run.main(["--train", "--backbone", "mitb0", "--size", "64", "--stage", "2", "--datasets",
              "duts:32,davis_train:32", "--batch-size", "8", "--lr", "5e-4", "--workers", "2", "--device", "cuda",
              "--amp", amp, "--epochs", "6", "--val-every", "0", "--data-root", str(toy_root), "--output",
              str(tmp_path)])
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.6 * log[0]["loss"]
