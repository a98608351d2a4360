"""Any timm model with feature maps at strides 4, 8, 16 and 32 (`features_only`): the encoder family "timm".

`--backbone timm:<model name>` (ConvNeXt, Swin, PVTv2, ResNet, EfficientNet, ...), ImageNet-normalised with
the model's own mean and std; ImageNet weights come from a timm checkpoint of the model.
"""

import torch
from torch import nn

PREFIX = "timm:"
STRIDES = (4, 8, 16, 32)


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


NAMES = "timm:<model name>"


def owns(name: str) -> bool:
    return name.startswith(PREFIX) and len(name) > len(PREFIX)


def describe(name: str) -> dict:
    return {"family": "timm", "name": name}


def build(description: dict, layer_norm_eps: float) -> TimmEncoder:
    return TimmEncoder(description["name"].removeprefix(PREFIX))


def load_imagenet(encoder: TimmEncoder, state_dict: dict, source: str) -> str:
    """The feature extractor keeps the full model's module names, so its weights are the checkpoint's minus
    the layers it drops (the classifier and anything after the last feature map); strictly."""
    wanted = encoder.features.state_dict()
    weights = {k: v for k, v in state_dict.items() if k in wanted}
    missing = sorted(wanted.keys() - weights.keys())
    if missing:
        raise ValueError(f"it lacks {len(missing)} of the encoder's weights (first: {missing[:3]})")
    if bad := next((k for k, v in weights.items() if v.shape != wanted[k].shape), None):
        raise ValueError(f"its {bad} is {tuple(weights[bad].shape)}, the encoder's {tuple(wanted[bad].shape)}")
    encoder.features.load_state_dict(weights, strict=True)
    return "timm"
