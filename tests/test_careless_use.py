"""Careless or hostile use never gives a silent wrong result, never loses finished work, and ends in one line."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import run
from dataset import DATASETS, Source, TrainingFrames, scan
from flow_synthesis.__main__ import main as synth_main
from flow_synthesis.video_flow import main as flow_main
from model import DepthFlow
from model.checkpoints import read_project_checkpoint, save_project_checkpoint
from tests.conftest import ROOT, assert_one_line_error, children, ctrl_c_once, hearing_ctrl_c, run_main
from utils import distributed
from utils.batches import GlobalBatches
from utils.errors import UserError
from utils.interrupts import StopRequests
from utils.io import FolderLock, append_line, save_image_atomic, save_torch_atomic, write_text_atomic


def _train_args(toy_root, out, *extra):
    return ["--train", "--backbone", "mitb0", "--size", "32", "--stage", "2", "--datasets", "duts:8,davis_train:8",
            "--batch-size", "4", "--lr", "1e-4", "--workers", "0", "--device", "cpu", "--selection", "last",
            "--checkpoint-every", "1", "--epochs", "2", "--data-root", toy_root, "--output", out, *extra]


def train(args):
    return run.run_train(args, StopRequests())


@pytest.fixture
def check(capsys):
    def check(main, *argv, expect):
        code, _, err = run_main(main, *argv, capsys=capsys)
        assert_one_line_error(code, err, *expect)

    return check


@pytest.mark.parametrize(("flag", "value"), [("--epochs", "0"), ("--epochs", "-3"), ("--checkpoint-every", "0"),
                                             ("--save-every", "-1"), ("--batch-size", "0"), ("--val-every", "-2")])
def test_numbers_that_would_silently_do_something_else(toy_root, tmp_path, check, flag, value):
    check(run.main, *_train_args(toy_root, tmp_path / "t"), flag, value, expect=[f"{flag} {value}", "at least"])
    assert not (tmp_path / "t").exists()


def test_a_learning_rate_that_is_not_a_number(toy_root, tmp_path, check):
    check(run.main, *_train_args(toy_root, tmp_path / "t"), "--lr", "nan", expect=["--lr nan", "positive finite"])


@pytest.mark.parametrize("name", ["davis", "fbms"])
def test_a_test_set_is_not_a_training_source(toy_root, tmp_path, check, name):
    check(run.main, *_train_args(toy_root, tmp_path / "t"), "--datasets", f"{name}:8",
          expect=[f"{name!r} is not a training set", "test set", "davis_train"])


@pytest.mark.slow
def test_an_output_folder_holding_a_run_is_not_mixed_with_another(toy_root, tmp_path, check):
    out = tmp_path / "run"
    assert run.main(list(map(str, _train_args(toy_root, out, "--epochs", "1")))) is None
    first = read_project_checkpoint(out / "last.pth")["model"]
    check(run.main, *_train_args(toy_root, out, "--seed", "5"), expect=[f"{out} holds an earlier run", "--resume",
                                                                        "--overwrite"])
    assert all(torch.equal(first[k], v) for k, v in read_project_checkpoint(out / "last.pth")["model"].items())
    assert run.main(list(map(str, _train_args(toy_root, out, "--seed", "5", "--overwrite")))) is None
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]  # the first run's lines are gone, not mixed in
    assert read_project_checkpoint(out / "last.pth")["recipe"]["seed"] == 5


@pytest.mark.slow
def test_resume_refuses_other_batches_and_weights_only_files(toy_root, tmp_path, check):
    out = tmp_path / "run"
    assert run.main(list(map(str, _train_args(toy_root, out, "--epochs", "1")))) is None
    for flag, value, shown in (("--batch-size", "8", "--batch-size 4"), ("--seed", "3", "--seed 0"),
                               ("--datasets", "duts:16", "--datasets duts:8,davis_train:8")):
        argv = [a for a in _train_args(toy_root, out, "--resume", "--epochs", "1")
                if a not in ("duts:8,davis_train:8",)]
        argv = [*argv[:argv.index("--datasets")], *argv[argv.index("--datasets") + 1:]]
        check(run.main, *argv, "--datasets", "duts:8,davis_train:8", flag, value,
              expect=[f"{out / 'last.pth'} was trained with {shown} (this run asks for", "keeps its recipe"])
    check(run.main, *_train_args(toy_root, out, "--resume", "--epochs", "3", "--lr", "2e-4"),
          expect=["was trained with --lr 0.0001 (this run asks for 0.0002)", "only --epochs may change"])
    converted = tmp_path / "weights.pth"
    save_project_checkpoint(converted, DepthFlow("mitb0", size=32))
    check(run.main, *_train_args(toy_root, tmp_path / "other", "--resume", converted),
          expect=[str(converted), "no training state", "not continue"])


def _first_use_of_each_flow(source, epochs: int) -> dict:
    """flow path -> (epoch, steps done before the first batch that reads it), for davis_train:8, batch 4."""
    plan = GlobalBatches(8, 4, 0, distributed.Context(0, 1, torch.device("cpu")))
    data = TrainingFrames([source], size=32, seed=0)
    first = {}
    for epoch in range(epochs):
        for step, batch in enumerate(plan.epoch(epoch)):
            for key in batch:
                first.setdefault(data.frame_for(key).flow, (epoch, step))
    return first


@pytest.mark.slow
def test_a_corrupt_file_found_mid_training_keeps_the_work_done(toy_copy, tmp_path, check):
    """The flow first read latest in the run is truncated: the run stops with one line, last.pth holds every
    finished step (checkpoints were otherwise due only at the end), and --resume after the repair ends where
    a clean run ends."""
    args = ["--datasets", "davis_train:8", "--checkpoint-every", "5", "--epochs", "3"]
    clean = tmp_path / "clean"
    train(run.parse_args(list(map(str, _train_args(toy_copy, clean, *args)))))
    source = Source(DATASETS["davis_train"], scan(DATASETS["davis_train"], toy_copy / "DAVIS"), 8)
    first = _first_use_of_each_flow(source, 3)
    victim = max(first, key=first.get)
    epoch, step = first[victim]
    assert (epoch, step) > (0, 0)
    backup = victim.read_bytes()
    victim.write_bytes(backup[:200])
    out = tmp_path / "broken"
    check(run.main, *_train_args(toy_copy, out, *args),
          expect=["truncated", str(victim), f"saved {out / 'last.pth'} at epoch {epoch + 1}, step {step}",
                  "--resume"])
    state = read_project_checkpoint(out / "last.pth")
    assert (state["epoch"], state["step"]) == (epoch, step)
    victim.write_bytes(backup)
    train(run.parse_args(list(map(str, _train_args(toy_copy, out, *args, "--resume")))))
    a, b = (read_project_checkpoint(p / "last.pth")["model"] for p in (clean, out))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_stops_in_one_line_when_loader_processes_cannot_start(toy_root, tmp_path, check, monkeypatch):
    """The loader cannot make its queues (a full /dev/shm, as in a default Docker container): one line saying
    what to change, and the work kept."""
    def no_room(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", no_room)
    out = tmp_path / "t"
    check(run.main, *_train_args(toy_root, out, "--workers", "2"),
          expect=["cannot start the data-loading processes", "--shm-size", f"saved {out / 'last.pth'}", "--resume"])
    assert read_project_checkpoint(out / "last.pth")["step"] == 0


@pytest.mark.slow
def test_training_stops_in_one_line_when_a_loader_process_dies(toy_root, tmp_path):
    """A loader process killed as the kernel's out-of-memory killer would: one line, the finished steps saved."""
    out = tmp_path / "t"
    proc = subprocess.Popen([sys.executable, "run.py", *map(str, _train_args(toy_root, out, "--workers", "1",
                                                                             "--epochs", "500"))],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not _with_loaders(proc.pid) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(1)  # a few steps in
    loaders = [p for server in children(proc.pid) for p in children(server)]
    assert loaders, "no loader process found"
    os.kill(loaders[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert_one_line_error(proc.returncode, err, "data loading failed at epoch", "DataLoader worker",
                          "lower --workers", f"saved {out / 'last.pth'}", "--resume")


@pytest.mark.slow
def test_a_corrupt_file_one_process_reads_stops_every_process(toy_copy, tmp_path):
    """Under torchrun, a truncated flow that only rank 1 reads: both processes stop at once with its one
    line (rank 0 does not wait in the step's all-reduce), and rank 0 saves the finished steps."""
    source = Source(DATASETS["davis_train"], scan(DATASETS["davis_train"], toy_copy / "DAVIS"), 8)
    data = TrainingFrames([source], size=32, seed=0)
    seen, victim = set(), None
    for epoch in range(3):
        for step, ranks in enumerate(zip(*(GlobalBatches(8, 4, 0, distributed.Context(r, 2, torch.device("cpu")))
                                           .epoch(epoch) for r in range(2)))):
            flows = [{data.frame_for(key).flow for key in keys} for keys in ranks]
            fresh = flows[1] - flows[0] - seen
            if (epoch, step) > (0, 0) and fresh and victim is None:
                victim, where = sorted(fresh)[0], (epoch, step)
            seen |= flows[0] | flows[1]
    assert victim is not None
    victim.write_bytes(victim.read_bytes()[:200])
    out = tmp_path / "broken"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", "29543",
               "run.py", *map(str, _train_args(toy_copy, out, "--datasets", "davis_train:8", "--epochs", "3",
                                               "--checkpoint-every", "5"))]
    proc = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all("truncated" in line and str(victim) in line for line in errors), proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines() if f'File "{ROOT}/' in line and ".venv" not in line]
    # Each process prints the line as it leaves; torchrun may stop the slower one before it does (it ends the
    # others once one process has failed), so one or two lines. No traceback through the project's code:
    # torchrun reports its own.
    assert len(errors) <= 2 and not ours
    state = read_project_checkpoint(out / "last.pth")
    assert (state["epoch"], state["step"]) == where


def test_training_data_of_mismatched_sizes_stops(toy_copy, tmp_path, check):
    for mask in (toy_copy / "DAVIS/Annotations/480p/davis_train_00").glob("*.png"):
        Image.open(mask).resize((48, 32)).save(mask)
    check(run.main, *_train_args(toy_copy, tmp_path / "t", "--datasets", "davis_train:8"),
          expect=["mask", "is 48x32, its frame", "is 96x64", "expected equal sizes"])


@pytest.mark.slow
def test_resume_log_has_no_repeated_epochs(toy_root, tmp_path):
    """Resuming from an earlier snapshot drops the log lines of the epochs it trains again."""
    out = tmp_path / "run"
    train(run.parse_args(list(map(str, _train_args(toy_root, out, "--epochs", "3", "--save-every", "2")))))
    with open(out / "metrics.jsonl", "a") as log:
        log.write('{"epoch": 4, "lo')  # a line cut short by a kill
    train(run.parse_args(list(map(str, _train_args(toy_root, out, "--epochs", "3", "--resume",
                                                   out / "epoch_00002.pth")))))
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


@pytest.mark.slow
def test_two_processes_train_as_one_and_resume_in_one(toy_root, tmp_path):
    """DDP with 2 CPU processes: epoch 1 ends where one process's epoch 1 ends, with the same logged figures
    (those of whole global batches, not rank 0's share); epoch 2, resumed in one process from the snapshot
    the 2 processes kept, ends where one process alone ends. Global batches do not depend on the process
    count; only the order of float sums in the averaged gradients does."""
    straight = train(run.parse_args(list(map(str, _train_args(toy_root, tmp_path / "one", "--lr", "1e-5",
                                                              "--save-every", "1")))))
    mixed = tmp_path / "mixed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", "29541",
               "run.py", *map(str, _train_args(toy_root, mixed, "--lr", "1e-5", "--save-every", "1"))]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-8000:]
    a, b = (read_project_checkpoint(p / "epoch_00001.pth") for p in (straight, mixed))
    assert b["epoch"] == 1 and max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]) < 1e-5
    (one, _), (two, _) = ([json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()]
                          for p in (straight, mixed))
    assert abs(one["loss"] - two["loss"]) < 1e-4 * one["loss"] and abs(one["iou"] - two["iou"]) < 1e-3
    train(run.parse_args(list(map(str, _train_args(toy_root, mixed, "--lr", "1e-5", "--save-every", "1",
                                                   "--resume", mixed / "epoch_00001.pth")))))
    a, b = (read_project_checkpoint(p / "last.pth")["model"] for p in (straight, mixed))
    start = DepthFlow("mitb0", size=32).state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-4  # it did train


def test_global_batches_are_the_same_for_any_process_count():
    def merged(world):
        ranks = [GlobalBatches(20, 8, 3, distributed.Context(r, world, torch.device("cpu"))).epoch(2)
                 for r in range(world)]
        return [sum((ranks[r][step] for r in range(world)), []) for step in range(len(ranks[0]))]

    one, two, four = merged(1), merged(2), merged(4)
    assert one == two == four and [len(b) for b in one] == [8, 8, 4]
    assert sorted(i for b in one for _, i in b) == list(range(20)) and {e for b in one for e, _ in b} == {2}
    assert merged(1) != [sum((GlobalBatches(20, 8, 3, distributed.Context(0, 1, torch.device("cpu"))).epoch(3)),
                             [])]


def test_dataset_lists_and_short_videos(toy_copy, tmp_path, check):
    listing = toy_copy / "DAVIS/ImageSets/2016/val.txt"
    listing.write_text("davis_00\ndavis_01\ndavis_00\n")
    check(run.main, "--test", "--checkpoint", _tiny(tmp_path), "--data-root", toy_copy, "--device", "cpu",
          "--output", tmp_path / "o", expect=[str(listing), "'davis_00' twice"])
    listing.write_text("davis_00\ndavis_01\n")
    for frame in sorted((toy_copy / "DAVIS/JPEGImages/480p/davis_01").glob("*.jpg"))[2:]:
        for folder in ("JPEGImages", "JPEGFlows"):
            (toy_copy / "DAVIS" / folder / "480p/davis_01" / frame.name).unlink()
        (toy_copy / "DAVIS/Annotations/480p/davis_01" / frame.with_suffix(".png").name).unlink()
    check(run.main, "--test", "--checkpoint", _tiny(tmp_path), "--data-root", toy_copy, "--device", "cpu",
          "--output", tmp_path / "o", expect=["davis_01", "has 2 frames", "at least 3"])
    check(run.main, "--test", "--checkpoint", _tiny(tmp_path), "--data-root", toy_copy, "--device", "cpu",
          "--datasets", ",", "--output", tmp_path / "o", expect=["--datasets names no dataset"])


def _tiny(tmp_path):
    path = tmp_path / "tiny.pth"
    if not path.exists():
        save_project_checkpoint(path, DepthFlow("mitb0", size=32))
    return path


def test_a_second_video_does_not_reuse_the_first_ones_outputs(toy_root, tmp_path, check):
    a, b = tmp_path / "A" / "clip", tmp_path / "B" / "clip"
    shutil.copytree(toy_root / "LVID/JPEGImages/lvid_00", a)
    shutil.copytree(toy_root / "LVID/JPEGImages/lvid_01", b)
    common = ["--checkpoint", _tiny(tmp_path), "--device", "cpu", "--workers", "0"]
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the default output folder, demo_out/clip, is the same for both
    try:
        assert run.main(["--demo", str(a), *map(str, common)]) is None
        flows_a = (tmp_path / "demo_out/clip/flows/00000.jpg").read_bytes()
        check(run.main, "--demo", b, *common, expect=["demo_out/clip holds the demo of", str(a), "--overwrite"])
        assert (tmp_path / "demo_out/clip/flows/00000.jpg").read_bytes() == flows_a
        assert run.main(["--demo", str(b), *map(str, common), "--overwrite"]) is None
        assert (tmp_path / "demo_out/clip/flows/00000.jpg").read_bytes() != flows_a
    finally:
        os.chdir(cwd)


def test_demo_frames_that_cannot_be_segmented(tmp_path, check):
    corrupt, tiny = tmp_path / "corrupt", tmp_path / "tiny"
    corrupt.mkdir()
    tiny.mkdir()
    Image.new("RGB", (64, 48)).save(corrupt / "00000.jpg")
    (corrupt / "00001.jpg").write_bytes(b"not a jpeg")
    Image.new("RGB", (1, 1)).save(tiny / "00000.png")
    common = ["--checkpoint", _tiny(tmp_path), "--device", "cpu"]
    check(run.main, "--demo", corrupt, *common, "--output", tmp_path / "o1", expect=["unreadable frame",
                                                                                   str(corrupt / "00001.jpg")])
    check(run.main, "--demo", tiny, *common, "--output", tmp_path / "o2", expect=["is 1x1", "at least 16x16"])


def test_flow_commands_refuse_what_would_do_nothing_or_harm(toy_root, tmp_path, check):
    frames = tmp_path / "frames"
    shutil.copytree(toy_root / "LVID/JPEGImages/lvid_00", frames)
    check(flow_main, "--frames", frames, "--out", frames, "--method", "dis",
          expect=["written over the frames", str(frames)])
    check(flow_main, "--frames", frames, "--out", tmp_path / "f", "--batch-size", "0", expect=["--batch-size"])
    duts = ["--duts", toy_root / "DUTS-TR", "--out", tmp_path / "v2", "--depth-dir", toy_root / "DUTS-TR/DUTS-TR-Depth"]
    check(synth_main, *duts, "--batch-size", "0", expect=["--batch-size 0"])
    check(synth_main, *duts, "--gamma-range", "2", "0.5", expect=["--gamma-range 2.0 0.5", "LOW <= HIGH"])


@pytest.mark.parametrize("content", ["object", "nan"])
def test_depth_maps_that_are_not_plain_numbers(toy_root, tmp_path, check, content):
    depth = tmp_path / "depth"
    shutil.copytree(toy_root / "DUTS-TR/DUTS-TR-Depth", depth)
    victim = sorted(depth.glob("*.png"))[0]
    victim.unlink()
    npy = victim.with_suffix(".npy")
    if content == "object":
        np.save(npy, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        np.save(npy, np.full((64, 96), np.nan, np.float32))
    check(synth_main, "--duts", toy_root / "DUTS-TR", "--out", tmp_path / "v2", "--depth-dir", depth,
          expect=[str(npy), "not a plain numeric" if content == "object" else "NaN"])


@pytest.mark.slow
def test_ctrl_c_in_test_keeps_the_finished_datasets(tmp_path):
    from tools.toydata import generate

    # A short DAVIS, then enough of YouTube-Objects (11 videos) that Ctrl-C, pressed once DAVIS's results are
    # written, lands seconds before the run could finish, however fast this machine is.
    root = generate(tmp_path / "toy", size=(64, 96), videos=1, frames=4, datasets=("davis",))
    long = generate(tmp_path / "long", size=(64, 96), frames=24, datasets=("ytobj",))
    out = tmp_path / "o"
    code, _, stderr = ctrl_c_once(["run.py", "--test", "--checkpoint", _tiny(tmp_path), "--data-root", root,
                                   "--ytobj-root", long / "YTOBJ", "--datasets", "davis,ytobj", "--output", out,
                                   "--device", "cpu", "--workers", "1", "--batch-size", "1"],
                                  ready=out / "per_frame/davis.csv")
    results = json.loads((out / "results.json").read_text())["datasets"]
    assert code == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert [line for line in stderr.splitlines() if line.strip()][-1].startswith("error: interrupted")
    assert list(results) == ["davis"] and results["davis"]["metrics"]["J&F-Mean"] >= 0


def test_atomic_writes_name_the_users_path_and_follow_the_umask(tmp_path):
    target = tmp_path / "out.json"
    write_text_atomic("{}\n", target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_current_umask()
    save_image_atomic(Image.new("L", (4, 4)), tmp_path / "out.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.png"]  # no temporary file stays
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError) as err:
        write_text_atomic("x", blocker / "sub" / "r.json")
    assert err.value.filename == str(blocker / "sub" / "r.json")


def test_no_write_follows_a_planted_link(tmp_path):
    """Links planted where a write's temporary file would be (any guessable name), at the output itself, or at
    a log that is appended to: the file linked to is never written."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("results.json", "00001.png", "last.pth"):
        for guess in (f".{name}.tmp", f"{name}.tmp", f".{name}.partial"):
            (out / guess).symlink_to(victim)
    (out / "results.json").symlink_to(victim)
    write_text_atomic("{}\n", out / "results.json")
    save_image_atomic(Image.new("L", (4, 4)), out / "00001.png")
    save_torch_atomic({"x": torch.zeros(1)}, out / "last.pth")
    assert victim.read_text() == "precious"
    assert not (out / "results.json").is_symlink() and (out / "results.json").read_text() == "{}\n"
    (out / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(UserError, match="metrics.jsonl is a symbolic link"):
        append_line(out / "metrics.jsonl", "{}")
    assert victim.read_text() == "precious"


def _current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_results_file_under_a_file_is_refused_before_the_work(toy_root, tmp_path, check):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    check(run.main, "--test", "--checkpoint", _tiny(tmp_path), "--data-root", toy_root, "--device", "cpu",
          "--json", blocker / "results.json", "--output", tmp_path / "o",
          expect=["cannot write to output folder", str(blocker)])
    assert not (tmp_path / "o/DAVIS16_val").exists()


def test_ctrl_c_anywhere_is_one_line_and_exit_code_130(capsys):
    from utils.errors import cli_entry

    @cli_entry
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_:
        interrupted()
    assert exit_.value.code == 130
    assert capsys.readouterr().err.strip() == ("error: interrupted; finished outputs are kept (a resumable command "
                                               "continues where it stopped)")


def test_toy_data_never_lands_on_real_data(tmp_path, check):
    from tools.toydata import main as toydata_main

    real = tmp_path / "VOS"
    (real / "DAVIS/ImageSets/2016").mkdir(parents=True)
    (real / "DAVIS/ImageSets/2016/val.txt").write_text("blackswan\n")
    check(toydata_main, real, "--datasets", "davis", expect=[str(real), "did not write", "new or empty folder"])
    check(toydata_main, real, "--datasets", "davis", "--overwrite", expect=["did not write"])
    assert (real / "DAVIS/ImageSets/2016/val.txt").read_text() == "blackswan\n"
    toy = tmp_path / "toy"
    assert toydata_main([str(toy), "--datasets", "davis"]) is None
    check(toydata_main, toy, "--datasets", "davis", expect=["holds toy data already", "--overwrite"])
    assert toydata_main([str(toy), "--datasets", "davis", "--overwrite"]) is None


@pytest.mark.slow
def test_outputs_never_land_on_inputs(toy_copy, tmp_path, check):
    frames = tmp_path / "out/frames"
    shutil.copytree(toy_copy / "LVID/JPEGImages/lvid_00", frames)
    check(run.main, "--demo", frames, "--checkpoint", _tiny(tmp_path), "--output", tmp_path / "out", "--overwrite",
          "--device", "cpu", expect=["lies inside the output folder", "another --output"])
    assert len(list(frames.glob("*.jpg"))) == 8
    check(run.main, "--test", "--checkpoint", _tiny(tmp_path), "--data-root", toy_copy, "--datasets", "davis",
          "--device", "cpu", "--output", toy_copy / "DAVIS/Annotations",
          expect=["--output", "lies inside the input folder"])
    check(run.main, "--test", "--checkpoint", _tiny(tmp_path), "--data-root", toy_copy, "--datasets", "davis",
          "--device", "cpu", "--output", tmp_path / "o", "--json", toy_copy / "DAVIS/ImageSets/2016/val.txt",
          expect=["--json", "lies inside the input folder"])
    assert (toy_copy / "DAVIS/ImageSets/2016/val.txt").read_text() == "davis_00\ndavis_01\n"
    checkpoint = _tiny(tmp_path)
    before = checkpoint.read_bytes()
    check(run.main, "--test", "--checkpoint", checkpoint, "--data-root", toy_copy, "--datasets", "davis", "--device",
          "cpu", "--output", tmp_path / "o", "--json", checkpoint, expect=["--json", "which this run reads"])
    assert checkpoint.read_bytes() == before
    run_dir = tmp_path / "run"
    assert run.main(list(map(str, _train_args(toy_copy, run_dir, "--epochs", "1")))) is None
    check(run.main, *_train_args(toy_copy, run_dir, "--epochs", "1", "--overwrite", "--checkpoint",
                                 run_dir / "last.pth"), expect=["--overwrite would delete", "last.pth"])
    assert (run_dir / "last.pth").is_file()
    FolderLock(run_dir, "--output").acquire().release()  # the refused run let its folder go
    check(run.main, *_train_args(toy_copy, toy_copy / "DAVIS" / "runs"), expect=["lies inside the input folder"])


def test_a_training_list_that_names_a_validation_video_is_refused(toy_copy, tmp_path, check):
    (toy_copy / "DAVIS/ImageSets/2016/train.txt").write_text("davis_train_00\ndavis_01\n")
    check(run.main, *_train_args(toy_copy, tmp_path / "t", "--selection", "davis"),
          expect=["DAVIS 2016 train holds davis_01, a video of DAVIS 2016 val, which picks best.pth", "disjoint"])
    assert not (tmp_path / "t").exists()


def test_a_loss_that_stops_being_a_number_stops_training(toy_root, tmp_path, check):
    """--lr 1e12: the run stops with one line; what it wrote before is all finite, and the log valid JSON."""
    out = tmp_path / "t"
    check(run.main, *_train_args(toy_root, out, "--lr", "1e12", "--epochs", "5", "--selection", "davis"),
          expect=["the loss became", "lower --lr"])
    for line in (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []:
        assert all(np.isfinite(v) for v in json.loads(line).values() if isinstance(v, float))
    for name in ("last.pth", "best.pth"):
        if (out / name).exists():
            assert all(v.isfinite().all() for v in read_project_checkpoint(out / name)["model"].values())


def test_initial_weights_are_one_source(toy_root, tmp_path, check):
    check(run.main, *_train_args(toy_root, tmp_path / "t", "--pretrained", tmp_path / "x.pth", "--checkpoint",
                                 _tiny(tmp_path)), expect=["--pretrained and --checkpoint", "pass one"])


@pytest.mark.parametrize(("flags", "expect"), [
    (["--device", "mps"], "--device mps: expected auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:7"], "--device cuda:7"),
    (["--amp", "bf16", "--device", "cpu"], "--amp bf16 is for GPUs"),
    (["--backbone", "timm:no_such_model"], "--backbone timm:no_such_model"),
    (["--loss", "ce+" + "x" * 9], "unknown loss 'xxxxxxxxx'"),  # a name no registry entry will take
    (["--loss", "dice+dice"], "dice appears twice"),
    (["--flip-p", "1.5"], "--flip-p 1.5"),
    (["--size", "8192"], "--size 8192: expected a multiple of 32 from 32 to 4096"),
    (["--size", "100000"], "--size 100000"),
    (["--dist-timeout", "0"], "--dist-timeout 0")])
def test_flag_values_that_cannot_be_honoured_are_one_line(toy_root, tmp_path, check, flags, expect):
    argv = [a for a in _train_args(toy_root, tmp_path / "t") if a not in ("--device", "cpu")]
    check(run.main, *argv, *flags, expect=[expect])


@pytest.mark.parametrize(("field", "value", "expect"), [
    ("stage", 5, "expected one of 1, 2"), ("epochs", 0, "at least 1"), ("lr", "1e-5", "positive finite"),
    ("batch_size", 3.5, "integer"), ("seed", None, "integer"), ("flip_p", 2, "probability"),
    ("size", 33, "multiple of 32"), ("selection", "best", "davis, heldout, last"), ("loss", "ce+x", "unknown loss"),
    ("backbone", "mitb9", "unknown backbone"), ("sources", "duts", "[dataset, samples] pairs"),
    ("sources", [["davis", 8]], "not a training set")])
def test_recipe_file_values_are_checked_as_the_flags_are(toy_root, tmp_path, check, field, value, expect):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({field: value}))
    check(run.main, *_train_args(toy_root, tmp_path / "t"), "--recipe", recipe,
          expect=[f"--recipe {recipe}: {field}", expect])
    assert not (tmp_path / "t").exists()


@pytest.mark.slow
def test_a_finished_run_resumed_has_nothing_to_do_and_a_resumed_epoch_is_logged_whole(toy_root, tmp_path, capsys):
    """Stopped mid-epoch and resumed, the epoch's logged loss is the whole epoch's, as in an uninterrupted run."""
    from tests.test_train_eval import StopAfter

    straight, stopped = tmp_path / "a", tmp_path / "b"
    train(run.parse_args(list(map(str, _train_args(toy_root, straight)))))
    with pytest.raises(Exception, match="continue with --resume"):
        run.run_train(run.parse_args(list(map(str, _train_args(toy_root, stopped)))), StopAfter(2))
    train(run.parse_args(list(map(str, _train_args(toy_root, stopped, "--resume")))))
    a, b = ([json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()] for p in (straight, stopped))
    assert [r["epoch"] for r in b] == [1, 2]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6) and x["iou"] == pytest.approx(y["iou"], rel=1e-6)
    capsys.readouterr()
    assert run.main(list(map(str, _train_args(toy_root, stopped, "--resume")))) is None
    assert "has finished all 2 epochs; nothing to do" in capsys.readouterr().out


def _start(args, ready):
    """Start a project command in its own process group and wait until `ready(pid)` holds."""
    with hearing_ctrl_c():
        proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not ready(proc.pid):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    return proc


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _with_loaders(pid):
    return any(children(server) for server in children(pid))


@pytest.mark.slow
@pytest.mark.parametrize(("command", "sig"), [("test", signal.SIGTERM), ("train", signal.SIGKILL),
                                             ("train", signal.SIGINT)])
def test_a_killed_run_leaves_no_process_behind(toy_root, tmp_path, command, sig):
    """SIGKILL or SIGTERM (SLURM, docker stop, timeout) of the program: every process it started ends within
    seconds; SIGTERM ends in one line and exit code 143, Ctrl-C (SIGINT) in 130, training having saved its
    finished steps in a checkpoint it can resume from."""
    from tests.conftest import descendants
    from tools.toydata import generate

    if command == "test":
        data = generate(tmp_path / "data", size=(64, 96), videos=2, frames=40, datasets=("davis",))
        args = ["run.py", "--test", "--checkpoint", _tiny(tmp_path), "--data-root", data, "--datasets", "davis",
                "--output", tmp_path / "o", "--device", "cpu", "--workers", "2"]
    else:
        args = ["run.py", *_train_args(toy_root, tmp_path / "t", "--workers", "2", "--epochs", "500")]
    proc = _start(args, _with_loaders)
    started = descendants(proc.pid)
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    deadline = time.time() + 15
    while time.time() < deadline and any(map(_alive, started)):
        time.sleep(0.2)
    assert not [p for p in started if _alive(p)]
    if sig != signal.SIGKILL:
        assert proc.returncode == 128 + sig and "Traceback" not in err, err[-2000:]
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, err
        if command == "train":
            assert lines[0].startswith("stopped: saved") and "--resume" in lines[0]
            assert read_project_checkpoint(tmp_path / "t/last.pth")["epoch"] < 500
        else:
            assert lines[0].startswith("error: terminated")


def test_resuming_with_any_changed_recipe_field_names_it(toy_root, tmp_path, check):
    """Every field of the recipe but the epochs, changed on --resume, stops the run with one line naming its
    flag."""
    from dataclasses import fields

    from recipe import RECIPE_FLAGS, RESUMABLE_CHANGES, Recipe

    changed = {"stage": "1", "sources": "duts:16", "batch_size": "8", "lr": "2e-4", "size": "64",
               "backbone": "mitb1", "flow_backbone": "mitb1", "flip_p": "0.3", "loss": "ce+dice", "selection": "davis",
               "val_every": "7", "seed": "9"}
    assert set(changed) | set(RESUMABLE_CHANGES) == {f.name for f in fields(Recipe)}, "a new field needs a case here"
    out = tmp_path / "run"
    assert run.main(list(map(str, _train_args(toy_root, out, "--epochs", "1")))) is None
    for field, value in changed.items():
        flag = RECIPE_FLAGS[field]
        check(run.main, *_train_args(toy_root, out, "--epochs", "1", "--resume"), flag, value,
              expect=[f"was trained with {flag} ", "keeps its recipe"])


def test_a_new_test_set_needs_only_its_dataset_spec(tmp_path, monkeypatch, capsys):
    """A DatasetSpec in the standard layout: tools.toydata writes it and run.py --test scores it, unedited."""
    import dataset
    from dataset import DatasetSpec
    from tools.toydata import main as toydata_main

    monkeypatch.setitem(dataset.DATASETS, "mine", DatasetSpec(
        name="mine", title="My test set", role="test", folder="MINE", images="Frames", flows="Flows", masks="Masks",
        mask_rule="nonzero", sparse=True, output="MINE_test"))
    root = tmp_path / "data"
    assert toydata_main([str(root), "--datasets", "mine", "--videos", "2", "--frames", "4", "--size", "48x64"]) is None
    code, out, err = run_main(run.main, "--test", "--checkpoint", _tiny(tmp_path), "--data-root", root,
                              "--datasets", "mine", "--output", tmp_path / "o", "--device", "cpu", capsys=capsys)
    assert code == 0, err
    assert "== My test set ==" in out
    results = json.loads((tmp_path / "o/results.json").read_text())["datasets"]
    assert set(results["mine"]["sequences"]) == {"mine_00", "mine_01"} and results["mine"]["metrics"]["J-Mean"] >= 0
    assert len(list((tmp_path / "o/MINE_test").rglob("*.png"))) == 8


def test_a_truncated_video_is_refused_not_shortened(tmp_path, check):
    """A video file whose header announces more frames than it decodes to is damaged: one line, not a demo of
    its first frames."""
    import cv2

    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10, (96, 64))
    rng = np.random.default_rng(0)
    for _ in range(6):
        writer.write(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    writer.release()
    data = clip.read_bytes()
    clip.write_bytes(data[:len(data) // 2])
    check(run.main, "--demo", clip, "--checkpoint", _tiny(tmp_path), "--output", tmp_path / "out", "--device", "cpu",
          expect=[str(clip), "but its header announces 6", "damaged or truncated"])


def test_phone_photos_are_segmented_upright(tmp_path, capsys):
    """JPEG frames with an EXIF orientation (a phone held sideways): masks line up with the frames as every
    viewer shows them, not as stored."""
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        image = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
        exif = image.getexif()
        exif[0x0112] = 6  # stored landscape, shown rotated a quarter turn: 64 wide, 96 high
        image.save(frames / f"{i}.jpg", exif=exif)
    code, _, err = run_main(run.main, "--demo", frames, "--checkpoint", _tiny(tmp_path), "--output", tmp_path / "out",
                            "--device", "cpu", "--flow", "dis", capsys=capsys)
    assert code in (0, None), err
    assert Image.open(tmp_path / "out/masks/0.png").size == (64, 96)
    assert Image.open(tmp_path / "out/frames/0.jpg").size == (64, 96)


def test_a_full_disk_says_so(tmp_path, capsys, monkeypatch):
    """torch's own report of a full disk ('unexpected pos', from its zip writer) ends as 'no space left on
    device', naming the file."""
    import shutil as shutil_module

    from model import convert

    checkpoint = _tiny(tmp_path)

    def full_disk(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 3968")

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: shutil_module._ntuple_diskusage(10**9, 10**9, 1024))
    code, _, err = run_main(convert.main, checkpoint, tmp_path / "out.pth", capsys=capsys)
    assert_one_line_error(code, err, f"cannot use {tmp_path / 'out.pth'}: no space left on device")
    assert not (tmp_path / "out.pth").exists()


def test_a_results_folder_never_mixes_two_models(toy_root, tmp_path, capsys):
    """--test of another checkpoint into a folder holding a first one's figures: refused; --overwrite deletes
    what the first test wrote (its masks too) and nothing else; the results record the checkpoint."""
    import hashlib

    first, second = _tiny(tmp_path), tmp_path / "second.pth"
    torch.manual_seed(1)
    save_project_checkpoint(second, DepthFlow("mitb0", size=32))
    out = tmp_path / "o"
    (out / "mine.txt").parent.mkdir()
    (out / "mine.txt").write_text("the user's")
    common = ["--test", "--data-root", toy_root, "--device", "cpu", "--output", out]
    assert run_main(run.main, *common, "--checkpoint", first, "--datasets", "davis", capsys=capsys)[0] in (0, None)
    results = json.loads((out / "results.json").read_text())
    assert results["run"]["checkpoint_sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    code, _, err = run_main(run.main, *common, "--checkpoint", second, "--datasets", "fbms", capsys=capsys)
    assert_one_line_error(code, err, "holds figures of another model", "--overwrite")
    assert run_main(run.main, *common, "--checkpoint", first, "--datasets", "fbms", capsys=capsys)[0] in (0, None)
    assert set(json.loads((out / "results.json").read_text())["datasets"]) == {"davis", "fbms"}  # same model
    code, _, err = run_main(run.main, *common, "--checkpoint", second, "--datasets", "fbms", "--overwrite",
                            capsys=capsys)
    assert code in (0, None), err
    results = json.loads((out / "results.json").read_text())
    assert set(results["datasets"]) == {"fbms"} and results["run"]["checkpoint"] == str(second.resolve())
    assert not (out / "DAVIS16_val").exists() and (out / "mine.txt").read_text() == "the user's"
