import pytest
import torch
from safetensors.torch import save_file

from model import MIT_SPECS, DepthFlow
from model import convert as convert_cmd
from model.checkpoints import (
    load_depthflow,
    load_pretrained,
    model_to_released,
    read_project_checkpoint,
    released_to_model,
    save_project_checkpoint,
)
from model.encoders import describe
from model.mit import convert
from tests.conftest import assert_one_line_error, run_cli, run_main
from tools.reference_net import random_reference

BACKBONE_SEEDS = {"mitb0": 0, "mitb1": 1, "mitb2": 2}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """{backbone: (reference network, path of its released-format checkpoint)}, built lazily."""
    cache = {}

    def make(backbone):
        if backbone not in cache:
            ref = random_reference(backbone, seed=BACKBONE_SEEDS[backbone])
            path = tmp_path_factory.mktemp(backbone) / f"DepthFlow_{backbone}.pth"
            torch.save(ref.state_dict(), path)
            cache[backbone] = ref, path
        return cache[backbone]

    return make


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["mitb0", "mitb1", "mitb2"])
def test_released_checkpoint_reproduces_reference_at_512(released, backbone):
    ref, path = released(backbone)
    model = load_depthflow(path, backbone=backbone).eval()
    image, flow = torch.rand(1, 3, 240, 427), torch.rand(1, 3, 240, 427)
    with torch.no_grad():
        expected, got = ref(image, flow), model(image, flow)
    ref_mask = expected.argmax(1)
    assert 0.05 < ref_mask.float().mean() < 0.95, "test needs both classes present"
    assert (expected - got).abs().max() <= 1e-3
    assert (model.predict(image, flow) == ref_mask).float().mean() >= 0.999


def test_dataparallel_prefix_and_fakeflow_name(released, tmp_path):
    ref, _ = released("mitb0")
    path = tmp_path / "FakeFlow_mitb0.pth"
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, path)
    model = load_depthflow(path).eval()
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(image, image), ref(image, image), atol=1e-3, rtol=0)


@pytest.mark.slow
def test_convert_round_trip_is_exact(released, tmp_path, capsys):
    ref, path = released("mitb0")
    project, back = tmp_path / "project.pth", tmp_path / "back.pth"
    rc, out, err = run_main(convert_cmd.main, path, project, capsys=capsys)
    assert rc == 0, err
    rc, out, err = run_cli("-m", "model.convert", project, back, "--to", "released")
    assert rc == 0, err
    original, restored = ref.state_dict(), torch.load(back, weights_only=True)
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    config = read_project_checkpoint(project)["config"]
    assert {k: config[k] for k in ("backbone", "flow_backbone", "size", "layer_norm_eps")} == \
        {"backbone": "mitb0", "flow_backbone": None, "size": 512, "layer_norm_eps": 1e-5}
    assert config["encoders"]["motion"] == config["encoders"]["appearance"] == describe("mitb0")


def test_project_checkpoint_keeps_training_state(tmp_path):
    model = DepthFlow("mitb0", size=64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    model(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)).sum().backward()
    optimizer.step()
    path = tmp_path / "ckpt" / "last.pth"
    save_project_checkpoint(path, model, optimizer=optimizer.state_dict(), epoch=7,
                            rng={"torch": torch.get_rng_state()})
    assert [p.name for p in path.parent.iterdir()] == ["last.pth"], "no temporary file left behind"
    state = read_project_checkpoint(path)
    assert state["epoch"] == 7
    restored = load_depthflow(path, size=64)
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), model.state_dict().values()))
    fresh = torch.optim.Adam(restored.parameters(), lr=1e-5)
    fresh.load_state_dict(state["optimizer"])
    assert fresh.state_dict()["state"][0]["step"] == 1


def _hf_encoder_state(backbone):
    return {f"encoder.{k}": v for k, v in convert(
        DepthFlow(backbone, size=64).appearance_encoder.mit.state_dict(), backbone, "timm", "hf").items()}


@pytest.mark.parametrize("fmt", ["hf-bin", "hf-safetensors", "nvlabs"])
def test_pretrained_formats_initialise_both_encoders(tmp_path, fmt):
    source = DepthFlow("mitb0", size=64).appearance_encoder.mit.state_dict()
    if fmt == "nvlabs":
        sd = {**convert(source, "mitb0", "timm", "nvlabs"), "head.weight": torch.zeros(1000, 256),
              "head.bias": torch.zeros(1000)}
        path = tmp_path / "mit_b0.pth"
        torch.save(sd, path)
    else:
        sd = {f"segformer.encoder.{k}": v for k, v in convert(source, "mitb0", "timm", "hf").items()}
        sd.update({"classifier.weight": torch.zeros(1000, 256), "classifier.bias": torch.zeros(1000)})
        path = tmp_path / ("model.safetensors" if fmt == "hf-safetensors" else "pytorch_model.bin")
        save_file(sd, str(path)) if fmt == "hf-safetensors" else torch.save(sd, path)
    model = DepthFlow("mitb0", size=64)
    load_pretrained(model, path)
    for encoder in (model.appearance_encoder, model.motion_encoder):
        loaded = encoder.mit.state_dict()
        assert all(torch.equal(loaded[k], source[k]) for k in source)


def test_pretrained_backbone_mismatch(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({f"segformer.{k}": v for k, v in _hf_encoder_state("mitb1").items()}, path)
    with pytest.raises(Exception, match="does not fit the appearance encoder \\(mitb0\\): it holds a mitb1, not mitb0"):
        load_pretrained(DepthFlow("mitb0", size=64), path)


@pytest.mark.slow
def test_bad_checkpoint_error_at_the_command_line(released, tmp_path):
    _, good = released("mitb0")
    rc, _, err = run_cli("-m", "model.convert", good, tmp_path / "out.pth", "--backbone", "mitb2")
    assert_one_line_error(rc, err, "DepthFlow_mitb0.pth holds a mitb0 model, not the mitb2 asked for")


def test_bad_checkpoints_give_one_line_errors(released, tmp_path, capsys):
    _, good = released("mitb0")
    out = tmp_path / "out.pth"

    rc, _, err = run_main(convert_cmd.main, good, out, "--backbone", "mitb1", capsys=capsys)
    assert_one_line_error(rc, err, "DepthFlow_mitb0.pth holds a mitb0 model, not the mitb1 asked for")

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    rc, _, err = run_main(convert_cmd.main, truncated, out, capsys=capsys)
    assert_one_line_error(rc, err, str(truncated), "not a readable checkpoint")

    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    rc, _, err = run_main(convert_cmd.main, text, out, capsys=capsys)
    assert_one_line_error(rc, err, str(text), "not a readable checkpoint")

    missing = tmp_path / "nowhere" / "DepthFlow_mitb2.pth"
    rc, _, err = run_main(convert_cmd.main, missing, out, capsys=capsys)
    assert_one_line_error(rc, err, str(missing), "checkpoint not found", "authors' release")

    mit = tmp_path / "pytorch_model.bin"
    torch.save(_hf_encoder_state("mitb0"), mit)
    rc, _, err = run_main(convert_cmd.main, mit, out, capsys=capsys)
    assert_one_line_error(rc, err, str(mit), "ImageNet MiT encoder weights")

    broken = tmp_path / "broken.pth"
    torch.save({k: v for k, v in torch.load(good, weights_only=True).items() if "block.1.0" not in k}, broken)
    rc, _, err = run_main(convert_cmd.main, broken, out, capsys=capsys)
    assert_one_line_error(rc, err, str(broken), "incomplete")

    mixed = tmp_path / "mixed.pth"
    state = torch.load(good, weights_only=True)
    state["vos.decoder.conv1.conv.weight"] = torch.zeros(256, 512, 1, 1)  # a mitb1/b2 decoder on mitb0 encoders
    torch.save(state, mixed)
    rc, _, err = run_main(convert_cmd.main, mixed, out, capsys=capsys)
    assert_one_line_error(rc, err, str(mixed), "does not fit the DepthFlow network", "size mismatch")
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("backbone", list(MIT_SPECS))
def test_every_mit_size_round_trips_through_the_released_layout(backbone):
    """Each entry of the MiT table builds, has HF SegformerModel's parameters exactly, and keeps every weight
    through the released layout and back (the file round trip is tested on mitb0 above)."""
    from tools.reference_net import RefEncoder

    with torch.device("meta"):  # shapes only
        reference = RefEncoder(backbone)
    model = DepthFlow(backbone, size=512)
    assert sum(p.numel() for p in model.appearance_encoder.parameters()) == \
        sum(p.numel() for p in reference.parameters())
    state_dict, found = released_to_model(model_to_released(model))
    assert found == backbone
    original = model.state_dict()
    assert state_dict.keys() == original.keys() and all(torch.equal(state_dict[k], original[k]) for k in original)


def test_a_timm_backbone_builds_trains_and_round_trips(tmp_path):
    model = DepthFlow("timm:convnext_atto", size=64)
    logits = model(torch.rand(2, 3, 40, 56), torch.rand(2, 3, 40, 56))
    assert logits.shape == (2, 2, 40, 56)
    logits.sum().backward()
    assert model.appearance_encoder.features.stem_0.weight.grad is not None
    save_project_checkpoint(tmp_path / "m.pth", model)
    loaded = load_depthflow(tmp_path / "m.pth")
    assert loaded.backbone == "timm:convnext_atto"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ValueError, match="cannot keep the backbone timm:convnext_atto"):
        model_to_released(model)


def test_conversions_refuse_what_the_released_layout_cannot_hold(tmp_path, capsys):
    small = tmp_path / "small.pth"
    save_project_checkpoint(small, DepthFlow("mitb0", size=64))
    rc, _, err = run_main(convert_cmd.main, small, tmp_path / "out.pth", "--to", "released", capsys=capsys)
    assert_one_line_error(rc, err, str(small), "cannot keep the internal size 64")
    assert not (tmp_path / "out.pth").exists()
    rc, _, err = run_main(convert_cmd.main, small, small, capsys=capsys)
    assert_one_line_error(rc, err, "which this run reads")


def test_a_checkpoint_with_non_finite_weights_is_refused(tmp_path, capsys):
    model = DepthFlow("mitb0", size=64)
    with torch.no_grad():
        model.decoder.blend2.conv.weight[0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pth"
    save_project_checkpoint(path, model)
    rc, _, err = run_main(convert_cmd.main, path, tmp_path / "out.pth", capsys=capsys)
    assert_one_line_error(rc, err, str(path), "NaN or infinite weights", "decoder.blend2.conv.weight")


def test_a_save_that_fails_is_one_line_and_keeps_the_old_file(tmp_path, capsys, monkeypatch):
    """torch.save reports a full disk or an unwritable file as a RuntimeError."""
    out = tmp_path / "out.pth"
    save_project_checkpoint(tmp_path / "m.pth", DepthFlow("mitb0", size=64))
    out.write_bytes(b"old")

    def disk_full(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", disk_full)
    rc, _, err = run_main(convert_cmd.main, tmp_path / "m.pth", out, capsys=capsys)
    assert_one_line_error(rc, err, f"cannot use {out}", "PytorchStreamWriter failed writing file")
    assert out.read_bytes() == b"old"
