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


def test_two_streams_may_use_different_encoders():
    """A MiT-B1 frame encoder beside a MiT-B0 flow encoder: the motion maps are projected to the frame
    encoder's widths before the sum, and the pair reloads from a checkpoint as it was built."""

    model = DepthFlow("mitb1", size=64, flow_backbone="mitb0").eval()
    assert [p.weight.shape[:2] for p in model.motion_projection] == [(64, 32), (128, 64), (320, 160), (512, 256)]
    image, flow = torch.rand(1, 3, 40, 56), torch.rand(1, 3, 40, 56)
    with torch.no_grad():
        logits = model(image, flow)
    assert logits.shape == (1, 2, 40, 56)
    assert DepthFlow("mitb1", size=64).motion_projection is None  # the paper's: one version, a plain sum


def test_checkpoints_rebuild_encoders_from_their_stored_description(tmp_path, monkeypatch):
    """A MiT that differs from MiT-B0 only in its heads (which no weight shape shows) reloads as itself: the
    checkpoint stores each encoder's whole description, not a name to guess from."""
    import model.mit as mit
    from model.checkpoints import load_depthflow, save_project_checkpoint

    monkeypatch.setitem(mit.MIT_SPECS, "mitb0h", mit.MiTSpec(depths=(2, 2, 2, 2), embed_dims=(32, 64, 160, 256),
                                                               num_heads=(2, 2, 4, 8)))
    model = DepthFlow("mitb0h", size=64).eval()
    save_project_checkpoint(tmp_path / "h.pth", model)
    monkeypatch.delitem(mit.MIT_SPECS, "mitb0h")  # gone from the table: the file still knows it
    again = load_depthflow(tmp_path / "h.pth")
    assert again.appearance_encoder.mit.stages[0].blocks[0].attn.num_heads == 2
    image, flow = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(image, flow), again(image, flow))


def test_imagenet_weights_load_by_shape_into_any_mit_of_those_widths(tmp_path, monkeypatch):
    """ImageNet MiT-B0 weights fit a MiT-B0 of other head counts (heads change no shape): the family loads by
    the encoder's own module table, and refuses what does not fit, naming it."""
    import model.mit as mit
    from model.checkpoints import load_pretrained

    source = MiTEncoder("mitb0")
    path = tmp_path / "mit_b0.pth"
    torch.save(source.mit.state_dict(), path)  # timm's layout
    monkeypatch.setitem(mit.MIT_SPECS, "mitb0h", mit.MiTSpec(depths=(2, 2, 2, 2), embed_dims=(32, 64, 160, 256),
                                                               num_heads=(2, 2, 4, 8)))
    model = DepthFlow("mitb0h", size=64)
    assert load_pretrained(model, path) == "timm"
    assert torch.equal(model.motion_encoder.mit.patch_embed.proj.weight, source.mit.patch_embed.proj.weight)
    from utils.errors import UserError

    with pytest.raises(UserError, match="does not fit the appearance encoder \\(mitb1\\): it holds a mitb0"):
        load_pretrained(DepthFlow("mitb1", size=64), path)


@pytest.mark.parametrize("name", sorted(__import__("model.losses", fromlist=["LOSSES"]).LOSSES))
def test_every_registered_loss_is_a_differentiable_scalar_that_rewards_the_truth(name):
    """Each loss of the registry: a scalar with gradients, lower for logits that agree with the target."""
    from model.losses import build_loss

    loss = build_loss(name)
    target = (torch.rand(2, 16, 16) > 0.5).long()
    right = torch.stack([1 - target, target], dim=1).float() * 8 - 4
    wrong = -right
    logits = torch.zeros(2, 2, 16, 16, requires_grad=True)
    value = loss(logits, target)
    value.backward()
    assert value.dim() == 0 and logits.grad is not None and logits.grad.abs().sum() > 0
    assert loss(right, target) < loss(wrong, target)


def test_weighted_loss_terms():
    from model.losses import LOSSES, build_loss, parse_loss

    unknown = "x" + "".join(sorted(LOSSES))  # a name no registry entry has, whatever is added to it
    assert parse_loss("ce+0.5*dice") == [(1.0, "ce"), (0.5, "dice")]
    logits, target = torch.randn(2, 2, 8, 8), (torch.rand(2, 8, 8) > 0.5).long()
    weighted = build_loss("ce+0.5*dice")(logits, target)
    torch.testing.assert_close(weighted, LOSSES["ce"](logits, target) + 0.5 * LOSSES["dice"](logits, target))
    for bad, message in ((unknown, "unknown loss"), ("ce+ce", "appears twice"), ("ce+0*dice", "must be positive"),
                         ("ce+-1*dice", "cannot read")):
        with pytest.raises(ValueError, match=message):
            parse_loss(bad)
