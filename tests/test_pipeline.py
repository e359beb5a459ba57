"""The scaled-out ingest: many sources in flight, worker-side writes, the client's bytes, hashing.

Real LocalCluster, real GeoTIFFs, real Zarr stores. Stores are made with small
write units (16 rows per chunk, set through ``rows_per_chunk``) so that block
rows straddle chunk boundaries and several sources share one chunk.
"""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import xarray as xr
from conftest import textured, write_tif

import dask_fp
from dask_fp.fingerprint import BlockResult
from dask_fp.inspection import RasterOptions
from dask_fp.models import ModelOptions
from dask_fp.store import COORDS
from dask_fp.store.region import Piece, SourceGeo, region_rows
from dask_fp.tiling import Tiling, make_uid, window_centres

RANDOM = ModelOptions("resnet18", weights="random", seed=7, threads=1)
TILING = Tiling(64, 32, 0.5)


@pytest.fixture
def small_chunks(monkeypatch):
    import dask_fp.store.writer as w

    monkeypatch.setattr(w, "rows_per_chunk", lambda dim, itemsize: 16)


def run(paths, store, client, **kw):
    return dask_fp.ingest([str(p) for p in paths], str(store), client=client, progress=False, model=RANDOM,
                          tiling=TILING, raster=RasterOptions(chunk=64), **kw)


@pytest.fixture
def many(tmp_path):
    """Seven small rasters (one with no CRS, one all black, one smaller than a tile)."""
    out = []
    for i in range(7):
        h, w = 128 + 32 * (i % 3), 160 + 32 * (i % 2)
        data = textured(h, w, seed=100 + i)
        if i == 3:
            data[:] = 0
        if i == 5:
            data = textured(40, 50, seed=9)
        out.append(write_tif(tmp_path / f"s{i}.tif", data, crs=None if i == 2 else "EPSG:32617"))
    return out


def test_many_sources_in_flight_equal_one_by_one(many, tmp_path, client, small_chunks):
    together, apart = tmp_path / "together.zarr", tmp_path / "apart.zarr"
    rep = run(many, together, client)
    for p in many:
        run([p], apart, client)
    a, b = dask_fp.open_store(together), dask_fp.open_store(apart)
    assert a.arrays["fingerprint"].chunks[0] == 16 and a.committed > 3 * 16  # rows span several chunks
    assert rep.tiles == a.committed == b.committed
    assert [(s["path"], s["rows"]) for s in a.sources] == [(s["path"], s["rows"]) for s in b.sources]
    assert {s["compute_precision"] for s in a.sources} == {"float32"}  # CPU workers
    for k in ("fingerprint", *COORDS):
        np.testing.assert_array_equal(np.asarray(a.arrays[k][: a.committed]), np.asarray(b.arrays[k][: b.committed]))
    # Rows are dense, in source order, and each source's rows hold its uids (independent check).
    c = a.coords()
    for s in a.sources:
        lo, hi = s["rows"]
        assert (c["source"][lo:hi] == s["index"]).all()
        np.testing.assert_array_equal(c["uid"][lo:hi], make_uid(s["index"], c["wy"][lo:hi], c["wx"][lo:hi]))
    fp = np.asarray(a.fingerprints(), dtype=np.float32)
    np.testing.assert_allclose(np.asarray(a.norm2()), (fp * fp).sum(1), rtol=1e-5)
    # Plain xarray sees exactly the committed rows; the arrays are trimmed after the run.
    assert xr.open_zarr(together).sizes["tile"] == a.committed == a.arrays["uid"].shape[0]


def test_client_receives_no_fingerprints(tmp_path, client):
    tifs = [write_tif(tmp_path / f"r{i}.tif", textured(256, 256, seed=60 + i)) for i in range(3)]
    rep = run(tifs, tmp_path / "s.zarr", client)
    st = dask_fp.open_store(tmp_path / "s.zarr")
    fp_bytes = st.committed * st.dim * 4
    assert st.committed == rep.tiles > 0
    assert 0 < rep.client_bytes <= 0.01 * fp_bytes, (rep.client_bytes, fp_bytes)


def test_hashing_rule_same_bytes_skip_changed_bytes_ingest(tmp_path, client):
    a = write_tif(tmp_path / "a.tif", textured(128, 128, seed=1))
    copy = tmp_path / "renamed.tif"
    shutil.copyfile(a, copy)
    store = tmp_path / "h.zarr"
    run([a], store, client)
    st = dask_fp.open_store(store)
    assert st.sources[0]["sha256"] == hashlib.sha256(a.read_bytes()).hexdigest()  # computed on a worker
    rep = run([copy], store, client)
    assert rep.sources[0].skipped and dask_fp.open_store(store).committed == st.committed
    # One byte changed at the very end (outside anything a header check reads): a new source.
    raw = bytearray(copy.read_bytes())
    raw.extend(b"\0")
    copy.write_bytes(bytes(raw))
    rep = run([copy], store, client)
    assert not rep.sources[0].skipped and len(dask_fp.open_store(store).sources) == 2


def test_bbox_wgs84_covers_every_tile(many, tmp_path, client):
    store = tmp_path / "b.zarr"
    run(many, store, client)
    st = dask_fp.open_store(store)
    c = st.coords()
    for s in st.sources:
        lo, hi = s["rows"]
        if s["crs"] is None:
            assert s["bbox_wgs84"] is None
            continue
        if s["shape"][0] < 64:
            assert s["bbox_wgs84"] is None  # no windows
            continue
        x0, y0, x1, y1 = s["bbox_wgs84"]
        assert x0 < x1 and y0 < y1
        assert (c["lon"][lo:hi] >= x0).all() and (c["lon"][lo:hi] <= x1).all()
        assert (c["lat"][lo:hi] >= y0).all() and (c["lat"][lo:hi] <= y1).all()


def test_region_rows_kernel():
    """Pure numpy: pieces of two block results become the rows a direct computation gives."""
    rng = np.random.default_rng(0)
    t = (0.5, 0.0, 100.0, 0.0, -0.5, 200.0)
    r1 = BlockResult(np.array([0, 0, 1], np.int32), np.array([0, 1, 0], np.int32),
                     rng.normal(size=(3, 4)).astype(np.float32), 4)
    r2 = BlockResult(np.array([2, 3], np.int32), np.array([5, 6], np.int32),
                     rng.normal(size=(2, 4)).astype(np.float32), 4)
    g = SourceGeo(3, t, None, 64, 32)
    rows = region_rows([Piece(10, 1, 3, g), Piece(12, 0, 1, g)], [r1, r2], "float16", 4)
    wy, wx = np.array([0, 1, 2]), np.array([1, 0, 5])
    np.testing.assert_array_equal(rows["uid"], make_uid(3, wy, wx))
    want_fp = np.concatenate([r1.features[1:3], r2.features[:1]]).astype(np.float16)
    np.testing.assert_array_equal(rows["fingerprint"], want_fp)
    np.testing.assert_allclose(rows["norm2"], (want_fp.astype(np.float32) ** 2).sum(1), rtol=1e-6)
    x, y = window_centres(t, wy, wx, tile=64, stride=32)
    np.testing.assert_array_equal(rows["x"], x)
    np.testing.assert_array_equal(rows["y"], y)
    assert np.isnan(rows["lon"]).all() and (rows["source"] == 3).all()
