"""Tests of ``dask_fp.search``: the top-k kernels, the Dask reduction, queries, de-duplication.

Every result is checked against a numpy brute force sorted by (distance, row).
Integer-valued (and coarse dyadic float16) data make the float32 arithmetic of
the code under test exact, so ties happen and must be broken by row exactly
as the brute force does.
"""

from __future__ import annotations

import os
import shutil

import dask
import dask.array as da
import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from dask_fp.classify import classify
from dask_fp.errors import QueryError
from dask_fp.kernels import candidates_needed, dedup_mask, knn_chunk, knn_merge, top_m
from dask_fp.scan import knn
from dask_fp.search import Query, search
from dask_fp.store import open_store, open_writer
from dask_fp.tiling import Tiling, grid_shape, make_uid, windows_overlap

try:
    from ._search_helpers import (
        UTM17_TRANSFORM,
        SourceSpec,
        brute_knn,
        build_store,
        ranked,
        settings,
        write_geotiff,
    )
except ImportError:  # tests/ is not a package
    from _search_helpers import (
        UTM17_TRANSFORM,
        SourceSpec,
        brute_knn,
        build_store,
        ranked,
        settings,
        write_geotiff,
    )

SYNC = {"scheduler": "sync"}

# --------------------------------------------------------------------------- strategies


def _values(rng: np.random.Generator, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """Small values whose float32 distances are exact (so ties are exact)."""
    if kind == "int":
        return rng.integers(0, 4, shape).astype(np.float32)
    # float16 values on a 1/8 grid in [-4, 4]: exact in float16, and every
    # product and sum the kernels form is exact in float32.
    return (rng.integers(-32, 33, shape) / 8).astype(np.float16)


@st.composite
def problems(draw, kinds=("int", "f16")):
    """(x, queries, k, rng): N 1..300, D 1..16, Q 1..5, k from 1 to beyond N."""
    n = draw(st.integers(1, 300))
    d = draw(st.integers(1, 16))
    q = draw(st.integers(1, 5))
    k = draw(st.one_of(st.just(1), st.integers(1, n), st.integers(n + 1, n + 20)))
    kind = draw(st.sampled_from(kinds))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = _values(rng, kind, (n, d))
    qs = _values(rng, kind, (q, d))
    copy = rng.random(q) < 0.5  # some queries are stored rows: distance-0 hits and ties
    qs[copy] = x[rng.integers(0, n, int(copy.sum()))]
    return x, qs, k, rng


def _norm2(x: np.ndarray) -> np.ndarray:
    """Squared norms as the store computes them (float32 of the stored values)."""
    x32 = x.astype(np.float32)
    return np.einsum("ij,ij->i", x32, x32)


def _split(n: int, rng: np.random.Generator, most: int = 40) -> list[int]:
    """Random chunk sizes (>= 1 each) that add up to ``n``."""
    pieces = int(rng.integers(1, min(n, most) + 1))
    cuts = np.sort(rng.choice(np.arange(1, n), size=pieces - 1, replace=False))
    bounds = [0, *[int(c) for c in cuts], n]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _chunk(x: np.ndarray, qs: np.ndarray, rows: np.ndarray, m: int, columns: bool = True):
    q32 = qs.astype(np.float32)
    n2 = _norm2(x)
    if columns:  # as the reduction hands the block over: norm2 and rows as (n, 1)
        return knn_chunk((x, n2[:, None], rows[:, None]), q=q32, qnorm2=_norm2(q32), m=m)
    return knn_chunk((x, n2, rows), q=q32, qnorm2=_norm2(q32), m=m)


def _nest(parts: list, rng: np.random.Generator) -> list:
    """Random nesting of a list of parts (dask hands combine nested lists)."""
    if len(parts) <= 2 or rng.random() < 0.3:
        return list(parts)
    cut = int(rng.integers(1, len(parts)))
    return [_nest(parts[:cut], rng), *_nest(parts[cut:], rng)]


# --------------------------------------------------------------------------- kernels


@st.composite
def distance_tables(draw):
    q = draw(st.integers(1, 5))
    n = draw(st.integers(0, 300))
    m = draw(st.one_of(st.just(1), st.integers(1, max(1, n)), st.integers(n, n + 10)))
    m = max(m, 1)
    levels = draw(st.sampled_from([1, 2, 3, 50, 10**6]))  # 1: every distance ties
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dist = rng.integers(0, levels, (q, n)).astype(np.float32)
    per_query_rows = draw(st.booleans())
    if per_query_rows:
        rows = np.stack([rng.permutation(10 * n + 1)[:n] for _ in range(q)]).astype(np.int64)
    else:
        rows = (rng.permutation(10 * n + 1)[:n] + 2**40).astype(np.int64)
    return dist, rows, m


@hsettings(max_examples=200, deadline=None)
@given(distance_tables())
def test_top_m_sorts_by_distance_then_row(table):
    dist, rows, m = table
    q, n = dist.shape
    got_d, got_r = top_m(dist, rows, m)
    r = np.broadcast_to(rows, (q, n))
    order = np.lexsort((r, dist), axis=-1)[:, :m]
    assert got_d.shape == got_r.shape == (q, min(m, n))
    assert got_r.dtype == np.int64
    np.testing.assert_array_equal(got_r, np.take_along_axis(r, order, axis=1))
    np.testing.assert_array_equal(got_d, np.take_along_axis(dist, order, axis=1))


def test_top_m_ties_at_the_cut_go_to_the_lower_row():
    dist = np.array([[5.0, 1.0, 1.0, 1.0, 0.0]], np.float32)
    rows = np.array([0, 9, 3, 7, 4])
    d, r = top_m(dist, rows, 3)
    np.testing.assert_array_equal(r, [[4, 3, 7]])
    np.testing.assert_array_equal(d, [[0.0, 1.0, 1.0]])


@hsettings(max_examples=200, deadline=None)
@given(problems(), st.booleans())
def test_knn_chunk_matches_brute_force(problem, columns):
    x, qs, k, rng = problem
    offset = int(rng.integers(0, 10**9))
    rows = np.arange(offset, offset + len(x), dtype=np.int64)
    got_d, got_r = _chunk(x, qs, rows, k, columns)
    exp_d, exp_r = brute_knn(x, qs, k, rows=rows)
    np.testing.assert_array_equal(got_r, exp_r)
    np.testing.assert_array_equal(got_d, exp_d.astype(np.float32))
    assert got_d.dtype == np.float32


@hsettings(max_examples=200, deadline=None)
@given(problems())
def test_knn_merge_of_chunks_matches_brute_force(problem):
    x, qs, k, rng = problem
    sizes = _split(len(x), rng)
    starts = np.cumsum([0, *sizes[:-1]])
    parts = [_chunk(x[s : s + n], qs, np.arange(s, s + n), k)
             for s, n in zip(starts, sizes, strict=True)]
    order = rng.permutation(len(parts))  # merging does not depend on the order of the parts
    parts = [parts[i] for i in order]
    got_d, got_r = knn_merge(_nest(parts, rng), m=k)
    exp_d, exp_r = brute_knn(x, qs, k)
    np.testing.assert_array_equal(got_r, exp_r)
    np.testing.assert_array_equal(got_d, exp_d.astype(np.float32))
    # A single (dist, rows) pair, as aggregate may receive it, passes through top_m.
    one_d, one_r = knn_merge((got_d, got_r), m=max(1, k // 2))
    np.testing.assert_array_equal(one_r, got_r[:, : max(1, k // 2)])
    np.testing.assert_array_equal(one_d, got_d[:, : max(1, k // 2)])


@hsettings(max_examples=100, deadline=None)
@given(st.integers(1, 300), st.integers(1, 16), st.integers(1, 5), st.integers(1, 40),
       st.integers(0, 2**32 - 1))
def test_kernels_with_arbitrary_float16_values(n, d, q, k, seed):
    """Any float16 fingerprints (cast to float32 for the arithmetic): right neighbours,
    distances within float32 rounding (ties may then differ from float64)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float16)
    qs = rng.standard_normal((q, d)).astype(np.float16)
    sizes = _split(n, rng, most=8)
    starts = np.cumsum([0, *sizes[:-1]])
    parts = [_chunk(x[s : s + c], qs, np.arange(s, s + c), k)
             for s, c in zip(starts, sizes, strict=True)]
    got_d, got_r = knn_merge(parts, m=k)
    exp_d, _ = brute_knn(x, qs, k)
    np.testing.assert_allclose(got_d, exp_d, rtol=1e-5, atol=1e-4)
    true = ((x.astype(np.float64)[got_r] - qs.astype(np.float64)[:, None, :]) ** 2).sum(-1)
    np.testing.assert_allclose(got_d, true, rtol=1e-5, atol=1e-4)
    assert all(len(set(r)) == len(r) for r in got_r.tolist())


# --------------------------------------------------------------------------- the Dask reduction


@hsettings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from([None, 2, 4]), st.booleans())
def test_knn_dask_uneven_chunks_matches_brute_force(problem, split_every, split_columns):
    x, qs, k, rng = problem
    n, d = x.shape
    col_chunks = (d // 2, d - d // 2) if split_columns and d > 1 else (d,)
    X = da.from_array(x, chunks=(tuple(_split(n, rng)), col_chunks))
    N2 = da.from_array(_norm2(x), chunks=(tuple(_split(n, rng)),))  # chunked unlike X on purpose
    with dask.config.set(SYNC):
        got_d, got_r = knn(X, N2, qs, k, split_every=split_every)
    exp_d, exp_r = brute_knn(x, qs, k)
    np.testing.assert_array_equal(got_r, exp_r)
    np.testing.assert_array_equal(got_d, exp_d.astype(np.float32))


def test_knn_empty_array_and_bad_arguments():
    X = da.zeros((0, 4), chunks=(1, 4), dtype=np.float32)
    d, r = knn(X, da.zeros((0,), chunks=1, dtype=np.float32), np.ones((2, 4)), 3)
    assert d.shape == r.shape == (2, 0)
    X = da.ones((10, 4), chunks=(3, 4), dtype=np.float32)
    N2 = da.full((10,), 4.0, chunks=3, dtype=np.float32)
    for m in (0, -1):
        with pytest.raises(QueryError, match="k must be"):
            knn(X, N2, np.ones((1, 4)), m)
    with pytest.raises(QueryError, match="shape"):
        knn(X, N2, np.ones((1, 5)), 1)
    with pytest.raises(QueryError, match="shape"):
        knn(X, N2, np.ones(4), 1)


# --------------------------------------------------------------------------- stores, a real cluster


@pytest.fixture(scope="module")
def exact_store(tmp_path_factory):
    """Two sources of integer fingerprints (exact distances), some windows dropped,
    300-row chunks: a UTM source (29x39 windows of 64 px, stride 32, in a 970 x 1310 px
    raster cropped to 960 x 1280) and a source without a CRS (19x25 windows)."""
    rng = np.random.default_rng(11)
    keep0 = rng.random((29, 39)) > 0.15
    keep1 = rng.random((19, 25)) > 0.1
    sources = [
        SourceSpec(shape=(970, 1310), keep=keep0, path="a.tif"),
        SourceSpec(shape=(640 + 5, 832 + 20), crs=None, transform=(1, 0, 0, 0, 1, 0), keep=keep1,
                   path="b.tif"),
    ]
    return build_store(tmp_path_factory.mktemp("exact") / "store", sources, dim=24,
                       rows_per_chunk=300, seed=11)


# ``client`` (tests/conftest.py): a real LocalCluster, 2 worker processes x 1 thread.


def test_store_holds_what_was_written(exact_store):
    st_ = exact_store.open()
    n = len(exact_store.fingerprint)
    assert st_.committed == n
    stored = np.asarray(st_.arrays["fingerprint"][:n])
    np.testing.assert_array_equal(stored, exact_store.fingerprint)
    c = st_.coords()
    for name, v in exact_store.cols.items():
        np.testing.assert_array_equal(c[name], v)
    assert st_.fingerprints().numblocks[0] == -(-n // 300) > 4


def test_knn_on_store_on_local_cluster_matches_brute_force(client, exact_store):
    from distributed import get_task_stream

    st_ = exact_store.open()
    fp = exact_store.fingerprint
    rng = np.random.default_rng(3)
    q = np.concatenate([rng.integers(0, 4, (3, fp.shape[1])), fp[[0, 299, 300, len(fp) - 1]]])
    workers = set(client.scheduler_info()["workers"])
    for k, split_every in [(1, None), (10, 2), (37, 3), (len(fp) + 5, 4)]:
        with dask.config.set(scheduler=client), get_task_stream(client) as ts:
            got_d, got_r = knn(st_.fingerprints(), st_.norm2(), q, k, split_every=split_every)
        exp_d, exp_r = brute_knn(fp, q, k)
        np.testing.assert_array_equal(got_r, exp_r)
        np.testing.assert_array_equal(got_d, exp_d.astype(np.float32))
        ran_on = {t["worker"] for t in ts.data}
        assert ran_on and ran_on <= workers  # the work ran on the cluster's workers


def _check_table(table, built, exp_d, exp_r, k):
    assert list(table["rank"]) == list(range(1, k + 1))
    np.testing.assert_array_equal(table["row"].to_numpy(), exp_r[:k])
    np.testing.assert_array_equal(table["distance"].to_numpy(), exp_d[:k].astype(np.float32))
    for name in ("uid", "source", "wy", "wx", "x", "y", "lon", "lat"):
        np.testing.assert_array_equal(table[name].to_numpy(), built.cols[name][exp_r[:k]],
                                      err_msg=name)
    paths = np.array(["a.tif", "b.tif"])[built.cols["source"][exp_r[:k]]]
    assert list(table["path"]) == list(paths)


def test_search_on_local_cluster_matches_brute_force(client, exact_store):
    st_ = exact_store.open()
    fp = exact_store.fingerprint
    rng = np.random.default_rng(5)
    vecs = np.concatenate([rng.integers(0, 4, (2, fp.shape[1])), fp[[5, 1000]]]).astype(np.float32)
    queries = [Query(f"vector {i}", v) for i, v in enumerate(vecs)]
    k = 8
    with dask.config.set(scheduler=client):
        hits = search(st_, queries=queries, k=k, dedup=False, split_every=3)
        persisted = search(st_.persist(), queries=queries, k=k, dedup=False)
    exp_d, exp_r = brute_knn(fp, vecs, k)
    assert len(hits) == len(persisted) == k * len(queries)
    for i in range(len(queries)):
        t = hits.for_query(i)
        assert set(t["label"]) == {f"vector {i}"}
        _check_table(t, exact_store, exp_d[i], exp_r[i], k)
        _check_table(persisted.for_query(i), exact_store, exp_d[i], exp_r[i], k)


def test_search_by_uid_on_local_cluster_excludes_only_itself(client, exact_store):
    st_ = exact_store.open()
    fp = exact_store.fingerprint
    row = 777
    uid = int(exact_store.cols["uid"][row])
    with dask.config.set(scheduler=client):
        hits = search(st_, uids=[uid], k=6, dedup=False)
    d, r = ranked(fp, fp[row])
    keep = r != row
    _check_table(hits.table, exact_store, d[keep], r[keep], 6)


def _topk_merge(best, d, r, k):
    cd, cr = np.concatenate([best[0], d], 1), np.concatenate([best[1], r], 1)
    o = np.lexsort((cr, cd), axis=-1)[:, :k]
    return np.take_along_axis(cd, o, 1), np.take_along_axis(cr, o, 1)


@pytest.mark.slow
def test_store_larger_than_cluster_memory_streams(tmp_path_factory):
    """A 1.5 GiB store (float32) on two workers of 600 MiB each: the query, and the
    classifier's scoring pass (``dask_fp.classify``, issue 12 item 3), stream it chunk by
    chunk, equal a numpy brute force, and no worker dies or restarts.

    A worker with its imports already holds about 200 MiB, so the limit leaves room for a
    few chunks in flight and no more. Dask's pause threshold is off: a paused worker whose
    memory does not fall again never runs another task and the query would wait forever (it
    did, in CI, at 400 MiB); above the limit the nanny kills the worker instead, and the
    same-processes check below fails.

    The fingerprints are integers 0..15 (as float32), so every distance is exact and
    ties across chunks must be broken by row as in the brute force.
    """
    from distributed import Client, LocalCluster

    limit, dim, n, batch, k = 600 * 2**20, 512, 768 * 1024, 65536, 10
    path = tmp_path_factory.mktemp("big") / "store"
    entry = {"index": 0, "path": "big.tif", "sha256": "big", "crs": None, "crs_name": None,
             "transform": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], "shape": [768 * 32 + 32, 1024 * 32 + 32],
             "bands": [1, 2, 3], "alpha": None, "nodata": None, "scale": None, "dtype": "uint8"}

    def data(b):  # batch b of the fingerprints, reproducible on its own
        rows = min(batch, n - b * batch)
        g = np.random.default_rng([2024, b])
        return g.integers(0, 16, (rows, dim), dtype=np.int8).astype(np.float32)

    own = 123_456
    stored = data(own // batch)[own % batch]
    nudged = stored.copy()
    nudged[:3] = 15 - nudged[:3]
    q = np.concatenate([np.random.default_rng(9).integers(0, 16, (2, dim)), [stored, nudged]])
    q = q.astype(np.float32)
    qn = np.einsum("ij,ij->i", q, q)
    best = (np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64))
    # the classifier's oracle: sklearn fitted on the labelled rows (known before the store is written),
    # its decision function over every other row, top k by (score desc, row) kept while writing
    from sklearn.linear_model import LogisticRegression

    prow, nrow = [17, 200_003, 511_111, 700_000], [5, 300_001, 650_000]
    lab = np.stack([data(r // batch)[r % batch] for r in prow + nrow]).astype(np.float64)
    oracle = LogisticRegression(class_weight="balanced", max_iter=1000).fit(lab, [1] * 4 + [0] * 3)
    coef, icpt = oracle.coef_[0], float(oracle.intercept_[0])
    top = (np.empty(0), np.empty(0, np.int64))

    def batches():  # the writer never holds more than a batch; the brute force runs alongside
        nonlocal best, top
        for b, i in enumerate(range(0, n, batch)):
            x = data(b)
            sc, sr = x.astype(np.float64) @ coef + icpt, np.arange(i, i + len(x))
            keep = ~np.isin(sr, prow + nrow)  # labelled tiles are not hits
            cs, cr = np.concatenate([top[0], sc[keep]]), np.concatenate([top[1], sr[keep]])
            o = np.lexsort((cr, -cs))[:k]
            top = (cs[o], cr[o])
            # exact in float32: every product and sum is an integer below 2**24
            d = np.einsum("ij,ij->i", x, x)[None, :] - 2 * (q @ x.T) + qn[:, None]
            r = np.arange(i, i + len(x))
            best = _topk_merge(best, d, np.broadcast_to(r, d.shape), k)
            wy, wx = (r // 1024).astype(np.int32), (r % 1024).astype(np.int32)
            yield {"fingerprint": x, "uid": make_uid(0, wy, wx),
                   "source": np.zeros(len(r), np.int32), "wy": wy, "wx": wx,
                   "x": wx * 32.0 + 32, "y": wy * 32.0 + 32,
                   "lon": np.full(len(r), np.nan), "lat": np.full(len(r), np.nan)}

    try:
        with open_writer(path, settings(dim)) as w:
            assert w.append(entry, batches(), upper_bound=n) == n
        st_ = open_store(path)
        assert st_.committed == n
        assert st_.info()["fingerprint_bytes"] >= 1.2 * 2 * limit  # more than the whole cluster holds
        with dask.config.set({"distributed.worker.memory.pause": False}), \
                LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="600MiB",
                             host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, \
                Client(cluster, set_as_default=False) as c:
            workers = c.scheduler_info()["workers"]
            assert sum(w["memory_limit"] for w in workers.values()) == 2 * limit
            assert c.run(lambda: dask.config.get("distributed.worker.memory.pause")) == {w: False for w in workers}
            before = set(workers), c.run(os.getpid)
            with dask.config.set(scheduler=c):
                got_d, got_r = knn(st_.fingerprints(), st_.norm2(), q, k)
                uid_of = [int(make_uid(0, r // 1024, r % 1024)) for r in prow + nrow]
                scored = classify(st_, positives=uid_of[:4], negatives=uid_of[4:], k=k)
            after = set(c.scheduler_info()["workers"]), c.run(os.getpid)
            assert before == after and len(after[0]) == 2  # same two workers, same processes
        np.testing.assert_array_equal(got_r, best[1])
        np.testing.assert_array_equal(got_d, best[0])
        assert got_r[2, 0] == own and got_d[2, 0] == 0.0
        assert got_r[3, 0] == own and got_d[3, 0] == float(((nudged - stored) ** 2).sum())
        np.testing.assert_array_equal(scored.table["row"], top[1])
        np.testing.assert_allclose(scored.table["score"], 1 / (1 + np.exp(-top[0])), rtol=1e-9)
        np.testing.assert_allclose(scored.classifier.coef_[0], coef, rtol=1e-6)
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- de-duplication


def test_dedup_mask_examples():
    t = Tiling(64, 32)
    src = np.array([0, 0, 0, 1, 0, 0])
    wy = np.array([0, 0, 2, 0, 1, 0])
    wx = np.array([0, 1, 0, 0, 1, 2])
    np.testing.assert_array_equal(dedup_mask(src, wy, wx, tiling=t), [1, 0, 1, 1, 0, 1])
    # The query's own window (0, 0, 0) removes itself and everything it overlaps.
    np.testing.assert_array_equal(dedup_mask(src, wy, wx, tiling=t, exclude=[(0, 0, 0)]),
                                  [0, 0, 1, 1, 0, 1])
    # stride == tile: neighbours share no pixel, so nothing is dropped.
    np.testing.assert_array_equal(dedup_mask(src, wy, wx, tiling=Tiling(64, 64)), [1] * 6)
    empty = np.array([], int)
    assert dedup_mask(empty, empty, empty, tiling=t).shape == (0,)


def test_candidates_needed_values():
    t = Tiling(256, 128)  # reach 1: a window overlaps its 3x3 block
    assert candidates_needed(10, t, dedup=False, from_store=False) == 10
    assert candidates_needed(10, t, dedup=False, from_store=True) == 11
    assert candidates_needed(10, t, dedup=True, from_store=False) == 90
    assert candidates_needed(10, t, dedup=True, from_store=True) == 99
    assert candidates_needed(3, Tiling(256, 256), dedup=True, from_store=True) == 4  # reach 0
    assert candidates_needed(2, Tiling(256, 100), dedup=True, from_store=False) == 50  # reach 2
    assert candidates_needed(1, Tiling(256, 64), dedup=True, from_store=True) == 98  # reach 3


@st.composite
def ranked_windows(draw):
    tile = draw(st.integers(1, 64))
    tiling = Tiling(tile, draw(st.integers(1, tile)))
    k = draw(st.integers(1, 6))
    from_store = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ny, nx, ns = int(rng.integers(1, 30)), int(rng.integers(1, 30)), int(rng.integers(1, 4))
    total = ns * ny * nx
    m = min(total, candidates_needed(k, tiling, dedup=True, from_store=from_store))
    pick = rng.choice(total, size=m, replace=False)  # distinct windows, in rank order
    s, rest = np.divmod(pick, ny * nx)
    wy, wx = np.divmod(rest, nx)
    own = [(int(rng.integers(0, ns)), int(rng.integers(0, ny)), int(rng.integers(0, nx)))]
    own = own if from_store else []
    return tiling, k, s, wy, wx, own, total


@hsettings(max_examples=300, deadline=None)
@given(ranked_windows())
def test_dedup_mask_properties_and_candidate_bound(case):
    tiling, k, s, wy, wx, own, total = case
    keep = dedup_mask(s, wy, wx, tiling=tiling, exclude=own)
    kept = np.flatnonzero(keep)
    ov = lambda i, y, x: windows_overlap(wy[i], wx[i], y, x, tile=tiling.tile, stride=tiling.stride)  # noqa: E731
    for a in kept:  # kept hits never overlap each other (within a source) or the query's own
        for b in kept:
            if a < b and s[a] == s[b]:
                assert not ov(a, wy[b], wx[b])
        assert not any(s[a] == o[0] and ov(a, o[1], o[2]) for o in own)
    for i in np.flatnonzero(~keep):  # and every dropped hit overlaps one of those
        assert any(s[j] == s[i] and ov(j, wy[i], wx[i]) for j in kept if j < i) or \
            any(s[i] == o[0] and ov(i, o[1], o[2]) for o in own)
    if len(s) == candidates_needed(k, tiling, dedup=True, from_store=bool(own)):
        assert keep.sum() >= k  # the fetched candidates always leave k distinct hits


def _smooth_fingerprints(ny: int, nx: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Integer fingerprints that change slowly across the grid: neighbours are near-duplicates."""
    a, b = rng.uniform(-0.35, 0.35, dim), rng.uniform(-0.35, 0.35, dim)
    c = rng.uniform(0, 6.3, dim)
    wy, wx = np.mgrid[0:ny, 0:nx]
    f = np.sin(wy.ravel()[:, None] * a + wx.ravel()[:, None] * b + c)
    return np.rint(12 * f).astype(np.float32)


def _greedy(built, dist, rows, k, tiling, own=None):
    """Reference de-duplication over the whole brute-force ranking."""
    out = []
    c = built.cols

    def olap(y1, x1, y2, x2):
        return windows_overlap(y1, x1, y2, x2, tile=tiling.tile, stride=tiling.stride)

    for r in rows:
        s, y, x = c["source"][r], c["wy"][r], c["wx"][r]
        if own is not None and s == own[0] and olap(y, x, own[1], own[2]):
            continue
        if any(c["source"][o] == s and olap(y, x, c["wy"][o], c["wx"][o]) for o in out):
            continue
        out.append(r)
        if len(out) == k:
            break
    return np.array(out, dtype=np.int64)


@pytest.mark.parametrize("tile,stride", [(64, 32), (64, 24), (64, 64), (64, 16)])
def test_dedup_search_matches_reference_and_returns_k(tmp_path, tile, stride):
    rng = np.random.default_rng(tile + stride)
    h = 10 * tile
    ny, nx = grid_shape(h, h, tile=tile, stride=stride)
    fp = _smooth_fingerprints(ny, nx, 16, rng)
    # Two sources with the same content: dedup works within a source only.
    sources = [SourceSpec(shape=(h, h), fingerprints=fp, path="a.tif"),
               SourceSpec(shape=(h, h), fingerprints=fp, path="b.tif")]
    built = build_store(tmp_path / "store", sources, dim=16, tile=tile, stride=stride,
                        rows_per_chunk=100)
    st_ = built.open()
    tiling = built.tiling
    centre = (0, ny // 2, nx // 2)
    row = built.row_of(*centre)
    noisy = fp[built.row_of(0, ny // 4, 3 * nx // 4)] + rng.integers(-1, 2, 16)
    k = 6
    with dask.config.set(SYNC):
        by_uid = search(st_, uids=[int(built.cols["uid"][row])], k=k)
        by_vec = search(st_, queries=[Query("vec", noisy.astype(np.float32))], k=k)
        raw = search(st_, queries=[Query("vec", noisy.astype(np.float32))], k=k, dedup=False)
    for hits, vec, own in [(by_uid, built.fingerprint[row], centre), (by_vec, noisy, None)]:
        t = hits.table
        assert len(t) == k
        d, r = ranked(built.fingerprint, vec)
        np.testing.assert_array_equal(t["row"].to_numpy(), _greedy(built, d, r, k, tiling, own))
        s, wy, wx = t["source"].to_numpy(), t["wy"].to_numpy(), t["wx"].to_numpy()
        for i in range(k):
            for j in range(i + 1, k):
                assert s[i] != s[j] or not windows_overlap(wy[i], wx[i], wy[j], wx[j], tile=tile,
                                                           stride=stride)
            if own is not None:
                assert s[i] != own[0] or not windows_overlap(wy[i], wx[i], own[1], own[2],
                                                             tile=tile, stride=stride)
        assert set(s) == {0, 1}  # the twin source's copies are not suppressed
    if stride < tile:  # the raw list is full of overlapping near-duplicates
        s, wy, wx = (raw.table[c].to_numpy() for c in ("source", "wy", "wx"))
        assert any(s[i] == s[j] and windows_overlap(wy[i], wx[i], wy[j], wx[j], tile=tile,
                                                    stride=stride)
                   for i in range(k) for j in range(i + 1, k))


def test_dedup_returns_every_distinct_place_when_fewer_than_k(tmp_path):
    rng = np.random.default_rng(1)
    built = build_store(tmp_path / "store", [SourceSpec(shape=(64 + 8 * 32, 64 + 8 * 32),
                        fingerprints=_smooth_fingerprints(9, 9, 8, rng))], dim=8)
    row = built.row_of(0, 4, 4)
    with dask.config.set(SYNC):
        hits = search(built.open(), uids=[int(built.cols["uid"][row])], k=40)
    d, r = ranked(built.fingerprint, built.fingerprint[row])
    exp = _greedy(built, d, r, 40, built.tiling, (0, 4, 4))
    assert 16 <= len(exp) < 40  # at least the 4x4 windows of even index that miss the query's
    np.testing.assert_array_equal(hits.table["row"].to_numpy(), exp)


# --------------------------------------------------------------------------- query kinds


def test_query_by_uid_returns_itself_first(exact_store):
    st_ = exact_store.open()
    fp = exact_store.fingerprint
    for row in (0, 450, len(fp) - 1):
        uid = int(exact_store.cols["uid"][row])
        d, r = ranked(fp, fp[row])
        assert r[0] == row  # (no duplicate fingerprint at a lower row)
        with dask.config.set(SYNC):
            hits = search(st_, uids=[uid], k=4, include_self=True, dedup=False)
        t = hits.table
        assert t["uid"].iloc[0] == uid and t["row"].iloc[0] == row
        assert t["distance"].iloc[0] == 0.0
        _check_table(t, exact_store, d, r, 4)
        c = exact_store.cols
        assert hits.queries[0].own == (int(c["source"][row]), int(c["wy"][row]), int(c["wx"][row]))
        np.testing.assert_array_equal(hits.queries[0].vector, fp[row])


def _lonlat_of_pixel(row: float, col: float) -> tuple[float, float]:
    from pyproj import Transformer

    a, b, c, d, e, f = UTM17_TRANSFORM
    x, y = a * col + b * row + c, d * col + e * row + f
    lon, lat = Transformer.from_crs("EPSG:32617", "EPSG:4326", always_xy=True).transform(x, y)
    return float(lon), float(lat)


def _expected_window(built, row: float, col: float):
    """Brute force: among the stored windows of source 0 that hold the pixel, the nearest centre."""
    t = built.tiling
    c = built.cols
    s0 = c["source"] == 0
    wy, wx = c["wy"][s0], c["wx"][s0]
    inside = ((wy * t.stride <= row) & (row < wy * t.stride + t.tile)
              & (wx * t.stride <= col) & (col < wx * t.stride + t.tile))
    if not inside.any():
        return None
    d = (wy * t.stride + t.tile / 2 - row) ** 2 + (wx * t.stride + t.tile / 2 - col) ** 2
    d = np.where(inside, d, np.inf)
    i = int(np.argmin(d))
    return int(wy[i]), int(wx[i])


def test_query_by_lonlat_finds_the_tile_at_its_centre(exact_store):
    st_ = exact_store.open()
    c = exact_store.cols
    for row in (3, 200, 600):
        assert c["source"][row] == 0
        wy, wx = int(c["wy"][row]), int(c["wx"][row])
        lon, lat = _lonlat_of_pixel(wy * 32 + 32, wx * 32 + 32)  # the window centre, via pyproj
        np.testing.assert_allclose([lon, lat], [c["lon"][row], c["lat"][row]], atol=1e-9)
        with dask.config.set(SYNC):
            hits = search(st_, lonlats=[(lon, lat)], k=1, include_self=True, dedup=False)
        assert hits.queries[0].own == (0, wy, wx)
        assert hits.table["uid"].iloc[0] == c["uid"][row]
        assert hits.table["distance"].iloc[0] == 0.0


def test_query_by_lonlat_anywhere_in_the_source(exact_store):
    """Random points: the stored tile that holds the point (nearest centre if several),
    also where the nearest window was dropped as empty."""
    st_ = exact_store.open()
    rng = np.random.default_rng(4)
    pts = rng.uniform([0, 0], [960, 1280], (60, 2))  # inside the cropped 960 x 1280 px grid area
    exp = [_expected_window(exact_store, r, c) for r, c in pts]
    lonlats = [_lonlat_of_pixel(r, c) for r, c in pts]
    inside = [i for i, e in enumerate(exp) if e is not None]
    with dask.config.set(SYNC):  # one batch of queries
        hits = search(st_, lonlats=[lonlats[i] for i in inside], k=1)
    assert [q.own for q in hits.queries] == [(0, *exp[i]) for i in inside]
    for i in set(range(len(pts))) - set(inside):  # only windows dropped as empty hold the point
        with pytest.raises(QueryError, match="no stored tile contains"):
            search(st_, lonlats=[lonlats[i]], k=1)


# --------------------------------------------------------------------------- image queries


@pytest.fixture(scope="module")
def ingested(client, tmp_path_factory):
    """A 256 x 256 textured GeoTIFF through the real ingest (random CNN) on the cluster."""
    from dask_fp.ingest import ingest
    from dask_fp.models import ModelOptions

    d = tmp_path_factory.mktemp("ingested")
    tif = write_geotiff(d / "ortho.tif", 256, 256, seed=3)
    report = ingest([tif], str(d / "store"), model=ModelOptions(weights="random", device="cpu"),
                    tiling=Tiling(64, 32), client=client, progress=False, log=lambda m: None)
    assert report.tiles == 49
    return tif, d / "store"


def test_query_by_image_finds_its_own_tile(ingested, tmp_path):
    import rasterio
    from PIL import Image
    from rasterio.windows import Window

    tif, store = ingested
    wy, wx = 2, 3
    with rasterio.open(tif) as ds:
        pix = ds.read(window=Window(wx * 32, wy * 32, 64, 64)).transpose(1, 2, 0)
    png = tmp_path / "query.png"
    Image.fromarray(pix).save(png)
    with dask.config.set(SYNC):
        hits = search(store, images=[str(png)], k=3)
    t = hits.table
    assert t["uid"].iloc[0] == make_uid(0, wy, wx)
    assert t["distance"].iloc[0] < 1e-3 * t["distance"].iloc[1]
    assert list(t["rank"]) == [1, 2, 3]
    assert hits.queries[0].own is None and hits.queries[0].label == str(png)
    np.testing.assert_array_equal(hits.queries[0].pixels, pix)
    for i in range(1, 3):  # the other hits do not overlap the first (dedup by default)
        assert not windows_overlap(t["wy"].iloc[i], t["wx"].iloc[i], wy, wx, tile=64, stride=32)


# --------------------------------------------------------------------------- errors


def test_bad_k_is_a_query_error(exact_store):
    uid = int(exact_store.cols["uid"][0])
    for k in (0, -3, 2.5, "3"):
        with pytest.raises(QueryError, match="k must be"):
            search(exact_store.path, uids=[uid], k=k)


def test_unknown_uid_is_a_query_error(exact_store):
    with pytest.raises(QueryError, match=r"uid \d+ \(source 5, window 1,2\) is not in"):
        search(exact_store.path, uids=[int(make_uid(5, 1, 2))], k=3)
    missing = np.setdiff1d(make_uid(0, *np.divmod(np.arange(29 * 39), 39)), exact_store.cols["uid"])
    with pytest.raises(QueryError, match="is not in"):  # a window dropped as empty
        search(exact_store.path, uids=[int(missing[0])], k=3)


def test_lonlat_outside_every_tile_is_a_query_error(exact_store):
    outside = [(0.0, 0.0), (-81.5, 31.0), _lonlat_of_pixel(-50, 100), _lonlat_of_pixel(100, 1300)]
    for lon, lat in outside:
        with pytest.raises(QueryError, match="no stored tile contains"):
            search(exact_store.path, lonlats=[(lon, lat)], k=3)
    for lon, lat in [(200.0, 10.0), (10.0, -95.0)]:
        with pytest.raises(QueryError, match="not a longitude,latitude"):
            search(exact_store.path, lonlats=[(lon, lat)], k=3)


def test_no_query_is_a_query_error(exact_store):
    with pytest.raises(QueryError, match="no query given"):
        search(exact_store.path, k=3)


def test_query_image_that_is_not_an_image(ingested, tmp_path):
    _, store = ingested
    bad = tmp_path / "notes.png"
    bad.write_text("this is not a picture\n")
    with pytest.raises(QueryError, match="not an image"):
        search(store, images=[str(bad)], k=3)
    with pytest.raises(QueryError, match="no such file"):
        search(store, images=[str(tmp_path / "missing.png")], k=3)


def test_image_query_against_a_store_of_other_weights(exact_store, tmp_path):
    from PIL import Image

    png = tmp_path / "q.png"
    Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(png)
    with pytest.raises(QueryError, match="Use the store's weights"):
        search(exact_store.path, images=[str(png)], k=3)
