"""The README's downloads and the data root: fetch them, unpack them, check them.

    python -m tools.archives list                              # every file this knows, and where it goes
    python -m tools.archives fetch davis fbms depthflow-mitb2  # into the cache; datasets unpacked in --data-root
    python -m tools.archives check [--data-root ../DB/VOS]     # each dataset's layout, annotation and size

`fetch` downloads with gdown (Google Drive's confirmation pages and quotas, resumed transfers over HTTP
Range, for Drive and plain URLs alike), records each file's size and SHA-256 in `downloads.json` beside
it, checks the SHA-256 prefix a file's published name carries (DPT's, RAFT's), and unpacks a dataset
archive into DATA_ROOT/<its folder> in the documented layout (docs/data.md), wherever the archive keeps it
inside. It never writes over a file or folder it did not make: a second fetch of the same file is a
no-op, an interrupted one resumes. `--mirror URL` fetches every file as URL/<file name> instead (a lab's
copy, or the tests' local server).

`check` reads every dataset folder under the data root and says in one line each what is wrong, or what
it holds: videos, frames, mask files and annotated frames, the form of a sparse annotation (a blank mask
for every frame without annotation, only the annotated frames kept, or masks on some frames), and the
counts set against each dataset's published size where one is published (docs/data.md cites them).
"""

import argparse
import os
import shutil
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dataset import DATASETS, DEFAULT_DATA_ROOT, DatasetSpec, Video, annotation_form, dataset_root, scan
from utils.background import map_in_threads
from utils.device import default_workers
from utils.errors import ArgumentParser, UserError, cli_entry
from utils.io import file_digest_sha256, read_json, read_rgb, write_json_atomic
from utils.palette import read_mask
from utils.progress import progress

CACHE = Path(os.environ.get("DEPTHFLOW_CACHE", Path.home() / ".cache" / "depthflow"))
MANIFEST = "downloads.json"  # beside the downloaded files: what was fetched, its size and SHA-256
UNPACKED = ".depthflow-unpacked.json"  # inside a dataset folder that `fetch` unpacked


@dataclass(frozen=True)
class Download:
    name: str
    title: str
    source: str  # "drive:<file id>" or an https URL
    file: str  # the file's name once fetched
    kind: str  # "weights", "results" (masks to score) or "dataset" (unpacked into the data root)
    folder: str = ""  # a dataset's folder under the data root (DatasetSpec.folder)
    sha256_prefix: str = ""  # the hash prefix the file's published name carries, checked when given
    terms: str = "the authors' terms: non-commercial research only"

    @property
    def url(self) -> str:
        return f"https://drive.google.com/uc?id={self.source[6:]}" if self.source.startswith("drive:") else self.source


def _drive(name, title, file_id, file, kind, folder=""):
    return Download(name, title, f"drive:{file_id}", file, kind, folder)


_HF = "https://huggingface.co"
# The authors' released models, MiT-B0, B1 and B2, by their Google Drive file ids.
RELEASED_MODELS = {
    "DepthFlow": ("1nu3qcU2Ot8Ly-5RPGBkYBMIW3Y6l6_wm", "1rJGP4a_AwD4OHzx7CaVt2_fctGtwWoA5",
                  "1StngTtpxtR10-RP2OxtYpZTs3SdePJua"),
    "FakeFlow": ("1FFz9buCu5XCl1LUpwwIUZJNvcAH4V_QG", "1DhNsNoF2borozWU5JbrJHIixUoW4hs-Y",
                 "1GYAlCt97kcNjtcXoZUGkhIQXgovwV0fz"),
}
DOWNLOADS = {d.name: d for d in [
    *[_drive(f"{name.lower()}-mitb{i}", f"{name} MiT-B{i}", file_id, f"{name}_mitb{i}.pth", "weights")
      for name, ids in RELEASED_MODELS.items() for i, file_id in enumerate(ids)],
    _drive("depthflow-results", "DepthFlow pre-computed masks", "1Umb5rGtVir8PwHsuFumYIkv49ALcE1Cl",
           "DepthFlow_results.zip", "results"),
    _drive("fakeflow-results", "FakeFlow pre-computed masks", "1OiIaVPf51kqAzGYqFtFl8lLsw-yuY5fi",
           "FakeFlow_results.zip", "results"),
    _drive("dutsv2", "DUTSv2 (images, synthetic flows, masks)", "1P8_USG8CWlpWm5UEcfXgXdr3IYQnhAvi", "DUTSv2.zip",
           "dataset", "DUTSv2"),
    _drive("davis", "DAVIS 2016 (frames, RAFT flows, masks)", "1kx-Cs5qQU99dszJQJOGKNb-wD_090q6c", "DAVIS.zip",
           "dataset", "DAVIS"),
    _drive("fbms", "FBMS (frames, RAFT flows, masks)", "1Zgt5ouwFeTpMTemfNeEFz7uEUo77e2ml", "FBMS.zip", "dataset",
           "FBMS"),
    _drive("ytobj", "YouTube-Objects (frames, RAFT flows, masks)", "1t_eeHXJ30TWBNmMzE7vfS0izEafiBfgn", "YTOBJ.zip",
           "dataset", "YTOBJ"),
    _drive("lvid", "Long-Videos (frames, RAFT flows, masks)", "1gZm1QBT_6JmHhphNrxuSztcqkm_eI6Sq", "LVID.zip",
           "dataset", "LVID"),
    Download("dpt-hybrid", "DPT-Hybrid depth (the paper's)",
             "https://github.com/isl-org/DPT/releases/download/1_0/dpt_hybrid-midas-501f0c75.pt",
             "dpt_hybrid-midas-501f0c75.pt", "weights", sha256_prefix="501f0c75", terms="MIT licence"),
    Download("dpt-large", "DPT-Large depth", "https://github.com/isl-org/DPT/releases/download/1_0/"
             "dpt_large-midas-2f21e586.pt", "dpt_large-midas-2f21e586.pt", "weights", sha256_prefix="2f21e586",
             terms="MIT licence"),
    Download("depth-anything-v2-small", "Depth Anything V2 Small",
             f"{_HF}/depth-anything/Depth-Anything-V2-Small/resolve/main/depth_anything_v2_vits.pth",
             "depth_anything_v2_vits.pth", "weights", terms="Apache-2.0"),
    Download("depth-anything-v2-base", "Depth Anything V2 Base",
             f"{_HF}/depth-anything/Depth-Anything-V2-Base/resolve/main/depth_anything_v2_vitb.pth",
             "depth_anything_v2_vitb.pth", "weights", terms="CC-BY-NC-4.0"),
    Download("depth-anything-v2-large", "Depth Anything V2 Large",
             f"{_HF}/depth-anything/Depth-Anything-V2-Large/resolve/main/depth_anything_v2_vitl.pth",
             "depth_anything_v2_vitl.pth", "weights", terms="CC-BY-NC-4.0"),
    Download("raft-large", "RAFT-Large (torchvision, C+T+S+K+H)",
             "https://download.pytorch.org/models/raft_large_C_T_SKHT_V2-ff5fadd5.pth",
             "raft_large_C_T_SKHT_V2-ff5fadd5.pth", "weights", sha256_prefix="ff5fadd5", terms="BSD-3-Clause"),
    *[Download(f"mit-b{i}", f"ImageNet MiT-B{i} (nvidia/mit-b{i})", f"{_HF}/nvidia/mit-b{i}/resolve/main/"
               "pytorch_model.bin", f"mit-b{i}.bin", "weights", terms="NVIDIA SegFormer licence (non-commercial)")
      for i in range(3)],
]}


def _manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    return read_json(path) if path.is_file() else {}


def fetch_file(item: Download, folder: Path, mirror: str | None = None) -> Path:
    """The item's file in `folder`, downloaded unless the manifest shows it is already there whole."""
    import gdown  # imported here: only fetching needs it

    folder.mkdir(parents=True, exist_ok=True)
    path, manifest = folder / item.file, _manifest(folder)
    record = manifest.get(item.file)
    if path.exists() or path.is_symlink():
        if record is None or path.is_symlink():
            raise UserError(f"{path} exists and was not fetched by this command; move it away, or fetch into "
                            "another folder with --to")
        if path.stat().st_size == record["size"]:
            print(f"{item.name}: {path} is here ({record['size']} bytes, SHA-256 {record['sha256'][:12]}...)")
            return path
        raise UserError(f"{path} is {path.stat().st_size} bytes, not the {record['size']} recorded in "
                        f"{folder / MANIFEST}; it was changed since: move it away to fetch it again")
    url = f"{mirror.rstrip('/')}/{item.file}" if mirror else item.url
    print(f"{item.name}: fetching {url} -> {path} ({item.terms})", flush=True)
    with progress(None, item.name, unit="byte") as bar:
        done = [0]

        def advance(total_done, total):
            bar.total = total
            bar.update(total_done - done[0])
            done[0] = total_done

        try:
            gdown.download(url, str(path), quiet=True, resume=True, progress=advance, retries=3)
        except Exception as err:  # gdown and requests report network trouble with many types
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(f"{item.name}: download from {url} failed ({reason}); run the same command again to "
                            "resume it") from None
    sha = file_digest_sha256(path)  # the whole file, also the part an earlier run fetched
    if item.sha256_prefix and not sha.startswith(item.sha256_prefix):
        bad = path.with_name(path.name + ".bad")
        path.replace(bad)
        raise UserError(f"{item.name}: {bad} has SHA-256 {sha[:12]}..., not the {item.sha256_prefix}... its published "
                        "name carries (a wrong or damaged file; it was kept aside)")
    manifest = _manifest(folder)
    manifest[item.file] = {"name": item.name, "url": url, "size": path.stat().st_size, "sha256": sha,
                           "fetched": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json_atomic(manifest, folder / MANIFEST)
    return path


def _safe_members(archive: Path) -> None:
    """Stop before unpacking an archive whose members would land outside the folder it is unpacked in."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            names = z.namelist()
    elif not tarfile.is_tarfile(archive):
        raise UserError(f"{archive} is neither a zip nor a tar archive (a partial or wrong download? delete it and "
                        "its entry in downloads.json to fetch it again)")
    else:
        with tarfile.open(archive) as t:
            names = [m.name for m in t.getmembers()]
            if bad := next((m.name for m in t.getmembers() if m.issym() or m.islnk() or m.isdev()), None):
                raise UserError(f"{archive} holds a link or device ({bad}); refusing to unpack it")
    for name in names:
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts:
            raise UserError(f"{archive} holds {name!r}, which would land outside the folder; refusing to unpack it")


def _unpack(archive: Path, into: Path) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            z.extractall(into)
    else:
        with tarfile.open(archive) as t:
            t.extractall(into, filter="data")


def _layout_root(top: Path, specs: list[DatasetSpec]) -> Path | None:
    """The folder inside an unpacked archive that holds a dataset's layout (its images folder), at most three
    levels down: archives differ in how many folders they wrap it in."""
    candidates = [top] + [p for depth in ("*", "*/*", "*/*/*") for p in sorted(top.glob(depth)) if p.is_dir()]
    return next((c for c in candidates if all((c / s.images).is_dir() for s in specs)), None)


def unpack_dataset(item: Download, archive: Path, data_root: Path, overwrite: bool) -> Path:
    """Unpack a dataset archive into data_root/<folder> in the documented layout; never over data it did not
    make (`overwrite` replaces only a folder that this command unpacked)."""
    target = data_root / item.folder
    sha = _manifest(archive.parent).get(archive.name, {}).get("sha256") or file_digest_sha256(archive)
    if target.exists() or target.is_symlink():
        record = target / UNPACKED
        if not record.is_file() or target.is_symlink():
            raise UserError(f"{target} exists and was not unpacked by this command; move it away, or pass another "
                            "--data-root")
        if read_json(record).get("sha256") == sha:
            print(f"{item.name}: {target} is unpacked from this archive already")
            return target
        if not overwrite:
            raise UserError(f"{target} was unpacked from another archive; pass --overwrite to replace it")
        shutil.rmtree(target)
    specs = [s for s in DATASETS.values() if s.folder == item.folder]
    _safe_members(archive)
    data_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{item.folder}.unpacking.", dir=data_root))
    try:
        print(f"{item.name}: unpacking {archive} into {target}", flush=True)
        _unpack(archive, staging)
        found = _layout_root(staging, specs)
        if found is None:
            wanted = ", ".join(f"{s.folder}/{s.images}" for s in specs)
            raise UserError(f"{archive} does not hold the {item.title} layout (no {wanted} in it; docs/data.md)")
        found.rename(target)
        write_json_atomic({"archive": str(archive), "sha256": sha, "unpacked": time.strftime("%Y-%m-%dT%H:%M:%S")},
                          target / UNPACKED)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def unpack_results(item: Download, archive: Path, overwrite: bool) -> Path:
    """Pre-computed masks, unpacked beside their archive in a folder of their own."""
    target = archive.with_suffix("")
    if target.exists() or target.is_symlink():
        if not (target / UNPACKED).is_file() or target.is_symlink():
            raise UserError(f"{target} exists and was not unpacked by this command; move it away")
        if not overwrite:
            print(f"{item.name}: {target} is unpacked already")
            return target
        shutil.rmtree(target)
    _safe_members(archive)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.unpacking.", dir=archive.parent))
    try:
        _unpack(archive, staging)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_json_atomic({"archive": str(archive)}, target / UNPACKED)
    print(f"{item.name}: masks in {target} (score them with evaluator.py --results {target}/<dataset folder>)")
    return target


# ---- check -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Published:
    videos: int | None = None
    frames: int | None = None
    source: str = ""


# Published sizes, each with its source (docs/data.md); a count no source gives is not checked.
PUBLISHED = {
    "davis": Published(20, 1376, "DAVIS 2016 val (Perazzi et al., CVPR 2016; its val split)"),
    "davis_train": Published(30, 2079, "DAVIS 2016 train (Perazzi et al., CVPR 2016: 50 videos, 3,455 frames, "
                                       "of which val holds 20 and 1,376)"),
    "fbms": Published(30, None, "FBMS-59 test (Ochs, Malik and Brox, TPAMI 2014: 29 training and 30 test videos)"),
    "ytobj": Published(126, None, "YouTube-Objects (Jain and Grauman, ECCV 2014: 126 annotated videos)"),
    "lvid": Published(3, None, "Long-Videos (Liang et al., NeurIPS 2020: 3 videos)"),
    "ytvos": Published(3471, None, "YouTube-VOS 2018 train (Xu et al., ECCV 2018: 3,471 training videos)"),
}


def _annotated(job) -> tuple[int, int]:
    spec, video = job
    masks = [f for f in video.frames if f.mask is not None]
    return len(masks), sum(bool(read_mask(f.mask, spec.mask_rule).any()) for f in masks)


def _flow_copies_frames(videos: list[Video]) -> str | None:
    """The first video whose first flow image is its frame (a JPEGFlows made by copying or linking frames)."""
    for video in videos:
        first = video.frames[0]
        image, flow = read_rgb(first.image), read_rgb(first.flow)
        if image.shape == flow.shape and np.array_equal(image, flow):
            return video.key
    return None


def check_dataset(spec: DatasetSpec, root: Path, workers: int) -> tuple[bool, str]:
    """(fine, one line) for one dataset folder."""
    try:
        videos = scan(spec, root)
    except UserError as err:
        return False, str(err)
    if copied := _flow_copies_frames(videos):
        return False, f"{spec.title}: the flow image of {copied}'s first frame is the frame itself (JPEGFlows " \
                      "holds copies of the frames, not flows)"
    jobs = [(spec, v) for v in videos]
    counts = list(map_in_threads(_annotated, jobs, workers, backlog=2 * workers))
    frames = sum(len(v.frames) for v in videos)
    masks, annotated = sum(c[0] for c in counts), sum(c[1] for c in counts)
    form = annotation_form(frames, masks, masks - annotated) if spec.sparse else "a mask for every frame"
    line = f"{spec.title}: {len(videos)} videos, {frames} frames, {form}, {annotated} with an object"
    published = PUBLISHED.get(spec.name)
    wrong = []
    if published and published.videos is not None and len(videos) != published.videos:
        wrong.append(f"{published.videos} videos")
    if published and published.frames is not None and frames != published.frames:
        wrong.append(f"{published.frames} frames")
    if wrong:
        return False, f"{line}; expected {' and '.join(wrong)}: {published.source}"
    if published:
        return True, f"{line}: as published ({published.source})"
    return True, f"{line} (no published size to check)"


def check(data_root, names, overrides: dict | None = None, workers: int = 4) -> bool:
    overrides = overrides or {}
    fine = True
    for name in names:
        spec = DATASETS[name]
        ok, line = check_dataset(spec, dataset_root(spec, data_root, overrides.get(name)), workers)
        print(("ok    " if ok else "WRONG ") + line, flush=True)
        fine &= ok
    return fine


@cli_entry
def main(argv=None):
    parser = ArgumentParser(prog="python -m tools.archives", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every file this knows")
    fetch = commands.add_parser("fetch", help="download (and unpack) files by name")
    fetch.add_argument("names", nargs="+", help="names from `list`; 'datasets' for all five archives")
    fetch.add_argument("--to", type=Path, default=CACHE, help=f"folder for the downloaded files (default {CACHE}, "
                                                              "or $DEPTHFLOW_CACHE)")
    fetch.add_argument("--data-root", type=Path, default=Path(DEFAULT_DATA_ROOT),
                       help=f"where dataset archives are unpacked (default {DEFAULT_DATA_ROOT})")
    fetch.add_argument("--mirror", help="fetch every file as MIRROR/<file name> instead of its source")
    fetch.add_argument("--overwrite", action="store_true", help="replace a folder this command unpacked before")
    checker = commands.add_parser("check", help="check the datasets under a data root")
    checker.add_argument("--data-root", default=DEFAULT_DATA_ROOT, help=f"default {DEFAULT_DATA_ROOT}")
    checker.add_argument("--datasets", help=f"comma-separated subset of {','.join(DATASETS)} (default: every "
                                            "dataset whose folder exists)")
    checker.add_argument("--workers", type=int, default=default_workers(), help="threads reading masks")
    args = parser.parse_args(argv)
    if args.command == "list":
        for item in DOWNLOADS.values():
            where = f"-> DATA_ROOT/{item.folder}" if item.kind == "dataset" else f"({item.kind})"
            print(f"{item.name:26} {item.file:40} {where}  [{item.terms}]")
        return
    if args.command == "fetch":
        names = [n for name in args.names for n in ([d for d, i in DOWNLOADS.items() if i.kind == "dataset"]
                                                     if name == "datasets" else [name])]
        if unknown := [n for n in names if n not in DOWNLOADS]:
            raise UserError(f"unknown download {unknown[0]!r}; `python -m tools.archives list` names them")
        fine = True
        for name in names:
            item = DOWNLOADS[name]
            path = fetch_file(item, args.to, args.mirror)
            if item.kind == "dataset":
                target = unpack_dataset(item, path, args.data_root, args.overwrite)
                specs = [n for n, s in DATASETS.items() if s.folder == item.folder]
                fine &= check(args.data_root, specs, {n: target for n in specs})
            elif item.kind == "results":
                unpack_results(item, path, args.overwrite)
        if not fine:
            sys.exit(1)
        return
    names = [n.strip() for n in args.datasets.split(",")] if args.datasets else \
        [n for n, s in DATASETS.items() if (Path(args.data_root) / s.folder).exists()]
    if unknown := [n for n in names if n not in DATASETS]:
        raise UserError(f"unknown dataset {unknown[0]!r}; expected names from {', '.join(DATASETS)}")
    if not names:
        folders = ", ".join(sorted({s.folder for s in DATASETS.values()}))
        raise UserError(f"no dataset folder under {args.data_root} (expected one of {folders})")
    if not check(args.data_root, names, workers=max(1, args.workers)):
        sys.exit(1)


if __name__ == "__main__":
    main()
