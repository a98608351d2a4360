"""MiT (SegFormer's Mix Transformer) encoders B0-B5, built on timm's PVTv2: the encoder family "mit".

timm has no model called MiT, but PVTv2 with Mix-FFN ratios of 4 in every stage is MiT module for module:
overlapping patch embeddings, spatial-reduction attention with a fused kv projection, depthwise-conv
Mix-FFN and a LayerNorm closing each stage. A new MiT size is one line of `MIT_SPECS`. Checkpoints store
an encoder's whole MiTSpec, so a model reloads as it was built, whatever MIT_SPECS holds by then.

`FAMILY` is this family's entry in the encoder registry (model/encoders.py): how it builds an encoder from
its description and how it loads ImageNet weights in the three layouts users hold (model/mit_keys.py).
"""

from dataclasses import asdict, dataclass
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

    def __init__(self, backbone: "str | MiTSpec" = "mitb0", layer_norm_eps: float = HF_LAYER_NORM_EPS):
        from timm.models.pvt_v2 import PyramidVisionTransformerV2  # imported when needed: timm takes seconds

        super().__init__()
        spec = MIT_SPECS[backbone] if isinstance(backbone, str) else backbone
        self.mit_spec = spec
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


NAMES = ", ".join(MIT_SPECS)


def owns(name: str) -> bool:
    return name in MIT_SPECS


def describe(name: str) -> dict:
    """The description a checkpoint stores for the MiT named `name`."""
    return {"family": "mit", "name": name, **{k: list(v) for k, v in asdict(MIT_SPECS[name]).items()}}


def build(description: dict, layer_norm_eps: float) -> MiTEncoder:
    spec = MiTSpec(**{k: tuple(v) for k, v in description.items() if k not in ("family", "name")})
    return MiTEncoder(spec, layer_norm_eps)


def load_imagenet(encoder: MiTEncoder, state_dict: dict, source: str) -> str:
    """Load ImageNet MiT weights in the HF (nvidia/mit-b*), NVlabs (mit_b*.pth) or timm layout, strictly, by
    the encoder's own module table: every weight has its place and its shape, or ValueError says which do not.
    Returns the layout found."""
    from model import mit_keys

    layout, weights = mit_keys.encoder_weights(state_dict)
    if layout is None:
        raise ValueError("it holds no MiT encoder weights in a known layout")
    mine = next((n for n, s in MIT_SPECS.items() if s == encoder.mit_spec), "this MiT")
    found = mit_keys.infer_backbone(weights, layout)
    try:
        timm_sd = mit_keys.convert(weights, encoder.mit_spec, layout, "timm")
    except mit_keys.KeyMismatch as err:
        raise ValueError(f"it holds a {found or 'MiT of another depth'}, not {mine} ({err})") from None
    own = encoder.mit.state_dict()
    if bad := next((k for k, v in timm_sd.items() if v.shape != own[k].shape), None):
        raise ValueError(f"it holds a {found or 'MiT of other widths'}, not {mine} ({bad} is "
                         f"{tuple(timm_sd[bad].shape)}, {mine}'s {tuple(own[bad].shape)})")
    encoder.mit.load_state_dict(timm_sd, strict=True)
    return layout
