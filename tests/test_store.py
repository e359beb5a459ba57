"""The store: schema, xarray, append, idempotent re-ingest, crash safety, locking, mismatches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr
from conftest import textured, write_tif

import dask_fp
from dask_fp.errors import StoreError, StoreLockedError, StoreMismatchError
from dask_fp.models import ModelOptions
from dask_fp.store import COORDS, LOCK_NAME, StoreWriter, break_lock, writer_lock
from dask_fp.tiling import Tiling

RANDOM = ModelOptions("resnet18", weights="random", seed=7, threads=1)
TILING = Tiling(64, 32, 0.5)


def run(paths, store, client, **kw):
    kw.setdefault("model", RANDOM)
    kw.setdefault("tiling", TILING)
    return dask_fp.ingest([str(p) for p in paths], str(store), client=client, progress=False, **kw)


@pytest.fixture
def two_tifs(tmp_path):
    a = write_tif(tmp_path / "a.tif", textured(160, 192, seed=2))
    b = write_tif(tmp_path / "b.tif", textured(128, 128, seed=3), crs=None)
    return a, b


def test_schema_and_attributes(two_tifs, tmp_path, client):
    a, _ = two_tifs
    out = tmp_path / "s.zarr"
    run([a], out, client)
    st = dask_fp.open_store(out)
    n = st.committed
    assert n == 3 * 5
    assert st.arrays["fingerprint"].shape == (n, 512) and st.arrays["fingerprint"].dtype == np.float32
    dtypes = {"uid": np.int64, "source": np.int32, "wy": np.int32, "wx": np.int32, "x": np.float64,
              "y": np.float64, "lon": np.float64, "lat": np.float64, "norm2": np.float32}
    for name, dt in dtypes.items():
        assert st.arrays[name].shape == (n,) and st.arrays[name].dtype == dt
    a_ = st.attrs
    for key in ("model", "weights", "weights_sha256", "feature_dim", "tile", "stride", "max_empty",
                "normalisation", "dask_fp_version", "committed_sources", "committed"):
        assert key in a_
    assert a_["model"] == "resnet18" and a_["weights"] == "random" and a_["tile"] == 64
    assert "sources" not in a_ and a_["committed_sources"] == 1  # the table is in arrays, not an attribute
    src = st.sources[0]
    assert src["sha256"] and src["crs"] and src["transform"] and src["shape"] == [160, 192] and src["tiles"] == n
    c = st.coords()
    assert len(np.unique(c["uid"])) == n
    assert np.isfinite(c["lon"]).all() and (c["lat"] > 29).all() and (c["lat"] < 31).all()


def test_plain_xarray_open_zarr(two_tifs, tmp_path, client):
    out = tmp_path / "x.zarr"
    run([two_tifs[0]], out, client)
    ds = xr.open_zarr(out)
    assert ds["fingerprint"].dims == ("tile", "feature")
    assert set(COORDS) <= set(ds.coords)
    assert ds.sizes["tile"] == ds.attrs["committed"] == 15
    np.testing.assert_allclose(ds["norm2"].values, (ds["fingerprint"].values ** 2).sum(1), rtol=1e-5)
    assert dask_fp.open_store(out).dataset().sizes["tile"] == 15


def test_append_and_reingest_is_a_noop(two_tifs, tmp_path, client):
    a, b = two_tifs
    out = tmp_path / "ap.zarr"
    run([a], out, client)
    first = np.asarray(dask_fp.open_store(out).fingerprints())
    msgs = []
    rep = run([a, b], out, client, log=msgs.append)
    assert rep.sources[0].skipped and not rep.sources[1].skipped
    assert any("no CRS" in m for m in msgs) and any("skip:" in m for m in msgs)
    st = dask_fp.open_store(out)
    assert st.committed == 15 + 9 and len(st.sources) == 2
    np.testing.assert_array_equal(np.asarray(st.fingerprints())[:15], first)
    c = st.coords()
    assert (c["source"][15:] == 1).all() and np.isnan(c["lon"][15:]).all()
    rep = run([a, b], out, client)
    assert all(s.skipped for s in rep.sources)
    assert dask_fp.open_store(out).committed == 24


def test_format_1_store_is_read_and_migrated_by_the_next_writer(two_tifs, tmp_path, client):
    """A store of format 1 (sources in a growing attribute) opens as before and is moved into the
    sources table, in one attributes update, by the next ingest."""
    import shutil

    import zarr

    a, b = two_tifs
    out = tmp_path / "v1.zarr"
    run([a], out, client)
    before = dask_fp.open_store(out).sources
    g = zarr.open_group(str(out), mode="r+", zarr_format=3, use_consolidated=False)
    attrs = {k: v for k, v in g.attrs.items() if k != "committed_sources"}
    g.attrs.put({**attrs, "format_version": 1, "sources": before})
    for name in ("source_table", "source_rows"):
        shutil.rmtree(out / name)
    old = dask_fp.open_store(out)
    assert old.sources == before and old.committed == 15
    run([a, b], out, client)  # a: skipped by hash (found in the old attribute); b: appended
    st = dask_fp.open_store(out)
    assert st.attrs["format_version"] == 2 and "sources" not in st.attrs
    assert [s["path"] for s in st.sources] == [str(a), str(b)] and st.sources[0] == before[0]
    assert st.committed == 15 + 3 * 3  # b: 128 px, 64 px tiles at stride 32


def test_crash_between_rows_and_commit(two_tifs, tmp_path, client, monkeypatch):
    a, b = two_tifs
    out = tmp_path / "crash.zarr"
    run([a], out, client)
    before = np.asarray(dask_fp.open_store(out).fingerprints())

    def die(self, entry, committed):
        raise KeyboardInterrupt("simulated crash after the rows were written")

    monkeypatch.setattr(StoreWriter, "_commit", die)
    with pytest.raises(KeyboardInterrupt):
        run([b], out, client)
    monkeypatch.undo()
    # Rows were written past `committed`, but readers see only the committed source.
    st = dask_fp.open_store(out)
    assert st.committed == 15 and len(st.sources) == 1
    np.testing.assert_array_equal(np.asarray(st.fingerprints()), before)
    assert xr.open_zarr(out).sizes["tile"] == 15
    assert not (out / LOCK_NAME).exists()
    # The next run completes with exactly the expected tiles.
    run([a, b], out, client)
    st = dask_fp.open_store(out)
    assert st.committed == 24 and len(np.unique(st.coords()["uid"])) == 24


def test_second_writer_is_refused_and_named(two_tifs, tmp_path, client):
    out = tmp_path / "lock.zarr"
    out.mkdir()
    with writer_lock(out):
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()} on {socket.gethostname()}"):
            run([two_tifs[0]], out, client)
    run([two_tifs[0]], out, client)  # free again


def test_stale_lock_of_a_dead_process_is_cleared(two_tifs, tmp_path, client):
    out = tmp_path / "stale.zarr"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (out / LOCK_NAME).write_text(json.dumps({"pid": int(dead), "host": socket.gethostname(),
                                             "started": "then", "argv": "dask-fp ingest"}))
    run([two_tifs[0]], out, client)
    assert dask_fp.open_store(out).committed == 15


def test_lock_of_another_host_needs_force(tmp_path):
    out = tmp_path / "remote.zarr"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x", "argv": "y"}))
    with pytest.raises(StoreLockedError, match="elsewhere"):
        break_lock(out)
    assert break_lock(out, force=True)["host"] == "elsewhere"
    assert not (out / LOCK_NAME).exists()


def test_mismatched_model_or_tiling_is_refused(two_tifs, tmp_path, client):
    out = tmp_path / "mm.zarr"
    run([two_tifs[0]], out, client)
    with pytest.raises(StoreMismatchError, match="tile: store has 64, this run uses 128"):
        run([two_tifs[1]], out, client, tiling=Tiling(128, 64))
    with pytest.raises(StoreMismatchError, match="weights_sha256"):
        run([two_tifs[1]], out, client, model=ModelOptions("resnet18", weights="random", seed=8))
    with pytest.raises(StoreMismatchError, match="model"):
        run([two_tifs[1]], out, client, model=ModelOptions("efficientnet-lite0"))
    assert dask_fp.open_store(out).committed == 15


def test_store_path_problems(tmp_path, two_tifs, client):
    f = tmp_path / "file.zarr"
    f.write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        run([two_tifs[0]], f, client)
    with pytest.raises(StoreError, match="no fingerprint store"):
        dask_fp.open_store(tmp_path / "nothing.zarr")
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a fingerprint store"):
        run([two_tifs[0]], other, client)


def test_damaged_metadata_is_reported(two_tifs, tmp_path, client):
    out = tmp_path / "dmg.zarr"
    run([two_tifs[0]], out, client)
    (out / "zarr.json").write_text("{ not json")
    with pytest.raises(StoreError, match="not a readable Zarr"):
        dask_fp.open_store(out)
