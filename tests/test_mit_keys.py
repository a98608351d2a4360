import pytest
import torch
from timm.models.pvt_v2 import checkpoint_filter_fn

from model import MiTEncoder
from model.mit import KeyMismatch, convert, expected_keys, infer_backbone
from tools.reference_net import hf_config


@pytest.mark.parametrize("backbone", ["mitb0", "mitb1", "mitb2"])
def test_table_covers_the_timm_encoder_exactly(backbone):
    timm_keys = set(MiTEncoder(backbone).mit.state_dict())
    assert expected_keys(backbone, "timm") == timm_keys


@pytest.mark.parametrize("backbone", ["mitb0", "mitb2"])
def test_round_trips_timm_hf_nvlabs(backbone):
    sd = MiTEncoder(backbone).mit.state_dict()
    hf = convert(sd, backbone, "timm", "hf")
    nv = convert(hf, backbone, "hf", "nvlabs")
    back = convert(nv, backbone, "nvlabs", "timm")
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert infer_backbone(hf, "hf") == infer_backbone(nv, "nvlabs") == infer_backbone(sd, "timm") == backbone


def test_kv_is_key_then_value_concatenated():
    sd = MiTEncoder("mitb0").mit.state_dict()
    hf = convert(sd, "mitb0", "timm", "hf")
    kv = sd["stages.2.blocks.1.attn.kv.weight"]
    assert kv.shape == (320, 160)
    assert torch.equal(hf["block.2.1.attention.self.key.weight"], kv[:160])
    assert torch.equal(hf["block.2.1.attention.self.value.weight"], kv[160:])
    assert torch.equal(hf["block.2.1.attention.self.value.bias"], sd["stages.2.blocks.1.attn.kv.bias"][160:])


def test_names_of_hf_segformer_are_the_table():
    from transformers import SegformerModel

    hf_keys = {k.removeprefix("encoder.") for k in SegformerModel(hf_config("mitb1")).state_dict()}
    assert hf_keys == expected_keys("mitb1", "hf")


def test_nvlabs_mapping_agrees_with_timms_own_filter():
    """timm's pvt_v2 filter maps NVlabs checkpoints independently; both must land on the same names."""
    sd = MiTEncoder("mitb2").mit.state_dict()
    nv = convert(sd, "mitb2", "timm", "nvlabs")
    nv_with_head = {**nv, "head.weight": torch.zeros(1000, 512), "head.bias": torch.zeros(1000)}
    timm_mapped = {k: v for k, v in checkpoint_filter_fn(nv_with_head, None).items() if not k.startswith("head")}
    assert timm_mapped.keys() == sd.keys()
    assert all(torch.equal(timm_mapped[k], sd[k]) for k in sd)


def test_hf_weights_give_hf_features():
    """Our timm encoder with converted HF weights reproduces HF SegformerModel's four stage outputs."""
    from transformers import SegformerModel

    hf_model = SegformerModel(hf_config("mitb0")).eval()
    with torch.no_grad():
        for m in hf_model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.add_(0.3 * torch.randn_like(m.weight))
                m.bias.add_(0.1 * torch.randn_like(m.bias))
    encoder = MiTEncoder("mitb0").eval()
    hf_sd = {k.removeprefix("encoder."): v for k, v in hf_model.state_dict().items()}
    encoder.mit.load_state_dict(convert(hf_sd, "mitb0", "hf", "timm"))
    x = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        ours = encoder(x)
        theirs = hf_model((x - encoder.mean) / encoder.std, output_hidden_states=True).hidden_states
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=0)


def test_strict_conversion_reports_missing_and_unexpected():
    sd = convert(MiTEncoder("mitb0").mit.state_dict(), "mitb0", "timm", "hf")
    del sd["block.0.0.mlp.dense1.weight"]
    sd["block.0.0.mlp.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyMismatch) as err:
        convert(sd, "mitb0", "hf", "timm")
    assert err.value.missing == ["block.0.0.mlp.dense1.weight"]
    assert err.value.unexpected == ["block.0.0.mlp.extra.weight"]
