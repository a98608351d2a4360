import pytest
import torch

from model import DepthFlow, MiTEncoder
from model.decoder import CBAM

# The paper's sizes, as SegFormer publishes them (every size is also checked against HF's SegformerModel in
# tests/test_checkpoints.py).
ENCODER_PARAMS = {"mitb0": 3_319_392, "mitb1": 13_151_424, "mitb2": 24_196_288}
STAGE_CHANNELS = {"mitb0": (32, 64, 160, 256), "mitb1": (64, 128, 320, 512), "mitb2": (64, 128, 320, 512)}


@pytest.mark.parametrize("backbone", list(ENCODER_PARAMS))
def test_encoder_parameter_counts_and_stage_shapes(backbone):
    encoder = MiTEncoder(backbone)
    assert sum(p.numel() for p in encoder.parameters()) == ENCODER_PARAMS[backbone]
    feats = encoder(torch.rand(1, 3, 64, 96))
    assert [f.shape[1] for f in feats] == list(STAGE_CHANNELS[backbone])
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]


@pytest.mark.parametrize("backbone", ["mitb0", "mitb1", "mitb2"])
def test_logits_and_masks_at_input_size(backbone):
    model = DepthFlow(backbone, size=64).eval()
    image, flow = torch.rand(2, 3, 45, 71), torch.rand(2, 3, 45, 71)
    logits = model(image, flow)
    assert logits.shape == (2, 2, 45, 71)
    assert logits.dtype == torch.float32
    masks = model.predict(image, flow)
    assert masks.shape == (2, 45, 71) and masks.dtype == torch.uint8
    assert torch.equal(masks, logits.argmax(1).to(torch.uint8))
    square = model.forward_square(model.to_square(image), model.to_square(flow))
    assert square.shape == (2, 2, 64, 64)
    torch.testing.assert_close(torch.nn.functional.interpolate(square, size=(45, 71), mode="bicubic"), logits)


def test_batched_frames_match_one_at_a_time():
    model = DepthFlow("mitb0", size=64).eval()
    with torch.no_grad():
        model.decoder.predictor.conv.weight.mul_(50)
    image, flow = torch.rand(4, 3, 40, 56), torch.rand(4, 3, 40, 56)
    with torch.no_grad():
        batched = model(image, flow)
        single = torch.cat([model(image[i:i + 1], flow[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)
    assert torch.equal(batched.argmax(1), single.argmax(1))


def test_encoders_do_not_share_weights_and_decoder_init():
    model = DepthFlow("mitb0", size=64)
    a = model.appearance_encoder.mit.patch_embed.proj.weight
    m = model.motion_encoder.mit.patch_embed.proj.weight
    assert a.data_ptr() != m.data_ptr() and not torch.equal(a, m)
    for conv in (mod for mod in model.decoder.modules() if isinstance(mod, torch.nn.Conv2d)):
        assert torch.count_nonzero(conv.bias) == 0
        bound = (6 / (conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1])) ** 0.5
        assert conv.weight.abs().max() <= bound


def test_cbam_gates_are_applied_in_order():
    cbam = CBAM(8).eval()
    x = torch.randn(1, 8, 5, 6)
    y = cbam.conv1(x)
    y = y * torch.sigmoid(cbam.conv2(y.mean((2, 3), keepdim=True)) + cbam.conv2(y.amax((2, 3), keepdim=True)))
    y = y * torch.sigmoid(cbam.conv3(torch.cat([y.mean(1, keepdim=True), y.amax(1, keepdim=True)], 1)))
    torch.testing.assert_close(cbam(x), y)


def test_layer_norm_eps_reaches_block_and_stage_norms_only():
    encoder = MiTEncoder("mitb0", layer_norm_eps=1e-6)
    stage = encoder.mit.stages[1]
    assert stage.blocks[0].norm1.eps == 1e-6 and stage.norm.eps == 1e-6
    assert stage.downsample.norm.eps == 1e-5 and stage.blocks[0].attn.norm.eps == 1e-5


def test_size_must_be_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        DepthFlow("mitb0", size=100)
