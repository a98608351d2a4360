"""DepthFlow's decoder: top-down fusion of the four strides with CBAM attention, two-class logits."""

import torch
import torch.nn.functional as F
from torch import nn


class Conv(nn.Module):
    """A biased convolution with 'same' padding. The wrapper keeps the released `<name>.conv.*` keys."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=True)

    def forward(self, x):
        return self.conv(x)


class ConvRelu(Conv):
    def forward(self, x):
        return F.relu(self.conv(x))


class CBAM(nn.Module):
    """A 3x3 conv, then channel attention (shared MLP over avg- and max-pooled maps), then spatial attention."""

    def __init__(self, channels: int, spatial_hidden: int = 16):
        super().__init__()
        self.conv1 = Conv(channels, channels, 3)
        self.conv2 = nn.Sequential(ConvRelu(channels, channels, 1), Conv(channels, channels, 1))
        self.conv3 = nn.Sequential(ConvRelu(2, spatial_hidden, 3), Conv(spatial_hidden, 1, 3))

    def forward(self, x):
        x = self.conv1(x)
        avg = F.adaptive_avg_pool2d(x, 1)
        peak = F.adaptive_max_pool2d(x, 1)
        x = x * torch.sigmoid(self.conv2(avg) + self.conv2(peak))
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv3(pooled))


def upsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    return F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)


class Decoder(nn.Module):
    """Input: fused maps at strides 4, 8, 16, 32. Output: two-class logits at stride 1 of the fused input."""

    def __init__(self, in_channels: tuple[int, int, int, int], width: int = 256, num_classes: int = 2):
        super().__init__()
        c4, c8, c16, c32 = in_channels
        self.conv1 = ConvRelu(c32, width, 1)
        self.blend1 = ConvRelu(width, width, 3)
        self.cbam1 = CBAM(width)
        self.conv2 = ConvRelu(c16, width, 1)
        self.blend2 = ConvRelu(2 * width, width, 3)
        self.cbam2 = CBAM(width)
        self.conv3 = ConvRelu(c8, width, 1)
        self.blend3 = ConvRelu(2 * width, width, 3)
        self.cbam3 = CBAM(width)
        self.conv4 = ConvRelu(c4, width, 1)
        self.blend4 = ConvRelu(2 * width, width, 3)
        self.cbam4 = CBAM(width)
        self.predictor = Conv(width, num_classes, 3)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        s4, s8, s16, s32 = features
        x = upsample(self.cbam1(self.blend1(self.conv1(s32))), 2)
        x = upsample(self.cbam2(self.blend2(torch.cat([self.conv2(s16), x], dim=1))), 2)
        x = upsample(self.cbam3(self.blend3(torch.cat([self.conv3(s8), x], dim=1))), 2)
        x = self.cbam4(self.blend4(torch.cat([self.conv4(s4), x], dim=1)))
        return upsample(self.predictor(x), 4)
