"""Store reads whose cost grows with the question, not the store.

File operations are counted with a Python audit hook (every ``open``,
``os.listdir`` and ``os.scandir``) plus a wrapper around ``os.stat`` (what
``Path.is_file``/``exists`` call), restricted to paths inside the store: a
per-chunk walk coming back at open time, or a whole-column read in a lookup,
makes these counts grow with the store and fails the tests.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from _search_helpers import UTM17, UTM17_TRANSFORM, SourceSpec, build_store

from dask_fp.errors import QueryError, StoreError
from dask_fp.query import lonlat_queries, source_bbox, uid_queries, uid_rows
from dask_fp.store import open_store
from dask_fp.tiling import grid_shape, make_uid

RPC = 8  # rows per chunk of the test stores
_WATCH: list[tuple[str, list[str]]] = []  # (root, log) pairs being recorded


def _audit(event: str, args: tuple) -> None:
    if not _WATCH or event not in ("open", "os.listdir", "os.scandir"):
        return
    p = args[0] if args else None
    if isinstance(p, bytes | str | os.PathLike):
        s = os.fsdecode(p)
        for root, log in _WATCH:
            if s.startswith(root):
                log.append(f"{event} {s[len(root):]}")


sys.addaudithook(_audit)


@contextmanager
def file_ops(root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Record the file operations on paths under ``root`` made inside the block."""
    log: list[str] = []
    entry = (str(root), log)
    real_stat = os.stat

    def stat(path, *a, **kw):
        s = os.fsdecode(path) if isinstance(path, bytes | str | os.PathLike) else ""
        if s.startswith(str(root)):
            log.append(f"stat {s[len(str(root)):]}")
        return real_stat(path, *a, **kw)

    monkeypatch.setattr(os, "stat", stat)
    _WATCH.append(entry)
    try:
        yield log
    finally:
        _WATCH.remove(entry)
        monkeypatch.setattr(os, "stat", real_stat)


def _specs(n: int) -> list[SourceSpec]:
    """``n`` overlapping UTM sources of 7 x 9 windows, some windows dropped, one without CRS."""
    out = []
    rng = np.random.default_rng(n)
    for i in range(n):
        t = list(UTM17_TRANSFORM)
        t[2] += 40.0 * (i % 5)  # overlapping footprints: 0.5 m pixels, 256 x 320 px each
        t[5] -= 30.0 * (i // 5)
        keep = rng.random((7, 9)) > 0.2
        out.append(SourceSpec(shape=(256, 320), transform=tuple(t), path=f"s{i}.tif", keep=keep,
                              crs=None if i == 3 else UTM17))
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A small and a 6x larger store, both with RPC-row chunks (many chunk files)."""
    d = tmp_path_factory.mktemp("reads")
    return {n: build_store(d / f"s{n}", _specs(n), dim=4, rows_per_chunk=RPC, seed=n) for n in (5, 30)}


def test_open_and_info_do_not_grow_with_the_store(stores, monkeypatch):
    counts = {}
    for n, built in stores.items():
        chunks = -(-len(built.cols["uid"]) // RPC)
        assert chunks > 16  # more chunk files per array than info samples
        with file_ops(built.path, monkeypatch) as opened:
            st = open_store(built.path)
        with file_ops(built.path, monkeypatch) as summed:
            info = st.info()
        counts[n] = (len(opened), len(summed))
        assert not [op for op in opened if "/c/" in op], opened  # no chunk file touched at open
        assert info["chunk_files"] == 10 * chunks and info["store_bytes_on_disk_estimated"]
        assert info["chunk_files_stated"] == 10 * 16
    assert counts[5] == counts[30], counts
    assert counts[30][0] <= 30


def test_info_bytes_are_exact_when_every_chunk_is_sampled(stores):
    st = open_store(stores[5].path)
    from dask_fp.store.reader import disk_bytes

    exact, stated, files = disk_bytes(st, sample=10**6)
    assert stated == files
    walked = sum(f.stat().st_size for name in st.arrays for f in (st.path / name / "c").rglob("*") if f.is_file())
    assert exact == walked
    estimate, _, _ = disk_bytes(st)
    assert abs(estimate - exact) <= 0.25 * exact


def test_uid_lookup_reads_only_its_source(stores, monkeypatch):
    built = stores[30]
    st = open_store(built.path)
    st.source_rows()  # the row ranges: one read of the (small) table, counted apart
    rng = np.random.default_rng(1)
    for r in rng.choice(len(built.cols["uid"]), 8, replace=False):
        u = int(built.cols["uid"][r])
        lo, hi = st.source_rows()[int(built.cols["source"][r])]
        with file_ops(built.path, monkeypatch) as ops:
            (q,) = uid_queries(st, [u])
        uid_files = {op.split()[-1] for op in ops if op.startswith("open /uid/c/")}
        assert len(uid_files) <= (hi - 1) // RPC - lo // RPC + 1
        assert {op.split()[-1] for op in ops if op.startswith("open /fingerprint/")} == {f"/fingerprint/c/{r // RPC}/0"}
        np.testing.assert_array_equal(q.vector, built.fingerprint[r])
        assert q.own == (int(built.cols["source"][r]), int(built.cols["wy"][r]), int(built.cols["wx"][r]))


def test_uid_rows_agree_with_a_whole_column_search(stores):
    built = stores[30]
    st = open_store(built.path)
    col = built.cols["uid"]
    rng = np.random.default_rng(2)
    stored = rng.choice(col, 50)
    grid = make_uid(*np.meshgrid(np.arange(30), np.arange(7), np.arange(9), indexing="ij"))
    absent = np.setdiff1d(grid.ravel(), col)  # windows dropped as empty
    assert absent.size > 30
    asked = np.concatenate([stored, rng.choice(absent, 30), make_uid([2, 99], [100, 0], [0, 5])])
    want = np.array([np.flatnonzero(col == u)[0] if (col == u).any() else -1 for u in asked])
    np.testing.assert_array_equal(uid_rows(st, asked.tolist()), want)
    with pytest.raises(QueryError, match="is not in"):
        uid_queries(st, [int(absent[0])])


def _brute_lonlat(built, st, lon: float, lat: float) -> int | None:
    """The old whole-store answer: every source, every stored window holding the point."""
    from affine import Affine
    from pyproj import Transformer

    t = built.tiling
    best = None
    for src in st.sources:
        if not src.get("crs"):
            continue
        x, y = Transformer.from_crs("EPSG:4326", src["crs"], always_xy=True).transform(lon, lat)
        col, row = ~Affine(*src["transform"][:6]) * (x, y)
        for r in np.flatnonzero(built.cols["source"] == src["index"]):
            wy, wx = built.cols["wy"][r], built.cols["wx"][r]
            if wy * t.stride <= row < wy * t.stride + t.tile and wx * t.stride <= col < wx * t.stride + t.tile:
                d = ((wy * t.stride + t.tile / 2 - row) ** 2 + (wx * t.stride + t.tile / 2 - col) ** 2) / t.tile**2
                if best is None or (d, r) < best:
                    best = (d, int(r))
    return None if best is None else best[1]


def test_lonlat_lookup_agrees_with_brute_force_and_reads_few_chunks(stores, monkeypatch):
    from pyproj import Transformer

    built = stores[30]
    st = open_store(built.path)
    _ = st.sources, st.source_rows()  # the sources table is read once per Store, counted apart
    to_ll = Transformer.from_crs(UTM17, "EPSG:4326", always_xy=True)
    rng = np.random.default_rng(3)
    xs = UTM17_TRANSFORM[2] + rng.uniform(-20, 330, 40)
    ys = UTM17_TRANSFORM[5] - rng.uniform(-20, 300, 40)
    found = 0
    for x, y in zip(xs, ys, strict=True):
        lon, lat = to_ll.transform(x, y)
        want = _brute_lonlat(built, st, lon, lat)
        with file_ops(built.path, monkeypatch) as ops:
            if want is None:
                with pytest.raises(QueryError, match="no stored tile contains"):
                    lonlat_queries(st, [(lon, lat)])
                continue
            (q,) = lonlat_queries(st, [(lon, lat)])
        found += 1
        assert q.own == (int(built.cols["source"][want]), int(built.cols["wy"][want]), int(built.cols["wx"][want]))
        np.testing.assert_array_equal(q.vector, built.fingerprint[want])
        # uid chunks of the few sources whose box holds the point, never the whole column
        uid_files = {op for op in ops if op.startswith("open /uid/c/")}
        assert len(uid_files) < -(-len(built.cols["uid"]) // RPC) // 2
    assert found > 20


def test_source_bbox_computed_for_old_records_holds_the_source(stores):
    from pyproj import Transformer

    st = open_store(stores[5].path)
    for src in st.sources:
        box = source_bbox(src)
        if not src.get("crs"):
            assert box is None
            continue
        assert box is not None
        c = Transformer.from_crs(src["crs"], "EPSG:4326", always_xy=True)
        ny, nx = grid_shape(*src["shape"], tile=64, stride=32)
        for r, k in ((0, 0), (src["shape"][0], src["shape"][1]), (0, src["shape"][1])):
            t = src["transform"]
            lon, lat = c.transform(t[0] * k + t[2], t[4] * r + t[5])
            assert box[0] - 1e-9 <= lon <= box[2] + 1e-9 and box[1] - 1e-9 <= lat <= box[3] + 1e-9
    assert source_bbox({"bbox_wgs84": [1, 2, 3, 4], "crs": None}) == (1.0, 2.0, 3.0, 4.0)


def test_deleted_chunk_is_found_by_the_reads_that_touch_it(tmp_path):
    built = build_store(tmp_path / "s", _specs(4), dim=4, rows_per_chunk=RPC)
    (built.path / "fingerprint" / "c" / "5" / "0").unlink()
    (built.path / "lat" / "c" / "6").unlink()
    st = open_store(built.path)  # opening stats no chunk file: still fine
    np.testing.assert_array_equal(st.read("fingerprint", np.array([0, 17])), built.fingerprint[[0, 17]])
    with pytest.raises(StoreError, match=r"fingerprint/c/5/0 missing \(rows 40\.\.47 .*s\d\.tif.*damaged"):
        st.read("fingerprint", np.array([40]))
    with pytest.raises(StoreError, match=r"lat/c/6 missing .*damaged"):
        st.coords(np.array([1, 50]))
    with pytest.raises(StoreError, match=r"fingerprint/c/5/0 missing .*damaged"):
        st.fingerprints().compute(scheduler="sync")
    with pytest.raises(StoreError, match=r"damaged"):
        st.verify()
    st.coords(np.array([1, 2, 40]))["lon"]  # lat's chunk 6 holds rows 48..55: not touched


def test_info_verify_walks_every_chunk_file_on_request(tmp_path):
    """`dask-fp info --verify` finds a deleted chunk file in the middle of a store that plain `info`
    (which samples) and opening (which stats none) need not touch."""
    import subprocess
    import sys

    built = build_store(tmp_path / "v.zarr", [SourceSpec(shape=(970, 1310), keep=None, path="a.tif")], dim=16,
                        rows_per_chunk=64, seed=1)
    run = [sys.executable, "-m", "dask_fp.cli", "info", str(built.path)]
    ok = subprocess.run([*run, "--verify"], capture_output=True, text=True)
    assert ok.returncode == 0 and "verified" in ok.stdout
    (built.path / "wx" / "c" / "7").unlink()  # rows 448..511 of 1131
    bad = subprocess.run([*run, "--verify"], capture_output=True, text=True)
    assert bad.returncode == 1 and "wx/c/7 missing (rows 448..511" in bad.stderr
