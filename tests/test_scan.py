"""Tests of the store-level passes in ``dask_fp.scan`` and ``dask_fp.stream``: the streamed
chunk-wise scan, and the persisted scan whose hits carry their coordinates through the merge.

Every result is checked against a numpy brute force sorted by (distance, row)
over integer fingerprints (exact float32 distances, so ties are broken by row).
"""

from __future__ import annotations

import shutil

import dask
import numpy as np
import pytest

from dask_fp.errors import StoreError
from dask_fp.filters import candidate_blocks
from dask_fp.kernels import RowFilter, hit_records, hits_merge, knn_merge, top_m, top_m_hits
from dask_fp.scan import HIT_COLUMNS, read_hits, store_hits, store_knn, stream_knn
from dask_fp.search import Query, search
from dask_fp.store import open_store
from dask_fp.stream import _split

try:
    from ._search_helpers import SourceSpec, brute_knn, build_store
except ImportError:  # tests/ is not a package
    from _search_helpers import SourceSpec, brute_knn, build_store


# --------------------------------------------------------------------------- pure kernels


def _oracle(dist: np.ndarray, rows: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.broadcast_to(rows, dist.shape)
    o = np.lexsort((r, dist), axis=1)[:, :m]
    return np.take_along_axis(dist, o, 1), np.take_along_axis(r, o, 1)


@pytest.mark.parametrize("seed", range(6))
def test_top_m_hits_takes_each_record_with_its_row(seed):
    rng = np.random.default_rng(seed)
    q, n = 3, 41
    m = int(rng.integers(1, 50))
    dist = rng.integers(0, 4, (q, n)).astype(np.float32)  # many ties at the cut
    rows = rng.permutation(10_000)[:n].astype(np.int64)
    rec = hit_records(("uid", "x"), [rows * 10, rows * 0.5])
    d, r, h = top_m_hits(dist, rows, np.broadcast_to(rec, (q, n)), m)
    ed, er = _oracle(dist, rows, m)
    np.testing.assert_array_equal(r, er)
    np.testing.assert_array_equal(d, ed)
    np.testing.assert_array_equal(h["uid"], er * 10)
    np.testing.assert_array_equal(h["x"], er * 0.5)
    pd_, pr = top_m(dist, rows, m)
    np.testing.assert_array_equal(pr, er)
    np.testing.assert_array_equal(pd_, ed)


@pytest.mark.parametrize("seed", range(4))
def test_hits_merge_of_parts_equals_the_whole(seed):
    rng = np.random.default_rng(seed)
    q, n, m = 2, 90, 13
    dist = rng.integers(0, 6, (q, n)).astype(np.float32)
    rows = np.arange(n, dtype=np.int64) + 500
    rec = hit_records(("uid", "lat"), [rows * 3, rows / 7])
    cuts = np.sort(rng.choice(np.arange(1, n), 3, replace=False))
    parts, pairs = [], []
    for lo, hi in zip([0, *cuts], [*cuts, n], strict=True):
        parts.append(top_m_hits(dist[:, lo:hi], rows[lo:hi], np.broadcast_to(rec[lo:hi], (q, hi - lo)), m))
        pairs.append(top_m(dist[:, lo:hi], rows[lo:hi], m))
    d, r, h = hits_merge([parts[:2], parts[2:]], m=m)  # nested, as dask's combine passes them
    ed, er = _oracle(dist, rows, m)
    np.testing.assert_array_equal(r, er)
    np.testing.assert_array_equal(d, ed)
    np.testing.assert_array_equal(h["uid"], er * 3)
    np.testing.assert_array_equal(h["lat"], er / 7)
    np.testing.assert_array_equal(knn_merge(pairs, m=m)[1], er)


def test_split_cuts_a_block_into_whole_steps():
    for lo, hi, step, parts in [(0, 45_000, 8192, 2), (65_536, 131_072, 8192, 2), (0, 5, 8, 2), (0, 16_385, 8192, 2),
                                (300, 700, 100, 3), (0, 1, 1, 4), (10, 20, 1, 4)]:
        spans = _split(lo, hi, step, parts)
        assert 1 <= len(spans) <= parts
        assert spans[0][0] == lo and spans[-1][1] == hi
        assert all(a < b for a, b in spans)
        assert all(b == c for (_, b), (c, _) in zip(spans, spans[1:], strict=False))
        assert all((a - lo) % step == 0 for a, _ in spans)


# --------------------------------------------------------------------------- a store on a real cluster


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two sources of integer fingerprints in 100-row chunks; 4 chunks per query task."""
    rng = np.random.default_rng(21)
    sources = [
        SourceSpec(shape=(970, 1310), keep=rng.random((29, 39)) > 0.15, path="a.tif"),
        SourceSpec(shape=(645, 852), crs=None, transform=(1, 0, 0, 0, 1, 0), keep=rng.random((19, 25)) > 0.1,
                   path="b.tif"),
    ]
    return build_store(tmp_path_factory.mktemp("scan") / "store", sources, dim=24, rows_per_chunk=100, seed=21)


def _open(path) -> object:
    st = open_store(path)
    st.task_chunks = 4
    return st


def _queries(fp: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(4)
    return np.concatenate([rng.integers(0, 4, (3, fp.shape[1])), fp[[0, 399, 400, len(fp) - 1]]]).astype(np.float32)


@pytest.mark.parametrize("step_bytes", [1, 16 << 20])  # one 100-row chunk per read, or the whole span
def test_stream_knn_matches_brute_force(client, built, step_bytes):
    st = _open(built.path)
    fp, q = built.fingerprint, _queries(built.fingerprint)
    assert st.fingerprints().numblocks[0] >= 3
    for k, split_every in [(1, None), (10, 2), (37, 3), (len(fp) + 5, 4)]:
        with dask.config.set(scheduler=client):
            d, r = stream_knn(st, q, k, split_every=split_every, step_bytes=step_bytes)
        ed, er = brute_knn(fp, q, k)
        np.testing.assert_array_equal(r, er)
        np.testing.assert_array_equal(d, ed.astype(np.float32))


def test_stream_knn_with_a_filter_and_some_blocks(client, built):
    st = _open(built.path)
    fp, q = built.fingerprint, _queries(built.fingerprint)
    where = RowFilter(sources=(1,))
    blocks = candidate_blocks(st, where, st.fingerprints().chunks[0])
    assert blocks and len(blocks) < st.fingerprints().numblocks[0]
    keep = np.flatnonzero(built.cols["source"] == 1)
    with dask.config.set(scheduler=client):
        d, r = stream_knn(st, q, 12, where=where, blocks=blocks, step_bytes=1)
        d2, r2, rec = store_knn(st, q, 12, where=where, blocks=blocks)
    ed, er = brute_knn(fp[keep], q, 12, rows=keep)
    np.testing.assert_array_equal(r, er)
    np.testing.assert_array_equal(d, ed.astype(np.float32))
    np.testing.assert_array_equal(r2, er)
    np.testing.assert_array_equal(rec["source"], np.ones_like(er))
    tr = st.task_rows  # blocks alone (no filter): only the rows of those blocks are scanned
    rows = np.concatenate([np.arange(b * tr, min(b * tr + tr, len(fp))) for b in (0, 2)])
    with dask.config.set(scheduler=client):
        _, r = stream_knn(st, q, 9, blocks=[0, 2], step_bytes=1)
    np.testing.assert_array_equal(r, brute_knn(fp[rows], q, 9, rows=rows)[1])


def test_persisted_filtered_scan_and_columns(client, built):
    """A persisted store's columns come from memory (Store.tiles) and filter its scan like the stored ones."""
    st = _open(built.path)
    fp, q = built.fingerprint, _queries(built.fingerprint)
    where = RowFilter(sources=(1,))
    keep = np.flatnonzero(built.cols["source"] == 1)
    with dask.config.set(scheduler=client):
        st.persist()
        for name in HIT_COLUMNS:
            np.testing.assert_array_equal(st.column(name).compute(), built.cols[name], err_msg=name)
        blocks = candidate_blocks(st, where, st.fingerprints().chunks[0])
        d, r, rec = store_knn(st, q, 12, where=where, blocks=blocks,
                              columns=[st.column("lon"), st.column("lat"), st.column("source")])
    ed, er = brute_knn(fp[keep], q, 12, rows=keep)
    np.testing.assert_array_equal(r, er)
    np.testing.assert_array_equal(d, ed.astype(np.float32))
    np.testing.assert_array_equal(rec["uid"], built.cols["uid"][er])


def test_persisted_hits_carry_their_columns_and_read_no_column(client, built, tmp_path):
    """After persist(), a query returns every hit column from cluster memory: the column
    files can be gone from disk and the hits are still right. The packed graph is built once."""
    path = tmp_path / "copy"
    shutil.copytree(built.path, path)
    st = _open(path)
    fp, q = built.fingerprint, _queries(built.fingerprint)
    with dask.config.set(scheduler=client):
        st.persist()
        d, r, rec = store_knn(st, q, 15, split_every=2)
        for name in HIT_COLUMNS:
            shutil.rmtree(path / name / "c")
        hits = search(st, [Query("v", v) for v in q], k=15, dedup=False)
        packed = st.scan_cache["packed"][1]
        again = search(st, [Query("v", q[0])], k=5, dedup=False)
    assert st.scan_cache["packed"][1] is packed
    ed, er = brute_knn(fp, q, 15)
    np.testing.assert_array_equal(r, er)
    np.testing.assert_array_equal(d, ed.astype(np.float32))
    for name in HIT_COLUMNS:
        np.testing.assert_array_equal(rec[name], built.cols[name][er], err_msg=name)
        np.testing.assert_array_equal(hits.table[name].to_numpy(), built.cols[name][er.ravel()], err_msg=name)
    np.testing.assert_array_equal(again.table["row"].to_numpy(), er[0, :5])
    with pytest.raises(StoreError, match="damaged"):  # the streamed read of the same rows needs the files
        read_hits(open_store(path), r)


def test_store_hits_of_a_persisted_store_come_from_memory(client, built, tmp_path):
    from distributed import futures_of, wait

    """store_hits on a persisted store (distributed: one task per worker holding the rows' blocks; local
    scheduler: blocks in the graph) equals the columns as stored, for any shape of rows with repeats;
    the column files are gone from disk meanwhile, so nothing is read from them."""
    path = tmp_path / "copy"
    shutil.copytree(built.path, path)
    rng = np.random.default_rng(3)
    n = len(built.cols["uid"])
    rows = rng.integers(0, n, (3, 40))
    rows[1, :5] = rows[0, :5]  # repeats across queries
    rows[2, -1] = n - 1
    with dask.config.set(scheduler=client):
        st = _open(path).persist()
        assert len(st.tiles().chunks[0]) > 2  # rows spread over several blocks (and both workers)
        wait(futures_of(st.tiles()))
        for name in HIT_COLUMNS:
            shutil.rmtree(path / name / "c")
        got = store_hits(st, rows)
        empty = store_hits(st, np.empty((2, 0), np.int64))
        with pytest.raises(IndexError, match="out of range"):
            store_hits(st, np.array([n]))
    assert got.dtype == read_hits(open_store(built.path), rows).dtype
    assert got.shape == rows.shape and empty.shape == (2, 0)
    for name in HIT_COLUMNS:
        np.testing.assert_array_equal(got[name], built.cols[name][rows], err_msg=name)
    with dask.config.set(scheduler="threads"):
        local = store_hits(_open(built.path).persist(), rows)
    for name in HIT_COLUMNS:
        np.testing.assert_array_equal(local[name], got[name], err_msg=name)


def test_streamed_scan_of_a_damaged_store_names_the_missing_file(client, built, tmp_path):
    path = tmp_path / "copy"
    shutil.copytree(built.path, path)
    (path / "fingerprint" / "c" / "5" / "0").unlink()
    st = _open(path)
    with dask.config.set(scheduler=client), pytest.raises(StoreError, match=r"fingerprint/c/5/0 missing .*damaged"):
        search(st, [Query("v", built.fingerprint[0])], k=3)
