"""Synthetic optical flow from one still image's depth: the method's training data (DUTSv2).

The paper does not publish its equations, so this conversion is designed from the physics of flow
(docs/flow_synthesis.md, 'The conversion') and every choice is a parameter:

1. Normalise: D = (d - min d) / (max d - min d) of the relative inverse depth d (disparity; DPT-MiDaS
   outputs exactly that: larger = nearer).
2. Refine: clip to the [p_low, p_high] percentiles and re-normalise (DPT's extreme values are mostly
   noise at image borders and in the sky), then a median filter removes speckle.
3. Augment (random per image): a gamma on D varies how depth is distributed over the scene.
4. Camera motion: a translation parallel to the image plane moves each pixel by f*T/Z, i.e. in proportion
   to inverse depth: flow = -m * diag * D * (cos a, sin a), with a random direction a and a random
   magnitude m (a fraction of the image diagonal). A translation along the optical axis adds an expansion
   about the image centre, also in proportion to inverse depth: s * D * (p - c).
5. Object motion: with probability p_object, the annotated object moves on its own, adding a rigid
   translation inside its mask. This is what makes the salient object separable in flow, as the moving
   object of a real video is.
6. Encode the two-channel flow with the colour wheel (utils.flow_viz), normalised per image.

Random draws come from a generator seeded by (seed, image name), so a file's flow does not depend on
processing order, and the draws are recorded per image so any flow can be regenerated exactly.
"""

import hashlib
from dataclasses import asdict, dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class SynthesisConfig:
    percentile_low: float = 1.0
    percentile_high: float = 99.0
    median_kernel: int = 5  # 3 or 5 (OpenCV's float median); 0 disables
    gamma_range: tuple[float, float] = (0.7, 1.4)
    camera_magnitude: tuple[float, float] = (0.01, 0.05)  # max parallax, fraction of the image diagonal
    zoom_range: tuple[float, float] = (-0.03, 0.03)  # expansion rate at D = 1
    object_probability: float = 0.8
    object_magnitude: tuple[float, float] = (0.01, 0.04)  # fraction of the image diagonal

    def __post_init__(self):
        if self.median_kernel not in (0, 3, 5):
            raise ValueError(f"median_kernel must be 0, 3 or 5, got {self.median_kernel}")
        if not 0 <= self.percentile_low < self.percentile_high <= 100:
            raise ValueError("need 0 <= percentile_low < percentile_high <= 100")
        for name in ("gamma_range", "camera_magnitude", "zoom_range", "object_magnitude"):
            low, high = getattr(self, name)
            if not (np.isfinite(low) and np.isfinite(high) and low <= high):
                raise ValueError(f"--{name.replace('_', '-')} {low} {high}: expected finite LOW <= HIGH")
        if self.gamma_range[0] <= 0 or min(self.camera_magnitude[0], self.object_magnitude[0]) < 0:
            raise ValueError("gammas must be positive and motion magnitudes at least 0")
        if not 0 <= self.object_probability <= 1:
            raise ValueError(f"--object-probability {self.object_probability}: expected a value in [0, 1]")


@dataclass(frozen=True)
class FlowParams:
    """The random draws for one image (one manifest record)."""

    gamma: float
    camera_angle: float
    camera_magnitude: float
    zoom: float
    object_dx: float
    object_dy: float


def normalise(depth: np.ndarray) -> np.ndarray:
    depth = depth.astype(np.float32)
    lo, hi = float(depth.min()), float(depth.max())
    if hi - lo < 1e-12:
        return np.zeros_like(depth)
    return (depth - lo) / (hi - lo)


def refine(depth: np.ndarray, config: SynthesisConfig) -> np.ndarray:
    """Percentile clipping and re-normalisation, then a median filter; returns D in [0, 1]."""
    d = normalise(depth)
    lo, hi = np.percentile(d, [config.percentile_low, config.percentile_high])
    if hi - lo > 1e-12:
        d = np.clip((d - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    if config.median_kernel > 1:
        d = cv2.medianBlur(d, config.median_kernel)
    return d.astype(np.float32)


def image_generator(seed: int, name: str) -> np.random.Generator:
    digest = hashlib.sha256(name.encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def draw_params(rng: np.random.Generator, config: SynthesisConfig, diagonal: float) -> FlowParams:
    gamma = rng.uniform(*config.gamma_range)
    angle = rng.uniform(0, 2 * np.pi)
    magnitude = rng.uniform(*config.camera_magnitude) * diagonal
    zoom = rng.uniform(*config.zoom_range)
    moves = rng.random() < config.object_probability
    obj_angle = rng.uniform(0, 2 * np.pi)
    obj_magnitude = rng.uniform(*config.object_magnitude) * diagonal if moves else 0.0
    return FlowParams(float(gamma), float(angle), float(magnitude), float(zoom),
                      float(obj_magnitude * np.cos(obj_angle)), float(obj_magnitude * np.sin(obj_angle)))


def depth_to_flow(depth: np.ndarray, mask: np.ndarray, params: FlowParams) -> np.ndarray:
    """Refined depth D in [0, 1] (HxW), object mask (HxW, 0/1) -> HxWx2 flow (dx, dy) in pixels."""
    h, w = depth.shape
    d = np.power(depth, params.gamma, dtype=np.float32)
    direction = np.array([np.cos(params.camera_angle), np.sin(params.camera_angle)], np.float32)
    flow = -params.camera_magnitude * d[..., None] * direction
    ys, xs = np.mgrid[:h, :w].astype(np.float32)
    flow[..., 0] += params.zoom * d * (xs - (w - 1) / 2)
    flow[..., 1] += params.zoom * d * (ys - (h - 1) / 2)
    inside = mask.astype(bool)
    flow[inside] += np.array([params.object_dx, params.object_dy], np.float32)
    return flow.astype(np.float32)


def synthesise(depth: np.ndarray, mask: np.ndarray, name: str, seed: int = 0,
               config: SynthesisConfig = SynthesisConfig()) -> tuple[np.ndarray, FlowParams]:
    """Raw depth (any scale, larger = nearer) and mask -> (flow, the parameters drawn for this image)."""
    refined = refine(depth, config)
    params = draw_params(image_generator(seed, name), config, float(np.hypot(*depth.shape)))
    return depth_to_flow(refined, mask, params), params


def params_record(name: str, params: FlowParams) -> dict:
    return {"image": name, **asdict(params)}
