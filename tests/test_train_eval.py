import json
import os
import shutil
import sys

import pytest
import torch
from PIL import Image

import evaluator
import run
import utils.device
from dataset import DATASETS, scan
from inference import InferenceOptions, Segmenter
from model import DepthFlow
from model.checkpoints import read_project_checkpoint, save_project_checkpoint
from tests.conftest import assert_one_line_error, run_cli, run_main
from utils.errors import UserError
from utils.interrupts import Stopped, StopRequests

TOY_RECIPE = ["--backbone", "mitb0", "--size", "64", "--stage", "2", "--datasets", "duts:32,davis_train:32",
              "--batch-size", "8", "--lr", "5e-4", "--workers", "0", "--device", "cpu"]


def toy_davis_jf(model, toy_root):
    videos = scan(DATASETS["davis"], toy_root / "DAVIS")
    segmenter = Segmenter(model, InferenceOptions(torch.device("cpu")))
    return evaluator.evaluate_dataset(segmenter, DATASETS["davis"], videos, progress=False)["metrics"]["J&F-Mean"]


@pytest.fixture(scope="module")
def trained(toy_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    run.main(["--train", *TOY_RECIPE, "--data-root", str(toy_root), "--epochs", "9", "--val-every", "3",
              "--output", str(out)])
    return out


@pytest.mark.slow
def test_training_lowers_the_loss_and_beats_an_untrained_model(trained, toy_root):
    log = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, 10))
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    assert log[-1]["iou"] > 0.4
    best = max(r["davis_jf"] for r in log if "davis_jf" in r)
    torch.manual_seed(0)
    untrained = toy_davis_jf(DepthFlow("mitb0", size=64), toy_root)
    assert best > max(2 * untrained, untrained + 0.15), (best, untrained)
    assert read_project_checkpoint(trained / "best.pth")["best"] == pytest.approx(best)


@pytest.mark.slow
def test_test_command_writes_masks_tables_and_json(trained, toy_root, tmp_path, capsys):
    out = tmp_path / "eval"
    code, stdout, _ = run_main(run.main, "--test", "--checkpoint", trained / "best.pth", "--data-root", toy_root,
                               "--output", out, "--workers", "0", "--device", "cpu", capsys=capsys)
    assert code == 0
    for title in ("DAVIS 2016 val", "FBMS test", "YouTube-Objects", "Long-Videos", "J&F-Mean", "per class"):
        assert title in stdout
    # Output to a file (as under SLURM or nohup): progress as plain lines, each dataset's last one saying so.
    assert "DAVIS 2016 val: 16/16 frames" in stdout and "done in" in stdout
    for folder, video in (("DAVIS16_val", "davis_01"), ("FBMS_test", "fbms_00"), ("YTOBJ", "aeroplane/0002"),
                          ("LVID", "lvid_01")):
        masks = sorted((out / folder / video).glob("*.png"))
        assert [m.stem for m in masks] == [f"{i:05d}" for i in range(8)]
        image = Image.open(masks[0])
        assert image.mode == "P" and image.size == (96, 64)
    results = json.loads((out / "results.json").read_text())["datasets"]
    assert set(results) == {"davis", "fbms", "ytobj", "lvid"}
    assert results["davis"]["speed"]["frames"] == 16 and results["davis"]["speed"]["forward_fps"] > 0
    assert len(results["ytobj"]["classes"]) == 10
    # The standalone scorer reads the saved masks back and must agree exactly with the in-process scores.
    for name, folder in (("davis", "DAVIS16_val"), ("ytobj", "YTOBJ")):
        videos = scan(DATASETS[name], toy_root / DATASETS[name].folder)
        saved, _ = evaluator.score_saved(DATASETS[name], videos, out / folder, workers=2)
        for key, value in saved["metrics"].items():
            assert value == pytest.approx(results[name]["metrics"][key], abs=1e-12)


def test_scoring_ground_truth_gives_perfect_scores(toy_root, tmp_path, capsys):
    results = tmp_path / "gt"
    for video in scan(DATASETS["fbms"], toy_root / "FBMS"):
        for frame in video.annotated:
            (results / video.key).mkdir(parents=True, exist_ok=True)
            shutil.copy(frame.mask, results / video.key / f"{frame.stem}.png")
    code, stdout, _ = run_main(evaluator.main, "--dataset", "fbms", "--data-root", toy_root, "--results", results,
                               "--json", tmp_path / "m.json", capsys=capsys)
    assert code == 0
    assert json.loads((tmp_path / "m.json").read_text())["datasets"]["fbms"]["metrics"]["J-Mean"] == 1.0
    shutil.rmtree(results / "fbms_01")
    code, _, err = run_main(evaluator.main, "--dataset", "fbms", "--data-root", toy_root, "--results", results,
                            capsys=capsys)
    assert_one_line_error(code, err, "missing result mask", str(results / "fbms_01"))
    small = next(results.rglob("*.png"))
    Image.open(small).resize((8, 8)).save(small)
    code, _, err = run_main(evaluator.main, "--dataset", "fbms", "--data-root", toy_root, "--results", results,
                            capsys=capsys)
    assert_one_line_error(code, err, f"result mask {small} is 8x8", "expected equal sizes")


def _small_args(toy_root, out, *extra, model=("--backbone", "mitb0", "--size", "32")):
    return run.parse_args(["--train", *model, "--stage", "2", "--datasets", "duts:8,davis_train:8", "--batch-size",
                           "4", "--lr", "1e-4", "--workers", "0", "--device", "cpu", "--selection", "last",
                           "--checkpoint-every", "1", "--epochs", "2", "--data-root", str(toy_root), "--output",
                           str(out), *extra])


def train(args, stop=None):
    return run.run_train(args, stop or StopRequests())


class StopAfter:
    """Stands for StopRequests: a stop request (as Ctrl-C makes) once a number of steps are done; the loop asks
    `signum` once before each step."""

    def __init__(self, steps):
        self.asked = -1
        self.steps = steps

    @property
    def signum(self):
        self.asked += 1  # the number of steps done when asked
        return 2 if self.asked >= self.steps else None


def test_compiled_training_needs_a_compiler(toy_root, tmp_path, monkeypatch):
    monkeypatch.setattr(utils.device.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="--compile on a CPU needs a C\\+\\+ compiler"):
        train(_small_args(toy_root, tmp_path / "c", "--compile"))


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DEPTHFLOW_SLOW_TESTS"), reason="compiling takes minutes on CPU; set "
                    "DEPTHFLOW_SLOW_TESTS=1")
def test_compiled_training_step_trains_as_eager(toy_root, tmp_path):
    """One epoch with --compile ends where the eager run ends, up to float rounding, and its checkpoint holds
    the plain model's names. Rounding differences reach Adam's step size on weights whose gradients are
    near zero (Adam moves every weight by about lr), so the check is on the whole update: the runs' weight
    changes differ by under 0.1% of their size (measured: 0.005%)."""
    eager = train(_small_args(toy_root, tmp_path / "eager", "--epochs", "1"))
    compiled = train(_small_args(toy_root, tmp_path / "compiled", "--epochs", "1", "--compile"))
    a, b = (read_project_checkpoint(p / "last.pth")["model"] for p in (eager, compiled))
    assert a.keys() == b.keys()
    torch.manual_seed(0)  # the runs' --seed: their starting weights
    start = DepthFlow("mitb0", size=32).state_dict()
    update = torch.cat([(a[k] - start[k]).flatten() for k in a])
    apart = torch.cat([(a[k] - b[k]).flatten() for k in a])
    assert update.norm() > 1e-3 and apart.norm() < 1e-3 * update.norm(), (apart.norm(), update.norm())


@pytest.mark.slow
@pytest.mark.parametrize("stop_after", [3, 4])  # mid-epoch, and at an epoch boundary
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(toy_root, tmp_path, stop_after):
    straight = train(_small_args(toy_root, tmp_path / "a"))
    stopped = tmp_path / "b"
    # A stop asked once 4 steps are done is seen before the next step: the start of epoch 2.
    where = "epoch 1, step 3" if stop_after == 3 else "epoch 2, step 0"
    with pytest.raises(Stopped, match=f"saved {stopped / 'last.pth'} at {where}"):
        train(_small_args(toy_root, stopped), stop=StopAfter(stop_after))
    state = read_project_checkpoint(stopped / "last.pth")
    assert (state["epoch"], state["step"]) == ((0, 3) if stop_after == 3 else (1, 0))
    with pytest.raises(UserError, match="was trained with --size 32 \\(this run asks for 64\\)"):
        train(_small_args(toy_root, stopped, "--resume", model=("--size", "64")))
    train(_small_args(toy_root, stopped, "--resume", model=()))  # backbone and size come from the checkpoint
    a = read_project_checkpoint(straight / "last.pth")
    b = read_project_checkpoint(stopped / "last.pth")
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not all(torch.equal(a["model"][k], state["model"][k]) for k in a["model"])


@pytest.mark.slow
def test_a_finished_run_extended_equals_the_longer_run(toy_root, tmp_path):
    """--resume --epochs 3 after a 2-epoch run: the weights and Adam's state of a run started with 3 epochs,
    bit for bit (a constant learning rate, samples and steps seeded by epoch and index)."""
    longer = train(_small_args(toy_root, tmp_path / "three", "--epochs", "3"))
    extended = train(_small_args(toy_root, tmp_path / "two", "--epochs", "2"))
    train(_small_args(toy_root, extended, "--resume", "--epochs", "3"))
    a, b = (read_project_checkpoint(p / "last.pth") for p in (longer, extended))
    assert a["epoch"] == b["epoch"] == 3 and b["recipe"]["epochs"] == 3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    moments = [(x["exp_avg"], y["exp_avg"]) for x, y in zip(a["optimizer"]["state"].values(),
                                                             b["optimizer"]["state"].values())]
    assert moments and all(torch.equal(x, y) for x, y in moments)
    log = [json.loads(line)["epoch"] for line in (extended / "metrics.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3]
    with pytest.raises(UserError, match="has trained 3 epochs already"):
        train(_small_args(toy_root, extended, "--resume", "--epochs", "2"))


def test_user_errors_are_one_line(toy_root, toy_copy, tmp_path, capsys):
    ckpt = tmp_path / "small.pth"
    save_project_checkpoint(ckpt, DepthFlow("mitb0", size=32))

    def check(*argv, expect):
        code, _, err = run_main(run.main, *argv, "--device", "cpu", capsys=capsys)
        assert_one_line_error(code, err, *expect)

    check("--test", "--checkpoint", ckpt, "--data-root", tmp_path / "nope", "--output", tmp_path / "o",
          expect=[str(tmp_path / "nope" / "DAVIS"), "expected layout"])
    check("--test", "--checkpoint", tmp_path / "missing.pth", "--data-root", toy_root,
          expect=["checkpoint not found", str(tmp_path / "missing.pth")])
    check("--test", "--checkpoint", ckpt, "--backbone", "mitb7", expect=["unknown backbone 'mitb7'", "timm:"])
    check("--test", "--checkpoint", ckpt, "--backbone", "mitb1",
          expect=["holds a mitb0 model, not the mitb1 asked for"])
    check("--test", "--checkpoint", ckpt, "--data-root", toy_root, "--datasets", "davis,kitti", "--output",
          tmp_path / "o", expect=["unknown test dataset 'kitti'"])
    check("--test", "--checkpoint", ckpt, "--data-root", toy_root, "--datasets", "ytvos", "--output", tmp_path / "o",
          expect=["unknown test dataset 'ytvos'", "davis, fbms, ytobj, lvid"])
    blocker = tmp_path / "file"
    blocker.write_text("")
    check("--test", "--checkpoint", ckpt, "--data-root", toy_root, "--output", blocker / "sub",
          expect=["cannot write to output folder", str(blocker / "sub")])
    check("--train", "--backbone", "mitb0", "--size", "32", "--pretrained", tmp_path / "mit_b0.pth", "--data-root",
          toy_root, "--output", tmp_path / "t", "--selection", "last", expect=["checkpoint not found", "mit_b0.pth"])
    flow = toy_copy / "FBMS/TestSet/JPEGFlows/fbms_01/00005.jpg"
    flow.unlink()
    check("--test", "--checkpoint", ckpt, "--data-root", toy_copy, "--output", tmp_path / "o",
          expect=["no flow for frame", str(toy_copy / "FBMS/TestSet/JPEGImages/fbms_01/00005.jpg")])
    shutil.copy(toy_root / "FBMS/TestSet/JPEGFlows/fbms_01/00005.jpg", flow)
    image = toy_copy / "DAVIS/JPEGImages/480p/davis_01/00002.jpg"
    image.write_bytes(image.read_bytes()[:300])
    check("--test", "--checkpoint", ckpt, "--data-root", toy_copy, "--output", tmp_path / "o", "--workers", "1",
          expect=["truncated", str(image)])


@pytest.mark.slow
def test_peak_memory_is_flat_in_video_length(tmp_path):
    """A 120-frame 854x480 video peaks where a 20-frame one does (masks stream to disk; only the batches in
    flight are held). Each run is its own process, whose high-water mark (VmHWM) starts with it; holding
    each frame's pixels would add about 300 MB, holding only its masks about 45 MB."""
    from tools.toydata import generate

    ckpt = tmp_path / "small.pth"
    save_project_checkpoint(ckpt, DepthFlow("mitb0", size=32))
    code = ("import json, sys; import run\n"
            "run.main(json.loads(sys.argv[1]))\n"
            "print(next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM')))")
    peaks = {}
    for frames in (20, 120):
        root = generate(tmp_path / f"toy{frames}", seed=1, size=(480, 854), videos=1, frames=frames,
                        datasets=("davis",))
        argv = ["--test", "--checkpoint", str(ckpt), "--data-root", str(root), "--datasets", "davis", "--output",
                str(tmp_path / f"o{frames}"), "--device", "cpu"]
        rc, out, err = run_cli("-c", code, json.dumps(argv))
        assert rc == 0, err[-1000:]
        peaks[frames] = int(out.strip().splitlines()[-1]) / 1024  # MiB
        assert len(list((tmp_path / f"o{frames}/DAVIS16_val/davis_00").glob("*.png"))) == frames
    assert peaks[120] - peaks[20] < 25, peaks


@pytest.mark.slow
def test_held_out_selection_never_trains_on_its_videos(toy_root, tmp_path, capsys):
    """--selection heldout: a seeded tenth of DAVIS 2016 train picks best.pth and is never sampled; the run
    says so at its start and records it in run.json, metrics.jsonl and its checkpoints."""
    from dataclasses import replace

    from recipe import STAGES
    from trainer import RunSettings, TrainingRun
    from utils import distributed

    recipe = replace(STAGES[2], sources=(("duts", 8), ("davis_train", 16)), epochs=2, batch_size=4, size=32,
                     backbone="mitb0", selection="heldout", val_every=1, lr=1e-4)
    settings = RunSettings(output=tmp_path / "t", data_root=str(toy_root), dataset_roots={}, device_name="cpu")
    run_ = TrainingRun(recipe, settings, distributed.init("cpu"), StopRequests())
    held = {v.frames[0].image.parent for v in run_.val_videos}
    assert len(held) == 1 and {v.key for v in run_.val_videos} <= {"davis_train_00", "davis_train_01"}
    sampled = {run_.data.frame_for(key).image.parent for epoch in range(recipe.epochs)
               for batch in run_.global_batches.epoch(epoch) for key in batch}
    assert sampled and not sampled & held
    assert any("davis_train" in str(p) for p in sampled)  # the other DAVIS train video is still trained on
    capsys.readouterr()
    run_.train()
    out = capsys.readouterr().out
    assert "best.pth: the best J&F of 1 held-out DAVIS 2016 train videos, never trained on" in out
    log = [json.loads(line) for line in (tmp_path / "t/metrics.jsonl").read_text().splitlines()]
    assert all(r["selection"] == "heldout" and "heldout_jf" in r for r in log)
    record = json.loads((tmp_path / "t/run.json").read_text())
    assert record["recipe"]["selection"] == "heldout" and len(record["heldout_videos"]) == 1 and record["code"]
    assert read_project_checkpoint(tmp_path / "t/best.pth")["recipe"]["selection"] == "heldout"


@pytest.mark.slow
def test_tensorboard_logs_the_epoch_figures(toy_root, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(_small_args(toy_root, tmp_path / "t", "--tensorboard", "--selection", "davis", "--val-every", "1"))
    events = EventAccumulator(str(tmp_path / "t/tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "iou", "lr", "davis_jf", "samples_per_s"} <= tags
    assert [e.step for e in events.Scalars("loss")] == [1, 2]
    log = [json.loads(line) for line in (tmp_path / "t/metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in log], rel=1e-6)
    pictures = [t for t in events.Tags()["images"] if t.startswith("validation/")]
    assert len(pictures) == 2 and [e.step for e in events.Images(pictures[0])] == [1, 2]
    # --overwrite starts fresh curves: none of the first run's points stay to be drawn beside the new ones.
    train(_small_args(toy_root, tmp_path / "t", "--tensorboard", "--selection", "davis", "--epochs", "1", "--seed",
                      "3", "--overwrite"))
    events = EventAccumulator(str(tmp_path / "t/tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1]


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")  # tensorboard's own notices
def test_the_tensorboard_viewer_starts_in_this_environment():
    """`tensorboard --logdir` imports its default plugins, and with them pkg_resources (setuptools < 81)."""
    pytest.importorskip("tensorboard")
    import tensorboard.default

    assert tensorboard.default.get_plugins()


def test_a_recipe_file_is_a_run_recipe(toy_root, tmp_path):
    """recipe.json of a run, given to --recipe, gives the same recipe; flags given beside it win."""
    first = train(_small_args(toy_root, tmp_path / "a", "--epochs", "1", "--seed", "4", "--loss", "ce+0.5*dice"))
    recipe = json.loads((first / "recipe.json").read_text())
    assert recipe["seed"] == 4 and recipe["loss"] == "ce+0.5*dice"
    second = train(run.parse_args(["--train", "--recipe", str(first / "recipe.json"), "--lr", "2e-4", "--workers",
                                   "0", "--device", "cpu", "--data-root", str(toy_root), "--output",
                                   str(tmp_path / "b")]))
    again = json.loads((second / "recipe.json").read_text())
    assert {**recipe, "lr": 2e-4} == again
    assert json.loads((second / "run.json").read_text())["recipe"] == again


def test_tensorboard_without_its_package_is_one_line(toy_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    code, _, err = run_main(run.main, *map(str, ["--train", "--backbone", "mitb0", "--size", "32", "--stage", "2",
                                                 "--datasets", "duts:8", "--batch-size", "4", "--epochs", "1",
                                                 "--selection", "last", "--device", "cpu", "--data-root", toy_root,
                                                 "--output", tmp_path / "t", "--tensorboard"]), capsys=capsys)
    assert_one_line_error(code, err, "--tensorboard needs the tensorboard package", "pip install tensorboard")


@pytest.mark.slow
def test_the_report_shows_every_sequence_and_the_worst_ones(trained, toy_root, tmp_path, capsys):
    """report.html after --test: per dataset the figures with their protocols, every sequence worst first, and
    strips of the worst sequences' frames, their pictures beside the page."""
    out = tmp_path / "eval"
    code, _, err = run_main(run.main, "--test", "--checkpoint", trained / "best.pth", "--data-root", toy_root,
                            "--datasets", "davis,ytobj", "--output", out, "--device", "cpu", capsys=capsys)
    assert code == 0, err
    page = (out / "report.html").read_text()
    results = json.loads((out / "results.json").read_text())["datasets"]
    for name in ("davis", "ytobj"):
        assert DATASETS[name].title in page
        for sequence in results[name]["sequences"]:
            assert f"<td>{sequence}</td>" in page
    davis = results["davis"]["sequences"]
    worst = min(davis, key=lambda k: davis[k]["J-Mean"])
    assert page.index(f"<td>{worst}</td>") < page.index(f"<td>{max(davis, key=lambda k: davis[k]['J-Mean'])}</td>")
    pictures = sorted((out / "report_files").rglob("*.jpg"))
    assert len(pictures) == 2 * 4 + 3 * 4 and all(f'src="{p.relative_to(out).as_posix()}"' in page for p in pictures)
    assert "the DAVIS rules (J, F, Decay) on the annotated frames" in page and "class means" in page
    assert "<svg" in page and "(J 0." in page  # each sequence's J curve; strips labelled with frame and J
    # A rerun into the same folder with fewer datasets leaves no picture of the earlier run.
    code, _, err = run_main(run.main, "--test", "--checkpoint", trained / "best.pth", "--data-root", toy_root,
                            "--datasets", "davis", "--output", out, "--device", "cpu", capsys=capsys)
    assert code in (0, None), err
    assert sorted(p.parent.name for p in (out / "report_files").rglob("*.jpg")) == ["0"] * 8
    code, stdout, err = run_main(evaluator.main, "--dataset", "davis", "--data-root", toy_root, "--results",
                                 out / "DAVIS16_val", "--json", tmp_path / "scores/davis.json", capsys=capsys)
    assert code == 0 and (tmp_path / "scores/DAVIS16_val_report.html").is_file(), err
