"""Convert between the authors' released checkpoint layout and this project's.

    python -m model.convert DepthFlow_mitb2.pth depthflow_mitb2_project.pth            # released -> project
    python -m model.convert depthflow_mitb2_project.pth DepthFlow_mitb2.pth --to released
"""

import argparse

from model.checkpoints import load_depthflow, model_to_released, save_project_checkpoint
from model.mit import BACKBONES
from utils.errors import ArgumentParser, cli_entry
from utils.io import save_torch_atomic


@cli_entry
def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="released or project checkpoint")
    parser.add_argument("output", help="file to write (atomically)")
    parser.add_argument("--to", choices=("project", "released"), default="project")
    parser.add_argument("--backbone", choices=BACKBONES, help="check the input's backbone")
    args = parser.parse_args(argv)
    model = load_depthflow(args.input, backbone=args.backbone)
    if args.to == "project":
        save_project_checkpoint(args.output, model)
    else:
        save_torch_atomic(model_to_released(model.state_dict(), model.backbone), args.output)
    print(f"wrote {args.output} ({args.to} layout, {model.backbone})")


if __name__ == "__main__":
    main()
