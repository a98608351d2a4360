"""An independent reference DepthFlow for the tests and the benchmark, built the way the authors built theirs.

Encoders are HF transformers 4.x SegformerModel (explicit attention, LayerNorm eps 1e-5); the decoder is a
separate, plain implementation of the architecture in docs/design.md, 'The network'. Its state_dict() is a
released-format checkpoint (`vos.app_encoder.backbone.encoder.*`, `vos.decoder.*`, ...), so a file saved
from it is what the authors ship. It needs transformers 4.x (requirements-test.txt).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SegformerConfig, SegformerModel

from model.mit import MIT_SPECS


def hf_config(backbone):
    """HF's SegformerConfig for an MiT size of model/mit.py's table."""
    spec = MIT_SPECS[backbone]
    return SegformerConfig(num_attention_heads=list(spec.num_heads), sr_ratios=list(spec.sr_ratios),
                           mlp_ratios=list(spec.mlp_ratios), hidden_sizes=list(spec.embed_dims),
                           depths=list(spec.depths), decoder_hidden_size=256)


class RefEncoder(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.backbone = SegformerModel(hf_config(backbone))

    def forward(self, x):
        return self.backbone((x - self.mean) / self.std, output_hidden_states=True).hidden_states


class RefConv(nn.Module):
    def __init__(self, cin, cout, k, relu):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, 1, (k - 1) // 2)
        self.relu = relu

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(y) if self.relu else y


class RefCBAM(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = RefConv(c, c, 3, False)
        self.conv2 = nn.Sequential(RefConv(c, c, 1, True), RefConv(c, c, 1, False))
        self.conv3 = nn.Sequential(RefConv(2, 16, 3, True), RefConv(16, 1, 3, False))

    def forward(self, x):
        x = self.conv1(x)
        gate = self.conv2(x.mean(dim=(2, 3), keepdim=True)) + self.conv2(x.amax(dim=(2, 3), keepdim=True))
        x = x * gate.sigmoid()
        spatial = torch.cat([x.mean(1, keepdim=True), x.max(1, keepdim=True)[0]], 1)
        return x * self.conv3(spatial).sigmoid()


class RefDecoder(nn.Module):
    def __init__(self, chans):
        super().__init__()
        for i, c in zip((1, 2, 3, 4), reversed(chans)):
            setattr(self, f"conv{i}", RefConv(c, 256, 1, True))
            setattr(self, f"blend{i}", RefConv(256 if i == 1 else 512, 256, 3, True))
            setattr(self, f"cbam{i}", RefCBAM(256))
        self.predictor = RefConv(256, 2, 3, False)

    def forward(self, feats):
        up = None
        for i, f in zip((1, 2, 3, 4), reversed(feats)):
            x = getattr(self, f"conv{i}")(f)
            if up is not None:
                x = torch.cat([x, up], 1)
            x = getattr(self, f"cbam{i}")(getattr(self, f"blend{i}")(x))
            up = F.interpolate(x, scale_factor=2, mode="bicubic") if i < 4 else x
        return F.interpolate(self.predictor(up), scale_factor=4, mode="bicubic")


class RefVOS(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.app_encoder = RefEncoder(backbone)
        self.mo_encoder = RefEncoder(backbone)
        self.decoder = RefDecoder(list(MIT_SPECS[backbone].embed_dims))

    def forward(self, img, flow):
        return self.decoder([a + m for a, m in zip(self.app_encoder(img), self.mo_encoder(flow))])


class RefDepthFlow(nn.Module):
    """Returns logits at the input size, as DepthFlow.forward does."""

    def __init__(self, backbone, size=512):
        super().__init__()
        self.vos = RefVOS(backbone)
        self.size = size

    def forward(self, img, flow):
        h, w = img.shape[-2:]
        img = F.interpolate(img, size=(self.size, self.size), mode="bicubic")
        flow = F.interpolate(flow, size=(self.size, self.size), mode="bicubic")
        return F.interpolate(self.vos(img, flow), size=(h, w), mode="bicubic")


def random_reference(backbone, seed=0, size=512):
    """A reference network with random weights; LayerNorms perturbed so that swapped norms would show."""
    torch.manual_seed(seed)
    net = RefDepthFlow(backbone, size).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.add_(0.2 * torch.randn_like(m.weight))
                m.bias.add_(0.1 * torch.randn_like(m.bias))
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.normal_(0, 0.01)
        # Large logits of both signs, so that mask agreement is a real test.
        net.vos.decoder.predictor.conv.weight.mul_(100.0)
    return net
