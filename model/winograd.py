"""Winograd 3x3 convolutions for CPU inference, through NNPACK (built into PyTorch's CPU wheels).

At 512x512 most of DepthFlow's arithmetic is in the decoder's 256-channel 3x3 convolutions on the stride-4
and stride-8 maps. oneDNN runs them as direct convolutions, already near a CPU's float32 peak; Winograd's
algorithm needs 4-5x fewer multiplications, and NNPACK's kernels run these layers 1.6-2.9x faster on a
2-core AVX2 machine. The results are not bitwise those of a direct convolution: outputs move by about 1e-5
relative (direct float32 itself is about 3e-6 from float64), which flips the odd pixel whose two logits
are that close (README, 'Speed'). The swap is therefore opt-in (`--winograd`).
"""

import torch
from torch import nn

# Below about 64x64 pixels, or with few channels (the predictor's 2 outputs, CBAM's spatial gate), NNPACK's
# transforms cost more than they save (measured per decoder layer on a 2-core AVX2 machine).
MIN_PIXELS = 64 * 64
MIN_CHANNELS = 64


def winograd_available() -> bool:
    """Whether this PyTorch build has NNPACK and the CPU supports it (also initialises NNPACK)."""
    return hasattr(torch, "_nnpack_spatial_convolution") and torch.backends.nnpack.is_available()


class WinogradConv2d(nn.Conv2d):
    """A 3x3, stride-1, undilated, ungrouped, wide nn.Conv2d (same parameters, same state-dict keys) that runs
    NNPACK's Winograd kernels for float32 CPU inference on maps of at least `min_pixels` pixels, and the
    usual convolution otherwise (GPU, other dtypes, autograd, small maps)."""

    min_pixels: int = MIN_PIXELS

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "WinogradConv2d":
        if not is_eligible(conv):
            raise ValueError(f"not a 3x3 stride-1 dense convolution with same padding and >= {MIN_CHANNELS} "
                             f"channels: {conv}")
        new = cls(conv.in_channels, conv.out_channels, 3, padding=1, bias=conv.bias is not None,
                  device=conv.weight.device, dtype=conv.weight.dtype)
        new.weight, new.bias = conv.weight, conv.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = (x.device.type != "cpu" or x.dtype != torch.float32 or self.weight.dtype != torch.float32
                 or x.shape[-2] * x.shape[-1] < self.min_pixels
                 or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)))
        if plain:
            return super().forward(x)
        # NNPACK's batched entry point uses its training-oriented algorithm, several times slower than its
        # single-image inference one, so frames go through one at a time.
        weight = self.weight.contiguous()
        return torch.cat([torch._nnpack_spatial_convolution(frame[None].contiguous(), weight, self.bias, [1, 1])
                          for frame in x])


def is_eligible(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS)


def use_winograd(module: nn.Module) -> int:
    """Replace, in place, every eligible convolution under `module` by a WinogradConv2d sharing its
    parameters. Returns how many were replaced."""
    if not winograd_available():
        raise RuntimeError("NNPACK is not available in this PyTorch build or on this CPU")
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if is_eligible(child):
                setattr(parent, name, WinogradConv2d.from_conv(child))
                replaced += 1
    return replaced
