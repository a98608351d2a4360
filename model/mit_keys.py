"""MiT parameter names in the three layouts users hold, and conversion between them.

Layouts: "timm" (this project's modules), "hf" (HF transformers 4.x SegformerModel encoder: the released
DepthFlow/FakeFlow checkpoints and the nvidia/mit-b* hub repos) and "nvlabs" (the original mit_b*.pth).
Every MiT module is listed once with its name in each layout, so each direction is a table lookup and any
key outside the table is reported rather than silently dropped.
"""

import re

import torch

from model.mit import MIT_SPECS

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
