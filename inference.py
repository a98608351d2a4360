"""The inference engine: every frame of a list of videos through the network, as masks.

`run.py --test`, `evaluator.py`, `--demo`, training's validation and the Python API segment through it:

    segmenter = Segmenter(model, InferenceOptions(device, batch_size=8, workers=8))
    for frame in segmenter.frames(videos):          # SegmentedFrame: video, index, mask, image, flow
        ...

- Frames are decoded to uint8 by loader processes (utils.loading) in batches that fill across
  consecutive videos of one frame size; videos are taken in groups of one frame size, and on a GPU or
  with --compile the last batch of each size is padded, so the network sees one shape per run (cuDNN
  tunes and torch.compile compiles once; padding is dropped from the results).
- On the device: uint8 to float, the bicubic resize of image and flow (each from its own size) to the
  network's square size, the network (`DepthFlow.forward_square`, the part --compile compiles), the
  logits' bicubic resize back to the frame's size in float32, and the class decision. Only the uint8
  masks travel back, while the next batch is already queued on the device. These are
  `DepthFlow.predict`'s operations on the same numbers, so the masks are its masks bit for bit (on a
  CPU; a GPU's kernels differ in the last bits).
- Test-time augmentation (`--tta`), off by default: the logits are averaged over input scales and
  horizontal flips before the class decision. Figures computed with it carry its name (`TTA.name`).
"""

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from dataset import Video, VideoFrames
from model.depthflow import DepthFlow, class_masks, resize_bicubic
from transforms import to_float
from utils import loading
from utils.device import DeviceQueue, PinnedStaging, autocast_context, check_compiler, compile_failure, out_of_memory
from utils.errors import UserError
from utils.progress import progress as progress_bar


@dataclass(frozen=True)
class TTA:
    """Test-time augmentation: the network's square input at each scale of its size, each also flipped
    horizontally if `hflip` (image and flow as pixels, as training flips them); logits averaged."""

    scales: tuple[float, ...] = (1.0,)
    hflip: bool = False

    @property
    def enabled(self) -> bool:
        return self.hflip or self.scales != (1.0,)

    @property
    def name(self) -> str:
        """How figures computed with it are named: '' for single-scale testing."""
        if not self.enabled:
            return ""
        return f"TTA scales {','.join(f'{s:g}' for s in self.scales)}" + (" + flip" if self.hflip else "")

    @classmethod
    def parse(cls, text: str | None) -> "TTA":
        """'0.75,1,1.25+flip', 'flip' or '1,1.5': ValueError for anything else."""
        if not text:
            return cls()
        parts = [p.strip() for p in text.split("+")]
        hflip = "flip" in parts
        numbers = [p for p in parts if p != "flip"]
        if len(numbers) > 1 or (not numbers and not hflip):
            raise ValueError(f"{text!r}: expected scales such as 0.75,1,1.25, optionally +flip")
        try:
            scales = tuple(float(s) for s in numbers[0].split(",")) if numbers else (1.0,)
        except ValueError:
            raise ValueError(f"{text!r}: expected scales such as 0.75,1,1.25, optionally +flip") from None
        if any(not 0.25 <= s <= 4 for s in scales) or len(set(scales)) != len(scales):
            raise ValueError(f"{text!r}: scales must be distinct and between 0.25 and 4")
        return cls(scales, hflip)


@dataclass(frozen=True)
class InferenceOptions:
    """How the network runs; each field is a flag of `run.py --test` and `--demo`."""

    device: torch.device = torch.device("cpu")
    batch_size: int = 8
    workers: int = 0  # loader processes (0: decode in this process)
    amp: str = "off"
    compile: bool = False
    tta: TTA = TTA()

    @classmethod
    def from_args(cls, args, device: torch.device) -> "InferenceOptions":
        """From run.py's parsed flags."""
        return cls(device=device, batch_size=args.batch_size, workers=args.workers, amp=args.amp,
                   compile=args.compile, tta=TTA.parse(args.tta))


@dataclass(frozen=True)
class SegmentedFrame:
    video: Video
    index: int  # position of the frame in its video
    mask: np.ndarray  # HxW uint8, 1 = object
    image: np.ndarray  # HxWx3 uint8, as decoded
    flow: np.ndarray  # as decoded (it may have another size than the image)


@dataclass
class RunStats:
    frames: int = 0
    forward_s: float = 0.0  # the network's time (device time on a GPU), compilation and warm-up excluded


def plan_batches(sizes: list, lengths: list[int], batch_size: int) -> list[list[tuple[int, int]]]:
    """(video, frame) keys in batches: videos grouped by frame size (sizes in order of first appearance,
    videos in their order within a size), each group's frames in order, cut into batches of `batch_size`
    that run on across videos. Only a group's last batch can be short."""
    groups: dict = {}
    for v, (size, n) in enumerate(zip(sizes, lengths)):
        groups.setdefault(size, []).extend((v, f) for f in range(n))
    return [keys[i:i + batch_size] for keys in groups.values() for i in range(0, len(keys), batch_size)]


def prepare_model(model: DepthFlow, options: InferenceOptions) -> DepthFlow:
    """The model on its device in eval mode; the compiler checked before any work when --compile asks."""
    if options.compile:
        check_compiler(options.device)
    return model.to(options.device).eval()


@dataclass
class _InFlight:
    keys: list[tuple[int, int]]
    pixels: tuple[torch.Tensor, torch.Tensor]  # images and flows on the host, as decoded
    masks: torch.Tensor  # BxHxW uint8 on the host, complete once `done` has happened
    seconds: float  # the network's time on a CPU
    events: tuple = ()  # (start, end, done) on a GPU


class Segmenter:
    """Owns a prepared network and runs videos through it (see the module's docstring)."""

    def __init__(self, model: DepthFlow, options: InferenceOptions):
        self.options = options
        self.device = options.device
        self.model = prepare_model(model, options)
        square = self.model.forward_square
        # Only the square part is compiled: its shapes never change, so it compiles once per run (per scale).
        self.network = torch.compile(square, dynamic=False) if options.compile else square
        self.queue = DeviceQueue(self.device)
        self.staging = PinnedStaging(self.device)
        self.fixed_shapes = self.queue.gpu or options.compile
        self._ready_batches: set[int] = set()

    def frames(self, videos: list[Video], *, stats: RunStats | None = None, desc: str = "segmenting",
               progress: bool = True) -> Iterator[SegmentedFrame]:
        """Every frame of `videos`, segmented, grouped by frame size and in order within each group."""
        stats = stats if stats is not None else RunStats()
        data = VideoFrames(videos)
        plan = plan_batches(data.sizes, [len(v.frames) for v in videos], self.options.batch_size)
        loader = loading.data_loader(data, plan, loading.bounded_workers(self.options.workers, len(plan), "--workers"))

        def where(k: int) -> str:
            (v, first), (w, last) = plan[k][0], plan[k][-1]
            if v == w:
                return f"{videos[v].key} (frames {videos[v].frames[first].stem} to {videos[v].frames[last].stem})"
            return f"{videos[v].key} frame {videos[v].frames[first].stem} to {videos[w].key} frame " \
                   f"{videos[w].frames[last].stem}"

        previous = None
        with progress_bar(len(data), desc, enabled=progress) as bar:
            for k, pixels in enumerate(loading.batches(loader, where)):
                current = self._launch(plan[k], tuple(pixels), lambda k=k: where(k))
                if previous is not None:
                    yield from self._collect(previous, videos, stats)
                    bar.update(len(previous.keys))
                previous = current
            if previous is not None:
                yield from self._collect(previous, videos, stats)
                bar.update(len(previous.keys))

    def to_device(self, pixels: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """A loader batch (BxHxWx3 uint8 images, BxH'xW'x3 flows) -> BxCxHxW float32 images and flows on the
        device, padded to --batch-size where the network must see one shape."""
        planes = []
        for x in self.staging(*pixels):
            if self.fixed_shapes and len(x) < self.options.batch_size:
                x = torch.cat([x, x[-1:].expand(self.options.batch_size - len(x), -1, -1, -1)])
            planes.append(to_float(x.permute(0, 3, 1, 2)))
        return planes[0], planes[1]

    def logits(self, image: torch.Tensor, flow: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Float32 logits at the frame's size: the network at its square size, or averaged over the TTA views."""
        tta, side = self.options.tta, self.model.size
        total = None
        for scale in tta.scales:
            square = max(32, round(side * scale / 32) * 32)
            x, y = resize_bicubic(image, (square, square)), resize_bicubic(flow, (square, square))
            for flip in (False, True) if tta.hflip else (False,):
                with autocast_context(self.device, self.options.amp):
                    out = self.network(x.flip(-1), y.flip(-1)) if flip else self.network(x, y)
                # float32 before the resize: reduced-precision logits would tie where float32's do not.
                out = resize_bicubic(out.float(), size)
                out = out.flip(-1) if flip else out
                total = out if total is None else total + out
        return total if not tta.enabled else total / (len(tta.scales) * (1 + tta.hflip))

    def _launch(self, keys: list[tuple[int, int]], pixels: tuple[torch.Tensor, torch.Tensor], where) -> _InFlight:
        n, size = len(keys), tuple(pixels[0].shape[1:3])
        try:
            with torch.inference_mode():
                image, flow = self.to_device(pixels)
                self._warm_up(image, flow, size)
                start_time, start = time.perf_counter(), self.queue.mark(timing=True)
                logits = self.logits(image, flow, size)
                end = self.queue.mark(timing=True)
                masks = class_masks(logits)[:n].to("cpu", non_blocking=True)  # into page-locked memory on a GPU
                done = self.queue.mark()
            return _InFlight(keys, pixels, masks, time.perf_counter() - start_time,
                             (start, end, done) if self.queue.gpu else ())
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not out_of_memory(err):
                raise
            h, w = size
            raise UserError(f"out of {'GPU' if self.queue.gpu else 'host'} memory segmenting {where()} ({w}x{h} "
                            f"frames) with --batch-size {self.options.batch_size}; lower --batch-size") from None

    def _warm_up(self, image: torch.Tensor, flow: torch.Tensor, size: tuple[int, int]) -> None:
        """Pay compilation, cuDNN's tuning and the allocator's first growth before the timed part."""
        if not self.fixed_shapes or len(image) in self._ready_batches:  # the network's shape: batch x its squares
            return
        try:
            self.logits(image, flow, size)
        except Exception as err:
            if out_of_memory(err) or not self.options.compile:
                raise  # the caller's one line for memory
            raise compile_failure(err, "the network") from None
        if self.queue.gpu:
            torch.cuda.synchronize(self.device)
        self._ready_batches.add(len(image))

    def _collect(self, flight: _InFlight, videos: list[Video], stats: RunStats) -> Iterator[SegmentedFrame]:
        if flight.events:
            start, end, done = flight.events
            done.synchronize()
            flight.seconds = start.elapsed_time(end) / 1000
        stats.forward_s += flight.seconds
        stats.frames += len(flight.keys)
        masks = flight.masks.numpy()
        images, flows = (p.numpy() for p in flight.pixels)
        for row, (v, f) in enumerate(flight.keys):
            yield SegmentedFrame(videos[v], f, masks[row], images[row], flows[row])
