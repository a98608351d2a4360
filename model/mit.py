"""MiT (SegFormer's Mix Transformer) encoders B0-B5, built on timm's PVTv2: the encoder family "mit".

timm has no model called MiT, but PVTv2 with Mix-FFN ratios of 4 in every stage is MiT module for module:
overlapping patch embeddings, spatial-reduction attention with a fused kv projection, depthwise-conv
Mix-FFN and a LayerNorm closing each stage. A new MiT size is one line of `MIT_SPECS`. Checkpoints store
an encoder's whole MiTSpec, so a model reloads as it was built, whatever MIT_SPECS holds by then.

`FAMILY` is this family's entry in the encoder registry (model/encoders.py): how it builds an encoder from
its description and how it loads ImageNet weights in the three layouts users hold (HF transformers, NVlabs,
timm), by one table of module names.
"""

import re
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


# ---- MiT parameter names in the three layouts users hold, and conversion between them ----------------------
# Layouts: "timm" (this project's modules), "hf" (HF transformers 4.x SegformerModel encoder: the released
# DepthFlow/FakeFlow checkpoints and the nvidia/mit-b* hub repos) and "nvlabs" (the original mit_b*.pth).
# Every MiT module is listed once with its name in each layout, so each direction is a table lookup and any
# key outside the table is reported rather than silently dropped.

LAYOUTS = ("timm", "hf", "nvlabs")


def _module_table(depths, sr_ratios):
    """Rows of (timm, hf, nvlabs) module names; the hf name of the fused kv projection is a (key, value) pair."""
    rows = [
        ("patch_embed.proj", "patch_embeddings.0.proj", "patch_embed1.proj"),
        ("patch_embed.norm", "patch_embeddings.0.layer_norm", "patch_embed1.norm"),
    ]
    for i, (depth, sr_ratio) in enumerate(zip(depths, sr_ratios)):
        if i > 0:
            rows += [
                (f"stages.{i}.downsample.proj", f"patch_embeddings.{i}.proj", f"patch_embed{i + 1}.proj"),
                (f"stages.{i}.downsample.norm", f"patch_embeddings.{i}.layer_norm", f"patch_embed{i + 1}.norm"),
            ]
        for j in range(depth):
            t, h, n = f"stages.{i}.blocks.{j}", f"block.{i}.{j}", f"block{i + 1}.{j}"
            rows += [
                (f"{t}.norm1", f"{h}.layer_norm_1", f"{n}.norm1"),
                (f"{t}.attn.q", f"{h}.attention.self.query", f"{n}.attn.q"),
                (f"{t}.attn.kv", (f"{h}.attention.self.key", f"{h}.attention.self.value"), f"{n}.attn.kv"),
                (f"{t}.attn.proj", f"{h}.attention.output.dense", f"{n}.attn.proj"),
                (f"{t}.norm2", f"{h}.layer_norm_2", f"{n}.norm2"),
                (f"{t}.mlp.fc1", f"{h}.mlp.dense1", f"{n}.mlp.fc1"),
                (f"{t}.mlp.dwconv", f"{h}.mlp.dwconv.dwconv", f"{n}.mlp.dwconv.dwconv"),
                (f"{t}.mlp.fc2", f"{h}.mlp.dense2", f"{n}.mlp.fc2"),
            ]
            if sr_ratio > 1:
                rows += [
                    (f"{t}.attn.sr", f"{h}.attention.self.sr", f"{n}.attn.sr"),
                    (f"{t}.attn.norm", f"{h}.attention.self.layer_norm", f"{n}.attn.norm"),
                ]
        rows.append((f"stages.{i}.norm", f"layer_norm.{i}", f"norm{i + 1}"))
    return rows


def module_table(backbone):
    """The table of a MiT given by name (MIT_SPECS) or by its MiTSpec."""
    spec = MIT_SPECS[backbone] if isinstance(backbone, str) else backbone
    return _module_table(spec.depths, spec.sr_ratios)


def expected_keys(backbone, layout: str) -> set[str]:
    col = LAYOUTS.index(layout)
    keys = set()
    for row in module_table(backbone):
        names = row[col] if isinstance(row[col], tuple) else (row[col],)
        keys.update(f"{name}.{p}" for name in names for p in ("weight", "bias"))
    return keys


class KeyMismatch(ValueError):
    def __init__(self, missing, unexpected):
        self.missing, self.unexpected = sorted(missing), sorted(unexpected)
        super().__init__(
            f"{len(self.missing)} missing keys (first: {self.missing[:2]}), "
            f"{len(self.unexpected)} unexpected keys (first: {self.unexpected[:2]})"
        )


def convert(state_dict: dict, backbone, src: str, dst: str) -> dict:
    """Map an MiT state dict from layout `src` to `dst`, strictly: every key must be known and present."""
    missing = expected_keys(backbone, src) - state_dict.keys()
    unexpected = state_dict.keys() - expected_keys(backbone, src)
    if missing or unexpected:
        raise KeyMismatch(missing, unexpected)
    s, d = LAYOUTS.index(src), LAYOUTS.index(dst)
    out = {}
    for row in module_table(backbone):
        for p in ("weight", "bias"):
            if isinstance(row[s], tuple):
                value = torch.cat([state_dict[f"{name}.{p}"] for name in row[s]], dim=0)
            else:
                value = state_dict[f"{row[s]}.{p}"]
            if isinstance(row[d], tuple):
                for name, part in zip(row[d], value.chunk(len(row[d]), dim=0)):
                    out[f"{name}.{p}"] = part.clone()
            else:
                out[f"{row[d]}.{p}"] = value
    return out


_FIRST_PROJ = {"timm": "patch_embed.proj.weight", "hf": "patch_embeddings.0.proj.weight",
               "nvlabs": "patch_embed1.proj.weight"}
# (regex of a block key giving stage and block index, index of the first stage in that layout)
_BLOCK_KEY = {"timm": (r"stages\.(\d)\.blocks\.(\d+)\.", 0), "hf": (r"block\.(\d)\.(\d+)\.", 0),
              "nvlabs": (r"block(\d)\.(\d+)\.", 1)}


def infer_backbone(state_dict: dict, layout: str) -> str | None:
    """The MiT version with this first-stage width and these per-stage block counts, or None."""
    first = state_dict.get(_FIRST_PROJ[layout])
    if first is None:
        return None
    pattern, first_stage = _BLOCK_KEY[layout]
    blocks = {m.groups() for m in map(re.compile(pattern).match, state_dict) if m}
    depths = tuple(sum(int(stage) - first_stage == i for stage, _ in blocks) for i in range(4))
    for name, spec in MIT_SPECS.items():
        if spec.embed_dims[0] == first.shape[0] and spec.depths == depths:
            return name
    return None


def _strip(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def encoder_weights(state_dict: dict) -> tuple[str | None, dict]:
    """(layout, the MiT encoder's weights alone) of an ImageNet MiT file: HF's (`segformer.encoder.` or
    `encoder.` prefixes, a classifier beside), NVlabs' or timm's (a `head.` classifier beside); (None, {})."""
    for prefix in ("segformer.encoder.", "encoder."):
        if any(k.startswith(prefix + "patch_embeddings.") for k in state_dict):
            return "hf", _strip(state_dict, prefix)
    for layout in ("nvlabs", "timm"):
        if _FIRST_PROJ[layout] in state_dict:
            return layout, {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    return None, {}


# ---- the family's entry in the encoder registry ------------------------------------------------------------

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
    layout, weights = encoder_weights(state_dict)
    if layout is None:
        raise ValueError("it holds no MiT encoder weights in a known layout")
    mine = next((n for n, s in MIT_SPECS.items() if s == encoder.mit_spec), "this MiT")
    found = infer_backbone(weights, layout)
    try:
        timm_sd = convert(weights, encoder.mit_spec, layout, "timm")
    except KeyMismatch as err:
        raise ValueError(f"it holds a {found or 'MiT of another depth'}, not {mine} ({err})") from None
    own = encoder.mit.state_dict()
    if bad := next((k for k, v in timm_sd.items() if v.shape != own[k].shape), None):
        raise ValueError(f"it holds a {found or 'MiT of other widths'}, not {mine} ({bad} is "
                         f"{tuple(timm_sd[bad].shape)}, {mine}'s {tuple(own[bad].shape)})")
    encoder.mit.load_state_dict(timm_sd, strict=True)
    return layout
