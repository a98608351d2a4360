"""The whole method on toy data, end to end, on a CPU in minutes (`make demo`).

1. tools.toydata writes synthetic versions of every dataset (and DUTS-TR with depth maps);
2. flow_synthesis turns the toy DUTS-TR depth maps into a DUTSv2 of synthetic flows (the method's data);
3. run.py --train, stage 1 on toy YouTube-VOS;
4. run.py --train, stage 2 from stage 1 on the synthesised DUTSv2 + toy DAVIS train;
5. run.py --test on toy DAVIS 2016 val, FBMS, YouTube-Objects and Long-Videos.

Each step is the real command, run as a user would run it, and printed before it runs. The recipe is
scaled down (MiT-B0 from random initialisation, --size 64, few samples, a higher learning rate) so that it
finishes quickly; the figures describe toy data only.
"""

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from utils.errors import ArgumentParser, UserError, cli_entry

TOY_SCALE = ["--backbone", "mitb0", "--size", "64", "--device", "cpu", "--batch-size", "8", "--lr", "5e-4",
             "--checkpoint-every", "10", "--save-every", "0"]
VAL_EVERY = 10


def step(title: str, args: list) -> None:
    command = [sys.executable, *map(str, args)]
    print(f"\n== {title}\n$ {shlex.join(['python', *map(str, args)])}", flush=True)
    if subprocess.run(command).returncode != 0:
        raise UserError(f"step '{title}' failed (its own message is above)")


@cli_entry
def main(argv=None):
    parser = ArgumentParser(prog="python -m tools.toy_demo", description=__doc__)
    parser.add_argument("--out", default="toy_demo", help="working folder, recreated (default toy_demo)")
    parser.add_argument("--stage1-epochs", type=int, default=16)
    parser.add_argument("--stage2-epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--videos", type=int, default=8, help="toy videos per dataset (default 8)")
    parser.add_argument("--frames", type=int, default=12, help="frames per toy video (default 12)")
    parser.add_argument("--frame-size", default="96x128", help="toy frame size HxW (default 96x128)")
    args = parser.parse_args(argv)
    out, start = Path(args.out), time.time()
    shutil.rmtree(out, ignore_errors=True)
    data, synthetic = out / "data", out / "data" / "DUTSv2-synth"
    common = [*TOY_SCALE, "--seed", args.seed, "--data-root", data]
    step("toy datasets", ["-m", "tools.toydata", data, "--seed", args.seed, "--videos", args.videos, "--frames",
                          args.frames, "--size", args.frame_size])
    step("DUTS-TR depth -> synthetic flow (DUTSv2)", ["-m", "flow_synthesis", "--duts", data / "DUTS-TR", "--out",
                                                      synthetic, "--depth-dir", data / "DUTS-TR/DUTS-TR-Depth"])
    step("training, stage 1 (YouTube-VOS)",
         ["run.py", "--train", "--stage", "1", "--datasets", "ytvos:64", "--epochs", args.stage1_epochs,
          "--val-every", min(VAL_EVERY, args.stage1_epochs), "--output", out / "stage1", *common])
    step("training, stage 2 (DUTSv2 + DAVIS train)",
         ["run.py", "--train", "--stage", "2", "--datasets", "duts:48,davis_train:16", "--epochs",
          args.stage2_epochs, "--val-every", min(VAL_EVERY, args.stage2_epochs), "--checkpoint",
          out / "stage1/last.pth", "--duts-root", synthetic, "--output", out / "stage2", *common])
    step("testing on DAVIS 2016 val, FBMS, YouTube-Objects, Long-Videos",
         ["run.py", "--test", "--checkpoint", out / "stage2/best.pth", "--data-root", data, "--output", out / "test",
          "--device", "cpu"])
    jf = json.loads((out / "test/results.json").read_text())["datasets"]["davis"]["metrics"]["J&F-Mean"]
    print(f"\nDone in {time.time() - start:.0f} s. These figures are on small synthetic toy data, not on the real "
          f"benchmarks;\nfor those, download the datasets and a released checkpoint and run "
          f"`python run.py --test --checkpoint DepthFlow_mitb2.pth` (see README).")
    print(f"toy DAVIS 2016 val J&F: {jf:.3f}")


if __name__ == "__main__":
    main()
