"""Every inference fast path gives the plain path's masks (README, 'Speed')."""

import json
import os

import pytest
import torch

from dataset import DATASETS, scan
from evaluator import prepare_for_inference, segment_dataset
from model import DepthFlow
from tests.conftest import run_main
from utils import bench


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
    result = segment_dataset(model, DATASETS["davis"], videos, torch.device("cpu"), out_dir=out, workers=0,
                             progress=False, **options)
    return result, {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.png"))}


def test_batching_and_workers_give_identical_masks(confident_model, toy_root, tmp_path):
    plain, plain_masks = _davis_masks(confident_model, toy_root, tmp_path / "a", batch_size=1)
    batched, batched_masks = _davis_masks(confident_model, toy_root, tmp_path / "b", batch_size=8)
    assert plain_masks == batched_masks and len(plain_masks) == 16
    assert plain["metrics"] == batched["metrics"]


def test_channels_last_gives_identical_masks(confident_model, toy_root, tmp_path):
    _, plain = _davis_masks(confident_model, toy_root, tmp_path / "a")
    fast = prepare_for_inference(DepthFlow("mitb0", size=64), torch.device("cpu"), channels_last=True)
    fast.load_state_dict(confident_model.state_dict())
    _, masks = _davis_masks(fast, toy_root, tmp_path / "b", channels_last=True)
    assert masks == plain


@pytest.mark.skipif(not os.environ.get("DEPTHFLOW_SLOW_TESTS"), reason="compiling takes minutes on CPU; set "
                    "DEPTHFLOW_SLOW_TESTS=1")
def test_torch_compile_gives_identical_masks(confident_model, toy_root, tmp_path):
    _, plain = _davis_masks(confident_model, toy_root, tmp_path / "a")
    fast = prepare_for_inference(DepthFlow("mitb0", size=64), torch.device("cpu"), compile_model=True)
    fast.load_state_dict(confident_model.state_dict())
    _, masks = _davis_masks(fast, toy_root, tmp_path / "b")
    assert masks == plain


def test_benchmark_quick_mode(tmp_path, capsys):
    code, out, err = run_main(bench.main, "--quick", "--device", "cpu", "--out", tmp_path, "--workers", "0",
                              capsys=capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "bench.json").read_text())
    variants = {(r["variant"], r["batch"]) for r in report["forward"]}
    assert variants == {("float32", 1), ("float32", 2), ("channels_last", 1), ("channels_last", 2)}
    assert all(r["frames_per_s"] > 0 and r["mask_iou_vs_fp32"] == 1.0 for r in report["forward"])
    assert report["per_backbone"]["mitb0"]["gflops_per_frame"] > 0
    e2e = report["end_to_end"]
    assert e2e["frames"] == 24 and e2e["pixel_agreement"] > 0.999
    assert "| mitb0 | float32 | 1 |" in (tmp_path / "bench.md").read_text()
