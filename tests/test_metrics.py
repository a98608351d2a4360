import math

import numpy as np
import pytest

from utils.metrics import (
    FrameScore,
    boundary_radius,
    davis_summary,
    disk,
    f_measure,
    j_summary,
    jaccard,
    seg2bmap,
    sequence_statistics,
)


def test_jaccard_values():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert jaccard(a, b) == 1.0
    a[:2, :2] = True
    assert jaccard(a, b) == 0.0
    b[:2, :] = True
    assert jaccard(a, b) == pytest.approx(4 / 8)


def test_seg2bmap_by_hand():
    seg = np.zeros((4, 5), bool)
    seg[1:3, 1:3] = True
    expected = np.array([
        [1, 1, 1, 0, 0],
        [1, 0, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0],
    ], bool)
    assert np.array_equal(seg2bmap(seg), expected)
    assert not seg2bmap(np.ones((3, 3), bool)).any()
    border = np.zeros((3, 3), bool)
    border[2, 1] = True
    assert seg2bmap(border)[2].tolist() == [True, True, False]


def _toolkit_seg2bmap(seg):
    """The toolkit's construction, literally: shifted copies padded with background, then its edge rules."""
    seg = seg.astype(bool)
    e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    e[:, :-1], s[:-1, :], se[:-1, :-1] = seg[:, 1:], seg[1:, :], seg[1:, 1:]
    b = seg ^ e | seg ^ s | seg ^ se
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = 0
    return b


def test_seg2bmap_equals_the_toolkits_construction():
    rng = np.random.default_rng(3)
    for h, w in [(1, 1), (1, 7), (6, 1), (2, 2), (17, 23), (48, 64)]:
        for density in (0.0, 0.1, 0.5, 1.0):
            seg = (rng.random((h, w)) < density).astype(np.uint8) * 255
            assert np.array_equal(seg2bmap(seg), _toolkit_seg2bmap(seg)), (h, w, density)


def test_disk_matches_skimage_definition():
    assert disk(1).tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    d2 = disk(2)
    assert d2.shape == (5, 5) and d2.sum() == 13 and d2[0, 2] == 1 and d2[0, 1] == 0
    assert boundary_radius((480, 854)) == 8
    assert boundary_radius((480, 854), 3) == 3


def _brute_f(pred, gt, radius):
    """F by explicit distances: a boundary pixel matches if the other boundary has a pixel within radius."""
    bp, bg = np.argwhere(seg2bmap(pred)), np.argwhere(seg2bmap(gt))
    if len(bp) == 0 or len(bg) == 0:
        return None
    d = np.sqrt(((bp[:, None, :] - bg[None, :, :]) ** 2).sum(-1))
    precision = (d.min(1) <= radius).mean()
    recall = (d.min(0) <= radius).mean()
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


@pytest.mark.parametrize("seed", range(6))
def test_f_measure_equals_brute_force_on_random_blobs(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(17, 60, size=2)
    pred = rng.random((h // 4 + 1, w // 4 + 1)) > 0.6
    gt = rng.random((h // 4 + 1, w // 4 + 1)) > 0.6
    pred = np.kron(pred, np.ones((4, 4), bool))[:h, :w]  # blocky blobs, touching the border
    gt = np.kron(gt, np.ones((4, 4), bool))[:h, :w]
    expected = _brute_f(pred, gt, boundary_radius((h, w)))
    if expected is not None:
        assert f_measure(pred, gt) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(40))
def test_f_measure_on_the_boundary_window_equals_brute_force(seed):
    """F is computed on the window around both boundaries: small objects in large frames, at the borders or
    far apart, with relative and absolute tolerances, must give the full computation's value."""
    rng = np.random.default_rng(100 + seed)
    h, w = int(rng.integers(60, 160)), int(rng.integers(60, 240))
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.integers(-10, h + 10), rng.integers(-10, w + 10)
    masks = []
    for _ in range(2):
        ry, rx = rng.integers(2, 25, size=2)
        masks.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1)
        # The second object near the first (partly matching boundaries) or anywhere (none).
        cy, cx = (cy + rng.integers(-6, 7), cx + rng.integers(-6, 7)) if seed % 3 else \
            (rng.integers(-10, h + 10), rng.integers(-10, w + 10))
    bound = [0.008, 0.03, 2, 5][seed % 4]
    expected = _brute_f(*masks, boundary_radius((h, w), bound))
    if expected is not None:
        assert f_measure(*masks, bound_th=bound) == pytest.approx(expected, abs=1e-12)


def test_f_measure_empty_rules():
    empty = np.zeros((10, 12), bool)
    full = empty.copy()
    full[3:6, 3:8] = True
    assert f_measure(empty, empty) == 1.0
    assert f_measure(empty, full) == 0.0  # P=1, R=0
    assert f_measure(full, empty) == 0.0  # P=0, R=1
    assert f_measure(full, full) == 1.0
    far = np.zeros((200, 200), bool)
    far[:10, :10] = True
    other = np.zeros((200, 200), bool)
    other[150:, 150:] = True
    assert f_measure(far, other) == 0.0


def test_sequence_statistics_by_hand():
    values = [1.0, 1.0, 0.4, 0.2, 0.0, 0.0, 0.6, 0.6]
    mean, recall, decay = sequence_statistics(values)
    assert mean == pytest.approx(np.mean(values))
    assert recall == pytest.approx(4 / 8)
    # Bin edges: round(linspace(1, 8, 5) = [1, 2.75, 4.5, 6.25, 8]) - 1 = [0, 2, 4, 5, 7];
    # first bin values[0:3], last bin values[5:8].
    assert decay == pytest.approx(np.mean(values[0:3]) - np.mean(values[5:8]))
    assert math.isnan(sequence_statistics([float("nan")] * 4)[0])


def test_davis_summary_averages_sequences():
    scores = {"a": [FrameScore(i, True, False, j, f) for i, (j, f) in enumerate([(0.8, 0.6), (0.6, 0.4)])],
              "b": [FrameScore(i, True, False, 1.0, 1.0) for i in range(3)]}
    out = davis_summary(scores)
    assert out["sequences"]["a"]["J-Mean"] == pytest.approx(0.7)
    assert out["metrics"]["J-Mean"] == pytest.approx((0.7 + 1.0) / 2)
    assert out["metrics"]["F-Mean"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["metrics"]["J&F-Mean"] == pytest.approx(((0.7 + 1.0) / 2 + (0.5 + 1.0) / 2) / 2)
    assert out["metrics"]["J-Recall"] == pytest.approx(1.0)
    assert out["metrics"]["F-Recall"] == pytest.approx((0.5 + 1.0) / 2)  # a: F = [0.6, 0.4] -> 1 of 2 > 0.5


def test_j_summary_skips_empty_and_unannotated_and_averages_classes():
    scores = {
        "car/1": [FrameScore(0, True, False, 0.5), FrameScore(1, False, True, float("nan")),
                  FrameScore(2, True, True, 1.0)],
        "car/2": [FrameScore(0, True, False, 1.0)],
        "dog/1": [FrameScore(0, True, False, 0.2)],
    }
    out = j_summary(scores, {"car/1": "car", "car/2": "car", "dog/1": "dog"})
    assert out["sequences"] == {"car/1": 0.5, "car/2": 1.0, "dog/1": 0.2}
    assert out["classes"] == {"car": pytest.approx(0.75), "dog": pytest.approx(0.2)}
    assert out["metrics"]["J-Mean over classes"] == pytest.approx((0.75 + 0.2) / 2)
    assert out["metrics"]["J-Mean"] == pytest.approx((0.5 + 1.0 + 0.2) / 3)


def _toolkit_decay(values, edge_type):
    """db_statistics' Decay, with its bin edges cast to `edge_type` (the toolkit casts them to uint8)."""
    values = np.asarray(values, np.float64)
    ids = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(edge_type)
    bins = [values[ids[i]:ids[i + 1] + 1] for i in range(4)]
    return np.nanmean(bins[0]) - np.nanmean(bins[3])


@pytest.mark.parametrize("frames", [3, 50, 104, 255])
def test_decay_is_the_toolkits_up_to_255_frames(frames):
    values = np.random.default_rng(frames).random(frames)
    assert sequence_statistics(values)[2] == _toolkit_decay(values, np.uint8)


def test_decay_of_a_long_sequence_uses_its_own_quarters():
    """600 frames (Long-Videos' are thousands): the toolkit's uint8 edges wrap; the first quarter minus the last."""
    values = np.linspace(1.0, 0.0, 600)  # a steady decline: Decay is the mean of the first quarter minus the last
    decay = sequence_statistics(values)[2]
    assert decay == pytest.approx(np.mean(values[:151]) - np.mean(values[449:]))
    assert decay == pytest.approx(0.75, abs=0.01)
    with pytest.warns(RuntimeWarning, match="Mean of empty slice"):  # a wrapped edge leaves a quarter empty
        toolkit = _toolkit_decay(values, np.uint8)
    assert decay != pytest.approx(toolkit, abs=0.01)


def test_every_figure_of_a_j_dataset_names_its_protocol(toy_root):
    """FBMS-like sets: the authors' J, and J, F and J&F with the DAVIS rules on the annotated frames;
    YouTube-Objects also the mean over classes."""
    import evaluator
    from dataset import DATASETS, scan

    videos = scan(DATASETS["ytobj"], toy_root / "YTOBJ")
    scores = {v.key: [FrameScore(i, f.mask is not None, False, 0.5 if f.mask is not None else float("nan"),
                                 0.25 if f.mask is not None else float("nan")) for i, f in enumerate(v.frames)]
              for v in videos}
    scores[videos[0].key] = [FrameScore(0, True, False, 1.0, 1.0)]
    result = evaluator.summarise(DATASETS["ytobj"], videos, scores)
    metrics = result["metrics"]
    assert metrics["J-Mean"] == pytest.approx((1.0 + 0.5 * 10) / 11)
    assert metrics["J-Mean over classes"] == pytest.approx((0.75 + 0.5 * 9) / 10)
    assert metrics["J-Mean (DAVIS rules)"] == pytest.approx(metrics["J-Mean"])
    assert metrics["F-Mean (DAVIS rules)"] == pytest.approx((1.0 + 0.25 * 10) / 11)
    assert metrics["J&F-Mean (DAVIS rules)"] == pytest.approx((metrics["J-Mean"] + metrics["F-Mean (DAVIS rules)"]) / 2)
    assert set(result["protocols"]) == set(metrics)
    assert "authors" in result["protocols"]["J-Mean"] and "class means" in result["protocols"]["J-Mean over classes"]
    assert all("DAVIS rules" in result["protocols"][k] for k in metrics if k.endswith("(DAVIS rules)"))


def test_compare_puts_runs_side_by_side_with_protocols_and_recipe_differences(tmp_path, capsys):
    """Two test folders (one with test-time augmentation) and a training run: one row per figure and protocol,
    so figures of different protocols never share a row, and the recipe fields in which the runs differ."""
    import json

    from tests.conftest import run_main
    from tools import compare

    def test_folder(name, checkpoint, tta=""):
        protocols = {"J&F-Mean": "the DAVIS toolkit: every frame", "J-Mean": "the DAVIS toolkit: every frame"}
        if tta:
            protocols = {k: f"{v} [{tta}]" for k, v in protocols.items()}
        folder = tmp_path / name
        folder.mkdir()
        results = {"run": {"checkpoint": str(checkpoint)}, "datasets": {"davis": {
            "metrics": {"J&F-Mean": 0.5, "J-Mean": 0.6}, "protocols": protocols}}}
        (folder / "results.json").write_text(json.dumps(results))
        return folder

    for run, seed in (("a", 0), ("b", 3)):
        (tmp_path / run).mkdir()
        (tmp_path / run / "recipe.json").write_text(json.dumps({"seed": seed, "lr": 1e-5}))
        (tmp_path / run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "loss": 0.3, "iou": 0.7,
                                                                  "davis_jf": 0.4}) + "\n")
    plain = test_folder("plain", tmp_path / "a/best.pth")
    tta = test_folder("tta", tmp_path / "b/best.pth", tta="TTA scales 1 + flip")
    code, out, err = run_main(compare.main, plain, tta, tmp_path / "b", "--format", "csv", capsys=capsys)
    assert code in (0, None), err
    rows = {line.split(",")[0]: line.split(",")[1:] for line in out.strip().splitlines()}
    assert rows["recipe: seed"] == ["0", "3", "3"]
    assert "recipe: lr" not in rows  # the same in every run
    assert rows["davis J&F-Mean [toolkit]"] == ["0.5000", "-", "-"]
    assert rows["davis J&F-Mean [toolkit [TTA scales 1 + flip]]"] == ["-", "0.5000", "-"]
    assert rows["validation davis_jf (best) [toolkit]"] == ["-", "-", "0.4000"]
    code, out, _ = run_main(compare.main, plain, tta, "--format", "markdown", "--rows", capsys=capsys)
    assert out.splitlines()[1].startswith("|---|") and out.count("\n") == 4  # a header, its rule, a row per run
    code, _, err = run_main(compare.main, tmp_path / "nothing", capsys=capsys)
    assert code == 2 and "neither a --test output" in err
    before = (plain / "results.json").read_text()
    code, _, err = run_main(compare.main, plain, tta, "--out", plain / "results.json", capsys=capsys)
    assert code == 2 and "--out" in err and "lies inside the input folder" in err
    assert (plain / "results.json").read_text() == before
    with open(tmp_path / "b" / "metrics.jsonl", "a") as log:
        log.write('{"epoch": 2, "lo')  # a line cut short
    code, _, err = run_main(compare.main, tmp_path / "b", capsys=capsys)
    assert code == 2 and "metrics.jsonl is not a metrics log" in err and "line 2" in err
