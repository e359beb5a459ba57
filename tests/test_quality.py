"""Retrieval quality: the metric kernels of the benchmarks, and a small real UC Merced run.

The real run uses the shared data (``../shared/data/ucmerced-a``, no network):
a fixed subset of the scenes goes through the real pipeline (GeoTIFF mosaic ->
``dask_fp.ingest`` on a LocalCluster -> ``dask_fp.search`` / ``classify``) and
the test asserts properties a correct system has on it (pretrained features
beat a random-init network; relevance feedback beats one example; the
classifier beats nearest-neighbour search), never values pinned from an
earlier run. The full evaluation is ``bench/quality.py`` (docs/quality.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import quality_data as qd  # noqa: E402
import quality_metrics as qm  # noqa: E402
import quality_stores as q  # noqa: E402
import ucm_data as ud  # noqa: E402
import ucm_eval as ue  # noqa: E402
from conftest import textured, write_tif  # noqa: E402

# --------------------------------------------------------------------------- metrics


def test_colour_histogram_is_l1_normalised_joint_rgb():
    px = np.zeros((2, 4, 4, 3), np.uint8)
    px[0] = (255, 0, 0)
    px[1, :2] = (0, 0, 0)
    px[1, 2:] = (0, 255, 31)
    h = qm.colour_histogram(px)
    assert h.shape == (2, 512) and h.dtype == np.float32
    np.testing.assert_allclose(h.sum(axis=1), 1.0)
    assert h[0, 7 * 64] == 1.0  # r bin 7, g 0, b 0
    assert h[1, 0] == 0.5 and h[1, 7 * 8 + 0] == 0.5  # b = 31 falls in bin 0


def test_precision_ap_and_vote_on_hand_made_lists():
    ql = np.array([1, 2])
    hits = np.array([[1, 0, 1, 2, -1], [2, 2, 1, 1, 1]])
    np.testing.assert_allclose(qm.precision_at(ql, hits, 2), [0.5, 1.0])
    np.testing.assert_allclose(qm.precision_at(ql, hits, 5), [0.4, 0.4])
    # AP@5: query 0 hits at ranks 1 and 3 -> (1 + 2/3) / 2; query 1 at ranks 1, 2 -> 1.
    np.testing.assert_allclose(qm.average_precision(ql, hits, 5), [(1 + 2 / 3) / 2, 1.0])
    np.testing.assert_allclose(qm.average_precision(np.array([3]), hits[:1], 5), [0.0])
    # 5-NN: distractors skipped; tie 1-1 vs 2-2 goes to the label ranked first.
    assert qm.knn_vote(np.array([[0, 2, 1, 1, 2, 0, 3]]), 5).tolist() == [2]
    assert qm.knn_vote(np.array([[0, 0, -1]]), 5).tolist() == [0]
    assert qm.knn_vote(np.array([[3, 1, 1, 3, 1]]), 5).tolist() == [1]
    m = qm.label_metrics(ql, hits, k_map=5)
    assert m["queries"] == 2 and m["P@5"] == pytest.approx(0.4)
    assert qm.majority_rate(np.array([1, 1, 2])) == pytest.approx(2 / 3)


def test_far_hits_drops_the_neighbourhood():
    labels = np.array([[1, 1, 2]])
    xy = np.array([[[0.0, 10.0], [0.0, 500.0], [300.0, 0.0]]])
    far = qm.far_hits(labels, xy, np.array([[0.0, 0.0]]), 100.0, 3)
    np.testing.assert_array_equal(far, [[1, 2, -1]])


def test_recall_and_overlap_success():
    from dask_fp.tiling import overlap_fraction

    def ov(a, b, c, d):
        return overlap_fraction(a, b, c, d, tile=256, stride=128)

    s = qm.overlap_success(np.array([0, 0, 1, 0]), np.array([3, 4, 3, 5]), np.array([3, 3, 3, 3]), (0, 3, 3), ov)
    assert s.tolist() == [True, True, False, False]  # one step away overlaps by exactly 50 %
    succ = np.array([[False, True], [False, False]])
    assert qm.recall_at(succ, 1) == 0.0 and qm.recall_at(succ, 2) == 0.5


@pytest.mark.parametrize("kind", list(qm.PERTURBATIONS))
def test_perturbations_are_deterministic_and_keep_the_tile_size(kind):
    tile = np.moveaxis(textured(64, 64, seed=3), 0, -1).copy()
    shifted = np.roll(tile, 8, axis=(0, 1))
    a, suffix = qm.perturb(tile, kind, seed=5, shifted=shifted)
    b, _ = qm.perturb(tile, kind, seed=5, shifted=shifted)
    assert a == b and suffix == (".jpg" if kind.startswith("jpeg") else ".png")
    img = qm.decode(a)
    assert img.shape == tile.shape
    if kind == "none":
        np.testing.assert_array_equal(img, tile)
    elif kind == "rotate 90°":
        np.testing.assert_array_equal(img, np.rot90(tile))
    elif kind == "flip h":
        np.testing.assert_array_equal(img, tile[:, ::-1])
    else:
        assert not np.array_equal(img, tile)


def test_shift_origin_stays_inside():
    assert qm.shift_origin(0, 0, tile=256, height=512, width=512) == (32, 32)
    assert qm.shift_origin(256, 128, tile=256, height=512, width=512) == (224, 160)
    assert qm.shift_origin(0, 0, tile=256, height=256, width=300) == (0, 32)  # no room down: stays


def test_tile_labels_majority_and_purity():
    lab = np.zeros((64, 64), np.uint8)
    lab[:32, :32] = 1  # window (0, 0): all class 1
    lab[:32, 32:56] = 2  # window (0, 2): 24/32 = 75 % class 2 -> labelled
    lab[32:, :20] = 1  # window (2, 0): 62.5 % class 1 -> distractor
    lab[32:, 20:32] = 2
    wy, wx = np.array([0, 0, 2, 1]), np.array([0, 2, 0, 0])
    got = qd.tile_labels(lab, wy, wx, tile=32, stride=16, n_classes=2)
    # (1, 0) covers rows 16-47: 16 x 32 + 16 x 20 class-1 pixels = 81 % -> class 1.
    assert got.tolist() == [1, 2, 0, 1]
    lab[32:48, :20] = 0  # now 50 % class 1, 50 % unlabelled: unlabelled pixels count against purity
    assert qd.tile_labels(lab, wy, wx, tile=32, stride=16, n_classes=2).tolist() == [1, 2, 0, 0]


# --------------------------------------------------------------------------- stores


def test_float16_twin_equals_a_float16_ingest(tmp_path, client):
    """The evaluation's float16 store (float32 rows re-written by the store writer) is exactly
    what ``ingest(dtype="float16")`` writes, so it stands for it."""
    import dask_fp
    from dask_fp import ModelOptions, Tiling

    tif = write_tif(tmp_path / "t.tif", textured(64, 96, seed=4))
    m = ModelOptions("resnet18", weights="random", seed=0, device="cpu", threads=1)
    t = Tiling(32, 16, 0.5)
    kw = dict(model=m, tiling=t, client=client, progress=False, log=lambda s: None)
    dask_fp.ingest([str(tif)], str(tmp_path / "a.zarr"), **kw)
    dask_fp.ingest([str(tif)], str(tmp_path / "b.zarr"), dtype="float16", **kw)
    s32, s16 = dask_fp.open_store(tmp_path / "a.zarr"), dask_fp.open_store(tmp_path / "b.zarr")
    twin = q.float16_store(s32, tmp_path / "c.zarr")
    assert twin.committed == s16.committed == 15
    for name in ("fingerprint", "norm2", "uid", "x", "y"):
        np.testing.assert_array_equal(np.asarray(twin.arrays[name][:]), np.asarray(s16.arrays[name][:]))
    assert not twin.sources[0].keys() ^ s16.sources[0].keys()
    assert twin.attrs["dtype"] == "float16" and twin.attrs["weights_sha256"] == s32.attrs["weights_sha256"]
    # Baseline stores search like fingerprint stores: by uid, de-duplicated.
    px = q.store_pixels(s32)
    np.testing.assert_array_equal(px[0], np.moveaxis(textured(64, 96, seed=4), 0, -1)[:32, :32])
    hist = q.write_vector_store(s32, tmp_path / "h.zarr", qm.colour_histogram(px), name="hist",
                                normalisation="test")
    hits = dask_fp.search(hist, uids=[int(s32.coords()["uid"][0])], k=3)
    assert len(hits.table) == 3 and (hits.table["wy"] + hits.table["wx"] >= 2).all()


# --------------------------------------------------------------------------- UC Merced kernels


def test_full_ranking_metrics_on_hand_made_lists():
    ql = np.array([1, 2])
    ranked = np.array([[1, 2, 1, -1], [1, 1, 2, 2]])
    np.testing.assert_allclose(ue.precision_at(ql, ranked, 2), [0.5, 0.0])
    np.testing.assert_allclose(ue.precision_at(ql, ranked, 10), [0.2, 0.2])  # missing ranks count as wrong
    # AP over the full ranking, divided by all relevant items: query 0 finds 2 of 3 (ranks 1, 3).
    np.testing.assert_allclose(ue.average_precision(ql, ranked, np.array([3, 2])),
                               [(1 + 2 / 3) / 3, (1 / 3 + 2 / 4) / 2])
    np.testing.assert_allclose(ue.average_precision(ql[:1], ranked[:1], np.array([0])), [0.0])
    assert ue.knn_vote(np.array([[2, 1, 1, 2, 3, 1]]), 5).tolist() == [2]  # 2-2 tie: the first ranked
    assert ue.knn_vote(np.array([[3, 1, 1, 3, 1]]), 5).tolist() == [1]
    m = ue.summarise(ql, ranked, np.array([3, 2]))
    assert m["queries"] == 2 and m["P@10"] == pytest.approx(0.2) and m["5-NN acc"] == pytest.approx(0.5)


def test_ranked_matrix_drop_items_and_feedback_negatives():
    mat = ue.ranked_matrix(np.array([0, 0, 1]), np.array([1, 2, 1]), np.array([7, 3, 9]), 2)
    np.testing.assert_array_equal(mat, [[7, 3], [9, -1]])
    np.testing.assert_array_equal(ue.drop_items(np.array([[4, 5, 6, -1]]), [{5}]), [[4, 6, -1, -1]])
    row_labels = np.array([1, 1, 2, 2, 3, 1])
    ranked = np.array([[1, 2, 3, 4, 5], [0, 1, 5, -1, -1]])
    neg = ue.feedback_negatives(ranked, np.array([1, 1]), row_labels, n_neg=2)
    assert [n.tolist() for n in neg] == [[2, 3], []]  # the first wrong hits in rank order; none wrong


def test_mosaic_holds_each_scene_in_its_window(tmp_path):
    from PIL import Image

    root = tmp_path / "scenes"
    for cls, n in (("b", 2), ("a", 3)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            size = 250 if (cls, i) == ("a", 1) else 256  # an odd-sized scene is resized
            px = np.full((size, size, 3), 10 + 40 * i + (100 if cls == "b" else 0), np.uint8)
            Image.fromarray(px).save(root / cls / f"{cls}{i:02d}.png")
    scenes = ud.list_scenes(root)
    assert [(s.label, s.cls, s.path.name) for s in scenes][:2] == [(1, "a", "a00.png"), (1, "a", "a01.png")]
    m = ud.write_mosaic(scenes, tmp_path / "m.tif", columns=2)
    import rasterio

    with rasterio.open(m.path) as ds:
        img = ds.read()
        assert (ds.width, ds.height) == (512, 768) and ds.crs is None
    for i, s in enumerate(scenes):
        wy, wx = divmod(i, 2)
        np.testing.assert_array_equal(img[:, wy * 256:(wy + 1) * 256, wx * 256:(wx + 1) * 256],
                                      ud.read_scene(s.path).transpose(2, 0, 1))
        assert m.label_at(np.array([wy]), np.array([wx])).tolist() == [s.label]
    assert m.label_at(np.array([2, 5]), np.array([1, 0])).tolist() == [0, 0]  # the empty slot, outside
    assert ud.list_scenes(root, classes=["b"], per_class=1)[0].path.name == "b00.png"
    with pytest.raises(FileNotFoundError, match="no class folder"):
        ud.list_scenes(root, classes=["c"])


# --------------------------------------------------------------------------- the real pipeline

UCM = ud.DEFAULT_ROOT
#: A fixed subset: all 21 classes (chance P@10 stays low, as on the full set), the first 8
#: scenes of each. With 3 labelled tiles per query, 5 relevant tiles stay in every ranking, so
#: rows that label the same number of tiles share the same ceiling on P@10.
UCM_CLASSES = None
UCM_PER_CLASS = 8
UCM_LABELS = 3


@pytest.fixture(scope="module")
def ucm(tmp_path_factory, client):
    """The subset through the real pipeline: mosaic -> ingest (LocalCluster) -> search/classify."""
    import os

    import quality as qb

    if not UCM.is_dir():
        if os.environ.get("CI"):
            raise FileNotFoundError(f"{UCM}: the shared UC Merced scenes are missing")
        pytest.skip(f"{UCM}: the shared UC Merced scenes are not here")
    out = tmp_path_factory.mktemp("ucm")
    mosaic = ud.write_mosaic(ud.list_scenes(UCM, classes=UCM_CLASSES, per_class=UCM_PER_CLASS), out / "m.tif")
    ms = qb.methods(None)
    stores, labels = qb.build(mosaic, ms, out, client=client, threads=1, timings={})
    full = qb.Plan(queries_per_class=2, positives=(UCM_LABELS,), feedback_positives=UCM_LABELS,
                   feedback_negatives=UCM_LABELS, classifier_labels=(UCM_LABELS,))
    return {k: qb.evaluate(st, labels, full if k == "lite0" else qb.Plan(one_only=True)).results
            for k, st in stores.items()}


def test_pretrained_beats_random_init_and_the_histogram(ucm):
    p10 = {k: r["one"]["P@10"] for k, r in ucm.items()}
    assert p10["lite0"] >= 2 * p10["resnet18-random"], p10
    assert p10["lite0"] > p10["hist"], p10
    assert ucm["lite0"]["one"]["queries"] == 21 * UCM_PER_CLASS


def test_feedback_beats_one_example(ucm):
    r = ucm["lite0"]
    # the fair control: the one-example ranking with the same labelled tiles removed
    assert r[f"fb{UCM_LABELS}"]["P@10"] > r["one-same"]["P@10"], r
    assert r[f"fb{UCM_LABELS}"]["mAP"] > r["one-same"]["mAP"], r


def test_classifier_beats_nearest_neighbour_search(ucm):
    """With the same number of positives (3 of the class), and the other classes' labels as
    negatives, the classifier ranks better than the k-NN search of the combined positives."""
    r = ucm["lite0"]
    assert r[f"clf{UCM_LABELS}"]["P@10"] > r[f"pos{UCM_LABELS}"]["P@10"], r
    assert r[f"clf{UCM_LABELS}"]["mAP"] > r[f"pos{UCM_LABELS}"]["mAP"], r
