"""Every checkpoint format a user holds, read from local files only.

- released: the authors' DepthFlow_mitb*.pth / FakeFlow_mitb*.pth (HF 4.x names under `vos.`, maybe `module.`)
- project: this repository's training checkpoint (model, optimizer, epoch, config, recipe)
- ImageNet MiT to start training from: HF `nvidia/mit-b*` (.bin or .safetensors) or NVlabs `mit_b*.pth`
"""

from pathlib import Path

import torch

from model import mit
from model.depthflow import DepthFlow
from model.encoders import is_mit, load_imagenet
from model.mit import HF_LAYER_NORM_EPS, MIT_SPECS
from utils.errors import UserError
from utils.io import save_torch_atomic

PROJECT_FORMAT = "depthflow-project"
PROJECT_VERSION = 1

RELEASED_HINT = "the authors' release (DepthFlow_mitb*.pth or FakeFlow_mitb*.pth; docs/data.md, 'Checkpoints')"
PRETRAINED_HINT = ("the HF hub repo nvidia/mit-b* (pytorch_model.bin or model.safetensors) or NVlabs SegFormer's "
                   "mit_b*.pth for MiT; a timm checkpoint of the model for timm:<name> (docs/data.md, 'Checkpoints')")
MIT_NAMES = ", ".join(MIT_SPECS)

# Released names of the two encoders, and where the HF encoder sits inside each.
_RELEASED_ENCODERS = {"app_encoder": "appearance_encoder", "mo_encoder": "motion_encoder"}
_HF_ENCODER_PREFIX = "backbone.encoder."


def read_file(path, hint: str) -> dict:
    """Load a .pth/.bin (weights_only) or .safetensors file as a dict, or fail with one line."""
    path = Path(path)
    if not path.is_file():
        beside = sorted(p.name for p in path.parent.glob("*.pth")) if path.parent.is_dir() else []
        if beside:  # a run's folder, say, whose best.pth was never written: name what is there instead
            raise UserError(f"checkpoint not found: {path} ({path.parent} holds {', '.join(beside[:4])})")
        raise UserError(f"checkpoint not found: {path} (expected a file from {hint})")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch/safetensors report corruption with many exception types
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path} is not a readable checkpoint (truncated or not a PyTorch file: {reason})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, expected a state dict or a training checkpoint")
    return obj


def _strip(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _unwrap(obj: dict) -> dict:
    if set(obj) == {"state_dict"} or set(obj) == {"model"}:
        obj = next(iter(obj.values()))
    if obj and all(k.startswith("module.") for k in obj):
        obj = _strip(obj, "module.")
    return obj


def detect_format(obj: dict) -> str:
    """One of: project, released, hf-mit, nvlabs-mit, timm-mit, unknown."""
    if obj.get("format") == PROJECT_FORMAT:
        return "project"
    sd = _unwrap(obj)
    if any(k.startswith("vos.") for k in sd):
        return "released"
    layout, _ = mit.encoder_weights(sd)
    return f"{layout}-mit" if layout else "unknown"


def released_to_model(state_dict: dict) -> tuple[dict, str]:
    """Released DepthFlow/FakeFlow state dict -> (this project's DepthFlow state dict, backbone)."""
    sd = _strip(_unwrap(state_dict), "vos.")
    out, backbones = {}, set()
    for released, ours in _RELEASED_ENCODERS.items():
        enc = _strip(sd, f"{released}.")
        hf = _strip(enc, _HF_ENCODER_PREFIX)
        backbone = mit.infer_backbone(hf, "hf")
        if backbone is None:
            raise ValueError(f"the {released} weights match no MiT layout ({MIT_NAMES})")
        backbones.add(backbone)
        out.update({f"{ours}.mit.{k}": v for k, v in mit.convert(hf, backbone, "hf", "timm").items()})
        for buffer in ("mean", "std"):
            out[f"{ours}.{buffer}"] = enc[buffer]
    if len(backbones) != 1:
        raise ValueError(f"the two encoders are different MiT versions: {sorted(backbones)}")
    out.update({f"decoder.{k}": v for k, v in _strip(sd, "decoder.").items()})
    return out, backbones.pop()


def model_to_released(model: DepthFlow) -> dict:
    """This project's DepthFlow -> the released layout (inverse of released_to_model). The released layout
    holds a MiT model at 512 with LayerNorm eps 1e-5 and nothing else, so any other model is refused
    (ValueError saying what would be lost) rather than written as a file that loads as a different model."""
    lost = [what for what, kept in (
        (f"the backbone {model.backbone} (the layout holds MiT only)", is_mit(model.backbone)),
        (f"a motion encoder ({model.flow_backbone}) other than the appearance one (the layout holds one MiT "
         "version)", model.flow_backbone in (None, model.backbone)),
        (f"the internal size {model.size} (the layout implies 512)", model.size == 512),
        (f"LayerNorm eps {model.layer_norm_eps} (the layout implies {HF_LAYER_NORM_EPS})",
         model.layer_norm_eps == HF_LAYER_NORM_EPS)) if not kept]
    if lost:
        raise ValueError(f"the released layout cannot keep {lost[0]}")
    state_dict = model.state_dict()
    out = {}
    for released, ours in _RELEASED_ENCODERS.items():
        enc = _strip(state_dict, f"{ours}.")
        timm_sd = _strip(enc, "mit.")
        hf = mit.convert(timm_sd, model.backbone, "timm", "hf")
        out.update({f"vos.{released}.{_HF_ENCODER_PREFIX}{k}": v for k, v in hf.items()})
        for buffer in ("mean", "std"):
            out[f"vos.{released}.{buffer}"] = enc[buffer]
    out.update({f"vos.decoder.{k}": v for k, v in _strip(state_dict, "decoder.").items()})
    return out


def load_strictly(model: torch.nn.Module, state_dict: dict, path, network: str, assign: bool = False) -> None:
    """Every parameter present, none left over, every shape right; otherwise one line naming the file.
    `assign`: take the tensors themselves (for a model built on the meta device, which has none of its own)."""
    try:
        result = model.load_state_dict(state_dict, strict=False, assign=assign)
    except RuntimeError as err:  # shape mismatches
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise UserError(f"{path} does not fit {network}: {detail}") from None
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f"{path} does not fit {network}: missing {result.missing_keys[:3]}, "
                        f"unexpected {result.unexpected_keys[:3]}")


def _backbone_mismatch(path, found: str, wanted: str) -> UserError:
    return UserError(f"{Path(path).name} holds a {found} model, not the {wanted} asked for ({path})")


def load_depthflow(path, backbone: str | None = None, size: int | None = None, map_location="cpu") -> DepthFlow:
    """Build DepthFlow from a released or project checkpoint. `backbone`, if given, must match the file.

    `size` defaults to the resolution the weights were trained at: the project checkpoint's, or 512. A
    project checkpoint builds its encoders from the descriptions it stores; a released file holds MiT-B0,
    B1 or B2, told apart by their widths and depths.
    """
    obj = read_file(path, RELEASED_HINT)
    fmt = detect_format(obj)
    if fmt == "project":
        config = dict(obj["config"])
        state_dict, trained_size = obj["model"], config.pop("size")
    elif fmt == "released":
        try:
            state_dict, found = released_to_model(obj)
        except (ValueError, KeyError) as err:
            raise UserError(f"{path} looks like a released DepthFlow checkpoint but is incomplete: {err}") from None
        config, trained_size = {"backbone": found, "layer_norm_eps": HF_LAYER_NORM_EPS}, 512
    elif fmt in ("hf-mit", "nvlabs-mit", "timm-mit"):
        raise UserError(f"{path} holds ImageNet MiT encoder weights ({fmt}), not a DepthFlow model; "
                        f"such weights only start a training run; a DepthFlow model file is expected here")
    else:
        raise UserError(f"{path} is not a DepthFlow checkpoint (expected a file from {RELEASED_HINT} "
                        f"or a training checkpoint of this project)")
    if backbone is not None and config["backbone"] != backbone:
        raise _backbone_mismatch(path, config["backbone"], backbone)
    if bad := next((k for k, v in state_dict.items() if v.is_floating_point() and not v.isfinite().all()), None):
        raise UserError(f"{path} holds NaN or infinite weights ({bad}); it cannot segment anything")
    with torch.device("meta"):  # no random initialisation of weights that the file replaces
        model = DepthFlow(size=size or trained_size, **config)
    load_strictly(model, state_dict, path, "the DepthFlow network", assign=True)
    return model.to(map_location)


def load_pretrained(model: DepthFlow, path, stream: str = "both") -> str:
    """Initialise encoders from ImageNet weights, each by its family's rules (MiT: HF hub, NVlabs or timm
    layout; timm: a timm checkpoint of the model). `stream`: "both", "appearance" or "motion". Returns the
    layout found."""
    weights = _unwrap(read_file(path, PRETRAINED_HINT))
    streams = ("appearance", "motion") if stream == "both" else (stream,)
    layout = ""
    for name in streams:
        encoder = getattr(model, f"{name}_encoder")
        try:
            layout = load_imagenet(encoder, model.encoders[name], weights, str(path))
        except (ValueError, mit.KeyMismatch) as err:
            raise UserError(f"{path} does not fit the {name} encoder ({model.encoders[name]['name']}): {err}; "
                            f"expected {PRETRAINED_HINT}") from None
    return layout


def model_config(model: DepthFlow) -> dict:
    """What rebuilds the model: its backbones, size, LayerNorm eps and its encoders' descriptions."""
    return {"backbone": model.backbone, "flow_backbone": model.flow_backbone, "size": model.size,
            "layer_norm_eps": model.layer_norm_eps, "encoders": model.encoders}


def save_project_checkpoint(path, model: DepthFlow, state_dict: dict | None = None, **training_state) -> None:
    """Write atomically: {format, version, config, model, **training_state} (optimizer, epoch, recipe, ...).
    `state_dict`: the model's weights as already copied to the host (default: copied from `model` now)."""
    if state_dict is None:
        state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": PROJECT_FORMAT, "version": PROJECT_VERSION, "config": model_config(model),
               "model": state_dict}
    payload.update(training_state)
    save_torch_atomic(payload, path)


TRAINING_STATE = ("optimizer", "scaler", "epoch", "step", "best")


def read_project_checkpoint(path, training: bool = False) -> dict:
    """A checkpoint in this project's format; with `training`, one that holds a whole training state."""
    obj = read_file(path, "an earlier training run (its output folder)")
    if detect_format(obj) != "project":
        raise UserError(f"{path} is not a training checkpoint of this project")
    if training and (missing := [k for k in TRAINING_STATE if k not in obj]):
        raise UserError(f"{path} holds model weights but no training state (no {missing[0]!r}; converted files "
                        "hold weights only): it can start a run, not continue one")
    return obj
