"""The encoder factory: every backbone DepthFlow can use, by name.

- `mitb0` ... `mitb5`: MiT, SegFormer's encoder (model/mit.py; the paper's B0, B1 and B2, and the larger
  sizes from the same table).
- `timm:<model name>`: any timm model that gives feature maps at strides 4, 8, 16 and 32 through
  `features_only` (ConvNeXt, Swin, PVTv2, ResNet, EfficientNet, ...), ImageNet-normalised with the
  model's own mean and std.

An encoder takes a Bx3xHxW image in [0, 1] and returns four NCHW maps at strides 4, 8, 16 and 32; its
`out_channels` gives their widths, which size the decoder.
"""

import torch
from torch import nn

from model.mit import HF_LAYER_NORM_EPS, MIT_SPECS, MiTEncoder

TIMM_PREFIX = "timm:"
STRIDES = (4, 8, 16, 32)


def is_mit(name: str) -> bool:
    return name in MIT_SPECS


def check_backbone(name: str) -> str:
    """`name` if it names a backbone (timm names are checked when the model is built), else ValueError."""
    if is_mit(name) or (name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX)):
        return name
    raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(MIT_SPECS)} or timm:<model name>")


class TimmEncoder(nn.Module):
    """A timm model's feature maps at strides 4, 8, 16 and 32."""

    def __init__(self, name: str):
        super().__init__()
        import timm

        try:
            probe = timm.create_model(name, pretrained=False, features_only=True)
        except RuntimeError as err:  # timm's "Unknown model" and "features_only not implemented"
            raise ValueError(f"timm cannot build {name!r} with feature maps: {err}") from None
        reductions = probe.feature_info.reduction()
        if not set(STRIDES) <= set(reductions):
            raise ValueError(f"timm model {name!r} gives feature maps at strides {reductions}; DepthFlow's decoder "
                             f"needs {STRIDES}")
        indices = tuple(reductions.index(s) for s in STRIDES)
        self.features = timm.create_model(name, pretrained=False, features_only=True, out_indices=indices)
        self.out_channels = tuple(self.features.feature_info.channels())
        self.channels_last = str(getattr(self.features, "output_fmt", "NCHW")).endswith("NHWC")  # Swin and others
        config = self.features.pretrained_cfg
        self.register_buffer("mean", torch.tensor(config.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(config.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.features((x - self.mean) / self.std)
        return [f.permute(0, 3, 1, 2) for f in features] if self.channels_last else features


def build_encoder(name: str, layer_norm_eps: float = HF_LAYER_NORM_EPS) -> nn.Module:
    check_backbone(name)
    if is_mit(name):
        return MiTEncoder(name, layer_norm_eps)
    return TimmEncoder(name.removeprefix(TIMM_PREFIX))
