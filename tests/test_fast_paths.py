"""Inference options: batching, workers and compilation keep the masks; test-time augmentation changes them
as it says, and says so in every figure."""

import io
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dataset import DATASETS, scan
from evaluator import evaluate_dataset
from inference import TTA, InferenceOptions, Segmenter
from model import DepthFlow
from tests.conftest import run_main
from tools import bench


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


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DEPTHFLOW_SLOW_TESTS"), reason="compiling takes minutes on CPU; set "
                    "DEPTHFLOW_SLOW_TESTS=1")
def test_torch_compile_gives_identical_masks(confident_model, toy_root, tmp_path):
    _, plain = _davis_masks(confident_model, toy_root, tmp_path / "a")
    fast = DepthFlow("mitb0", size=64)
    fast.load_state_dict(confident_model.state_dict())
    _, masks = _davis_masks(fast, toy_root, tmp_path / "b", compile=True, batch_size=3)
    assert masks == plain


def test_test_time_augmentation_averages_the_logits_of_its_views(confident_model, toy_root):
    """Scales and flips: each view through the network at its square size, logits resized to the frame in
    float32, flipped back and averaged, then the class decision."""
    videos = scan(DATASETS["davis"], toy_root / "DAVIS")[:1]
    tta = TTA((1.0, 1.5), hflip=True)
    frames = list(Segmenter(confident_model, InferenceOptions(torch.device("cpu"), tta=tta)).frames(videos,
                                                                                                 progress=False))
    frame = videos[0].frames[2]
    image, flow = (torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
                   for p in (frame.image, frame.flow))
    size, views = image.shape[-2:], []
    with torch.no_grad():
        for side in (64, 96):  # 1.0 and 1.5 of the model's 64, in multiples of 32
            x, y = (F.interpolate(t, size=(side, side), mode="bicubic") for t in (image, flow))
            views.append(F.interpolate(confident_model.forward_square(x, y), size=size, mode="bicubic"))
            flipped = confident_model.forward_square(x.flip(-1), y.flip(-1))
            views.append(F.interpolate(flipped, size=size, mode="bicubic").flip(-1))
    logits = sum(views) / 4
    want = (logits[0, 1] > logits[0, 0]).numpy().astype(np.uint8)
    assert np.array_equal(frames[2].mask, want)
    single = list(Segmenter(confident_model, InferenceOptions(torch.device("cpu"))).frames(videos, progress=False))
    assert not np.array_equal(single[2].mask, want)  # the views do change the masks


def test_test_time_augmentation_is_named_in_every_figure(confident_model, toy_root, tmp_path):
    assert TTA().name == "" and not TTA().enabled
    assert TTA.parse("0.75,1,1.25+flip") == TTA((0.75, 1.0, 1.25), True)
    assert TTA.parse("flip") == TTA((1.0,), True) and TTA.parse("flip").name == "TTA scales 1 + flip"
    for bad in ("2,2", "fast", "0.1", "1+flip+flip,2"):
        with pytest.raises(ValueError):
            TTA.parse(bad)
    result, _ = _davis_masks(confident_model, toy_root, tmp_path, tta=TTA((1.0,), True))
    assert result["tta"] == "TTA scales 1 + flip"
    assert all(p.endswith("[TTA scales 1 + flip]") for p in result["protocols"].values())


@pytest.mark.slow
def test_benchmark_reports_network_against_test_and_steps_against_epochs(tmp_path, capsys):
    code, out, err = run_main(bench.main, "--device", "cpu", "--backbones", "mitb0", "--size", "32", "--frames", "8",
                              "--frame-size", "48x64", "--batch", "2", "--part-seconds", "1", "--train-batch", "2",
                              "--train-steps", "2", "--workers", "0", "--out", tmp_path, capsys=capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "bench.json").read_text())
    names = ["float32"]
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
