"""DUTS -> DUTSv2: synthetic flow for every DUTS training image from its depth.

    python -m flow_synthesis --duts ROOT/DUTS-TR --out ROOT/DUTSv2 --dpt-weights dpt_hybrid-midas-501f0c75.pt
    python -m flow_synthesis --duts ROOT/DUTS-TR --out ROOT/DUTSv2 --depth-dir ROOT/DUTS-TR/DUTS-TR-Depth

Depth comes from DPT (Hybrid or Large, official weight files) or from precomputed maps (--depth-dir), so any
depth estimator can be used. Interrupted runs resume where they stopped. Every conversion parameter of
flow_synthesis.depth_to_flow.SynthesisConfig is a flag.
"""

import dataclasses
from pathlib import Path

from flow_synthesis.depth_to_flow import SynthesisConfig
from flow_synthesis.duts import DepthFolder, DPTDepth, convert, list_duts
from utils.device import resolve_device
from utils.errors import ArgumentParser, UserError, cli_entry


def _config_flags(parser):
    group = parser.add_argument_group("depth-to-flow parameters (see README, 'Synthetic flow')")
    for field in dataclasses.fields(SynthesisConfig):
        flag = "--" + field.name.replace("_", "-")
        if isinstance(field.default, tuple):
            group.add_argument(flag, type=float, nargs=2, metavar=("LOW", "HIGH"), default=field.default,
                               help=f"default {field.default[0]} {field.default[1]}")
        else:
            group.add_argument(flag, type=type(field.default), default=field.default,
                               help=f"default {field.default}")


@cli_entry
def main(argv=None):
    parser = ArgumentParser(prog="python -m flow_synthesis", description=__doc__,
                            formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    parser.add_argument("--duts", required=True, help="DUTS-TR folder (DUTS-TR-Image/, DUTS-TR-Mask/)")
    parser.add_argument("--out", required=True, help="DUTSv2 folder to write")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--depth-dir", help="precomputed depth maps: <stem>.png or .npy, larger = nearer")
    source.add_argument("--dpt-weights", help="official DPT weight file (dpt_hybrid-midas-501f0c75.pt, ...)")
    parser.add_argument("--dpt-model", choices=("hybrid", "large"), help="checked against --dpt-weights")
    parser.add_argument("--save-depth", help="also write the depth maps (16-bit PNG) to this folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4, help="images per DPT batch (default 4)")
    parser.add_argument("--device", default="auto")
    _config_flags(parser)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: expected at least 1")
    try:
        config = SynthesisConfig(**{f.name: tuple(v) if isinstance(v := getattr(args, f.name), list) else v
                                    for f in dataclasses.fields(SynthesisConfig)})
    except ValueError as err:
        raise UserError(str(err)) from None
    duts = Path(args.duts)
    if args.depth_dir:
        depth_source = DepthFolder(Path(args.depth_dir), list_duts(duts))
        settings = {"depth": "folder"}
    else:
        depth_source = DPTDepth(args.dpt_weights, args.dpt_model, resolve_device(args.device))
        settings = {"depth": f"dpt-{Path(args.dpt_weights).name}"}
    report = convert(duts, Path(args.out), depth_source, seed=args.seed, config=config, save_depth=args.save_depth,
                     batch_size=args.batch_size, settings=settings)
    print(f"DUTSv2 at {args.out}: {report.done} images converted, {report.resumed} already done, "
          f"{len(report.skipped)} skipped" + (f" (see {Path(args.out) / 'skipped.tsv'})" if report.skipped else ""))


if __name__ == "__main__":
    main()
