import json
import shutil

import cv2
import numpy as np
import pytest
import torch
from torchvision.utils import flow_to_image

from dataset import DATASETS, scan
from flow_synthesis import __main__ as synth_cli
from flow_synthesis.depth import DepthFolder
from flow_synthesis.depth_to_flow import FlowParams, SynthesisConfig, depth_to_flow, refine, synthesise
from flow_synthesis.dpt import DPT, input_size, load_dpt, predict_depth
from flow_synthesis.duts import convert
from flow_synthesis.video_flow import DISFlow, RAFTFlow, crop_padding, pad_to_multiple, video_flows
from tests.conftest import assert_one_line_error, run_main
from tools.toydata import render_still, texture
from utils.flow_viz import flow_to_rgb
from utils.io import image_is_complete, list_frames


@pytest.mark.parametrize(("variant", "millions"), [("hybrid", 123.15), ("large", 344.06)])
def test_dpt_official_names_and_sizes(variant, millions):
    with torch.device("meta"):
        model = DPT(variant)
    state = model.state_dict()
    assert len(state) == 368
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions
    prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in state}
    taps = ("1", "2", "3", "4") if variant == "large" else ("3", "4")
    assert prefixes == {"pretrained.model", *(f"pretrained.act_postprocess{i}" for i in taps),
                        *(f"scratch.layer{i}_rn" for i in "1234"), *(f"scratch.refinenet{i}" for i in "1234"),
                        "scratch.output_conv"}
    assert {k for k in state if k.startswith("scratch.output_conv")} == {
        f"scratch.output_conv.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    assert "pretrained.act_postprocess3.0.project.0.weight" in state


@pytest.mark.slow
def test_dpt_weight_file_loads_strictly_and_predicts(tmp_path):
    torch.manual_seed(0)
    model = DPT("hybrid")
    path = tmp_path / "dpt_hybrid-midas-501f0c75.pt"
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    loaded = load_dpt(path, "hybrid")
    assert torch.equal(loaded.scratch.layer1_rn.weight, model.scratch.layer1_rn.weight.half().float())
    images = [np.asarray(texture(np.random.default_rng(1), 60, 90, 0.5)), np.zeros((40, 40, 3), np.uint8)]
    depths = predict_depth(loaded, images, torch.device("cpu"))
    assert [d.shape for d in depths] == [(60, 90), (40, 40)]
    assert all(np.isfinite(d).all() and (d >= 0).all() for d in depths)
    with pytest.raises(Exception, match="holds DPT-Hybrid weights, not the DPT-Large asked for"):
        load_dpt(path, "large")


def test_dpt_input_size_is_midas_minimal_resize():
    assert input_size(480, 854) == (384, 672)
    assert input_size(64, 96) == (256, 384)
    assert input_size(384, 384) == (384, 384)


def test_colour_encoding_is_torchvision_per_image():
    rng = np.random.default_rng(0)
    small, large = rng.normal(size=(2, 20, 30)).astype(np.float32), 10 * rng.normal(size=(2, 20, 30)).astype(np.float32)
    for flow in (small, large):
        expected = flow_to_image(torch.from_numpy(flow)).permute(1, 2, 0).numpy()
        assert np.array_equal(flow_to_rgb(flow), expected)
        assert np.array_equal(flow_to_rgb(flow.transpose(1, 2, 0)), expected)
    batched = flow_to_image(torch.from_numpy(np.stack([small, large])))[0].permute(1, 2, 0).numpy()
    assert not np.array_equal(batched, flow_to_rgb(small)), "batch normalisation would change the image"
    assert (flow_to_rgb(np.zeros((2, 4, 4), np.float32)) == 255).all()


def test_flow_follows_inverse_depth_and_object_motion():
    depth = np.tile(np.linspace(0, 1, 50, dtype=np.float32)[:, None], (1, 40))
    mask = np.zeros((50, 40), np.uint8)
    mask[10:20, 10:20] = 1
    params = FlowParams(gamma=1.0, camera_angle=0.0, camera_magnitude=10.0, zoom=0.0, object_dx=0.0, object_dy=5.0)
    flow = depth_to_flow(depth, mask, params)
    assert np.allclose(flow[:, 0, 0], -10.0 * depth[:, 0]) and np.allclose(flow[..., 1][mask == 0], 0)
    assert np.allclose(flow[12, 12], [-10.0 * depth[12, 12], 5.0])
    zoomed = depth_to_flow(np.ones((11, 11), np.float32), np.zeros((11, 11)), FlowParams(1, 0, 0, 0.1, 0, 0))
    assert np.allclose(zoomed[5, 5], 0) and zoomed[5, 10, 0] == pytest.approx(0.5) and zoomed[0, 5, 1] < 0


def test_refine_normalises_robustly():
    depth = np.linspace(0, 1, 100 * 100, dtype=np.float32).reshape(100, 100) * 7 + 3
    depth[0, 0] = 1000  # an outlier that plain min-max normalisation would let squash everything else
    refined = refine(depth, SynthesisConfig())
    assert refined.min() == 0 and refined.max() == 1 and 0.4 < np.median(refined) < 0.6


def test_synthetic_object_is_separable_in_the_flow_image():
    ious = []
    for i in range(20):
        _, mask, disparity, _ = render_still(np.random.default_rng(i), 96, 128)
        flow, _ = synthesise(disparity, mask, f"image{i}", seed=0)
        rgb, inside = flow_to_rgb(flow).astype(np.float32), mask.astype(bool)
        near_object = np.linalg.norm(rgb - rgb[inside].mean(0), axis=2) < np.linalg.norm(
            rgb - rgb[~inside].mean(0), axis=2)
        ious.append((near_object & inside).sum() / (near_object | inside).sum())
    assert np.median(ious) > 0.95 and np.mean(ious) > 0.75, ious


def test_same_seed_same_flow_and_parameters_regenerate_it():
    _, mask, disparity, _ = render_still(np.random.default_rng(3), 64, 64)
    a, params = synthesise(disparity, mask, "img", seed=5)
    b, again = synthesise(disparity, mask, "img", seed=5)
    c, other = synthesise(disparity, mask, "img", seed=6)
    assert np.array_equal(a, b) and params == again and not np.array_equal(a, c) and params != other
    assert np.array_equal(depth_to_flow(refine(disparity, SynthesisConfig()), mask, params), a)


class CountingDepth(DepthFolder):
    """Depth from a folder, recording which images were asked for; "killed" after `stop_after_images`."""

    def __init__(self, folder, stems, stop_after_images=None):
        super().__init__(folder, stems)
        self.calls, self.stop_after_images = [], stop_after_images

    def __call__(self, stems, images):
        if self.stop_after_images is not None and len(self.calls) >= self.stop_after_images:
            raise KeyboardInterrupt
        self.calls += stems
        return super().__call__(stems, images)


def test_conversion_resumes_and_repairs(toy_copy, tmp_path):
    duts, out = toy_copy / "DUTS-TR", tmp_path / "DUTSv2"
    stems = sorted(p.stem for p in (duts / "DUTS-TR-Image").glob("*.jpg"))
    depth_dir = duts / "DUTS-TR-Depth"
    with pytest.raises(KeyboardInterrupt):
        convert(duts, out, CountingDepth(depth_dir, stems, stop_after_images=8), batch_size=4, progress=False)
    finished = [json.loads(line)["image"] for line in (out / "manifest.0.jsonl").read_text().splitlines()]
    assert finished == stems[:8]
    broken = out / "JPEGFlows" / f"{stems[3]}.jpg"
    broken.write_bytes(broken.read_bytes()[:100])
    resumed = CountingDepth(depth_dir, stems)
    report = convert(duts, out, resumed, batch_size=4, progress=False)
    assert sorted(resumed.calls) == sorted([stems[3], *stems[8:]])
    assert (report.done, report.resumed) == (len(stems) - 7, 7)
    assert image_is_complete(broken)
    videos = scan(DATASETS["duts"], out)
    assert len(videos) == len(stems)
    assert [json.loads(line)["image"] for line in (out / "manifest.jsonl").read_text().splitlines()] == stems
    assert not list(out.glob("manifest.*.jsonl"))
    with pytest.raises(Exception, match="other settings"):
        convert(duts, out, resumed, seed=1, progress=False)


def test_estimated_depth_is_kept_and_reused_only_for_the_same_image(toy_copy, tmp_path):
    """A second parameter set costs no estimation; an image edited since is estimated and converted again."""
    duts = toy_copy / "DUTS-TR"
    stems = sorted(p.stem for p in (duts / "DUTS-TR-Image").glob("*.jpg"))
    cache = tmp_path / "cache"
    first = CountingDepth(duts / "DUTS-TR-Depth", stems)
    convert(duts, tmp_path / "a", first, cache_dir=cache, progress=False)
    assert sorted(first.calls) == stems and len(list(cache.glob("*.png"))) == len(stems)
    again = CountingDepth(duts / "DUTS-TR-Depth", stems)
    convert(duts, tmp_path / "b", again, cache_dir=cache, config=SynthesisConfig(object_probability=0.0),
            progress=False)
    assert again.calls == []
    edited = duts / "DUTS-TR-Image" / f"{stems[2]}.jpg"
    cv2.imwrite(str(edited), cv2.imread(str(edited))[::-1].copy())  # same name, another picture
    later = CountingDepth(duts / "DUTS-TR-Depth", stems)
    report = convert(duts, tmp_path / "b", later, cache_dir=cache, config=SynthesisConfig(object_probability=0.0),
                     progress=False)
    assert later.calls == [stems[2]] and (report.done, report.resumed) == (1, len(stems) - 1)
    flows = {p: (tmp_path / "b/JPEGFlows" / p.name).read_bytes() for p in (tmp_path / "a/JPEGFlows").glob("*.jpg")}
    assert any(v != (tmp_path / "a/JPEGFlows" / p.name).read_bytes() for p, v in flows.items())


def _synthesis_command(duts, out, *extra):
    return ["-m", "flow_synthesis", "--duts", duts, "--out", out, "--depth-dir", duts / "DUTS-TR-Depth",
            "--device", "cpu", *extra]


@pytest.mark.slow
def _outputs(folder):
    """The files a synthesis wrote (its folder's lock file, which names the process that held it, aside)."""
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and p.name != ".depthflow.lock")


def test_two_processes_write_what_one_process_writes_and_resume_with_any_count(toy_root, tmp_path, capsys):
    """torchrun shares the images out; the files (manifest included) are one process's, byte for byte, and a
    run stopped part-way finishes with another number of processes to the same files."""
    from tests.conftest import ROOT, run_cli

    duts = toy_root / "DUTS-TR"
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", "29561"]
    assert synth_cli.main(list(map(str, _synthesis_command(duts, tmp_path / "one")[2:]))) is None
    rc, out, err = run_cli(*torchrun, *_synthesis_command(duts, tmp_path / "two"), cwd=ROOT)
    assert rc == 0, err[-2000:]
    assert "rank 0 of 2: DUTSv2" in out and "rank 1 of 2: DUTSv2" in out
    files = _outputs(tmp_path / "one")
    assert files == _outputs(tmp_path / "two")
    assert all((tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes() for f in files)
    # As a kill part-way leaves it: half the images done, their lines in one process's manifest part.
    partial = tmp_path / "partial"
    shutil.copytree(tmp_path / "two", partial)
    lines = (partial / "manifest.jsonl").read_text().splitlines()
    (partial / "manifest.jsonl").unlink()
    (partial / "manifest.1.jsonl").write_text("".join(line + "\n" for line in lines[::2]))
    for line in lines[1::2]:
        (partial / "JPEGFlows" / f"{json.loads(line)['image']}.jpg").unlink()
    code, out, _ = run_main(synth_cli.main, *_synthesis_command(duts, partial)[2:], capsys=capsys)
    assert code == 0 and f"{len(lines) - len(lines[::2])} images converted, {len(lines[::2])} already done" in out
    assert all((tmp_path / "one" / f).read_bytes() == (partial / f).read_bytes() for f in files)


def test_depth_maps_at_another_resolution_are_resized(toy_root, tmp_path):
    duts = toy_root / "DUTS-TR"
    stems = sorted(p.stem for p in (duts / "DUTS-TR-Image").glob("*.jpg"))[:2]
    depth_dir = tmp_path / "depth"
    depth_dir.mkdir()
    for stem in stems:
        full = cv2.imread(str(duts / "DUTS-TR-Depth" / f"{stem}.png"), cv2.IMREAD_UNCHANGED).astype(np.float32)
        np.save(depth_dir / f"{stem}.npy", cv2.resize(full, (48, 32), interpolation=cv2.INTER_AREA))
    images = [np.asarray(cv2.imread(str(duts / "DUTS-TR-Image" / f"{s}.jpg"))) for s in stems]
    depths = DepthFolder(depth_dir, stems)(stems, images)
    assert [d.shape for d in depths] == [(64, 96), (64, 96)]
    np.save(depth_dir / f"{stems[0]}.npy", np.zeros((2, 32, 48, 3), np.float32))
    with pytest.raises(Exception, match="expected one channel"):
        DepthFolder(depth_dir, stems)(stems, images)


def test_empty_and_unreadable_masks_are_skipped_and_reported(toy_copy, tmp_path):
    duts = toy_copy / "DUTS-TR"
    masks = sorted((duts / "DUTS-TR-Mask").glob("*.png"))
    cv2.imwrite(str(masks[0]), np.zeros((64, 96), np.uint8))
    masks[1].write_bytes(b"not a png")
    stems = sorted(p.stem for p in (duts / "DUTS-TR-Image").glob("*.jpg"))
    report = convert(duts, tmp_path / "out", DepthFolder(duts / "DUTS-TR-Depth", stems), progress=False)
    assert [s for s, _ in report.skipped] == [masks[0].stem, masks[1].stem]
    assert report.done == len(stems) - 2
    assert (tmp_path / "out" / "skipped.tsv").read_text().count("\n") == 2


def test_conversion_command_and_its_errors(toy_root, tmp_path, capsys):
    code, out, _ = run_main(synth_cli.main, "--duts", toy_root / "DUTS-TR", "--out", tmp_path / "v2", "--depth-dir",
                            toy_root / "DUTS-TR/DUTS-TR-Depth", "--object-probability", "1.0", capsys=capsys)
    assert code == 0 and "16 images converted" in out
    settings = json.loads((tmp_path / "v2/synthesis.json").read_text())
    assert settings["config"]["object_probability"] == 1.0
    assert settings["depth"] == f"maps from {(toy_root / 'DUTS-TR/DUTS-TR-Depth').resolve()}"
    records = [json.loads(line) for line in (tmp_path / "v2/manifest.jsonl").read_text().splitlines()]
    assert len(records) == 16 and all(r["depth"] == settings["depth"] and len(r["image_sha1"]) == 40 for r in records)
    code, _, err = run_main(synth_cli.main, "--duts", tmp_path / "nope", "--out", tmp_path / "x", "--depth-dir",
                            tmp_path, capsys=capsys)
    assert_one_line_error(code, err, str(tmp_path / "nope" / "DUTS-TR-Image"))
    code, _, err = run_main(synth_cli.main, "--duts", toy_root / "DUTS-TR", "--out", tmp_path / "x", "--depth-dir",
                            tmp_path, capsys=capsys)
    assert_one_line_error(code, err, "no depth map for", str(tmp_path))
    code, _, err = run_main(synth_cli.main, "--duts", toy_root / "DUTS-TR", "--out", tmp_path / "x", "--depth-dir",
                            toy_root / "DUTS-TR/DUTS-TR-Depth", "--median-kernel", "7", capsys=capsys)
    assert_one_line_error(code, err, "median_kernel must be 0, 3 or 5")


def test_raft_padding_and_cropping():
    x = torch.rand(2, 3, 61, 99)
    padded, pads = pad_to_multiple(x)
    assert padded.shape == (2, 3, 64, 104) and pads == (2, 3, 1, 2)
    assert torch.equal(crop_padding(padded, pads), x)
    assert torch.equal(padded[..., 0, 2:-3], x[..., 0, :])  # replicated edge


def test_raft_from_a_torchvision_weights_file(tmp_path):
    from torchvision.models.optical_flow import raft_large

    torch.manual_seed(0)
    path = tmp_path / "raft_large_C_T_SKHT_V2-ff5fadd5.pth"
    torch.save(raft_large(weights=None).state_dict(), path)
    backend = RAFTFlow(path, torch.device("cpu"), iterations=2)
    frames = [np.asarray(texture(np.random.default_rng(i), 130, 150, 0.5)) for i in range(2)]
    flows = backend(frames[:1], frames[1:])
    assert flows[0].shape == (130, 150, 2) and np.isfinite(flows[0]).all()
    # Below RAFT's minimum the frames are enlarged for it and the flow comes back at their size, its vectors
    # in their pixels: a network that sees a shift of (8, 4) enlarged pixels gives (4, 2) for frames half as big.
    seen = []

    def enlarged_shift(a, b, num_flow_updates):
        seen.append(tuple(a.shape[-2:]))
        flow = torch.zeros(a.shape[0], 2, *a.shape[-2:])
        flow[:, 0], flow[:, 1] = 8, 4
        return [flow]

    backend.model = enlarged_shift
    small = backend([frames[0][:64, :80]], [frames[1][:64, :80]])
    assert seen == [(128, 160)] and small[0].shape == (64, 80, 2)
    np.testing.assert_allclose(small[0][..., 0], 4, rtol=1e-6)
    np.testing.assert_allclose(small[0][..., 1], 2, rtol=1e-6)


def test_dis_flow_points_the_right_way(tmp_path):
    rng = np.random.default_rng(0)
    background = texture(rng, 120, 160, 0.2)
    square = texture(rng, 40, 40, 1.0)
    frames = []
    for t in range(3):
        frame = background.copy()
        frame[40 + 2 * t:80 + 2 * t, 50 + 3 * t:90 + 3 * t] = square
        frames.append(frame)
    flows = DISFlow()(frames[:2], frames[1:])
    inside = flows[0][45:75, 58:85]
    assert np.median(inside[..., 0]) == pytest.approx(3, abs=0.5)
    assert np.median(inside[..., 1]) == pytest.approx(2, abs=0.5)
    for i, frame in enumerate(frames):
        cv2.imwrite(str(tmp_path / f"{i:05d}.jpg"), frame[..., ::-1])
    out = tmp_path / "flows"
    frame_paths = sorted(tmp_path.glob("*.jpg"))
    assert video_flows(frame_paths, out, DISFlow(), progress=False) == 3
    assert video_flows(frame_paths, out, DISFlow(), progress=False) == 0, "complete flows are kept"
    assert sorted(p.stem for p in out.glob("*.jpg")) == ["00000", "00001", "00002"]


def _official_to_hf_dpt(state: dict) -> dict:
    """Official DPT-Large key names -> HF transformers 4.x DPTForDepthEstimation (an independent implementation)."""
    import re

    rules = [
        (r"^pretrained\.model\.cls_token$", "dpt.embeddings.cls_token"),
        (r"^pretrained\.model\.pos_embed$", "dpt.embeddings.position_embeddings"),
        (r"^pretrained\.model\.patch_embed\.proj\.", "dpt.embeddings.patch_embeddings.projection."),
        (r"^pretrained\.model\.blocks\.(\d+)\.norm1\.", r"dpt.encoder.layer.\1.layernorm_before."),
        (r"^pretrained\.model\.blocks\.(\d+)\.norm2\.", r"dpt.encoder.layer.\1.layernorm_after."),
        (r"^pretrained\.model\.blocks\.(\d+)\.attn\.proj\.", r"dpt.encoder.layer.\1.attention.output.dense."),
        (r"^pretrained\.model\.blocks\.(\d+)\.mlp\.fc1\.", r"dpt.encoder.layer.\1.intermediate.dense."),
        (r"^pretrained\.model\.blocks\.(\d+)\.mlp\.fc2\.", r"dpt.encoder.layer.\1.output.dense."),
        (r"^pretrained\.model\.norm\.", "dpt.layernorm."),
        (r"^pretrained\.act_postprocess(\d)\.0\.project\.0\.",
         lambda m: f"neck.reassemble_stage.readout_projects.{int(m[1]) - 1}.0."),
        (r"^pretrained\.act_postprocess(\d)\.3\.",
         lambda m: f"neck.reassemble_stage.layers.{int(m[1]) - 1}.projection."),
        (r"^pretrained\.act_postprocess(\d)\.4\.",
         lambda m: f"neck.reassemble_stage.layers.{int(m[1]) - 1}.resize."),
        (r"^scratch\.layer(\d)_rn\.", lambda m: f"neck.convs.{int(m[1]) - 1}."),
        (r"^scratch\.refinenet(\d)\.", lambda m: f"neck.fusion_stage.layers.{4 - int(m[1])}."),
        (r"^scratch\.output_conv\.", "head.head."),
    ]
    inner = [("out_conv.", "projection."), ("resConfUnit1.", "residual_layer1."), ("resConfUnit2.", "residual_layer2."),
             ("conv1.", "convolution1."), ("conv2.", "convolution2.")]
    out = {}
    for key, value in state.items():
        if key.startswith("pretrained.model.head."):
            continue
        if m := re.match(r"^pretrained\.model\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key):
            for name, part in zip(("query", "key", "value"), value.chunk(3)):
                out[f"dpt.encoder.layer.{m[1]}.attention.attention.{name}.{m[2]}"] = part
            continue
        for pattern, replacement in rules:
            if re.match(pattern, key):
                key = re.sub(pattern, replacement, key)
                if key.startswith("neck.fusion_stage"):
                    for a, b in inner:
                        key = key.replace(a, b)
                break
        else:
            raise KeyError(key)
        out[key] = value
    return out


@pytest.mark.slow
def test_dpt_plain_vit_matches_hf_transformers_dpt(monkeypatch):
    """Same weights through HF's independent DPT implementation give the same inverse depth. DPT-Large's code
    path (a plain ViT tapped at four blocks, readout projection, resampling, fusion, head), run at a tenth of
    its width so the test takes seconds; Large's own names and sizes are checked above."""
    from transformers import DPTConfig, DPTForDepthEstimation

    from flow_synthesis import dpt

    monkeypatch.setitem(dpt.DPT_SPECS, "narrow", dpt.DPTSpec("vit_tiny_patch16_384", (2, 5, 8, 11), 192,
                                                             (48, 96, 192, 192), False, ()))
    torch.manual_seed(0)
    ours = DPT("narrow", features=64).eval()
    with torch.no_grad():
        ours.scratch.output_conv[4].bias.fill_(0.5)  # a random head would predict zero depth everywhere
    config = DPTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                       backbone_out_indices=[2, 5, 8, 11], neck_hidden_sizes=[48, 96, 192, 192],
                       fusion_hidden_size=64, readout_type="project", image_size=384, patch_size=16,
                       layer_norm_eps=1e-6)
    hf = DPTForDepthEstimation(config).eval()
    hf.load_state_dict(_official_to_hf_dpt(ours.state_dict()), strict=True)
    # HF's plain-ViT DPT assumes a square token grid; 448 exercises the position-embedding resize too.
    for side in (384, 448):
        x = torch.randn(1, 3, side, side)
        with torch.inference_mode():
            a, b = ours(x), hf(pixel_values=x).predicted_depth
        assert a.shape == b.shape == (1, side, side)
        assert (b > 0).float().mean() > 0.05, "a depth map of zeros would make this comparison empty"
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_video_flows_are_kept_only_for_the_frames_they_were_made_from(toy_copy, tmp_path):
    """Flows of another video in the output folder are made again; so is the last frame's backward flow once
    the video has gained a frame; flows still matching their frames are kept."""
    a, b = (toy_copy / "LVID/JPEGImages" / name for name in ("lvid_00", "lvid_01"))
    out = tmp_path / "flows"
    assert video_flows(list_frames(a), out, DISFlow(), progress=False) == 8
    kept = (out / "00000.jpg").read_bytes()
    assert video_flows(list_frames(a), out, DISFlow(), progress=False) == 0
    assert video_flows(list_frames(b), out, DISFlow(), progress=False) == 8
    assert (out / "00000.jpg").read_bytes() != kept
    shutil.copy(a / "00003.jpg", b / "00008.jpg")  # the video gains a ninth frame
    last = (out / "00007.jpg").read_bytes()
    assert video_flows(list_frames(b), out, DISFlow(), progress=False) == 2  # the old last frame, the new one
    assert (out / "00007.jpg").read_bytes() != last


@pytest.mark.slow
def test_video_flows_under_torchrun_are_one_process_flows(toy_root, tmp_path):
    from flow_synthesis.video_flow import main as flow_main
    from tests.conftest import ROOT, run_cli

    outputs = {}
    for nproc in (1, 2):
        root = tmp_path / f"n{nproc}"
        shutil.copytree(toy_root / "FBMS", root / "FBMS")
        shutil.rmtree(root / "FBMS/TestSet/JPEGFlows")
        command = ["--dataset", "fbms", "--data-root", root, "--method", "dis", "--device", "cpu"]
        if nproc == 1:
            assert flow_main(list(map(str, command))) is None
        else:
            rc, out, err = run_cli("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", "29563",
                                   "-m", "flow_synthesis.video_flow", *command, cwd=ROOT)
            assert rc == 0, err[-2000:]
        outputs[nproc] = {p.relative_to(root): p.read_bytes() for p in (root / "FBMS").rglob("JPEGFlows/*/*")}
    assert "rank 1 of 2: wrote 8 flow images for 1 video(s)" in out
    assert len(outputs[1]) == 2 * 8 + 2 and outputs[1] == outputs[2]


def _official_to_hf_depth_anything(state: dict) -> dict:
    """Official Depth Anything V2 key names -> HF transformers 4.x DepthAnythingForDepthEstimation, an
    independent implementation (its own DINOv2, neck and head)."""
    import re

    out = {}
    inner = [("out_conv.", "projection."), ("resConfUnit1.", "residual_layer1."), ("resConfUnit2.", "residual_layer2."),
             ("conv1.", "convolution1."), ("conv2.", "convolution2.")]
    fixed = {"pretrained.cls_token": "backbone.embeddings.cls_token",
             "pretrained.mask_token": "backbone.embeddings.mask_token",
             "pretrained.pos_embed": "backbone.embeddings.position_embeddings",
             "depth_head.scratch.output_conv1.weight": "head.conv1.weight",
             "depth_head.scratch.output_conv1.bias": "head.conv1.bias"}
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
        elif m := re.match(r"pretrained\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key):
            for name, part in zip(("query", "key", "value"), value.chunk(3)):
                out[f"backbone.encoder.layer.{m[1]}.attention.attention.{name}.{m[2]}"] = part
        elif m := re.match(r"pretrained\.blocks\.(\d+)\.(.*)$", key):
            rest = m[2].replace("attn.proj.", "attention.output.dense.").replace("ls1.gamma", "layer_scale1.lambda1")
            out[f"backbone.encoder.layer.{m[1]}.{rest.replace('ls2.gamma', 'layer_scale2.lambda1')}"] = value
        elif key.startswith("pretrained.patch_embed.proj."):
            out[key.replace("pretrained.patch_embed.proj.", "backbone.embeddings.patch_embeddings.projection.")] = value
        elif key.startswith("pretrained.norm."):
            out[key.replace("pretrained.norm.", "backbone.layernorm.")] = value
        elif m := re.match(r"depth_head\.(projects|resize_layers)\.(\d)\.(.*)$", key):
            part = "projection" if m[1] == "projects" else "resize"
            out[f"neck.reassemble_stage.layers.{m[2]}.{part}.{m[3]}"] = value
        elif m := re.match(r"depth_head\.scratch\.layer(\d)_rn\.(.*)$", key):
            out[f"neck.convs.{int(m[1]) - 1}.{m[2]}"] = value
        elif m := re.match(r"depth_head\.scratch\.refinenet(\d)\.(.*)$", key):
            rest = m[2]
            for a, b in inner:
                rest = rest.replace(a, b)
            out[f"neck.fusion_stage.layers.{4 - int(m[1])}.{rest}"] = value
        elif m := re.match(r"depth_head\.scratch\.output_conv2\.(\d)\.(.*)$", key):
            out[f"head.conv{2 if m[1] == '0' else 3}.{m[2]}"] = value
        else:
            raise KeyError(key)
    return out


@pytest.mark.slow
def test_depth_anything_small_matches_hf_transformers(tmp_path):
    """The official layout's random weights through HF's independent implementation give the same depth to
    1e-4 at 518x518; the weight file loads strictly. At other sizes the position embeddings are resized, and
    there HF resizes to the grid's size where the official code (which this project follows) resizes by a
    scale factor with a 0.1 offset: depths then differ by about 2e-4 of their range."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    from flow_synthesis.depth_anything import DepthAnythingV2, input_size, load_depth_anything

    torch.manual_seed(0)
    ours = DepthAnythingV2("small").eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("gamma"):  # layer scales of 1e-5 would hide the blocks
                p.copy_(1 + 0.1 * torch.randn_like(p))
        ours.depth_head.scratch.output_conv2[2].bias.fill_(0.5)
    path = tmp_path / "depth_anything_v2_vits.pth"
    torch.save(ours.state_dict(), path)
    loaded = load_depth_anything(path, "small")
    config = DepthAnythingConfig(
        backbone_config=Dinov2Config(image_size=518, patch_size=14, hidden_size=384, num_attention_heads=6,
                                     out_indices=[3, 6, 9, 12], apply_layernorm=True, reshape_hidden_states=False),
        neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64, reassemble_hidden_size=384, patch_size=14)
    hf = DepthAnythingForDepthEstimation(config).eval()
    hf.load_state_dict(_official_to_hf_depth_anything(ours.state_dict()), strict=True)
    for size, tolerance in (((518, 518), 1e-4), (input_size(240, 427), 5e-4)):
        x = torch.randn(1, 3, *size)
        with torch.inference_mode():
            a, b = loaded(x), hf(pixel_values=x).predicted_depth
        assert a.shape == b.shape == (1, *size)
        assert (b > 0).float().mean() > 0.05, "a depth map of zeros would make this comparison empty"
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance * b.abs().max().item())
    assert input_size(240, 427) == (518, 924)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(Exception, match="not a readable checkpoint"):
        load_depth_anything(path)


def test_the_conversion_sees_any_relative_inverse_depth_alike():
    """DPT and Depth Anything both give inverse depth up to an unknown scale and shift; the conversion's
    min-max normalisation removes both, so the flow depends only on the depth ordering: nearer moves more."""
    depth = np.full((48, 64), 10.0, np.float32)
    depth[10:30, 20:44] = 2.0  # an object nearer than the background
    mask = np.zeros((48, 64), np.uint8)
    config = SynthesisConfig(object_probability=0.0, zoom_range=(0.0, 0.0), median_kernel=0,
                             percentile_low=0.0, percentile_high=100.0)
    flows = [synthesise(scale / depth + shift, mask, "scene", seed=3, config=config)[0]
             for scale, shift in ((1.0, 0.0), (37.0, 5.0), (0.01, -0.2))]
    assert all(np.allclose(flows[0], f, atol=1e-4 * np.abs(flows[0]).max()) for f in flows[1:])
    speed = np.hypot(*np.moveaxis(flows[0], -1, 0))
    assert speed[20, 30] > speed[2, 2] > 0 or speed[2, 2] == 0 < speed[20, 30]


def test_dpt_hybrid_standardises_weights_as_the_dpt_repository_does():
    """A stand-in ResNet filter of small spread: (w - mean) / (std + 1e-5), the formula the weights were trained
    with (timm 0.4.5, as the DPT repository pins), not timm's current (w - mean) / sqrt(var + 1e-8)."""
    import torch.nn.functional as F
    from timm.layers import StdConv2dSame

    from flow_synthesis.dpt import standardise_as_dpt

    torch.manual_seed(0)
    conv = StdConv2dSame(3, 4, 3, eps=1e-8)
    with torch.no_grad():
        conv.weight.mul_(0.00045 / conv.weight.std())
    x = torch.randn(1, 3, 9, 11)
    with torch.no_grad():
        timm_now = conv(x)
        assert standardise_as_dpt(torch.nn.Sequential(conv)) == 1
        ours = conv(x)
        std, mean = torch.std_mean(conv.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
        dpt = F.conv2d(F.pad(x, (1, 1, 1, 1)), (conv.weight - mean) / (std + 1e-5))
    torch.testing.assert_close(ours, dpt)
    assert (timm_now - dpt).abs().max() > 1e-3 * dpt.abs().max()  # the two formulas differ for such a filter
    assert isinstance(DPT("hybrid").pretrained.model.patch_embed.backbone.stem.conv, StdConv2dSame)
