"""ONNX export: the exported network gives PyTorch's logits and masks in ONNX Runtime, for any batch."""

import numpy as np
import pytest
import torch

from model import DepthFlow
from model.checkpoints import save_project_checkpoint
from tests.conftest import assert_one_line_error, run_main
from tools import export_onnx


@pytest.mark.slow
def test_onnx_export_gives_the_logits_and_masks_of_pytorch(tmp_path, capsys):
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = DepthFlow("mitb0", size=32).eval()
    with torch.no_grad():
        model.decoder.predictor.conv.weight.mul_(50)  # margins like a trained network's
    checkpoint = tmp_path / "m.pth"
    save_project_checkpoint(checkpoint, model)
    code, out, err = run_main(export_onnx.main, checkpoint, tmp_path / "m.onnx", "--check", capsys=capsys)
    assert code in (0, None), err
    assert "mask pixels agreeing 1.000000" in out
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    image, flow = torch.rand(5, 3, 32, 32), torch.rand(5, 3, 32, 32)  # another batch than the export's
    got = session.run(["logits"], {"image": image.numpy(), "flow": flow.numpy()})[0]
    with torch.no_grad():
        want = model.forward_square(image, flow).numpy()
    assert got.shape == (5, 2, 32, 32) and np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    code, _, err = run_main(export_onnx.main, checkpoint, checkpoint, capsys=capsys)
    assert_one_line_error(code, err, "which this run reads")
