"""The documentation stays true: every pointer resolves, and every shell command of the README and docs/ that
can run on toy data runs, in a folder laid out as the commands expect (../DB/VOS, DepthFlow_mitb2.pth,
mit-b2.bin, ROOT/DUTS-TR, a video, a frame folder). Each command is run as written, with only the flags of
SHORTER appended so that it finishes in seconds (a few samples, a small size); a command that needs what
no test has (a GPU, the network, several machines, SLURM) is listed in NOT_RUN with why, so a new command
must be run or listed."""

import re
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, run_main

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Commands not run here, and why (matched by their start).
NOT_RUN = {
    "make test": "the suite itself",
    "make demo": "tests/test_demo.py runs the toy demo",
    "torchrun ": "several processes: tests/test_inference.py and test_careless_use.py run torchrun with two",
    "srun ": "SLURM",
    "export MASTER_": "SLURM",
    "python -m tools.archives fetch": "downloads: tests/test_archives.py serves archives from a local server",
    "python -m flow_synthesis --duts ROOT/DUTS-TR --out ROOT/DUTSv2 --depth-weights": "DPT-Hybrid on a CPU: "
        "tests/test_flow_synthesis.py runs DPT on random weights",
    "python -m flow_synthesis.video_flow --dataset davis": "RAFT over a dataset on a CPU: tests/test_flow_synthesis.py "
        "runs RAFT",
    "python -m tools.bench": "minutes: tests/test_fast_paths.py runs the benchmark at a small size",
    "tensorboard ": "a server",
}
# Flags appended so that a command finishes in seconds: few samples, a small internal size, one dataset.
SHORTER = {
    "python run.py --train --stage 1": ["--epochs", "1", "--size", "32", "--datasets", "ytvos:4", "--batch-size", "2"],
    "python run.py --train --stage 2": ["--epochs", "1", "--size", "32", "--datasets", "duts:2,davis_train:2",
                                        "--batch-size", "2"],
    "python run.py --test": ["--size", "32", "--datasets", "davis"],
    "python run.py --demo": ["--size", "32"],
}
# Programs, by how the docs start them.
PROGRAMS = {"python run.py": "run", "python evaluator.py": "evaluator", "python -m tools.archives": "tools.archives",
            "python -m tools.compare": "tools.compare", "python -m model.convert": "model.convert",
            "python -m flow_synthesis.video_flow": "flow_synthesis.video_flow",
            "python -m flow_synthesis": "flow_synthesis.__main__", "python -m tools.toydata": "tools.toydata",
            "python -m tools.export_onnx": "tools.export_onnx"}
# Commands whose success on toy data is an exit code of 1: the check finds toy sizes, not the published ones.
EXPECTED_CODES = {"python -m tools.archives check": 1}


def documented_commands() -> list[tuple[str, str]]:
    """(document, command) for every shell command in a ```bash block, continuation lines joined."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                if line and not line.startswith("#"):
                    found.append((doc.name, " ".join(line.split())))
    return found


def _phase(command: str) -> int:
    """Producers first: data and weights, then training, then tests and demos, then what reads their outputs."""
    order = (("--train", 1), ("--resume", 1), ("run.py --test", 2), ("--demo", 2), ("evaluator.py", 3),
             ("tools.compare", 3))
    return next((phase for key, phase in order if key in command), 0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder laid out as the documented commands expect, with toy data and random weights."""
    from model import DepthFlow, MiTEncoder
    from model.checkpoints import model_to_released
    from model.mit import convert
    from tools.toydata import generate

    top = tmp_path_factory.mktemp("docs")
    work = top / "work"
    generate(top / "DB/VOS", size=(64, 96), videos=2, frames=6)
    generate(work / "ROOT", size=(64, 96), videos=1, frames=4, datasets=("duts_tr",))
    torch.manual_seed(0)
    torch.save(model_to_released(DepthFlow("mitb0", size=512)), work / "DepthFlow_mitb2.pth")
    mit = MiTEncoder("mitb2").mit.state_dict()
    torch.save({f"segformer.encoder.{k}": v for k, v in convert(mit, "mitb2", "timm", "hf").items()},
               work / "mit-b2.bin")
    from torchvision.models.optical_flow import raft_large

    torch.save(raft_large(weights=None).state_dict(), work / "raft_large_C_T_SKHT_V2-ff5fadd5.pth")
    frames = work / "path/to/frames"
    frames.mkdir(parents=True)
    video = sorted((top / "DB/VOS/DAVIS/JPEGImages/480p/davis_00").glob("*.jpg"))[:4]
    for path in video:
        Image.open(path).save(frames / path.name)
    import cv2

    writer = cv2.VideoWriter(str(work / "my_video.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (96, 64))
    for path in video:
        writer.write(np.asarray(Image.open(path))[..., ::-1].copy())
    writer.release()
    (work / "my_depths").symlink_to(work / "ROOT/DUTS-TR/DUTS-TR-Depth")
    return work


def _program(command: str):
    import importlib

    start = next(p for p in sorted(PROGRAMS, key=len, reverse=True) if command.startswith(p + " "))
    return importlib.import_module(PROGRAMS[start]), shlex.split(command)[len(start.split()):]


@pytest.mark.slow
def test_every_documented_command_runs(world, capsys, monkeypatch):
    monkeypatch.chdir(world)
    commands = [(doc, c) for doc, c in documented_commands() if not any(c.startswith(k) for k in NOT_RUN)]
    unknown = [c for _, c in commands if not any(c.startswith(p + " ") for p in PROGRAMS)]
    assert not unknown, f"a documented command neither run here nor listed in NOT_RUN: {unknown[0]}"
    seen = set()
    for doc, command in sorted(commands, key=lambda dc: _phase(dc[1])):
        if command in seen:  # the same command in two documents
            continue
        seen.add(command)
        module, argv = _program(command)
        argv += next((extra for start, extra in SHORTER.items() if command.startswith(start)), [])
        code, out, err = run_main(module.main, *argv, capsys=capsys)
        want = next((c for start, c in EXPECTED_CODES.items() if command.startswith(start)), 0)
        assert code in (0, None) if want == 0 else code == want, f"{doc}: `{command}` exited {code}: {err[-800:]}"


@pytest.mark.slow
def test_the_python_example_runs(world, monkeypatch):
    """The README's Python example, run as written, with a frame and its flow image at hand."""
    monkeypatch.chdir(world)
    example = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    example = example.replace('"frames/"', '"path/to/frames"')  # the example's folder, laid out in this world
    frame = np.asarray(Image.open(sorted((world / "path/to/frames").glob("*.jpg"))[0]))
    flow = np.full_like(frame, 255)
    names = {"frame": frame, "flow": flow}
    exec(compile(example, "README.md", "exec"), names)
    assert names["mask"].shape == frame.shape[:2] and names["mask"].dtype == np.uint8


def test_every_pointer_resolves():
    """"README, 'Section'" and "docs/x.md, 'Section'" in code, help texts and errors, and the docs' links to files:
    each names a section or file that exists."""
    sections = {doc.relative_to(ROOT).as_posix(): {h.strip() for h in re.findall(r"^#+ (.+)$", doc.read_text(), re.M)}
                for doc in DOCS}
    sections["README"] = sections["README.md"]
    sources = [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and p.name != "test_docs.py"] + DOCS
    broken = []
    for source in sources:
        text = source.read_text()
        for doc, section in re.findall(r"(README|docs/[a-z_]+\.md),? '([^']+)'", text):
            if section not in sections.get(doc, ()):
                broken.append(f"{source.relative_to(ROOT)}: {doc}, '{section}'")
        for doc in re.findall(r"\b(docs/[a-z_]+\.md)", text):
            if not (ROOT / doc).is_file():
                broken.append(f"{source.relative_to(ROOT)}: {doc}")
        for link in re.findall(r"\]\(([^)#:]+\.md)\)", text):
            if not (source.parent / link).is_file():
                broken.append(f"{source.relative_to(ROOT)}: link {link}")
    assert not broken, broken
