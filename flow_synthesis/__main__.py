"""DUTS -> DUTSv2: synthetic flow for every DUTS training image from its depth.

    python -m flow_synthesis --duts ROOT/DUTS-TR --out ROOT/DUTSv2 --depth-weights dpt_hybrid-midas-501f0c75.pt
    python -m flow_synthesis --duts ROOT/DUTS-TR --out ROOT/DUTSv2 --depth-dir ROOT/DUTS-TR/DUTS-TR-Depth
    torchrun --nproc_per_node=8 -m flow_synthesis ...          # the images shared out over 8 processes (GPUs)

Depth comes from an estimator's official weight file (--depth-model, DPT-Hybrid by default, the paper's)
or from precomputed maps (--depth-dir), so any depth estimator can be used. Estimated maps are kept in
--depth-cache and reused, so a new conversion parameter costs only the conversion. Interrupted runs
resume where they stopped. Every conversion parameter of flow_synthesis.depth_to_flow.SynthesisConfig is
a flag.
"""

import argparse
import dataclasses
from pathlib import Path

from flow_synthesis.depth import DEPTH_MODELS, DepthFolder, ModelDepth
from flow_synthesis.depth_to_flow import SynthesisConfig
from flow_synthesis.duts import convert, list_duts
from utils import distributed
from utils.errors import ArgumentParser, UserError, cli_entry


def _config_flags(parser):
    group = parser.add_argument_group("depth-to-flow parameters (see docs/flow_synthesis.md)")
    for field in dataclasses.fields(SynthesisConfig):
        flag = "--" + field.name.replace("_", "-")
        if isinstance(field.default, tuple):
            group.add_argument(flag, type=float, nargs=2, metavar=("LOW", "HIGH"), default=field.default,
                               help=f"default {field.default[0]} {field.default[1]}")
        else:
            group.add_argument(flag, type=type(field.default), default=field.default,
                               help=f"default {field.default}")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m flow_synthesis", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duts", required=True, help="DUTS-TR folder (DUTS-TR-Image/, DUTS-TR-Mask/)")
    parser.add_argument("--out", required=True, help="DUTSv2 folder to write")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--depth-dir", help="precomputed depth maps: <stem>.png or .npy, larger = nearer")
    source.add_argument("--depth-weights", "--dpt-weights", dest="depth_weights",
                        help="the estimator's official weight file (dpt_hybrid-midas-501f0c75.pt, ...)")
    parser.add_argument("--depth-model", choices=tuple(DEPTH_MODELS), default="dpt-hybrid",
                        help="the estimator --depth-weights holds (default dpt-hybrid, the paper's)")
    parser.add_argument("--dpt-model", choices=("hybrid", "large"), help=argparse.SUPPRESS)
    parser.add_argument("--depth-cache", help="folder keeping the estimated depth maps (default: beside --out, "
                                              "OUT_PARENT/depth_cache/<model>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4, help="images per estimator batch (default 4)")
    parser.add_argument("--device", default="auto")
    _config_flags(parser)
    return parser


def synthesis_config(args) -> SynthesisConfig:
    try:
        return SynthesisConfig(**{f.name: tuple(v) if isinstance(v := getattr(args, f.name), list) else v
                                  for f in dataclasses.fields(SynthesisConfig)})
    except ValueError as err:
        raise UserError(str(err)) from None


@cli_entry
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: expected at least 1")
    config = synthesis_config(args)
    model_name = f"dpt-{args.dpt_model}" if args.dpt_model else args.depth_model
    duts, out = Path(args.duts), Path(args.out)
    ctx = distributed.init(args.device)
    lock = distributed.lock_folder(out, "--out", ctx)
    try:
        if args.depth_dir:
            source, cache = DepthFolder(Path(args.depth_dir), list_duts(duts)), None
        else:
            source = ModelDepth(model_name, args.depth_weights, ctx.device)
            cache = Path(args.depth_cache) if args.depth_cache else out.resolve().parent / "depth_cache" / model_name
        report = convert(duts, out, source, seed=args.seed, config=config, batch_size=args.batch_size,
                         cache_dir=cache, ctx=ctx)
    finally:
        if lock is not None:
            lock.release()
    distributed.shutdown(ctx)
    who = f"rank {ctx.rank} of {ctx.world_size}: " if ctx.distributed else ""
    print(f"{who}DUTSv2 at {out}: {report.done} images converted, {report.resumed} already done, "
          f"{len(report.skipped)} skipped" + (f" (see {out / 'skipped.tsv'})" if report.skipped else ""))


if __name__ == "__main__":
    main()
