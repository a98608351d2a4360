"""Streaming inference: batches of video frames in, network outputs out, with the device kept busy.

Loader processes decode whole batches of frames into uint8 tensors, in the decoder's HxWx3 layout (a
quarter of float32's bytes to copy, and no reordering on the host), and hand them over through shared
memory that each process reuses (utils.shared_batches). The main process only moves a batch to the
device, reorders it and turns it into floats there, runs the network and starts the copy of the result
back; while the device works on one batch, the caller handles the previous one. What
callers do with masks (writing PNGs, scoring) runs in their own worker processes (evaluator.py), so the
loop that launches kernels never waits for it.

On a GPU the masks are made on the device (the bicubic resize to the frame's size, then the two-class
decision) and only they travel back. On a CPU that resize costs as much as a small network, so it is
left to the callers' processes (`masks_from_output`): the same operation on the same numbers, hence
bit for bit the masks of `DepthFlow.predict`.

Where shapes must stay fixed (a GPU, or --compile), the last batch of a video is padded to the full batch
size and the padding dropped, so compilation happens once per frame size, before the timed part.
"""

import contextlib
import multiprocessing
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset import Video, VideoBatches, VideoFrames
from model.depthflow import DepthFlow, class_masks, resize_bicubic
from model.winograd import use_winograd, winograd_available
from transforms import frames_to_float
from utils.device import autocast_context, check_compiler
from utils.errors import UserError, deferring_ctrl_c
from utils.host_memory import init_loader_worker, reuse_freed_buffers
from utils.loader_failures import loader_failure
from utils.shared_batches import SharedBatches

PREFETCH = 4  # batches each loader process keeps ready


@dataclass(frozen=True)
class InferenceOptions:
    """How the network runs; each field is a flag of `run.py --test` and `--demo`."""

    device: torch.device = torch.device("cpu")
    batch_size: int = 8
    workers: int = 0  # loader processes; 0 decodes in the main process
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False
    winograd: bool = False

    @classmethod
    def from_args(cls, args, device: torch.device) -> "InferenceOptions":
        """From run.py's parsed flags."""
        return cls(device=device, batch_size=args.batch_size, workers=args.workers, amp=args.amp,
                   channels_last=args.channels_last, compile=args.compile, winograd=args.winograd)


@dataclass
class Batch:
    """Consecutive frames of one video and what the network made of them."""

    video: Video
    frames: list[int]  # positions in the video
    pixels: torch.Tensor  # Bx2xHxWx3 uint8 on the host: each frame's image and flow, as decoded
    output: np.ndarray  # BxHxW uint8 masks, or (CPU) Bx2xSxS float32 logits at the network's size S

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the frames."""
        return tuple(self.pixels.shape[2:4])

    @property
    def images(self) -> torch.Tensor:
        """BxHxWx3 uint8."""
        return self.pixels[:, 0]

    @property
    def flows(self) -> torch.Tensor:
        return self.pixels[:, 1]

    def masks(self) -> np.ndarray:
        return masks_from_output(self.output, self.size)


def masks_from_output(output: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """BxHxW uint8 object masks from a Batch's output (resizing the logits where the device left them)."""
    if output.ndim == 3:
        return output
    return class_masks(resize_bicubic(torch.from_numpy(output), size)).numpy()


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
        # Measured on an H100: 2.3-2.6x slower than the default layout for this network (README, 'Speed').
        raise UserError("--channels-last is slower on a GPU for this network; it is a CPU option (drop it)")
    if options.compile:
        check_compiler(device)
    model = model.to(device).eval()
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


@dataclass
class _InFlight:
    indices: list[int]  # into the run's VideoFrames
    pixels: torch.Tensor  # as the loader made them
    output: torch.Tensor
    seconds: float  # the network's time (on a GPU, replaced by the events' once they have happened)
    events: tuple[torch.cuda.Event, ...] = ()  # (start, end, copied back), on a GPU


class Segmenter:
    """Owns a prepared network and runs videos through it (see the module's docstring)."""

    def __init__(self, model: DepthFlow, options: InferenceOptions):
        self.options = options
        self.device = options.device
        self.model = prepare_model(model, options)
        forward = self.model.forward_internal
        self.network = torch.compile(forward, dynamic=False) if options.compile else forward
        self.on_gpu = self.device.type == "cuda"
        # Masks are made where the network runs on a GPU; tools.bench also sets this on a CPU, to measure
        # what feeding a GPU costs the host.
        self.masks_on_device = self.on_gpu
        self.fixed_shapes = self.on_gpu or options.compile
        self._ready_shapes: set[tuple[int, ...]] = set()
        # Input buffers reused batch after batch on a CPU (frames_to_float); a GPU's allocator caches its own.
        self._float_buffers: dict[torch.Size, torch.Tensor] = {}
        self._frames: VideoFrames | None = None  # of the run in progress, to name a frame that kills a loader

    def batches(self, videos: list[Video], *, timing: dict | None = None, desc: str = "segmenting",
                progress: bool = True) -> Iterator[Batch]:
        """Every frame of `videos`, in order, in batches that never span two videos.

        `timing["forward_s"]` accumulates the network's time (CUDA events on a GPU, so nothing waits for it).
        """
        timing = {} if timing is None else timing
        timing.setdefault("forward_s", 0.0)
        workers = self.options.workers
        frames = self._frames = VideoFrames(videos, workers)
        shared = SharedBatches(workers, PREFETCH + 1)
        batched = VideoBatches(frames, self.options.batch_size, shared)
        loader = DataLoader(batched, batch_size=None, num_workers=workers, pin_memory=self.on_gpu,
                            prefetch_factor=PREFETCH if workers else None, worker_init_fn=init_loader_worker)
        previous = None
        with self.reporting_loader_deaths(), tqdm(total=len(frames), unit="frame", desc=desc,
                                                  disable=None if progress else True, leave=False) as bar:
            with deferring_ctrl_c():
                batches = iter(loader)  # starts the loader processes
            for indices, (slot, pixels) in zip(batched.plan, batches):  # the loader keeps the plan's order
                current = self._launch(indices, shared.receive(slot, pixels, pinned=self.on_gpu), videos)
                if previous is not None:
                    yield self._collect(previous, videos, timing)
                    bar.update(len(previous.indices))
                previous = current
            if previous is not None:
                yield self._collect(previous, videos, timing)
                bar.update(len(previous.indices))

    @contextlib.contextmanager
    def reporting_loader_deaths(self):
        """Turn the loader's report of a dead process into one line naming the frame it was decoding, and its
        failure to get shared memory into one line saying what to change (utils.loader_failures).

        The loader raises the first from a signal handler, wherever the main process is; callers that do
        work between batches wrap their loop in this too."""
        try:
            yield
        except RuntimeError as err:
            failure = loader_failure(err, self._frames.decoding if self._frames is not None else None)
            if failure is None:
                raise
            raise failure from None

    def _to_device(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A loader batch (Bx2xHxWx3 uint8) -> image and flow, each Bx3xHxW float32 in [0, 1] on the device."""
        x = pixels.to(self.device, non_blocking=True)
        if self.fixed_shapes and len(x) < self.options.batch_size:
            x = torch.cat([x, x[-1:].expand(self.options.batch_size - len(x), -1, -1, -1, -1)])
        planes = x.permute(1, 0, 4, 2, 3)  # 2xBx3xHxW: image and flow, channels first
        out = None
        if not self.on_gpu:  # safe to refill: a CPU network has finished with the last batch's input
            out = self._float_buffers.get(planes.shape)
            if out is None:
                out = self._float_buffers[planes.shape] = torch.empty(planes.shape)
        image, flow = frames_to_float(planes, out)
        if self.options.channels_last:
            image, flow = (t.contiguous(memory_format=torch.channels_last) for t in (image, flow))
        return image, flow

    def _launch(self, indices: list[int], pixels: torch.Tensor, videos: list[Video]) -> _InFlight:
        n = len(indices)
        try:
            image, flow = self._to_device(pixels)
            self._warm_up(image, flow)
            events = tuple(torch.cuda.Event(enable_timing=True) for _ in range(3)) if self.on_gpu else ()
            with torch.inference_mode(), autocast_context(self.device, self.options.amp):
                start = time.perf_counter()
                if events:
                    events[0].record()
                output = self._output(self.network(image, flow), tuple(image.shape[-2:]))[:n]
                if events:
                    events[1].record()
                    output = output.to("cpu", non_blocking=True)
                    events[2].record()
                return _InFlight(indices, pixels, output, time.perf_counter() - start, events)
        except torch.OutOfMemoryError:
            video = videos[self._frames.index[indices[0]][0]]
            h, w = pixels.shape[2:4]
            raise UserError(f"out of GPU memory segmenting {video.key} ({w}x{h} frames) with --batch-size "
                            f"{self.options.batch_size}; lower --batch-size") from None

    def _output(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """What leaves the device for the host (Batch.output)."""
        if self.masks_on_device:
            return class_masks(resize_bicubic(logits, size))
        return logits.float().contiguous()

    def _warm_up(self, image: torch.Tensor, flow: torch.Tensor) -> None:
        """Pay compilation (and the allocator's first growth) for a new shape before the timed part."""
        if not self.fixed_shapes or image.shape in self._ready_shapes:
            return
        try:
            with torch.inference_mode(), autocast_context(self.device, self.options.amp):
                self.network(image, flow)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:
            if not self.options.compile:
                raise
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(f"--compile failed to compile the network ({first}); drop --compile") from None
        if self.on_gpu:
            torch.cuda.synchronize(self.device)
        self._ready_shapes.add(image.shape)

    def _collect(self, flight: _InFlight, videos: list[Video], timing: dict) -> Batch:
        if flight.events:
            start, end, done = flight.events
            done.synchronize()
            flight.seconds = start.elapsed_time(end) / 1000
        timing["forward_s"] += flight.seconds
        video, _ = self._frames.index[flight.indices[0]]
        return Batch(videos[video], [self._frames.index[i][1] for i in flight.indices], flight.pixels,
                     flight.output.numpy())


def init_helper() -> None:
    """Initialiser of helper processes: one thread each, so they do not fight the main process for cores,
    and deaf to Ctrl-C, which the main process handles for all."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    reuse_freed_buffers()


def helper_pool_context():
    """Helper processes are forked: they start at once and inherit the loaded modules; they never use CUDA."""
    return multiprocessing.get_context("fork")
