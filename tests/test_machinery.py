"""Machinery a GPU cluster exercises, tested without one: launchers and their device choice, pinned staging,
checkpoint snapshots, fp16 figures, folder locks, strict JSON, loader bounds, and which programs import what."""

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.conftest import ROOT
from utils import distributed
from utils.background import all_finite, host_copy
from utils.device import PinnedStaging
from utils.epoch_figures import EpochFigures
from utils.errors import UserError
from utils.io import FolderLock, json_text, strict_json, write_json_atomic
from utils.launch import launch
from utils.loading import bounded_workers

SLURM_TASK = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE":
              "4(x2)", "SLURM_JOB_ID": "1"}


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", *SLURM_TASK):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_launchers_are_read_from_their_environment(clean_env):
    assert launch().world_size == 1 and launch().launcher == "none"
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "1")  # a batch script's own step: one process
    clean_env.setenv("SLURM_PROCID", "0")
    assert launch().world_size == 1
    for name, value in SLURM_TASK.items():
        clean_env.setenv(name, value)
    got = launch()
    assert (got.rank, got.world_size, got.local_rank, got.local_world_size, got.launcher) == (5, 8, 1, 4, "srun")
    for name, value in {"RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8"}.items():
        clean_env.setenv(name, value)  # torchrun inside a SLURM allocation: torchrun's own variables win
    got = launch()
    assert (got.rank, got.world_size, got.local_rank, got.local_world_size, got.launcher) == (3, 16, 3, 8, "torchrun")


@pytest.mark.parametrize(("visible", "local_rank", "asked", "expect"), [
    (8, 3, "auto", "cuda:3"),       # torchrun on an 8-GPU node
    (1, 6, "auto", "cuda:0"),       # one visible GPU per process (SLURM --gpus-per-task=1, Kubernetes)
    (8, 3, "cuda", "cuda:3"),
    (8, 3, "cuda:3", "cuda:3"),
    (8, 3, "cpu", "cpu"),
])
def test_each_process_takes_its_own_gpu(monkeypatch, visible, local_rank, asked, expect):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    where = distributed.Launch(local_rank, 8, local_rank, 8, "torchrun")
    assert distributed.process_device(asked, where) == expect


def test_a_gpu_that_is_not_the_process_own_is_refused(monkeypatch):
    """--device cuda:5 under torchrun: refused before any CUDA context is made on GPU 5."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    made_current = []
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    with pytest.raises(UserError, match="--device cuda:5: under torchrun each process takes its own GPU .*cuda:3"):
        distributed.process_device("cuda:5", distributed.Launch(3, 8, 3, 8, "torchrun"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match="local rank 3 but sees 2 GPUs"):
        distributed.process_device("auto", distributed.Launch(3, 8, 3, 8, "srun"))
    assert made_current == []


class FakeEvent:
    def __init__(self):
        self.waited = 0

    def synchronize(self):
        self.waited += 1


def test_pinned_staging_reuses_a_fixed_number_of_buffers(monkeypatch):
    """However many batches go through, page-locked memory is `slots` buffers, each reused only once the copy
    out of it is done; the tensors arrive whole and in order."""
    staging = PinnedStaging(torch.device("cpu"))
    created = []
    staging.queue = SimpleNamespace(gpu=True, device=torch.device("cpu"),
                                    mark=lambda: created.append(FakeEvent()) or created[-1])
    allocated = []
    monkeypatch.setattr(staging, "_buffer", lambda n: allocated.append(n) or torch.empty(n, dtype=torch.uint8))
    seen = []
    for i in range(7):
        image = torch.full((2, 5, 7, 3), i, dtype=torch.uint8)
        mask = torch.full((2, 5, 7), i + 100, dtype=torch.int64)
        got_image, got_mask = staging(image, mask)
        seen.append((torch.equal(got_image, image), torch.equal(got_mask, mask)))
    assert seen == [(True, True)] * 7
    assert len(allocated) == 2  # two slots, allocated once each
    # Each buffer was waited on (its copy out finished) before its reuse, and only then: the last two are in flight.
    assert [e.waited for e in created] == [1, 1, 1, 1, 1, 0, 0]
    assert PinnedStaging(torch.device("cpu"))(torch.zeros(2))[0].data_ptr() is not None  # on a CPU: as they are


def test_checkpoint_snapshots_are_one_copy_per_dtype_and_exact():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 3}
    copy = host_copy(state)
    flat = [t for t in copy["model"].values()] + [v for s in copy["optimizer"]["state"].values() for v in s.values()]
    storages = {t.untyped_storage().data_ptr() for t in flat if t.dtype == torch.float32}
    assert len(storages) == 1  # one flat buffer for every float32 tensor
    for key, value in state["model"].items():
        assert torch.equal(copy["model"][key], value) and copy["model"][key].data_ptr() != value.data_ptr()
    assert copy["step"] == 3 and all_finite(copy)
    copy["model"]["0.weight"][0, 0] = float("nan")
    assert not all_finite(copy) and not math.isnan(model[0].weight[0, 0].item())


def test_fp16_overflows_are_skipped_not_averaged():
    ctx = distributed.Context(0, 1, torch.device("cpu"))
    logits, target = torch.randn(2, 2, 4, 4), torch.ones(2, 4, 4, dtype=torch.long)
    figures = EpochFigures(ctx)
    figures.add(torch.tensor(0.5), logits, target, skip_non_finite=True)
    figures.add(torch.tensor(float("inf")), logits, target, skip_non_finite=True)
    read = figures.read()
    assert read["loss"] == 0.5 and read["skipped"] == 1
    plain = EpochFigures(ctx)
    plain.add(torch.tensor(float("nan")), logits, target, skip_non_finite=False)
    assert math.isnan(plain.read()["loss"])  # without loss scaling a non-finite loss stops the run


def test_a_second_program_in_a_folder_in_use_names_the_first(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, '.');"
                               "from utils.io import FolderLock; held = FolderLock(sys.argv[1], '--output').acquire();"
                               "print('held', flush=True); time.sleep(60)", str(tmp_path)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"{tmp_path} is in use by pid {holder.pid} on .*; wait for it"):
            FolderLock(tmp_path, "--output").acquire()
    finally:
        holder.kill()
        holder.wait()
    FolderLock(tmp_path, "--output").acquire().release()  # a killed holder leaves no stale lock


def test_json_outputs_are_strict_and_name_undefined_figures(tmp_path):
    write_json_atomic({"J-Mean": float("nan"), "F": [1.0, float("inf")], "ok": 0.5}, tmp_path / "r.json")
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text) == {"J-Mean": None, "F": [1.0, None], "ok": 0.5} and "NaN" not in text
    assert strict_json((1.0, float("-inf"))) == [1.0, None]
    assert json_text({"b": float("nan"), "a": 1}, sort_keys=True) == '{"a": 1, "b": null}'


def test_undefined_figures_are_null_and_said(tmp_path, toy_copy, capsys):
    """Long-Videos whose masks are all blank: no annotated frame, so no figure; null in results.json, named in
    the table, exit 0."""
    from PIL import Image

    import run
    from model import DepthFlow
    from model.checkpoints import save_project_checkpoint
    from tests.conftest import run_main

    for mask in (toy_copy / "LVID/Annotations").rglob("*.png"):
        Image.fromarray(np.zeros_like(np.asarray(Image.open(mask)))).save(mask)
    save_project_checkpoint(tmp_path / "m.pth", DepthFlow("mitb0", size=32))
    code, out, err = run_main(run.main, "--test", "--checkpoint", tmp_path / "m.pth", "--data-root", toy_copy,
                              "--datasets", "lvid", "--output", tmp_path / "o", "--device", "cpu", capsys=capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "o/results.json").read_text())["datasets"]["lvid"]
    assert result["metrics"]["J-Mean"] is None and result["left_out"] == ["lvid_00", "lvid_01"]
    assert "undefined (no frame to compute them on; null in the JSON): J-Mean" in out


def test_loader_processes_are_bounded_by_cores_and_work(capsys, monkeypatch):
    import utils.loading

    monkeypatch.setattr(utils.loading, "available_cores", lambda: 4)
    assert bounded_workers(2, 100, "--workers") == 2
    assert bounded_workers(1000, 18, "--workers") == 4
    assert "--workers 1000: using 4 loader processes (18 batches, 4 cores" in capsys.readouterr().err
    assert bounded_workers(8, 3, "--workers") == 3


def test_testing_and_demo_import_nothing_of_training():
    """run.py (which --test and --demo start from), evaluator.py, demo.py and the engine load no training code."""
    code = ("import sys\n"
            "for program in ('run', 'evaluator', 'demo', 'inference', 'api'):\n"
            "    __import__(program)\n"
            "print(sorted(m for m in sys.modules if m in ('trainer', 'utils.batches', 'utils.run_control',\n"
            "                                             'utils.epoch_figures')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
