"""Convert between the authors' released checkpoint layout and this project's.

    python -m model.convert DepthFlow_mitb2.pth depthflow_mitb2_project.pth            # released -> project
    python -m model.convert depthflow_mitb2_project.pth DepthFlow_mitb2.pth --to released
"""

import argparse

from model.checkpoints import load_depthflow, model_to_released, save_project_checkpoint
from utils.errors import ArgumentParser, UserError, cli_entry
from utils.io import check_outside, save_torch_atomic


@cli_entry
def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="released or project checkpoint")
    parser.add_argument("output", help="file to write (atomically)")
    parser.add_argument("--to", choices=("project", "released"), default="project")
    parser.add_argument("--backbone", help="check the input's backbone")
    args = parser.parse_args(argv)
    check_outside(args.output, [args.input], "the output")
    model = load_depthflow(args.input, backbone=args.backbone)
    if args.to == "project":
        save_project_checkpoint(args.output, model)
    else:
        try:
            released = model_to_released(model)
        except ValueError as err:
            raise UserError(f"{args.input}: {err}") from None
        save_torch_atomic(released, args.output)
    print(f"wrote {args.output} ({args.to} layout, {model.backbone})")


if __name__ == "__main__":
    main()
