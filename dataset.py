"""Datasets in the layouts of the authors' pre-processed archives (docs/data.md, 'Dataset layouts').

Every dataset is described by a DatasetSpec (data, not code): a new test set in the standard layout is one
entry of DATASETS, and `run.py --test`, `python -m tools.toydata` and the tests pick it up. `scan`
validates a layout up front by names and file sizes only, so a missing or mismatched file stops a run
before it starts, not an hour into it. Test videos are read frame by frame (VideoFrames); training draws
a fixed number of random samples per epoch (TrainingFrames).
"""

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from transforms import TrainTransform
from utils.errors import UserError
from utils.io import FRAME_EXTENSIONS, image_size, natural_key, read_rgb
from utils.palette import read_mask, read_mask_grey8

DEFAULT_DATA_ROOT = "../DB/VOS"

MASK_EXTENSIONS = (".png",)
YTOBJ_CLASSES = ("aeroplane", "bird", "boat", "car", "cat", "cow", "dog", "horse", "motorbike", "train")


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset's files are, relative to its root, and how its masks read."""

    name: str  # command-line name
    title: str
    role: str  # "train": a training source; "test": scored by --test (DAVIS 2016 val also picks best.pth)
    folder: str  # default sub-folder of --data-root
    images: str  # folder holding one sub-folder per video (or the image files, if flat)
    flows: str
    masks: str
    mask_rule: str  # utils.palette.MASK_RULES
    video_list: str | None = None  # file naming the videos, one per line
    grouped: bool = False  # <class>/<video>/ (YouTube-Objects)
    groups: tuple[str, ...] = ()  # the classes of a grouped dataset, as the benchmark defines them
    flat: bool = False  # one still image per "video" (DUTSv2)
    # Annotated on some frames only (FBMS, YouTube-Objects, Long-Videos). The archives hold such a set in one of
    # two forms, and either reads the same here: a mask file for every frame, blank where the frame is not
    # annotated, or only the annotated frames kept. So a frame counts as annotated when it has a mask file with
    # an object in it; a blank mask is a placeholder, as the authors' scoring loops treat it.
    sparse: bool = False
    output: str = ""  # folder of saved masks under --output
    metric: str = "j"  # "davis" (J and F, toolkit statistics) or "j" (J on annotated frames with an object)
    mask_resize: str = "nearest"  # training resize rule (transforms.MASK_RESIZE)

    def layout(self) -> str:
        where = f"{self.folder}/{{{self.images},{self.flows},{self.masks}}}"
        unit = "*.{jpg,png}" if self.flat else ("<class>/<video>/*" if self.grouped else "<video>/*")
        listed = f" and {self.folder}/{self.video_list}" if self.video_list else ""
        return f"{where}/{unit}{listed}"


def _davis(split):
    return DatasetSpec(
        name="davis" if split == "val" else "davis_train", title=f"DAVIS 2016 {split}", folder="DAVIS",
        role="test" if split == "val" else "train",
        images="JPEGImages/480p", flows="JPEGFlows/480p", masks="Annotations/480p", mask_rule="nonzero",
        video_list=f"ImageSets/2016/{split}.txt", output=f"DAVIS16_{split}", metric="davis")


DATASETS = {
    "davis": _davis("val"),
    "davis_train": _davis("train"),
    "fbms": DatasetSpec(
        name="fbms", title="FBMS test", role="test", folder="FBMS", images="TestSet/JPEGImages",
        flows="TestSet/JPEGFlows", masks="TestSet/Annotations", mask_rule="grey", sparse=True,
        output="FBMS_test"),
    "ytobj": DatasetSpec(
        name="ytobj", title="YouTube-Objects", role="test", folder="YTOBJ", images="JPEGImages",
        flows="JPEGFlows", masks="Annotations", mask_rule="grey", grouped=True, groups=YTOBJ_CLASSES,
        sparse=True, output="YTOBJ"),
    "lvid": DatasetSpec(
        name="lvid", title="Long-Videos", role="test", folder="LVID", images="JPEGImages", flows="JPEGFlows",
        masks="Annotations", mask_rule="nonzero", sparse=True, output="LVID"),
    "ytvos": DatasetSpec(
        name="ytvos", title="YouTube-VOS 2018 train", role="train", folder="YTVOS18", images="train/JPEGImages",
        flows="train/JPEGFlows", masks="train/Annotations", mask_rule="nonzero", video_list="ImageSets/train.txt"),
    "duts": DatasetSpec(
        name="duts", title="DUTSv2", role="train", folder="DUTSv2", images="JPEGImages", flows="JPEGFlows",
        masks="Annotations", mask_rule="grey", flat=True, mask_resize="bicubic"),
}
VALIDATION_DATASET = "davis"  # scored during training to keep best.pth; the paper's main table


def test_datasets() -> tuple[str, ...]:
    """The sets `run.py --test` scores, in order (read from DATASETS when asked, so an entry added to it counts)."""
    return tuple(n for n, spec in DATASETS.items() if spec.role == "test")


def training_datasets() -> tuple[str, ...]:
    return tuple(n for n, spec in DATASETS.items() if spec.role == "train")


def video_datasets() -> tuple[str, ...]:
    return tuple(n for n, spec in DATASETS.items() if not spec.flat)


@dataclass(frozen=True)
class Frame:
    stem: str
    image: Path
    flow: Path
    mask: Path | None


@dataclass(frozen=True)
class Video:
    name: str
    frames: tuple[Frame, ...]
    group: str | None = None  # YouTube-Objects class

    @property
    def key(self) -> str:
        return f"{self.group}/{self.name}" if self.group else self.name

    @property
    def annotated(self) -> tuple[Frame, ...]:
        return tuple(f for f in self.frames if f.mask is not None)


def _files_by_stem(folder: Path, extensions, spec: DatasetSpec) -> dict[str, Path]:
    if not folder.is_dir():
        raise UserError(f"{spec.title}: missing folder {folder} (expected layout {spec.layout()})")
    files = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, ext = os.path.splitext(entry.name)
            if ext.lower() not in extensions or not entry.is_file():
                continue
            if entry.stat().st_size == 0:
                raise UserError(f"{spec.title}: empty file {entry.path}")
            if stem in files:
                raise UserError(f"{spec.title}: two files for frame {stem!r}: {files[stem]} and {entry.path}")
            files[stem] = Path(entry.path)
    return files


def _pair(video_dir: str, root: Path, spec: DatasetSpec, name: str, group: str | None) -> Video | list[Video]:
    images = _files_by_stem(root / spec.images / video_dir, FRAME_EXTENSIONS, spec)
    flows = _files_by_stem(root / spec.flows / video_dir, FRAME_EXTENSIONS, spec)
    masks = _files_by_stem(root / spec.masks / video_dir, MASK_EXTENSIONS, spec)
    where = root / spec.images / video_dir
    if not images:
        raise UserError(f"{spec.title}: no frames in {where} (expected .jpg/.png files)")
    if stems := sorted(images.keys() - flows.keys()):
        raise UserError(f"{spec.title}: no flow for frame {images[stems[0]]} "
                        f"(expected {root / spec.flows / video_dir / stems[0]}.jpg)")
    if stems := sorted(flows.keys() - images.keys()):
        raise UserError(f"{spec.title}: flow {flows[stems[0]]} has no frame (expected {where / stems[0]}.jpg)")
    if stems := sorted(masks.keys() - images.keys()):
        raise UserError(f"{spec.title}: mask {masks[stems[0]]} has no frame (expected {where / stems[0]}.jpg)")
    if not spec.sparse and (stems := sorted(images.keys() - masks.keys())):
        raise UserError(f"{spec.title}: no mask for frame {images[stems[0]]} "
                        f"(expected {root / spec.masks / video_dir / stems[0]}.png)")
    if not masks:
        raise UserError(f"{spec.title}: no annotated frame in {root / spec.masks / video_dir}")
    frames = [Frame(s, images[s], flows[s], masks.get(s)) for s in sorted(images, key=natural_key)]
    if spec.flat:
        return [Video(f.stem, (f,)) for f in frames]
    return Video(name, tuple(frames), group)


def _subfolders(folder: Path, spec: DatasetSpec) -> list[str]:
    if not folder.is_dir():
        raise UserError(f"{spec.title}: missing folder {folder} (expected layout {spec.layout()})")
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def _video_names(root: Path, spec: DatasetSpec) -> list[tuple[str | None, str]]:
    """(group, video) pairs, from the list file if the dataset has one, else from the image folders."""
    if spec.video_list:
        listing = root / spec.video_list
        if not listing.is_file():
            raise UserError(f"{spec.title}: missing video list {listing} (expected layout {spec.layout()})")
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        if not names:
            raise UserError(f"{spec.title}: video list {listing} is empty")
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise UserError(f"{spec.title}: video list {listing} names {twice[0]!r} twice (expected each video once)")
        for name in names:
            if not (root / spec.images / name).is_dir():
                raise UserError(f"{spec.title}: {listing} names video {name!r}, but "
                                f"{root / spec.images / name} does not exist")
        return [(None, n) for n in names]
    top = _subfolders(root / spec.images, spec)
    if spec.grouped:
        return [(g, v) for g in top for v in _subfolders(root / spec.images / g, spec)]
    return [(None, v) for v in top]


def dataset_root(spec: DatasetSpec, data_root, override=None) -> Path:
    return Path(override) if override else Path(data_root) / spec.folder


def scan(spec: DatasetSpec, root) -> list[Video]:
    """Check the whole layout by names and sizes; return the videos. Raises UserError naming the problem."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{spec.title}: data folder not found: {root} (expected layout {spec.layout()})")
    for sub in (spec.images, spec.flows, spec.masks):
        if not (root / sub).is_dir():
            raise UserError(f"{spec.title}: missing folder {root / sub} (expected layout {spec.layout()})")
    if (root / spec.flows).resolve() == (root / spec.images).resolve():
        raise UserError(f"{spec.title}: the flow folder {root / spec.flows} is the frame folder {root / spec.images} "
                        "(a link?): frames would be read as flows")
    if spec.flat:
        return _pair("", root, spec, "", None)
    videos = [_pair(f"{g}/{v}" if g else v, root, spec, v, g) for g, v in _video_names(root, spec)]
    if not videos:
        raise UserError(f"{spec.title}: no videos under {root / spec.images} (expected layout {spec.layout()})")
    if spec.role == "test" and spec.metric == "davis":
        for video in videos:
            if len(video.frames) < 3:
                raise UserError(f"{spec.title}: video {root / spec.images / video.key} has {len(video.frames)} "
                                "frames; the DAVIS protocol drops the first and the last, so it needs at least 3")
    return videos


def annotation_form(frames: int, mask_files: int, blank: int) -> str:
    """In words, the form of a sparse annotation (DatasetSpec.sparse), from a set's frames, its mask files and
    how many of them are blank."""
    if mask_files == frames and not blank:
        return "a mask with an object for every frame (only the annotated frames kept)"
    if mask_files == frames:
        return f"a mask file for every frame, {blank} blank (placeholders for frames without annotation)"
    return f"mask files for {mask_files} frames" + (f", {blank} blank (placeholders)" if blank else "")


class VideoFrames(Dataset):
    """Every frame of a list of videos, for inference, addressed by (video, frame) positions.

    An item is the frame's image and flow as decoded, HxWx3 uint8 tensors: a quarter of float32's bytes to
    move, turned into floats on the device. A flow image may have another size than its frame (each is
    resized to the network's square input on its own, as the authors' code does), but every frame of a
    video must have its first frame's size, and every flow its first flow's (`sizes`, read from the
    headers): that is what lets the engine batch a video's frames.
    """

    def __init__(self, videos: list[Video]):
        self.videos = videos
        self.sizes = [(image_size(video.frames[0].image), image_size(video.frames[0].flow)) for video in videos]

    def __len__(self):
        return sum(len(video.frames) for video in self.videos)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        v, f = key
        frame, first = self.videos[v].frames[f], self.videos[v].frames[0]
        image, flow = read_rgb(frame.image), read_rgb(frame.flow)
        for path, pixels, size, other in ((frame.image, image, self.sizes[v][0], first.image),
                                          (frame.flow, flow, self.sizes[v][1], first.flow)):
            if pixels.shape[:2] != size:
                raise UserError(f"{path} is {_size(pixels)}, {other} of the same video is {size[1]}x{size[0]} "
                                "(expected one size per video)")
        return torch.from_numpy(image.copy()), torch.from_numpy(flow.copy())  # PIL's arrays are read-only


def _size(pixels: np.ndarray) -> str:
    return f"{pixels.shape[1]}x{pixels.shape[0]}"


@dataclass
class Source:
    """Videos to draw training samples from, how many per epoch, and how their masks read and resize."""

    spec: DatasetSpec
    videos: list[Video]
    samples: int
    annotated: list[tuple[Frame, ...]] = field(init=False)

    def __post_init__(self):
        self.annotated = [v.annotated for v in self.videos if v.annotated]
        if not self.annotated:
            raise UserError(f"{self.spec.title}: no annotated frames to train on")


class TrainingFrames(Dataset):
    """Random samples from one or more sources: a random video, then a random annotated frame.

    An item is addressed by (epoch, index) and drawn from a generator seeded by (seed, epoch, index), so a
    run is the same for any number of workers or processes, and resuming replays exactly what the stopped
    run would have done. An epoch holds `len(self)` samples, each source's share in order. Mixing sources
    is one line: TrainingFrames([Source(duts, videos, 384), Source(davis, videos, 128)], ...).
    Items are uint8 tensors (image and flow 3xSxS, mask SxS 0/1); the device makes floats of them.
    """

    def __init__(self, sources: list[Source], size: int = 512, seed: int = 0, flip_p: float = 0.5):
        self.sources = sources
        self.transforms = [TrainTransform(size, s.spec.mask_resize, flip_p, flip_p) for s in sources]
        self.seed = seed
        self.bounds = np.cumsum([s.samples for s in sources]).tolist()

    def __len__(self):
        return self.bounds[-1]

    def _draw(self, key: tuple[int, int]) -> tuple[int, Frame, random.Random]:
        """(source, frame, the generator that then draws the flips) of sample `key`."""
        epoch, i = key
        part = next(p for p, bound in enumerate(self.bounds) if i < bound)
        rng = random.Random(f"{self.seed}/{epoch}/{i}")
        return part, rng.choice(rng.choice(self.sources[part].annotated)), rng

    def frame_for(self, key: tuple[int, int]) -> Frame:
        """The frame that sample (epoch, index) is made from."""
        return self._draw(key)[1]

    def __getitem__(self, key: tuple[int, int]):
        part, frame, rng = self._draw(key)
        spec = self.sources[part].spec
        image, flow = read_rgb(frame.image), read_rgb(frame.flow)
        # 8-bit grey levels for a bicubic mask resize (DUTSv2, as the authors resize their 'L' masks), 0/1 labels
        # otherwise. A flow image of another size is resized on its own, as the authors' loaders do.
        mask = read_mask_grey8(frame.mask) if spec.mask_resize == "bicubic" else read_mask(frame.mask, spec.mask_rule)
        if mask.shape != image.shape[:2]:
            raise UserError(f"mask {frame.mask} is {_size(mask)}, its frame {frame.image} is {_size(image)} "
                            "(expected equal sizes)")
        image_t, flow_t, mask_t = self.transforms[part](image, flow, mask, rng)
        return {"image": image_t, "flow": flow_t, "mask": mask_t}
