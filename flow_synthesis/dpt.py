"""DPT (Ranftl et al., 2021) monocular depth, built on timm, loading the official weight files by their own keys.

DPT-Hybrid taps the ResNet-50 stem's stages 0 and 1 and ViT blocks 8 and 11; DPT-Large taps ViT blocks
5, 11, 17 and 23. Tapped tokens get the "project" readout (each patch token concatenated with the class
token, Linear + GELU), are reshaped to maps, resampled to strides 4/8/16/32, and fused top-down by
RefineNet-style blocks; the head predicts relative inverse depth (MiDaS convention: larger = nearer).
Module names follow the official files: pretrained.model.* (the timm ViT), pretrained.act_postprocess{1-4},
scratch.layer{1-4}_rn, scratch.refinenet{1-4}, scratch.output_conv.
"""

import math
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.layers import StdConv2dSame, pad_same
from torch import nn

from utils.errors import UserError


@dataclass(frozen=True)
class DPTSpec:
    timm_name: str
    hooks: tuple[int, ...]
    vit_features: int
    features: tuple[int, int, int, int]  # channels of the four maps before scratch.layer*_rn
    hybrid: bool
    weight_files: tuple[str, ...]


DPT_SPECS = {
    "hybrid": DPTSpec("vit_base_r50_s16_384", (0, 1, 8, 11), 768, (256, 512, 768, 768), True,
                      ("dpt_hybrid-midas-501f0c75.pt", "dpt_hybrid_384.pt")),
    "large": DPTSpec("vit_large_patch16_384", (5, 11, 17, 23), 1024, (256, 512, 1024, 1024), False,
                     ("dpt_large-midas-2f21e586.pt", "dpt_large_384.pt")),
}
NET_SIZE = 384
MULTIPLE_OF = 32
PATCH = 16


class ProjectReadout(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU())

    def forward(self, tokens):
        patches = tokens[:, 1:]
        return self.project(torch.cat([patches, tokens[:, :1].expand_as(patches)], dim=-1))


class Postprocess(nn.Module):
    """act_postprocess{i}: readout (index 0), then convs at indices 3 (1x1) and 4 (resampling), as in the files."""

    def __init__(self, vit_features: int, out: int, resample: nn.Module | None):
        super().__init__()
        self.add_module("0", ProjectReadout(vit_features))
        self.add_module("3", nn.Conv2d(vit_features, out, 1))
        if resample is not None:
            self.add_module("4", resample)

    def forward(self, tokens, grid):
        x = getattr(self, "0")(tokens).transpose(1, 2).unflatten(2, grid)
        for name in ("3", "4"):
            if name in self._modules:
                x = self._modules[name](x)
        return x


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(F.relu(x)))) + x


class FusionBlock(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(self, x, skip=None, size=None):
        """`size`: the resolution to resample to (Depth Anything's head); by default twice the input's."""
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        resample = {"size": size} if size is not None else {"scale_factor": 2}
        x = F.interpolate(x, **resample, mode="bilinear", align_corners=True)
        return self.out_conv(x)


# The hybrid's ResNet standardises each convolution's weights. The DPT repository runs it with the timm 0.4.5
# it pins, as the original ViT-R50 code does: (w - mean) / (std + 1e-5), std without Bessel's correction; the
# weights were trained so. timm 0.6 and later compute (w - mean) / sqrt(var + 1e-8), which differs by about
# 1e-5 / std relative: ~1e-4 of the depth range for a filter of std 0.045, ~3% for one of std 0.00045.
DPT_STD_EPS = 1e-5


class DPTStdConv2dSame(StdConv2dSame):
    """timm's StdConv2dSame with the DPT repository's standardisation (DPT_STD_EPS above)."""

    def forward(self, x):
        if self.same_pad:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        std, mean = torch.std_mean(self.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
        weight = (self.weight - mean) / (std + DPT_STD_EPS)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def standardise_as_dpt(module: nn.Module) -> int:
    """Give every StdConv2dSame in `module` the DPT repository's standardisation; returns how many. The
    modules keep their parameters and names: only the arithmetic of their forward changes."""
    convs = [m for m in module.modules() if type(m) is StdConv2dSame]
    for conv in convs:
        conv.__class__ = DPTStdConv2dSame
    return len(convs)


class DPT(nn.Module):
    """DPT depth network. forward: Bx3xHxW normalised input (H, W multiples of 32) -> BxHxW inverse depth."""

    def __init__(self, variant: str = "hybrid", features: int = 256):
        super().__init__()
        spec = DPT_SPECS[variant]
        self.spec = spec
        self.pretrained = nn.Module()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # timm notes that the hybrid's old name is an alias
            self.pretrained.model = timm.create_model(spec.timm_name, pretrained=False)
        if spec.hybrid:
            standardise_as_dpt(self.pretrained.model)
        v, f = spec.vit_features, spec.features
        if not spec.hybrid:
            self.pretrained.act_postprocess1 = Postprocess(v, f[0], nn.ConvTranspose2d(f[0], f[0], 4, stride=4))
            self.pretrained.act_postprocess2 = Postprocess(v, f[1], nn.ConvTranspose2d(f[1], f[1], 2, stride=2))
        self.pretrained.act_postprocess3 = Postprocess(v, f[2], None)
        self.pretrained.act_postprocess4 = Postprocess(v, f[3], nn.Conv2d(f[3], f[3], 3, stride=2, padding=1))
        self.scratch = nn.Module()
        for i, channels in enumerate(f, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(channels, features, 3, padding=1, bias=False))
            setattr(self.scratch, f"refinenet{i}", FusionBlock(features))
        self.scratch.output_conv = nn.Sequential(
            nn.Conv2d(features, features // 2, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(features // 2, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 1, 1),
            nn.ReLU(),
        )

    def _pos_embed(self, grid):
        """Class-token embedding plus the patch grid resized bilinearly (align_corners False) to `grid`."""
        vit = self.pretrained.model
        cls, patches = vit.pos_embed[:, :1], vit.pos_embed[0, 1:]
        side = int(math.sqrt(len(patches)))
        patches = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)
        return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1)

    def _taps(self, x):
        vit = self.pretrained.model
        grid = (x.shape[-2] // PATCH, x.shape[-1] // PATCH)
        maps = []
        if self.spec.hybrid:
            backbone = vit.patch_embed.backbone
            x = backbone.stem(x)
            for i, stage in enumerate(backbone.stages):
                x = stage(x)
                if i < 2:
                    maps.append(x)
            x = backbone.norm(x)
        tokens = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([vit.cls_token.expand(len(tokens), -1, -1), tokens], dim=1) + self._pos_embed(grid)
        taps = {}
        for i, block in enumerate(vit.blocks):
            tokens = block(tokens)
            if i in self.spec.hooks:
                taps[i] = tokens
        hooks = self.spec.hooks[2:] if self.spec.hybrid else self.spec.hooks
        first = 3 if self.spec.hybrid else 1
        for n, hook in enumerate(hooks, start=first):
            maps.append(getattr(self.pretrained, f"act_postprocess{n}")(taps[hook], grid))
        return maps

    def forward(self, x):
        l1, l2, l3, l4 = (getattr(self.scratch, f"layer{i}_rn")(m) for i, m in enumerate(self._taps(x), start=1))
        path = self.scratch.refinenet4(l4)
        path = self.scratch.refinenet3(path, l3)
        path = self.scratch.refinenet2(path, l2)
        path = self.scratch.refinenet1(path, l1)
        return self.scratch.output_conv(path).squeeze(1)


def load_dpt(path, variant: str | None = None) -> DPT:
    """Build DPT and load an official weight file strictly. The variant is read from the file if not given."""
    from model.checkpoints import load_strictly, read_file

    hint = "the DPT/MiDaS release: " + ", ".join(f for s in DPT_SPECS.values() for f in s.weight_files)
    state = read_file(path, hint)
    found = "large" if "pretrained.act_postprocess1.0.project.0.weight" in state else "hybrid"
    if not any(k.startswith("scratch.output_conv") for k in state):
        raise UserError(f"{path} is not a DPT weight file (expected {hint})")
    if variant and variant != found:
        raise UserError(f"{path} holds DPT-{found.capitalize()} weights, not the DPT-{variant.capitalize()} asked for")
    model = DPT(found)
    load_strictly(model, state, path, f"DPT-{found.capitalize()}")
    return model.eval()


def input_size(height: int, width: int) -> tuple[int, int]:
    """MiDaS 'minimal' resize: keep the aspect ratio, scale the side nearest 384 to 384, round to /32."""
    scale_h, scale_w = NET_SIZE / height, NET_SIZE / width
    scale = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h
    return (int(np.round(scale * height / MULTIPLE_OF) * MULTIPLE_OF),
            int(np.round(scale * width / MULTIPLE_OF) * MULTIPLE_OF))


def preprocess(rgb: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xhxw float: /255, bicubic resize (OpenCV, as MiDaS), normalised with mean = std = 0.5."""
    h, w = input_size(*rgb.shape[:2])
    image = cv2.resize(rgb.astype(np.float32) / 255.0, (w, h), interpolation=cv2.INTER_CUBIC)
    return torch.from_numpy((image - 0.5) / 0.5).permute(2, 0, 1).contiguous()


def by_size(images: list[np.ndarray], predict) -> list[np.ndarray]:
    """`predict(same_size_images)` once per image size, each image's result in the input order."""
    outputs = [None] * len(images)
    groups = {}
    for i, rgb in enumerate(images):
        groups.setdefault(rgb.shape[:2], []).append(i)
    for indices in groups.values():
        for i, result in zip(indices, predict([images[i] for i in indices])):
            outputs[i] = result
    return outputs


@torch.inference_mode()
def predict_depth(model: DPT, images: list[np.ndarray], device) -> list[np.ndarray]:
    """Relative inverse depth at each image's own size (bicubic). Same-size images are batched."""
    def predict(batch_images):
        h, w = batch_images[0].shape[:2]
        depth = model(torch.stack([preprocess(rgb) for rgb in batch_images]).to(device)).unsqueeze(1).float()
        return F.interpolate(depth, size=(h, w), mode="bicubic", align_corners=False).squeeze(1).cpu().numpy()

    return by_size(images, predict)
