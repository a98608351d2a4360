"""The inference engine: every frame of a list of videos through the network, as masks.

`run.py --test`, `evaluator.py`, `--demo` and training's validation all segment through it:

    segmenter = Segmenter(model, InferenceOptions(device, batch_size=8, workers=8))
    for frame in segmenter.frames(videos):          # SegmentedFrame: video, index, mask, image, flow
        ...
    results, stats = segmenter.segment(videos, handle)   # handle(frame) on helper threads

It is the only place in the project with loader processes, helper threads and device streams:
- Frames are decoded to uint8 by loader processes (utils.loading: a standard DataLoader; pinned on a GPU)
  in batches that fill across consecutive videos of one frame size; videos are taken in groups of one
  frame size, and on a GPU or with --compile the last batch of each size is padded, so the network sees
  one shape per run (cuDNN tunes and torch.compile compiles once; padding is dropped from the results).
- On the device: uint8 to float, the bicubic resize to the network's square size, the network
  (`DepthFlow.forward_square`, the part --compile compiles), the logits' bicubic resize back to the
  frame's size in float32, and the class decision. Only the uint8 masks travel back, while the next
  batch is already queued on the device. These are `DepthFlow.predict`'s operations on the same numbers,
  so the masks are its masks bit for bit (on a CPU; a GPU's kernels differ in the last bits).
- `segment` hands each mask to helper threads (PNG encoding, reading ground truth and scoring release
  the GIL), with a bounded backlog, so the thread that launches kernels never waits for them and host
  memory stays flat however long a video is.
"""

import functools
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from dataset import Video, VideoFrames
from model.depthflow import DepthFlow, class_masks, resize_bicubic
from model.winograd import use_winograd, winograd_available
from transforms import to_float
from utils import loading
from utils.device import autocast_context, check_compiler, compile_failure
from utils.errors import UserError


@dataclass(frozen=True)
class InferenceOptions:
    """How the network runs; each field is a flag of `run.py --test` and `--demo`."""

    device: torch.device = torch.device("cpu")
    batch_size: int = 8
    workers: int = 0  # loader processes (0: decode in this process), and as many helper threads
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False
    winograd: bool = False

    @classmethod
    def from_args(cls, args, device: torch.device) -> "InferenceOptions":
        """From run.py's parsed flags."""
        return cls(device=device, batch_size=args.batch_size, workers=args.workers, amp=args.amp,
                   channels_last=args.channels_last, compile=args.compile, winograd=args.winograd)


@dataclass(frozen=True)
class SegmentedFrame:
    video: Video
    index: int  # position of the frame in its video
    mask: np.ndarray  # HxW uint8, 1 = object
    image: np.ndarray  # HxWx3 uint8, as decoded
    flow: np.ndarray


@dataclass
class RunStats:
    frames: int = 0
    forward_s: float = 0.0  # the network's time (device time on a GPU), compilation and warm-up excluded


def plan_batches(sizes: list[tuple[int, int]], lengths: list[int], batch_size: int) -> list[list[tuple[int, int]]]:
    """(video, frame) keys in batches: videos grouped by frame size (sizes in order of first appearance,
    videos in their order within a size), each group's frames in order, cut into batches of `batch_size`
    that run on across videos. Only a group's last batch can be short."""
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for v, (size, n) in enumerate(zip(sizes, lengths)):
        groups.setdefault(size, []).extend((v, f) for f in range(n))
    return [keys[i:i + batch_size] for keys in groups.values() for i in range(0, len(keys), batch_size)]


def prepare_model(model: DepthFlow, options: InferenceOptions) -> DepthFlow:
    """Move the model to its device in eval mode, with the fast paths the options ask for."""
    device = options.device
    if options.winograd:
        if device.type != "cpu":
            raise UserError(f"--winograd is for CPU inference; on {device.type} the convolution library "
                            "chooses its own algorithms (drop --winograd)")
        if not winograd_available():
            raise UserError("--winograd needs NNPACK, which this PyTorch build or this CPU lacks (drop --winograd)")
        use_winograd(model)
    if options.channels_last and device.type == "cuda":
        raise UserError("--channels-last is slower on a GPU for this network; it is a CPU option (drop it)")
    if options.compile:
        check_compiler(device)
    model = model.to(device).eval()
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


class DeviceQueue:
    """The order of work on one device: on a GPU, events recorded on that device's current stream mark when
    queued work is done, so the host waits for one batch without waiting for the next."""

    def __init__(self, device: torch.device):
        self.device = device
        self.gpu = device.type == "cuda"

    def mark(self, timing: bool = False):
        """An event at this point of the device's queue (None on a CPU, where work is done when it returns)."""
        if not self.gpu:
            return None
        event = torch.cuda.Event(enable_timing=timing)
        event.record(torch.cuda.current_stream(self.device))
        return event


@dataclass
class _InFlight:
    keys: list[tuple[int, int]]
    pixels: torch.Tensor  # Bx2xHxWx3 uint8 on the host
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
        # Only the square part is compiled: its shapes never change, so it compiles once per run.
        self.network = torch.compile(square, dynamic=False) if options.compile else square
        self.queue = DeviceQueue(self.device)
        self.fixed_shapes = self.queue.gpu or options.compile
        self._ready_shapes: set[tuple[int, ...]] = set()

    def frames(self, videos: list[Video], *, stats: RunStats | None = None, desc: str = "segmenting",
               progress: bool = True) -> Iterator[SegmentedFrame]:
        """Every frame of `videos`, segmented, grouped by frame size and in order within each group."""
        stats = stats if stats is not None else RunStats()
        data = VideoFrames(videos)
        plan = plan_batches(data.sizes, [len(v.frames) for v in videos], self.options.batch_size)
        loader = loading.data_loader(data, plan, self.options.workers, pin_memory=self.queue.gpu)

        def where(k: int) -> str:
            (v, first), (w, last) = plan[k][0], plan[k][-1]
            if v == w:
                return f"{videos[v].key} (frames {videos[v].frames[first].stem} to {videos[v].frames[last].stem})"
            return f"{videos[v].key} frame {videos[v].frames[first].stem} to {videos[w].key} frame " \
                   f"{videos[w].frames[last].stem}"

        previous = None
        with tqdm(total=len(data), unit="frame", desc=desc, disable=None if progress else True, leave=False) as bar:
            for k, pixels in enumerate(loading.batches(loader, where)):
                current = self._launch(plan[k], pixels, functools.partial(where, k))
                if previous is not None:
                    yield from self._collect(previous, videos, stats)
                    bar.update(len(previous.keys))
                previous = current
            if previous is not None:
                yield from self._collect(previous, videos, stats)
                bar.update(len(previous.keys))

    def segment(self, videos: list[Video], handle: Callable[[SegmentedFrame], object], *, desc: str = "segmenting",
                progress: bool = True) -> tuple[list, RunStats]:
        """`handle(frame)` for every frame, on `workers` helper threads (at least one), with a bounded backlog.
        Returns the handlers' results (in no set order) and the run's statistics."""
        stats, results, pending = RunStats(), [], deque()
        helpers = max(1, self.options.workers)
        pool = ThreadPoolExecutor(helpers, thread_name_prefix="depthflow-helper")
        try:
            for frame in self.frames(videos, stats=stats, desc=desc, progress=progress):
                pending.append(pool.submit(handle, frame))
                while len(pending) > 2 * self.options.batch_size + helpers:
                    results.append(pending.popleft().result())
            results += [future.result() for future in pending]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return results, stats

    def _to_device(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A loader batch (Bx2xHxWx3 uint8) -> image and flow at the network's square size, Bx3xSxS float32."""
        x = pixels.to(self.device, non_blocking=True)
        if self.fixed_shapes and len(x) < self.options.batch_size:
            x = torch.cat([x, x[-1:].expand(self.options.batch_size - len(x), -1, -1, -1, -1)])
        image, flow = (to_float(planes) for planes in x.permute(1, 0, 4, 2, 3))  # 2 x Bx3xHxW, channels first
        image, flow = self.model.to_square(image), self.model.to_square(flow)
        if self.options.channels_last:
            image, flow = (t.contiguous(memory_format=torch.channels_last) for t in (image, flow))
        return image, flow

    def _launch(self, keys: list[tuple[int, int]], pixels: torch.Tensor, where: Callable[[], str]) -> _InFlight:
        n, size = len(keys), tuple(pixels.shape[2:4])
        try:
            with torch.inference_mode():
                image, flow = self._to_device(pixels)
                self._warm_up(image, flow)
                start_time, start = time.perf_counter(), self.queue.mark(timing=True)
                with autocast_context(self.device, self.options.amp):
                    logits = self.network(image, flow)
                end = self.queue.mark(timing=True)
                # float32 before the resize: reduced-precision logits would tie where float32's do not.
                masks = class_masks(resize_bicubic(logits.float(), size))[:n]
                masks = masks.to("cpu", non_blocking=True)  # into page-locked memory on a GPU
                done = self.queue.mark()
            return _InFlight(keys, pixels, masks, time.perf_counter() - start_time,
                             (start, end, done) if self.queue.gpu else ())
        except torch.OutOfMemoryError:
            h, w = size
            raise UserError(f"out of GPU memory segmenting {where()} ({w}x{h} frames) with --batch-size "
                            f"{self.options.batch_size}; lower --batch-size") from None

    def _warm_up(self, image: torch.Tensor, flow: torch.Tensor) -> None:
        """Pay compilation, cuDNN's tuning and the allocator's first growth before the timed part."""
        if not self.fixed_shapes or image.shape in self._ready_shapes:
            return
        try:
            with autocast_context(self.device, self.options.amp):
                self.network(image, flow)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:
            if not self.options.compile:
                raise
            raise compile_failure(err, "the network") from None
        if self.queue.gpu:
            torch.cuda.synchronize(self.device)
        self._ready_shapes.add(image.shape)

    def _collect(self, flight: _InFlight, videos: list[Video], stats: RunStats) -> Iterator[SegmentedFrame]:
        if flight.events:
            start, end, done = flight.events
            done.synchronize()
            flight.seconds = start.elapsed_time(end) / 1000
        stats.forward_s += flight.seconds
        stats.frames += len(flight.keys)
        masks, pixels = flight.masks.numpy(), flight.pixels.numpy()
        for row, (v, f) in enumerate(flight.keys):
            yield SegmentedFrame(videos[v], f, masks[row], pixels[row, 0], pixels[row, 1])
