"""Tests of ``dask_fp.classify``: a logistic regression on labelled tiles, scored over the store.

The oracle fits its own ``sklearn.linear_model.LogisticRegression`` (same
parameters) on the written fingerprints of the labelled rows and ranks every
row by ``decision_function`` (ties by row), with ``predict_proba`` as the
expected score.
"""

from __future__ import annotations

import dask
import numpy as np
import pytest
from shapely.geometry import box
from sklearn.linear_model import LogisticRegression

from dask_fp import classify
from dask_fp.kernels import knn_merge, score_chunk
from dask_fp.scan import ALL

try:
    from ._search_helpers import SourceSpec, build_store
except ImportError:  # tests/ is not a package
    from _search_helpers import SourceSpec, build_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """~3,300 rows in 53-row chunks; fingerprints from two clusters, so thousands score above 0.5."""
    rng = np.random.default_rng(31)
    grids = [(41, 49), (31, 45)]  # odd: (n + 1) * 32 px is a multiple of the 64 px tile
    specs = []
    for i, (ny, nx) in enumerate(grids):
        n = ny * nx
        centre = np.where(rng.random(n) < 0.45, 1.0, -1.0)[:, None]
        fp = (centre + rng.normal(0, 1.2, (n, 16))).astype(np.float32)
        crs = {} if i == 0 else {"crs": None, "transform": (1, 0, 0, 0, 1, 0)}
        specs.append(SourceSpec(shape=(ny * 32 + 32, nx * 32 + 32), fingerprints=fp, path=f"s{i}.tif", **crs))
    return build_store(tmp_path_factory.mktemp("classify") / "store", specs, dim=16, rows_per_chunk=53, seed=31)


def _labels(built, rng, n_pos=12, n_neg=20):
    fp = built.fingerprint
    pos_pool = np.flatnonzero(fp.mean(1) > 0.8)
    neg_pool = np.flatnonzero(fp.mean(1) < -0.8)
    return (sorted(rng.choice(pos_pool, n_pos, replace=False).tolist()),
            sorted(rng.choice(neg_pool, n_neg, replace=False).tolist()))


def _oracle(built, prow, nrow, *, C=1.0):
    fp = built.fingerprint.astype(np.float64)
    clf = LogisticRegression(C=C, class_weight="balanced", max_iter=1000)
    clf.fit(fp[prow + nrow], [1] * len(prow) + [0] * len(nrow))
    dec = clf.decision_function(fp)
    prob = clf.predict_proba(fp)[:, 1]
    allowed = np.ones(len(fp), bool)
    allowed[prow + nrow] = False
    return dec, prob, allowed


def test_score_chunk_and_merge_without_dask():
    rng = np.random.default_rng(0)
    n = 5000  # one block longer than SCORE_SLICE rows
    x = rng.normal(size=(n, 5)).astype(np.float32)
    coef, b = rng.normal(size=5), 0.3
    rows = np.arange(n) + 7
    s = x.astype(np.float64) @ coef + b
    for m, lo in [(9, None), (ALL, 0.5), (4, 1.0)]:
        parts = [score_chunk((x[a:c], rows[a:c, None]), coef=coef, intercept=b, m=m, min_logit=lo)
                 for a, c in [(0, 1), (1, 120), (120, n)]]
        neg, r = knn_merge(parts, m=m)
        keep = np.ones(n, bool) if lo is None else s >= lo
        order = np.lexsort((rows[keep], -s[keep]))[: min(m, keep.sum())]
        np.testing.assert_array_equal(r[0], rows[keep][order])
        np.testing.assert_allclose(-neg[0], s[keep][order], rtol=1e-12)


def test_top_k_matches_sklearn_on_local_cluster(client, store):
    st = store.open()
    prow, nrow = _labels(store, np.random.default_rng(1))
    uid = store.cols["uid"]
    with dask.config.set(scheduler=client):
        hits = classify(st, positives=[int(uid[r]) for r in prow], negatives=[int(uid[r]) for r in nrow],
                        k=25, split_every=3)
    dec, prob, allowed = _oracle(store, prow, nrow)
    rows = np.flatnonzero(allowed)
    order = rows[np.lexsort((rows, -dec[rows]))][:25]
    t = hits.table
    assert hits.rank_by == "score" and t["distance"].isna().all()
    np.testing.assert_array_equal(t["row"], order)
    np.testing.assert_allclose(t["score"], prob[order], rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(t["uid"], uid[order])
    assert list(t["rank"]) == list(range(1, 26))
    assert t["label"].iloc[0] == "classifier: 12 positives, 20 negatives"
    np.testing.assert_allclose(hits.classifier.coef_, LogisticRegression(class_weight="balanced", max_iter=1000)
                               .fit(store.fingerprint[prow + nrow].astype(np.float64),
                                    [1] * 12 + [0] * 20).coef_, rtol=1e-6)


@pytest.mark.parametrize("threshold", [0.5, 0.97])
def test_threshold_returns_every_tile_above_it(client, store, threshold):
    st = store.open()
    prow, nrow = _labels(store, np.random.default_rng(2))
    uid = store.cols["uid"]
    with dask.config.set(scheduler=client):
        hits = classify(st, positives=[int(uid[r]) for r in prow], negatives=[int(uid[r]) for r in nrow],
                        threshold=threshold)
    dec, prob, allowed = _oracle(store, prow, nrow)
    near = np.abs(prob - threshold) < 1e-9  # float rounding may put these on either side
    exp = set(np.flatnonzero(allowed & (prob >= threshold) & ~near).tolist())
    got = set(hits.table["row"].tolist())
    assert exp <= got <= exp | set(np.flatnonzero(near).tolist())
    if threshold == 0.5:
        assert len(got) > 1000  # thousands of hits come back whole
    s = hits.table["score"].to_numpy()
    assert (s >= threshold).all() and (np.diff(s) <= 0).all()


def test_classifier_with_area_and_pictures_of_points(store):
    st = store.open()
    prow, nrow = _labels(store, np.random.default_rng(3))
    prow = [r for r in prow if store.cols["source"][r] == 0][:6]
    nrow = [r for r in nrow if store.cols["source"][r] == 0][:6]
    lon, lat = store.cols["lon"], store.cols["lat"]
    pts = [(float(lon[r]), float(lat[r])) for r in prow]  # positives given as lon/lat points
    a = np.flatnonzero(store.cols["source"] == 0)
    bbox = (float(np.quantile(lon[a], 0.25)), float(np.quantile(lat[a], 0.25)), float(np.quantile(lon[a], 0.75)),
            float(np.quantile(lat[a], 0.75)))
    hits = classify(st, positives=pts, negatives=[int(store.cols["uid"][r]) for r in nrow], k=30, area=bbox)
    dec, prob, allowed = _oracle(store, prow, nrow)
    g = box(*bbox)
    from shapely.geometry import Point

    allowed &= np.array([Point(x, y).intersects(g) if np.isfinite(x) else False for x, y in zip(lon, lat,
                                                                                                 strict=True)])
    rows = np.flatnonzero(allowed)
    order = rows[np.lexsort((rows, -dec[rows]))][:30]
    np.testing.assert_array_equal(hits.table["row"], order)


def test_streamed_and_persisted_stores_score_alike(client, store):
    """classify streams a store from Zarr (``stream_score``), or scores a persisted one in memory
    (``score_pass``): both equal the sklearn oracle, with an area filter too."""
    from dask_fp.scan import stream_score

    prow, nrow = _labels(store, np.random.default_rng(4))
    uid = store.cols["uid"]
    kw = dict(positives=[int(uid[r]) for r in prow], negatives=[int(uid[r]) for r in nrow])
    lon, lat = store.cols["lon"], store.cols["lat"]
    a = np.flatnonzero(store.cols["source"] == 0)
    bbox = (float(lon[a].min()), float(np.median(lat[a])), float(lon[a].max()), float(lat[a].max()))
    dec, prob, allowed = _oracle(store, prow, nrow)
    from shapely.geometry import Point

    in_box = np.array([bool(np.isfinite(x) and Point(x, y).intersects(box(*bbox))) for x, y in zip(lon, lat,
                                                                                                   strict=True)])
    with dask.config.set(scheduler=client):
        streamed = store.open()
        persisted = store.open().persist()
        for st in (streamed, persisted):
            assert st.persisted is (st is persisted)
            top = classify(st, k=40, split_every=2, **kw)
            rows = np.flatnonzero(allowed)
            np.testing.assert_array_equal(top.table["row"], rows[np.lexsort((rows, -dec[rows]))][:40])
            inside = classify(st, threshold=0.5, area=bbox, **kw)
            near = np.abs(prob - 0.5) < 1e-9
            exp = set(np.flatnonzero(allowed & in_box & (prob >= 0.5) & ~near).tolist())
            assert exp <= set(inside.table["row"].tolist()) <= exp | set(np.flatnonzero(near).tolist())
            assert len(exp) > 100
        # the streamed pass alone, one Zarr chunk per read, every row (labelled ones too)
        clf = top.classifier
        s, r = stream_score(streamed, clf.coef_[0], float(clf.intercept_[0]), k=25, step_bytes=1)
        every = np.arange(len(dec))
        np.testing.assert_array_equal(r, every[np.lexsort((every, -dec))][:25])
        np.testing.assert_allclose(s, dec[r], rtol=1e-9)
