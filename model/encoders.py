"""The encoder registry: every backbone family DepthFlow can use.

Each family is one module and one entry of FAMILIES (as timm registers its model families), owning three
things: `describe(name)`, the description a checkpoint stores (so a model reloads as it was built, with no
guessing from weight shapes); `build(description, layer_norm_eps)`; and `load_imagenet(encoder, weights,
source)`, which reads that family's pretrained files in every layout users hold.

- `mitb0` ... `mitb5`: MiT, SegFormer's encoder (model/mit.py; the paper's B0, B1 and B2).
- `timm:<model name>`: any timm model with feature maps at strides 4 to 32 (model/timm_features.py).

An encoder takes a Bx3xHxW image in [0, 1] and returns four NCHW maps at strides 4, 8, 16 and 32; its
`out_channels` gives their widths, which size the decoder.
"""

from types import ModuleType

from torch import nn

from model import mit, timm_features
from model.mit import HF_LAYER_NORM_EPS, MIT_SPECS

# A family is a module with NAMES (how its backbones are named, for messages), owns(name), describe(name),
# build(description, layer_norm_eps) and load_imagenet(encoder, weights, source).
FAMILIES: dict[str, ModuleType] = {"mit": mit, "timm": timm_features}


def family_of(name: str) -> ModuleType:
    """The family of a backbone name; ValueError naming the choices for an unknown one."""
    for family in FAMILIES.values():
        if family.owns(name):
            return family
    raise ValueError(f"unknown backbone {name!r}; expected {' or '.join(f.NAMES for f in FAMILIES.values())}")


def check_backbone(name: str) -> str:
    """`name` if a family owns it (a timm model is checked when built), else ValueError."""
    family_of(name)
    return name


def is_mit(name: str) -> bool:
    return name in MIT_SPECS


def describe(name: str) -> dict:
    return family_of(name).describe(name)


def build_encoder(backbone: str | dict, layer_norm_eps: float = HF_LAYER_NORM_EPS) -> nn.Module:
    """An encoder from a backbone name or from the description a checkpoint stored."""
    description = describe(backbone) if isinstance(backbone, str) else backbone
    return FAMILIES[description["family"]].build(description, layer_norm_eps)


def load_imagenet(encoder: nn.Module, description: dict, weights: dict, source: str) -> str:
    """ImageNet weights into one encoder, by its family's rules; ValueError if they do not fit it."""
    return FAMILIES[description["family"]].load_imagenet(encoder, weights, source)
