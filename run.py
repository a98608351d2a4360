"""DepthFlow / FakeFlow: unsupervised video object segmentation.

    python run.py --train [--stage 1|2] [--recipe FILE] [--pretrained MIT_WEIGHTS] [options]     # trainer.py
    python run.py --test --checkpoint DepthFlow_mitb2.pth [options]                              # evaluator.py
    python run.py --demo VIDEO_OR_FRAME_FOLDER --checkpoint FILE [options]                       # demo.py
"""

import argparse
import math
import sys
from dataclasses import fields

from dataset import DATASETS, DEFAULT_DATA_ROOT, test_datasets
from model.mit import MIT_SPECS
from recipe import RECIPE_FLAGS, SELECTIONS, STAGES, Recipe, build_recipe, check_fields, parse_sources, read_recipe_file
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
    m.add_argument("--flow-backbone", help="--train: the motion (flow) encoder, if not the same as --backbone")
    m.add_argument("--checkpoint", help="DepthFlow weights: released DepthFlow_/FakeFlow_mitb*.pth or a file "
                                        "written by --train (for --train: initial weights, e.g. stage 1's)")
    m.add_argument("--pretrained", help="ImageNet weights to start training from: nvidia/mit-b* "
                                        "(pytorch_model.bin or model.safetensors), NVlabs mit_b*.pth, or a timm "
                                        "checkpoint for timm:<name>")
    m.add_argument("--flow-pretrained", help="--train: ImageNet weights of the motion encoder (default: "
                                             "--pretrained, where the two encoders are the same)")
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
    d.add_argument("--overwrite", action="store_true", help="start afresh in an --output that holds an earlier run "
                                                            "(--train), another model's figures (--test) or "
                                                            "another video's outputs (--demo)")

    s = parser.add_argument_group("recipe (--train; defaults by --stage, recipe.STAGES)")
    s.add_argument("--stage", type=int, choices=tuple(STAGES), help="recipe stage for --train (default 1)")
    s.add_argument("--recipe", metavar="FILE", help="a recipe file (JSON of recipe.Recipe's fields, e.g. a run's "
                                                    "recipe.json); the flags given override it")
    s.add_argument("--epochs", type=int, help="default by stage: 4000 (1), 2000 (2); may grow on --resume")
    s.add_argument("--batch-size", type=int, help="--train: global batch (default 16); otherwise frames per "
                                                  "forward pass (default 8 on a GPU, 1 on a CPU)")
    s.add_argument("--lr", type=float, help="Adam learning rate (default 1e-5)")
    s.add_argument("--loss", help="training loss, from model/losses.py: terms joined by '+', each optionally "
                                  "weighted (default ce, the reference; e.g. ce+0.5*dice)")
    s.add_argument("--flip-p", type=float, help="probability of each joint flip (default 0.5)")
    s.add_argument("--selection", choices=SELECTIONS, help="how best.pth is chosen: davis (the reference: the best "
                                                           "DAVIS 2016 val J&F, the paper's test set), heldout (a "
                                                           "tenth of DAVIS 2016 train, never trained on) or last")
    s.add_argument("--val-every", type=int, help="epochs between validations, and always after the last epoch "
                                                 "(default 100)")
    s.add_argument("--seed", type=int, help="default 0")

    t = parser.add_argument_group("run (--train)")
    t.add_argument("--checkpoint-every", type=int, default=10, help="write OUTPUT/last.pth every N epochs")
    t.add_argument("--save-every", type=int, default=1000, help="keep OUTPUT/epoch_N.pth every N epochs; 0: never")
    t.add_argument("--resume", nargs="?", const="last", help="continue OUTPUT/last.pth, or the given file")
    t.add_argument("--tensorboard", action="store_true", help="also log the figures and validation frames to "
                                                              "OUTPUT/tensorboard (needs the tensorboard package)")

    e = parser.add_argument_group("inference (--test, --demo)")
    e.add_argument("--tta", metavar="SCALES[+flip]",
                   help="test-time augmentation: average the logits over these scales of the network's input and, "
                        "with +flip, horizontal flips, e.g. 0.75,1,1.25+flip; every figure then carries its name "
                        "(default off: the paper's single-scale testing)")
    e.add_argument("--flow", choices=("auto", "raft", "dis"), default="auto",
                   help="--demo's optical flow: raft (the model's training flow; needs --raft-weights), dis "
                        "(OpenCV, no weights) or auto (raft when --raft-weights is given, else dis)")
    e.add_argument("--raft-weights", help="torchvision RAFT-Large weights for --demo's flow")

    h = parser.add_argument_group("machine")
    h.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto; under torchrun or "
                                                    "srun each process takes its own GPU)")
    h.add_argument("--amp", choices=AMP_MODES, default="off", help="mixed precision on GPU (default off)")
    h.add_argument("--strict-fp32", action="store_true", help="GPU: float32 matrix products and convolutions in "
                                                              "full precision, not TF32 (see utils/device.py)")
    h.add_argument("--workers", type=int,
                   help=f"data-loading processes, and as many threads writing and scoring masks (default: on a GPU, "
                        f"this process's share of the cores, up to 8, here {default_workers()}; on a CPU 0, as the "
                        "network keeps every core busy)")
    h.add_argument("--compile", action="store_true", help="torch.compile the model (inference) or the "
                   "training step's forward and backward")
    h.add_argument("--dist-timeout", type=float, default=1800, metavar="SECONDS",
                   help="several processes: how long one waits for the others before naming the one that does not "
                        "answer and stopping (default 1800)")
    return parser


# Recipe flags that mean nothing outside training (--batch-size, --size and --backbone serve inference too).
RECIPE_ONLY = ("epochs", "lr", "loss", "flip_p", "selection", "val_every", "seed", "flow_backbone", "recipe",
               "flow_pretrained")
INFERENCE_ONLY = ("tta",)


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    flags = _root_flags()
    args.dataset_roots = {name: getattr(args, f"{flags[spec.folder]}_root") for name, spec in DATASETS.items()}
    if args.output is None and not args.demo:
        args.output = f"runs/stage{args.stage or 1}" if args.train else "outputs"
    wrong_mode = RECIPE_ONLY if not args.train else INFERENCE_ONLY
    if used := [name for name in wrong_mode if getattr(args, name) is not None]:
        flag = f"--{used[0].replace('_', '-')}"
        raise UserError(f"{flag} is a training option (--train)" if not args.train else
                        f"{flag} is an inference option (--test, --demo); training does not use it")
    check_fields(_recipe_flags(args), RECIPE_FLAGS.get)  # --size, --backbone, --batch-size serve inference too
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
    if args.tta is not None:
        from inference import TTA

        _check_with("--tta", TTA.parse, args.tta)
    _check_numbers(args)
    return args


def _check_numbers(args) -> None:
    """Numbers of the run (the recipe's are recipe.check_fields's) that would silently do something else than
    asked (nothing, every epoch, wait forever)."""
    at_least = {"--workers": (args.workers, 0), "--checkpoint-every": (args.checkpoint_every, 1),
                "--save-every": (args.save_every, 0)}
    for flag, (value, low) in at_least.items():
        if value < low:
            raise UserError(f"{flag} {value}: expected an integer of at least {low}")
    if not (math.isfinite(args.dist_timeout) and args.dist_timeout > 0):
        raise UserError(f"--dist-timeout {args.dist_timeout}: expected a positive number of seconds")


def _check_with(flag: str, check, value):
    """`check(value)`, its ValueError as one line naming the flag."""
    try:
        return check(value)
    except ValueError as err:
        raise UserError(f"{flag}: {err}") from None


def _recipe_flags(args) -> dict:
    """The recipe fields the flags set (but the sources, which --datasets gives in training)."""
    return {f.name: getattr(args, f.name) for f in fields(Recipe)
            if f.name != "sources" and getattr(args, f.name) is not None}


def recipe_of(args) -> tuple[Recipe, frozenset[str]]:
    """The stage's recipe, the recipe file's fields on it, the flags given on top; and the fields set."""
    file_values = read_recipe_file(args.recipe) if args.recipe else {}
    flag_values = _recipe_flags(args)
    if args.datasets:
        flag_values["sources"] = _check_with("--datasets", parse_sources, args.datasets)
    return build_recipe(file_values, flag_values)


def run_settings(args):
    from trainer import RunSettings

    return RunSettings(output=args.output, data_root=args.data_root, dataset_roots=args.dataset_roots,
                       device_name=args.device, workers=args.workers, amp=args.amp, compile=args.compile,
                       strict_fp32=args.strict_fp32, checkpoint_every=args.checkpoint_every,
                       save_every=args.save_every, resume=args.resume, overwrite=args.overwrite,
                       init_checkpoint=args.checkpoint, pretrained=args.pretrained,
                       flow_pretrained=args.flow_pretrained, tensorboard=args.tensorboard,
                       dist_timeout=args.dist_timeout)


def run_train(args, stop):
    """`--train`: the recipe from --stage, --recipe and the flags given; returns the output folder."""
    from trainer import train

    recipe, given = recipe_of(args)
    return train(recipe, run_settings(args), stop, given)


def run_test(args) -> None:
    from evaluator import evaluate
    from inference import InferenceOptions
    from model.checkpoints import load_depthflow
    from utils import distributed

    if not args.checkpoint:
        raise UserError("--test needs --checkpoint FILE (a released DepthFlow_mitb*.pth or a --train output)")
    names = [n.strip() for n in (args.datasets or ",".join(test_datasets())).split(",") if n.strip()]
    ctx = distributed.init(args.device, args.strict_fp32, args.dist_timeout)
    model = load_depthflow(args.checkpoint, backbone=args.backbone, size=args.size)
    options = InferenceOptions.from_args(args, ctx.device)
    evaluate(model, names, args.data_root, args.dataset_roots, args.output, options, checkpoint=args.checkpoint,
             json_path=args.json, overwrite=args.overwrite, ctx=ctx)
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
