"""Depth Anything V2 (Yang et al., 2024) monocular depth, on timm's DINOv2 ViT with a DPT-style head, loading
the official weight files (depth_anything_v2_vit{s,b,l}.pth) strictly by their own key names.

The encoder is DINOv2 with 14-pixel patches: its position embeddings (trained at 518x518) are resized
bicubically for other inputs, by a scale factor with the official +0.1 offset and no antialiasing; four
blocks are tapped and layer-normed (Small and Base: 2, 5, 8, 11; Large: 4, 11, 17, 23), their patch tokens
projected (1x1) and resampled to strides 4, 8, 16 and 32 of the patch grid, then fused top-down as DPT
does, each fusion resampled to the next map's size. The head predicts relative inverse depth (larger =
nearer, up to an unknown scale and shift), as DPT does, so the synthesis treats both alike. Module names
follow the official files: pretrained.* (the DINOv2 ViT, its unused mask_token included) and depth_head.*.
Small is Apache-2.0; Base and Large are CC-BY-NC-4.0.
"""

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flow_synthesis.dpt import FusionBlock, by_size
from utils.errors import UserError

PATCH = 14
INPUT_SIDE = 518  # the shorter side's target: both sides at least this, multiples of 14
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@dataclass(frozen=True)
class DepthAnythingSpec:
    timm_name: str
    embed_dim: int
    hooks: tuple[int, int, int, int]
    features: int
    out_channels: tuple[int, int, int, int]
    weight_file: str
    licence: str


DEPTH_ANYTHING_SPECS = {
    "small": DepthAnythingSpec("vit_small_patch14_dinov2", 384, (2, 5, 8, 11), 64, (48, 96, 192, 384),
                               "depth_anything_v2_vits.pth", "Apache-2.0"),
    "base": DepthAnythingSpec("vit_base_patch14_dinov2", 768, (2, 5, 8, 11), 128, (96, 192, 384, 768),
                              "depth_anything_v2_vitb.pth", "CC-BY-NC-4.0"),
    "large": DepthAnythingSpec("vit_large_patch14_dinov2", 1024, (4, 11, 17, 23), 256, (256, 512, 1024, 1024),
                               "depth_anything_v2_vitl.pth", "CC-BY-NC-4.0"),
}


class DepthHead(nn.Module):
    """depth_head.*: projections, resampling to strides 4-32, DPT fusion, and the two-convolution output."""

    def __init__(self, spec: DepthAnythingSpec):
        super().__init__()
        c, f = spec.out_channels, spec.features
        self.projects = nn.ModuleList(nn.Conv2d(spec.embed_dim, channels, 1) for channels in c)
        self.resize_layers = nn.ModuleList([nn.ConvTranspose2d(c[0], c[0], 4, stride=4),
                                            nn.ConvTranspose2d(c[1], c[1], 2, stride=2), nn.Identity(),
                                            nn.Conv2d(c[3], c[3], 3, stride=2, padding=1)])
        self.scratch = nn.Module()
        for i, channels in enumerate(c, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(channels, f, 3, padding=1, bias=False))
            setattr(self.scratch, f"refinenet{i}", FusionBlock(f))
        self.scratch.output_conv1 = nn.Conv2d(f, f // 2, 3, padding=1)
        self.scratch.output_conv2 = nn.Sequential(nn.Conv2d(f // 2, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 1, 1),
                                                  nn.ReLU(), nn.Identity())

    def forward(self, taps: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        maps = [resize(project(tokens.transpose(1, 2).unflatten(2, grid)))
                for tokens, project, resize in zip(taps, self.projects, self.resize_layers)]
        s = self.scratch
        l1, l2, l3, l4 = (getattr(s, f"layer{i}_rn")(m) for i, m in enumerate(maps, start=1))
        path = s.refinenet4(l4, size=l3.shape[-2:])
        path = s.refinenet3(path, l3, size=l2.shape[-2:])
        path = s.refinenet2(path, l2, size=l1.shape[-2:])
        path = s.refinenet1(path, l1)
        path = F.interpolate(s.output_conv1(path), size=(grid[0] * PATCH, grid[1] * PATCH), mode="bilinear",
                             align_corners=True)
        return s.output_conv2(path)


class DepthAnythingV2(nn.Module):
    """forward: Bx3xHxW ImageNet-normalised input (H, W multiples of 14) -> BxHxW relative inverse depth."""

    def __init__(self, variant: str = "small"):
        import timm  # imported when needed: timm takes seconds

        super().__init__()
        self.spec = spec = DEPTH_ANYTHING_SPECS[variant]
        self.pretrained = timm.create_model(spec.timm_name, pretrained=False, num_classes=0)
        self.pretrained.mask_token = nn.Parameter(torch.zeros(1, spec.embed_dim))  # in the files; unused here
        self.depth_head = DepthHead(spec)

    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        vit = self.pretrained
        cls, patches = vit.pos_embed[:, :1], vit.pos_embed[0, 1:]
        side = math.sqrt(len(patches))
        if grid == (side, side):
            return vit.pos_embed
        patches = patches.reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2).float()
        scale = ((grid[0] + 0.1) / side, (grid[1] + 0.1) / side)  # the official offset against rounding down
        patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", antialias=False)
        return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(cls.dtype)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit, grid = self.pretrained, (x.shape[-2] // PATCH, x.shape[-1] // PATCH)
        tokens = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([vit.cls_token.expand(len(tokens), -1, -1), tokens], dim=1) + self._pos_embed(grid)
        taps = []
        for i, block in enumerate(vit.blocks):
            tokens = block(tokens)
            if i in self.spec.hooks:
                taps.append(vit.norm(tokens)[:, 1:])
        return F.relu(self.depth_head(taps, grid)).squeeze(1)


def load_depth_anything(path, variant: str | None = None) -> DepthAnythingV2:
    """Build Depth Anything V2 and load an official weight file strictly; the size is read from the file."""
    from model.checkpoints import load_strictly, read_file

    hint = "the Depth Anything V2 release: " + ", ".join(s.weight_file for s in DEPTH_ANYTHING_SPECS.values())
    state = read_file(path, hint)
    if "depth_head.scratch.output_conv2.0.weight" not in state or "pretrained.pos_embed" not in state:
        raise UserError(f"{path} is not a Depth Anything V2 weight file (expected {hint})")
    width = state["pretrained.pos_embed"].shape[-1]
    found = next((name for name, spec in DEPTH_ANYTHING_SPECS.items() if spec.embed_dim == width), None)
    if found is None:
        raise UserError(f"{path} holds a {width}-wide encoder, which no Depth Anything V2 size has")
    if variant and variant != found:
        raise UserError(f"{path} holds Depth Anything V2 {found.capitalize()} weights, not the {variant.capitalize()} "
                        "asked for")
    with torch.device("meta"):
        model = DepthAnythingV2(found)
    load_strictly(model, state, path, f"Depth Anything V2 {found.capitalize()}", assign=True)
    return model.eval()


def input_size(height: int, width: int) -> tuple[int, int]:
    """The official resize: aspect kept, both sides at least 518, each rounded to a multiple of 14 (up where
    rounding would fall under 518)."""
    scale = max(INPUT_SIDE / height, INPUT_SIDE / width)

    def constrain(x):
        y = int(np.round(x / PATCH) * PATCH)
        return y if y >= INPUT_SIDE else int(np.ceil(x / PATCH) * PATCH)

    return constrain(scale * height), constrain(scale * width)


def preprocess(rgb: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xhxw float: /255, bicubic resize (OpenCV, as the official code), ImageNet-normalised."""
    h, w = input_size(*rgb.shape[:2])
    image = cv2.resize(rgb.astype(np.float32) / 255.0, (w, h), interpolation=cv2.INTER_CUBIC)
    return torch.from_numpy((image - IMAGENET_MEAN) / IMAGENET_STD).permute(2, 0, 1).contiguous()


@torch.inference_mode()
def predict_depth(model: DepthAnythingV2, images: list[np.ndarray], device) -> list[np.ndarray]:
    """Relative inverse depth at each image's own size (bilinear, as the official code). Same-size images
    are batched."""
    def predict(batch_images):
        h, w = batch_images[0].shape[:2]
        depth = model(torch.stack([preprocess(rgb) for rgb in batch_images]).to(device)).unsqueeze(1).float()
        return F.interpolate(depth, size=(h, w), mode="bilinear", align_corners=True).squeeze(1).cpu().numpy()

    return by_size(images, predict)
