"""MiT (SegFormer's Mix Transformer) encoders B0-B5, built on timm's PVTv2.

timm has no model called MiT, but PVTv2 with Mix-FFN ratios of 4 in every stage is MiT module for module:
overlapping patch embeddings, spatial-reduction attention with a fused kv projection, depthwise-conv
Mix-FFN and a LayerNorm closing each stage. A new MiT size is one line of `MIT_SPECS`.
"""

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# HF transformers' SegformerModel (the authors' training code, hence the released checkpoints) uses
# LayerNorm eps 1e-5 everywhere. NVlabs' original MiT uses 1e-6 in blocks and stage norms.
HF_LAYER_NORM_EPS = 1e-5
NVLABS_LAYER_NORM_EPS = 1e-6


@dataclass(frozen=True)
class MiTSpec:
    depths: tuple[int, int, int, int]
    embed_dims: tuple[int, int, int, int] = (64, 128, 320, 512)
    num_heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratios: tuple[int, int, int, int] = (4, 4, 4, 4)


# SegFormer's six sizes. The released DepthFlow/FakeFlow models are B0, B1 and B2.
MIT_SPECS = {
    "mitb0": MiTSpec(depths=(2, 2, 2, 2), embed_dims=(32, 64, 160, 256)),
    "mitb1": MiTSpec(depths=(2, 2, 2, 2)),
    "mitb2": MiTSpec(depths=(3, 4, 6, 3)),
    "mitb3": MiTSpec(depths=(3, 4, 18, 3)),
    "mitb4": MiTSpec(depths=(3, 8, 27, 3)),
    "mitb5": MiTSpec(depths=(3, 6, 40, 3)),
}


class MiTEncoder(nn.Module):
    """ImageNet-normalises a [0, 1] image and returns the four stage maps (strides 4, 8, 16, 32), NCHW."""

    def __init__(self, backbone: str = "mitb0", layer_norm_eps: float = HF_LAYER_NORM_EPS):
        from timm.models.pvt_v2 import PyramidVisionTransformerV2  # imported when needed: timm takes seconds

        super().__init__()
        spec = MIT_SPECS[backbone]
        self.out_channels = spec.embed_dims
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        # Patch-embed and spatial-reduction norms are plain nn.LayerNorm (eps 1e-5) in timm, as in both
        # reference implementations; norm_layer sets the block and stage norms.
        self.mit = PyramidVisionTransformerV2(
            depths=spec.depths,
            embed_dims=spec.embed_dims,
            num_heads=spec.num_heads,
            sr_ratios=spec.sr_ratios,
            mlp_ratios=spec.mlp_ratios,
            num_classes=0,
            norm_layer=partial(nn.LayerNorm, eps=layer_norm_eps),
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.mean) / self.std
        x = self.mit.patch_embed(x)
        features = []
        for stage in self.mit.stages:
            x = stage(x)
            features.append(x)
        return features
