"""The compact-code index in a store (dask_fp.index): build, extend, code search + exact re-rank.

The oracle is the exact scan (dask_fp.scan.knn) and numpy brute force; stores are
real Zarr on disk written through the store's writer, searched on a real LocalCluster.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dask_fp.cli import main
from dask_fp.codes import CodeBlock, encode
from dask_fp.errors import QueryError, StoreError
from dask_fp.index import (
    IndexOptions,
    build_index,
    choose_method,
    code_search,
    default_candidates,
    extend_index,
    has_index,
    old_index,
    open_index,
)
from dask_fp.index.layout import ROW_ARRAYS
from dask_fp.scan import knn
from dask_fp.search import search
from dask_fp.store import open_store, open_writer

try:
    from ._search_helpers import SourceSpec, build_store, chunk_rows, settings, source_entry, source_rows
except ImportError:  # tests/ is not a package
    from _search_helpers import SourceSpec, build_store, chunk_rows, settings, source_entry, source_rows

DIM = 64
SHAPE = (970, 1310)  # 29 x 39 windows of 64 px at stride 32


def clustered_ints(n: int, seed: int, centres: int = 60) -> np.ndarray:
    """Integer fingerprints around a few centres (exact float32 distances, real structure)."""
    rng = np.random.default_rng(seed)
    c = rng.integers(0, 12, (centres, DIM)) * np.linspace(3, 1, DIM).round()
    return (c[rng.integers(0, centres, n)] + rng.integers(-1, 2, (n, DIM))).astype(np.float32)


def spec(seed: int, path: str) -> SourceSpec:
    keep = np.random.default_rng(seed).random((29, 39)) > 0.1
    return SourceSpec(shape=SHAPE, keep=keep, path=path, fingerprints=clustered_ints(int(keep.sum()), seed))


@pytest.fixture()
def store_dir(tmp_path):
    return build_store(tmp_path / "store", [spec(1, "a.tif"), spec(2, "b.tif")], dim=DIM,
                       rows_per_chunk=256, seed=3)


def append_source(built, seed: int, path: str) -> np.ndarray:
    """Append one more source through the store writer, as ``dask_fp.ingest`` does."""
    rng = np.random.default_rng(seed)
    with chunk_rows(256), open_writer(built.path, settings(DIM)) as w:
        index = w.next_source_index
        s = spec(seed, path)
        rows = source_rows(s, index, built.tiling, DIM, rng)
        b = 97
        batches = ({k: v[i : i + b] for k, v in rows.items()} for i in range(0, len(rows["uid"]), b))
        w.append(source_entry(s, index), batches, upper_bound=29 * 39)
    return rows["fingerprint"]


def assert_stored_codes(idx, x: np.ndarray) -> None:
    """The index's row arrays hold ``encode(x)`` (every row, in row order) and its per-list counts."""
    want = encode(x, idx.params)
    for name, arr in zip(ROW_ARRAYS, idx.arrays, strict=True):
        got, exp = arr[: len(x)], getattr(want, "lists" if name == "list" else name)
        if got.dtype.kind == "f":  # float32 norms of one chunk's product vs the whole one's: rounding apart
            np.testing.assert_allclose(got, exp, rtol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(got, exp, err_msg=name)
    np.testing.assert_array_equal(idx.list_rows, np.bincount(want.lists, minlength=idx.params.lists))


def recall(truth: np.ndarray, got: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(truth, got, strict=True)]))


def test_build_writes_chunk_aligned_codes_of_every_row(client, store_dir):
    info = build_index(store_dir.path, IndexOptions(nbits=64, lists=12), client=client)
    st = open_store(store_dir.path)
    assert info["indexed"] == st.committed == len(store_dir.fingerprint) and info["lists"] == 12
    idx = open_index(st)
    assert idx.params.centroids.shape == (12, DIM) and idx.params.projection.shape == (DIM, 64)
    codes = idx.group["codes"]
    assert codes.shape == (st.committed, 8) and codes.dtype == np.uint8  # 8 B per tile (+ 12 B of list and norms)
    for arr in idx.arrays:
        assert arr.shape[0] == st.committed and arr.chunks[0] == st.arrays["fingerprint"].chunks[0]
    assert_stored_codes(idx, store_dir.fingerprint)
    # The rest of the store does not see the index: it still opens and reads the same.
    assert open_store(store_dir.path).committed == st.committed


def test_code_search_reranks_exactly_and_recalls_on_structured_data(client, store_dir):
    build_index(store_dir.path, IndexOptions(nbits=64), client=client)
    st = store_dir.open()
    x = store_dir.fingerprint
    q = x[::37] + np.float32(0.5)
    ed, er = knn(st.fingerprints(), st.norm2(), q, 10)
    # Every row a candidate (every list probed): the re-rank alone decides, so the answer is the exact one.
    d_all, r_all = code_search(st, q, 10, candidates=len(x))
    np.testing.assert_array_equal(r_all, er)
    np.testing.assert_array_equal(d_all, ed)
    # Default candidates: distances are the exact ones of the rows returned, sorted; recall high.
    d, r = code_search(st, q, 10)
    exact_of_rows = ((q[:, None, :].astype(np.float64) - x[r].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(d, exact_of_rows.astype(np.float32))
    assert (np.diff(d, axis=1) >= 0).all()
    assert recall(er, r) >= 0.95
    # A small candidate list, one list probed: still exact distances (possibly other rows), k of them.
    d5, r5 = code_search(st, q, 10, candidates=10, probes=1)
    assert (d5 >= ed).all() and r5.shape == (len(q), 10)
    with pytest.raises(QueryError, match="probes"):
        code_search(st, q, 10, probes=0)


def test_k_above_the_rows_returns_every_row(client, tmp_path):
    built = build_store(tmp_path / "small", [SourceSpec(shape=(192, 192), path="s.tif",
                                                        fingerprints=clustered_ints(25, 4))], dim=DIM, seed=1)
    build_index(built.path, IndexOptions(nbits=64, lists=3), client=client)
    st = built.open()
    q = built.fingerprint[:2] + np.float32(0.5)
    ed, er = knn(st.fingerprints(), st.norm2(), q, 40)
    d, r = code_search(st, q, 40)
    assert r.shape == (2, 25)
    np.testing.assert_array_equal(r, er)
    np.testing.assert_array_equal(d, ed)


def test_persisted_index_answers_like_the_streamed_one(client, store_dir, monkeypatch):
    """Persisted on the cluster (futures of sorted blocks), in this process (no cluster), or
    read per query: the same tasks, the same answer."""
    monkeypatch.setattr("dask_fp.index.layout.CODE_TASK_ROWS", 1)  # one task per Zarr chunk: several blocks to merge
    build_index(store_dir.path, IndexOptions(nbits=64), client=client)
    st = store_dir.open()
    q = store_dir.fingerprint[::23] + np.float32(0.25)
    fresh = open_index(st)
    assert fresh.blocks is None and len(fresh.ranges()) > 1
    held = open_index(st).persist()
    threads = sum(client.nthreads().values())
    assert threads > 1 and not isinstance(held.blocks[0], CodeBlock)
    assert len(held.blocks) == len(held.ranges(-(-st.committed // threads))) > 1  # one block per worker thread
    assert len({w for ws in client.who_has(held.blocks).values() for w in ws}) == len(client.nthreads())

    def no_client():
        raise ValueError("no client")

    monkeypatch.setattr("distributed.default_client", no_client)
    local = open_index(st).persist()
    assert all(isinstance(b, CodeBlock) for b in local.blocks)
    got_rows = np.concatenate([b.rows for b in local.blocks])
    np.testing.assert_array_equal(np.sort(got_rows), np.arange(st.committed))
    for kw in ({}, {"candidates": 40}, {"candidates": 40, "probes": 1}, {"candidates": len(q)}):
        want = code_search(st, q, 10, index=fresh, **kw)
        for idx in (held, local):
            got = code_search(st, q, 10, index=idx, **kw)
            np.testing.assert_array_equal(got[1], want[1])
            np.testing.assert_array_equal(got[0], want[0])


def test_stale_index_answers_exactly_for_new_rows_then_extends(client, store_dir):
    build_index(store_dir.path, IndexOptions(nbits=64), client=client)
    new = append_source(store_dir, 7, "c.tif")
    st = store_dir.open()
    x = np.concatenate([store_dir.fingerprint, new])
    assert st.committed == len(x) and open_index(st).indexed == len(store_dir.fingerprint)
    q = new[::29] + np.float32(0.25)  # queries whose neighbours are in the new, un-indexed rows
    ed, er = knn(st.fingerprints(), st.norm2(), q, 10)
    d, r = code_search(st, q, 10, candidates=len(x))
    np.testing.assert_array_equal(r, er)
    np.testing.assert_array_equal(d, ed)
    assert extend_index(store_dir.path, client=client) == len(new)
    assert extend_index(store_dir.path, client=client) == 0
    idx = open_index(store_dir.open())
    assert idx.indexed == len(x)
    assert_stored_codes(idx, x)
    d, r = code_search(store_dir.open(), q, 10, candidates=len(x))
    np.testing.assert_array_equal(r, er)


def test_search_verb_with_codes_matches_exact(client, store_dir):
    build_index(store_dir.path, IndexOptions(nbits=64), client=client)
    st = store_dir.open()
    uids = [int(u) for u in store_dir.cols["uid"][::150]]
    exact = search(st, uids=uids, k=5, method="exact").table
    codes = search(st, uids=uids, k=5, method="codes", candidates=st.committed).table
    # k = 5 de-duplicated at stride 32 / tile 64 (reach 1): 5·3² rows, plus 3² for the query's own tile.
    with pytest.raises(QueryError, match=r"candidates \(10\) is below the 54 rows fetched per query for k = 5"
                                         r" with de-duplication; pass at least 54"):
        search(st, uids=uids, k=5, method="codes", candidates=10)
    assert exact[["query", "rank", "uid", "distance"]].equals(codes[["query", "rank", "uid", "distance"]])


def test_no_index_bad_method_and_auto_choice(store_dir):
    st = store_dir.open()
    with pytest.raises(StoreError, match="no compact-code index.*dask-fp index"):
        code_search(st, store_dir.fingerprint[:1], 5)
    with pytest.raises(QueryError, match="method"):
        choose_method(st, "fast")
    assert choose_method(st, "auto") == "exact"  # small store, no index
    with pytest.raises(QueryError, match="nbits"):
        build_index(store_dir.path, IndexOptions(nbits=128))  # more bits than 64 dimensions
    with pytest.raises(QueryError, match="lists"):
        build_index(store_dir.path, IndexOptions(nbits=64, lists=10**6))  # more lists than rows
    assert default_candidates(10, 50) == 50 and default_candidates(10, 10**6) == 500
    assert default_candidates(10, 10**7) == 500 and default_candidates(100, 10**6) == 1000


def test_an_index_of_the_first_format_is_refused_with_the_rebuild_command(client, store_dir):
    """Index version 1 (one global code, no lists) cannot be searched by this code: a clear error, and
    rebuilding replaces it."""
    import zarr

    build_index(store_dir.path, IndexOptions(nbits=64), client=client)
    g = zarr.open_group(str(store_dir.path / "index"), mode="r+", zarr_format=3)
    g.attrs.update({"version": 1, "method": "itq"})
    with pytest.raises(StoreError, match=r"version/method 1/itq is not supported.*dask-fp index"):
        code_search(store_dir.open(), store_dir.fingerprint[:1], 5)
    build_index(store_dir.path, IndexOptions(nbits=64), client=client)
    assert open_index(store_dir.open()).attrs["version"] == 2


def test_cli_index_and_query_method(client, store_dir, capsys):
    addr = client.scheduler.address
    path = str(store_dir.path)
    assert main(["index", path, "--extend", "--scheduler", addr]) == 1
    assert f"{path}: no index to extend; build one with `dask-fp index {path}`" in capsys.readouterr().err
    assert main(["index", path, "--nbits", "64", "--scheduler", addr]) == 0
    n = len(store_dir.fingerprint)
    assert f"{n} rows, 64 bits (20 B/tile with list and norms), {round(n ** 0.5)} lists" in capsys.readouterr().out
    assert main(["info", path]) == 0
    assert f"index      ivf-itq v2: {n} rows coded (64 bits, {round(n ** 0.5)} lists, 20 B/tile)" in \
        capsys.readouterr().out
    assert main(["index", path, "--extend", "--lists", "3", "--scheduler", addr]) == 1
    assert "--extend encodes new rows with the trained code; --lists would change it" in capsys.readouterr().err
    uid = str(int(store_dir.cols["uid"][5]))
    assert main(["query", str(store_dir.path), "--uid", uid, "--method", "codes", "--json", "--probes", "2",
                 "--scheduler", addr]) == 0
    out = capsys.readouterr()
    assert "method codes" in out.err and '"hits"' in out.out
    append_source(store_dir, 9, "d.tif")
    assert main(["info", path, "--json"]) == 0
    ix = json.loads(capsys.readouterr().out)["index"]
    assert ix["indexed"] == n and ix["not_indexed"] > 0 and ix["usable"]
    assert main(["index", str(store_dir.path), "--extend", "--scheduler", addr]) == 0
    assert "encoded" in capsys.readouterr().out
    assert main(["index", str(store_dir.path) + "-missing", "--scheduler", addr]) == 1


def test_ingest_extends_the_index_of_the_store_it_appends_to(client, tmp_path):
    """A real ingest into an indexed store encodes its new rows with the trained code (no rebuild)."""
    from conftest import textured, write_tif

    import dask_fp

    kw = dict(model=dask_fp.ModelOptions("resnet18", weights="random", seed=5, threads=1),
              tiling=dask_fp.Tiling(64, 32), client=client, progress=False)
    out = tmp_path / "s.zarr"
    dask_fp.ingest([str(write_tif(tmp_path / "a.tif", textured(320, 320, seed=1)))], str(out), **kw)
    build_index(out, IndexOptions(nbits=64), client=client)
    before = open_index(open_store(out))
    report = dask_fp.ingest([str(write_tif(tmp_path / "b.tif", textured(192, 192, seed=2)))], str(out), **kw)
    st = open_store(out)
    idx = open_index(st)
    assert report.indexed == 5 * 5 and idx.indexed == st.committed == 9 * 9 + 5 * 5
    np.testing.assert_array_equal(idx.params.centroids, before.params.centroids)  # extended, not retrained
    assert_stored_codes(idx, np.asarray(st.arrays["fingerprint"][:]))
    # An index of the first format is not extended (a warning says how to rebuild it); the rows commit,
    # and searches (method auto) scan them exactly.
    import zarr

    zarr.open_group(str(out / "index"), mode="r+", zarr_format=3).attrs.update({"version": 1, "method": "itq"})
    said: list[str] = []
    report = dask_fp.ingest([str(write_tif(tmp_path / "c.tif", textured(192, 192, seed=3)))], str(out), log=said.append,
                            **kw)
    st = open_store(out)
    assert report.indexed == 0 and st.committed == 9 * 9 + 2 * 5 * 5
    assert any("index is of an earlier format" in m and f"dask-fp index {out}" in m for m in said), said
    assert not has_index(st) and old_index(st) and choose_method(st, "auto") == "exact"
    hits = search(st, uids=[int(st.arrays["uid"][-1])], k=3, method="auto").table
    assert len(hits) == 3
