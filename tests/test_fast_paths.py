"""Every inference fast path gives the plain path's masks (README, 'Speed')."""

import io
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dataset import DATASETS, scan
from evaluator import evaluate_dataset
from inference import InferenceOptions, Segmenter, prepare_model
from model import DepthFlow
from model.winograd import WinogradConv2d, use_winograd, winograd_available
from run import main as run_main_cli
from tests.conftest import assert_one_line_error, nnpack_calls, run_main
from tools import bench
from utils.errors import UserError
from utils.metrics import jaccard

needs_nnpack = pytest.mark.skipif(not winograd_available(), reason="this PyTorch build or CPU has no NNPACK")


@pytest.fixture(scope="module")
def confident_model():
    """Random weights with a large predictor, so masks have real margins (like a trained model's)."""
    torch.manual_seed(0)
    model = DepthFlow("mitb0", size=64).eval()
    with torch.no_grad():
        model.decoder.predictor.conv.weight.mul_(50)
    return model


def _davis_masks(model, toy_root, tmp_path, **options):
    videos = scan(DATASETS["davis"], toy_root / "DAVIS")
    out = tmp_path / "masks"
    segmenter = Segmenter(model, InferenceOptions(torch.device("cpu"), **options))
    result = evaluate_dataset(segmenter, DATASETS["davis"], videos, out_dir=out, progress=False)
    return result, {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.png"))}


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_batching_and_workers_give_identical_masks(confident_model, toy_root, tmp_path):
    plain, plain_masks = _davis_masks(confident_model, toy_root, tmp_path / "a", batch_size=1)
    batched, batched_masks = _davis_masks(confident_model, toy_root, tmp_path / "b", batch_size=8)
    assert plain_masks == batched_masks and len(plain_masks) == 16
    assert plain["metrics"] == batched["metrics"]


def test_channels_last_gives_identical_masks(confident_model, toy_root, tmp_path):
    _, plain = _davis_masks(confident_model, toy_root, tmp_path / "a")
    fast = DepthFlow("mitb0", size=64)
    fast.load_state_dict(confident_model.state_dict())
    _, masks = _davis_masks(fast, toy_root, tmp_path / "b", channels_last=True)
    assert masks == plain


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DEPTHFLOW_SLOW_TESTS"), reason="compiling takes minutes on CPU; set "
                    "DEPTHFLOW_SLOW_TESTS=1")
def test_torch_compile_gives_identical_masks(confident_model, toy_root, tmp_path):
    _, plain = _davis_masks(confident_model, toy_root, tmp_path / "a")
    fast = DepthFlow("mitb0", size=64)
    fast.load_state_dict(confident_model.state_dict())
    _, masks = _davis_masks(fast, toy_root, tmp_path / "b", compile=True, batch_size=3)
    assert masks == plain


@needs_nnpack
def test_winograd_conv_matches_direct_convolution(small_winograd_maps):
    conv = nn.Conv2d(64, 96, 3, padding=1)
    fast = WinogradConv2d.from_conv(conv)
    assert fast.weight is conv.weight and fast.bias is conv.bias
    x = torch.randn(3, 64, 20, 24)
    with torch.inference_mode(), nnpack_calls() as calls:
        got = fast(x)
    exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    assert calls == [(1, 64, 20, 24)] * 3  # one frame at a time
    assert got.shape == exact.shape and got.dtype == torch.float32
    error = (got.double() - exact).abs().max() / exact.abs().max()
    assert 0 < error < 1e-4  # Winograd, not bitwise a direct convolution, but close


@needs_nnpack
def test_winograd_conv_falls_back_where_nnpack_does_not_apply(small_winograd_maps, monkeypatch):
    conv = nn.Conv2d(64, 64, 3, padding=1)
    fast = WinogradConv2d.from_conv(conv)
    x = torch.randn(1, 64, 16, 16, requires_grad=True)
    with nnpack_calls() as calls:
        assert torch.equal(fast(x), conv(x))  # autograd: the usual convolution, so training is unchanged
        with torch.inference_mode():
            fast64 = WinogradConv2d.from_conv(nn.Conv2d(64, 64, 3, padding=1).double())
            assert torch.equal(fast64(x.double()), F.conv2d(x.double(), fast64.weight, fast64.bias, padding=1))
            monkeypatch.setattr(WinogradConv2d, "min_pixels", 17 * 17)
            assert torch.equal(fast(x), conv(x))
    assert calls == []
    for not_eligible in (nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.Conv2d(64, 64, 3, padding=1, groups=64),
                         nn.Conv2d(64, 2, 3, padding=1), nn.Conv2d(64, 64, 1)):
        with pytest.raises(ValueError, match="not a 3x3"):
            WinogradConv2d.from_conv(not_eligible)


@needs_nnpack
def test_winograd_model_keeps_its_weights_and_nearly_its_masks(confident_model, toy_root, tmp_path,
                                                               small_winograd_maps):
    _, plain = _davis_masks(confident_model, toy_root, tmp_path / "a")
    fast = DepthFlow("mitb0", size=64)
    fast.load_state_dict(confident_model.state_dict())
    assert use_winograd(fast) == 8  # blend1-4 and cbam1-4.conv1; not the predictor nor CBAM's spatial gate
    assert fast.state_dict().keys() == confident_model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), confident_model.state_dict().values()))
    fast = prepare_model(fast, InferenceOptions())
    image, flow = torch.rand(2, 3, 48, 80), torch.rand(2, 3, 48, 80)
    with torch.inference_mode(), nnpack_calls() as calls:
        want, got = confident_model(image, flow), fast(image, flow)
    assert len(calls) == 16 and 0 < (got - want).abs().max() < 1e-4 * want.abs().max()
    _, masks = _davis_masks(fast, toy_root, tmp_path / "b")
    assert masks.keys() == plain.keys()
    ious = [jaccard(_decode(masks[k]), _decode(plain[k])) for k in plain]
    assert np.mean(ious) > 0.999 and any(_decode(m).any() for m in plain.values())


def test_winograd_is_refused_where_it_cannot_apply(capsys):
    with pytest.raises(UserError, match="--winograd is for CPU inference"):
        prepare_model(DepthFlow("mitb0", size=64), InferenceOptions(torch.device("cuda"), winograd=True))
    code, _, err = run_main(run_main_cli, "--train", "--winograd", capsys=capsys)
    assert_one_line_error(code, err, "--winograd is an inference option")


@pytest.mark.slow
def test_benchmark_reports_network_against_test_and_steps_against_epochs(tmp_path, capsys):
    code, out, err = run_main(bench.main, "--device", "cpu", "--backbones", "mitb0", "--size", "32", "--frames", "8",
                              "--frame-size", "48x64", "--batch", "2", "--iters", "1", "--train-batch", "2",
                              "--train-steps", "2", "--workers", "0", "--out", tmp_path, capsys=capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "bench.json").read_text())
    names = ["float32"] + (["winograd"] if winograd_available() else [])
    assert [r["variant"] for r in report["inference"]] == names
    for row in report["inference"]:
        assert row["network_fps"] > 0 and row["test_fps"] > 0
        assert row["ratio"] == pytest.approx(row["test_fps"] / row["network_fps"])
    assert report["inference"][0]["mask_iou_vs_float32"] == 1.0
    (training,) = report["training"]
    assert training["step_s"] > 0
    assert training["busy"] == pytest.approx(training["step_s"] / training["epoch_s_per_step"])
    table = (tmp_path / "bench.md").read_text()
    assert "| mitb0 | float32 | 2 |" in table and "device busy" in table
