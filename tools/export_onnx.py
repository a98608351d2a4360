"""Export DepthFlow's network to ONNX: both encoders and the decoder, at the network's square size.

    python -m tools.export_onnx DepthFlow_mitb2.pth depthflow_mitb2.onnx [--check]

The graph is `DepthFlow.forward_square`: inputs `image` and `flow`, Bx3xSxS float32 in [0, 1] (S the
checkpoint's size, 512 for the released files; the batch is dynamic), output `logits`, Bx2xSxS. It is what
to run in ONNX Runtime, TensorRT or a browser; it does not cover what surrounds the network: optical flow
(RAFT or DIS) and its colour-wheel image, the bicubic resizes of frame and flow to SxS and of the logits
back to the frame's size, and the class decision (logits[:, 1] > logits[:, 0]), which the caller does as
inference.py does. `--check` runs the file in ONNX Runtime on random inputs beside PyTorch and prints the
largest logit difference and the share of mask pixels that agree.

It needs the onnx and onnxscript packages (PyTorch's exporter), and onnxruntime for `--check`
(`pip install onnx onnxscript onnxruntime`).
"""

import argparse
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch

from model.checkpoints import load_depthflow
from utils.errors import ArgumentParser, UserError, cli_entry
from utils.io import check_outside


class _Square(torch.nn.Module):
    """The network at its square size, as a module (torch.onnx exports modules)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image, flow):
        return self.model.forward_square(image, flow)


def export(model, path: Path, batch: int = 2) -> Path:
    """Write the network's ONNX graph to `path`, with a dynamic batch; returns the path."""
    for package in ("onnx", "onnxscript"):
        if importlib.util.find_spec(package) is None:
            raise UserError(f"ONNX export needs the {package} package (pip install onnx onnxscript)")
    model = model.eval()
    size = model.size
    inputs = (torch.rand(batch, 3, size, size), torch.rand(batch, 3, size, size))
    batch_dim = torch.export.Dim("batch", min=1, max=1024)
    with warnings.catch_warnings():  # the exporter notes that both inputs share the one batch dimension: they do
        warnings.filterwarnings("ignore", message=".*shares the same shape constraints with another axis.*")
        program = torch.onnx.export(_Square(model).eval(), inputs, dynamo=True, input_names=["image", "flow"],
                                    output_names=["logits"], dynamic_shapes=({0: batch_dim}, {0: batch_dim}),
                                    verbose=False)
        program.save(str(path), external_data=False)
    return path


def check(model, path: Path, batch: int = 3, seed: int = 0) -> dict:
    """ONNX Runtime on the CPU beside PyTorch, on random inputs: the largest logit difference, the largest
    logit, and the share of mask pixels that agree."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise UserError("--check needs the onnxruntime package (pip install onnxruntime)")
    import onnxruntime

    gen = torch.Generator().manual_seed(seed)
    size = model.size
    image, flow = torch.rand(batch, 3, size, size, generator=gen), torch.rand(batch, 3, size, size, generator=gen)
    with torch.no_grad():
        want = model.eval().forward_square(image, flow).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"image": image.numpy(), "flow": flow.numpy()})[0]
    masks_agree = float(np.mean((got[:, 1] > got[:, 0]) == (want[:, 1] > want[:, 0])))
    return {"max_abs_diff": float(np.abs(got - want).max()), "max_abs_logit": float(np.abs(want).max()),
            "masks_agree": masks_agree}


@cli_entry
def main(argv=None):
    parser = ArgumentParser(prog="python -m tools.export_onnx", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a released DepthFlow_/FakeFlow_mitb*.pth or a trained checkpoint")
    parser.add_argument("output", help="the .onnx file to write")
    parser.add_argument("--check", action="store_true", help="compare ONNX Runtime with PyTorch on random inputs")
    args = parser.parse_args(argv)
    out = Path(args.output)
    check_outside(out, [Path(args.checkpoint)], "the output")
    model = load_depthflow(args.checkpoint)
    export(model, out)
    print(f"wrote {out} ({model.backbone}, inputs Bx3x{model.size}x{model.size})")
    if args.check:
        result = check(model, out)
        print(f"ONNX Runtime vs PyTorch: largest logit difference {result['max_abs_diff']:.2e} (logits up to "
              f"{result['max_abs_logit']:.3g}), mask pixels agreeing {result['masks_agree']:.6f}")


if __name__ == "__main__":
    main()
