"""DepthFlow / FakeFlow: unsupervised video object segmentation.

    python run.py --train [--stage 1|2] [--pretrained MIT_WEIGHTS] [options]     # trainer.py
    python run.py --test --checkpoint DepthFlow_mitb2.pth [options]              # evaluator.py
    python run.py --demo VIDEO_OR_FRAME_FOLDER --checkpoint FILE [options]       # demo.py
"""

import argparse
import math
import sys
from dataclasses import fields, replace

from dataset import DATASETS, DEFAULT_DATA_ROOT, test_datasets
from model.encoders import check_backbone
from model.losses import build_loss
from model.mit import MIT_SPECS
from trainer import SELECTIONS, STAGES, Recipe, RunSettings, parse_sources
from utils.device import AMP_MODES, default_workers, device_type
from utils.errors import ArgumentParser, UserError, cli_entry
from utils.interrupts import stop_requests


def _root_flags() -> dict[str, str]:
    """One --<name>-root flag per dataset folder (DAVIS train and val share theirs): folder -> name."""
    flags = {}
    for name, spec in DATASETS.items():
        flags.setdefault(spec.folder, name)
    return flags




def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", action="store_true", help="train one stage of the recipe")
    mode.add_argument("--test", action="store_true", help="segment and score the test sets")
    mode.add_argument("--demo", metavar="PATH", help="segment one video file or folder of frames")

    m = parser.add_argument_group("model")
    m.add_argument("--backbone", help=f"{', '.join(MIT_SPECS)} or timm:<model name> (model/encoders.py); "
                                      "training default mitb2, otherwise read from --checkpoint and checked")
    m.add_argument("--checkpoint", help="DepthFlow weights: released DepthFlow_/FakeFlow_mitb*.pth or a file "
                                        "written by --train (for --train: initial weights, e.g. stage 1's)")
    m.add_argument("--pretrained", help="ImageNet weights to start training from: nvidia/mit-b* "
                                        "(pytorch_model.bin or model.safetensors), NVlabs mit_b*.pth, or a timm "
                                        "checkpoint for timm:<name>")
    m.add_argument("--size", type=int, help="internal square resolution; default: the checkpoint's own (512 for "
                                            "the released files), or 512 when training from scratch")

    d = parser.add_argument_group("data")
    d.add_argument("--data-root", default=DEFAULT_DATA_ROOT,
                   help=f"folder holding DAVIS/, FBMS/, YTOBJ/, LVID/, YTVOS18/, DUTSv2/ (default {DEFAULT_DATA_ROOT})")
    for folder, name in _root_flags().items():
        d.add_argument(f"--{name}-root", metavar="DIR", help=f"the {folder} folder (default DATA_ROOT/{folder})")
    d.add_argument("--datasets", help=f"--test: comma-separated subset of {','.join(test_datasets())} (default all); "
                                      "--train: NAME:SAMPLES list, default by --stage "
                                      "(1: ytvos:512, 2: duts:384,davis_train:128)")
    d.add_argument("--output", help="--test: masks and results (default outputs); --train: checkpoints and logs "
                                    "(default runs/stageN); --demo: default demo_out/<video name>")
    d.add_argument("--json", help="--test: write the metrics here (default OUTPUT/results.json)")
    d.add_argument("--overwrite", action="store_true", help="--train: start afresh in an --output that holds an "
                                                            "earlier run; --demo: replace another video's outputs")

    s = parser.add_argument_group("recipe (--train; defaults by --stage, trainer.STAGES)")
    s.add_argument("--stage", type=int, choices=tuple(STAGES), help="recipe stage for --train (default 1)")
    s.add_argument("--epochs", type=int, help="default by stage: 4000 (1), 2000 (2)")
    s.add_argument("--batch-size", type=int, help="--train: global batch (default 16); otherwise frames per "
                                                  "forward pass (default 8 on a GPU, 1 on a CPU)")
    s.add_argument("--lr", type=float, help="Adam learning rate (default 1e-5)")
    s.add_argument("--loss", help="training loss, from model/losses.py; terms joined by '+' are summed "
                                  "(default ce, the reference)")
    s.add_argument("--flip-p", type=float, help="probability of each joint flip (default 0.5)")
    s.add_argument("--selection", choices=SELECTIONS, help="how best.pth is chosen: davis (the reference: the best "
                                                           "DAVIS 2016 val J&F, the paper's test set), heldout (a "
                                                           "tenth of DAVIS 2016 train, never trained on) or last")
    s.add_argument("--val-every", type=int, help="epochs between DAVIS 2016 val scores (default 100)")
    s.add_argument("--seed", type=int, help="default 0")

    t = parser.add_argument_group("run (--train)")
    t.add_argument("--checkpoint-every", type=int, default=10, help="write OUTPUT/last.pth every N epochs")
    t.add_argument("--save-every", type=int, default=1000, help="keep OUTPUT/epoch_N.pth every N epochs; 0: never")
    t.add_argument("--resume", nargs="?", const="last", help="continue OUTPUT/last.pth, or the given file")
    t.add_argument("--tensorboard", action="store_true", help="also log the figures to OUTPUT/tensorboard "
                                                              "(needs the tensorboard package)")

    parser.add_argument_group("demo").add_argument(
        "--raft-weights", help="torchvision RAFT-Large weights for --demo's flow (default: DIS, no weights)")

    h = parser.add_argument_group("machine")
    h.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    h.add_argument("--amp", choices=AMP_MODES, default="off", help="mixed precision on GPU (default off)")
    h.add_argument("--strict-fp32", action="store_true", help="GPU: float32 matrix products and convolutions in "
                                                              "full precision, not TF32 (see utils/device.py)")
    h.add_argument("--workers", type=int,
                   help=f"data-loading processes, and as many threads writing and scoring masks (default: on a GPU, "
                        f"this process's share of the cores, up to 8, here {default_workers()}; on a CPU 0, as the "
                        "network keeps every core busy)")
    h.add_argument("--channels-last", action="store_true",
                   help="CPU inference in channels-last memory format (refused on a GPU, where it is slower)")
    h.add_argument("--compile", action="store_true", help="torch.compile the model (inference) or the "
                   "training step's forward and backward")
    h.add_argument("--winograd", action="store_true", help="CPU inference: the decoder's wide 3x3 convolutions "
                                                           "by NNPACK's Winograd kernels (faster; logits move "
                                                           "by ~1e-5, see README 'Speed')")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    flags = _root_flags()
    args.dataset_roots = {name: getattr(args, f"{flags[spec.folder]}_root") for name, spec in DATASETS.items()}
    if args.output is None and not args.demo:
        args.output = f"runs/stage{args.stage or 1}" if args.train else "outputs"
    if args.size is not None and (args.size < 32 or args.size % 32):
        raise UserError(f"--size {args.size}: expected a positive multiple of 32 (the published model uses 512)")
    if args.backbone is not None:
        _check_with("--backbone", check_backbone, args.backbone)
    inference_only = [flag for flag, on in (("--channels-last", args.channels_last), ("--winograd", args.winograd))
                      if on]
    if args.train and inference_only:
        raise UserError(f"{inference_only[0]} is an inference option (--test, --demo); training does not use it")
    if not args.train:
        training_only = [f"--{name.replace('_', '-')}" for name in RECIPE_ONLY if getattr(args, name) is not None]
        if training_only:
            raise UserError(f"{training_only[0]} is a training option (--train)")
    if args.pretrained and args.checkpoint:
        raise UserError("--pretrained and --checkpoint both give initial weights; pass one (--checkpoint: a whole "
                        "DepthFlow model, --pretrained: ImageNet encoder weights)")
    on_gpu = device_type(args.device) == "cuda"
    if args.amp != "off" and not on_gpu:
        raise UserError(f"--amp {args.amp} is for GPUs; on a CPU the network runs in float32 (drop --amp)")
    if args.batch_size is None and not args.train:
        args.batch_size = 8 if on_gpu else 1  # a CPU gains nothing from batches, and holds their activations
    if args.workers is None:
        args.workers = default_workers() if on_gpu else 0
    _check_numbers(args)
    return args


# Recipe flags that mean nothing outside training (--batch-size, --size and --backbone serve inference too).
RECIPE_ONLY = ("epochs", "lr", "loss", "flip_p", "selection", "val_every", "seed")


def _check_numbers(args) -> None:
    """Numbers that would silently do something else than asked (a default, nothing, every epoch)."""
    at_least = {"--batch-size": (args.batch_size, 1), "--workers": (args.workers, 0), "--epochs": (args.epochs, 1),
                "--checkpoint-every": (args.checkpoint_every, 1), "--save-every": (args.save_every, 0),
                "--val-every": (args.val_every, 1)}
    for flag, (value, low) in at_least.items():
        if value is not None and value < low:
            raise UserError(f"{flag} {value}: expected an integer of at least {low}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UserError(f"--lr {args.lr}: expected a positive finite learning rate (the recipe uses 1e-5)")
    if args.flip_p is not None and not 0 <= args.flip_p <= 1:
        raise UserError(f"--flip-p {args.flip_p}: expected a probability in [0, 1]")
    if args.loss is not None:
        _check_with("--loss", build_loss, args.loss)


def _check_with(flag: str, check, value) -> None:
    """`check(value)`, its ValueError as one line naming the flag."""
    try:
        check(value)
    except ValueError as err:
        raise UserError(f"{flag}: {err}") from None


def build_recipe(args):
    """The stage's recipe with the flags given on top of it, and the names of the fields the flags set."""
    overrides = {f.name: getattr(args, f.name) for f in fields(Recipe)
                 if f.name != "sources" and getattr(args, f.name) is not None}  # sources: from --datasets
    if args.datasets:
        overrides["sources"] = parse_sources(args.datasets)
    return replace(STAGES[args.stage or 1], **overrides), frozenset(overrides)


def run_settings(args) -> RunSettings:
    return RunSettings(output=args.output, data_root=args.data_root, dataset_roots=args.dataset_roots,
                       device_name=args.device, workers=args.workers, amp=args.amp, compile=args.compile,
                       strict_fp32=args.strict_fp32, checkpoint_every=args.checkpoint_every,
                       save_every=args.save_every, resume=args.resume, overwrite=args.overwrite,
                       init_checkpoint=args.checkpoint, pretrained=args.pretrained, tensorboard=args.tensorboard)


def run_train(args, stop):
    """`--train`: the recipe from --stage and the flags given; returns the output folder."""
    from trainer import train

    recipe, given = build_recipe(args)
    return train(recipe, run_settings(args), stop, given)


def run_test(args) -> None:
    from evaluator import evaluate
    from inference import InferenceOptions
    from model.checkpoints import load_depthflow
    from utils import distributed

    if not args.checkpoint:
        raise UserError("--test needs --checkpoint FILE (a released DepthFlow_mitb*.pth or a --train output)")
    names = [n.strip() for n in (args.datasets or ",".join(test_datasets())).split(",") if n.strip()]
    ctx = distributed.init(args.device, args.strict_fp32)
    try:
        model = load_depthflow(args.checkpoint, backbone=args.backbone, size=args.size)
        options = InferenceOptions.from_args(args, ctx.device)
        evaluate(model, names, args.data_root, args.dataset_roots, args.output, options, json_path=args.json, ctx=ctx)
    finally:
        distributed.shutdown(ctx)


@cli_entry
def main(argv=None):
    args = parse_args(argv)
    if args.train:
        with stop_requests() as stop:
            run_train(args, stop)
    elif args.test:
        run_test(args)
    else:
        from demo import run_demo

        run_demo(args)


if __name__ == "__main__":
    sys.exit(main())
