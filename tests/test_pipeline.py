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


# ----------------------------------------------------------------------------- errors that say what happened


class _CudaOomModel:
    """A registry model whose forward pass fails the way torch does when a GPU is out of memory."""

    precision = "bfloat16-autocast"

    def _fail(self):
        import torch

        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 3.00 GiB. GPU 0 has a total capacity of 139.72 GiB of which"
            " 1.19 GiB is free.\nIncluding non-PyTorch memory, this process has 138.5 GiB memory in use.")

    def embed(self, pixels):
        self._fail()

    def embed_windows(self, rgb, iy, ix, *, tile, stride):
        self._fail()


def test_cuda_out_of_memory_in_a_block_task_says_so_not_is_the_file_complete(tmp_path, monkeypatch, capfd):
    """A CUDA OOM raised by the model inside a block task, on a real (in-process) cluster, through the CLI:
    reported as the GPU running out of memory with what to shrink; the store is left as it was."""
    from distributed import Client, LocalCluster

    from dask_fp.cli import main
    from dask_fp.models import REGISTRY, ModelSpec

    monkeypatch.setitem(REGISTRY, "oom-test", ModelSpec(
        name="oom-test", dim=8, builder=_CudaOomModel, mean=(0.0,) * 3, std=(1.0,) * 3, weights=None,
        normalisation="none (test model)"))
    tif = write_tif(tmp_path / "a.tif", textured(128, 128, seed=3))
    store = tmp_path / "s.zarr"
    # Workers in this process (threads), so they see the test registry entry.
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster):
        args = ["--tile", "64", "--stride", "32", "--chunk", "64", "--scheduler", cluster.scheduler_address]
        capfd.readouterr()
        rc = main(["ingest", str(tif), "--store", str(store), "--model", "oom-test", *args])
        err = capfd.readouterr().err
        assert rc == 1
        assert "a.tif: block" in err and "the GPU ran out of memory" in err and "CUDA out of memory" in err
        assert "--batch-size" in err and "store is intact" in err
        assert "is the file complete" not in err.lower() and "damaged" not in err
        # nothing committed, the lock released: the same command with a working model goes through
        assert dask_fp.open_store(store).committed == 0
        assert main(["ingest", str(tif), "--store", str(tmp_path / "ok.zarr"), "--model", "colour-layout",
                     *args]) == 0


def test_a_lost_worker_is_reported_as_a_lost_worker_not_a_damaged_store_or_file(tmp_path):
    """SIGKILL the worker process that runs block tasks, on a real multi-process cluster where Dask
    gives up at the first worker death (allowed-failures 0): a ClusterError naming the worker; the
    store stays readable with nothing of the source committed, and a re-run completes it."""
    import os
    import signal

    import dask
    from distributed import Client, LocalCluster

    tif = write_tif(tmp_path / "big.tif", textured(256, 256, seed=11), block=64)  # 16 block tasks
    store = tmp_path / "lost.zarr"
    opts = dict(model=RANDOM, tiling=TILING, raster=RasterOptions(chunk=64))
    killed: list[str] = []
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                         dashboard_address=None) as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)

        def kill_a_busy_worker(done: int, total: int, rate: float) -> None:
            if killed:
                return
            busy = [a for a, ks in client.processing().items() if any("fingerprint-" in str(k) for k in ks)]
            if busy:
                os.kill(pids[busy[0]], signal.SIGKILL)
                killed.append(busy[0])

        with pytest.raises(dask_fp.ClusterError) as info:
            dask_fp.ingest([str(tif)], str(store), client=client, progress=kill_a_busy_worker, **opts)
        msg = str(info.value)
        # Dask reports it as KilledWorker for the task, or as its dependent's future cancelled
        assert killed and "worker died" in msg and "store is intact" in msg
        assert "damaged" not in msg and "is the file complete" not in msg.lower()
        assert dask_fp.open_store(store).committed == 0
        client.wait_for_workers(2, timeout=120)
        rep = dask_fp.ingest([str(tif)], str(store), client=client, progress=False, **opts)
    assert rep.tiles == dask_fp.open_store(store).committed == 7 * 7


def test_lost_results_are_cluster_errors_and_killed_worker_names_the_worker():
    """The ways a task's result goes missing without the task itself failing: the connection to the
    cluster closes, the scheduler cancels the future; and Dask's KilledWorker, with its numbers."""
    from distributed.client import FutureCancelledError
    from distributed.comm.core import CommClosedError

    from dask_fp.pipeline import describe_failure

    for e in (CommClosedError("in <TCP (closed)>: Stream is closed"),
              FutureCancelledError("fingerprint-abc", "scheduler-connection-lost")):
        got = describe_failure(e, "a.tif: block (0, 0)")
        assert isinstance(got, dask_fp.ClusterError) and "result was lost" in str(got) and "worker died" in str(got)
        assert "a.tif: block (0, 0)" in str(got) and "is the file complete" not in str(got).lower()
    from distributed.core import Status
    from distributed.scheduler import KilledWorker, WorkerState

    ws = WorkerState(address="tcp://10.0.0.7:4001", status=Status.running, pid=1, name="w7", nthreads=1,
                     memory_limit=0, local_directory="", nanny=None, server_id="w7")
    got = describe_failure(KilledWorker("fingerprint-abc", ws, 3), "a.tif: block (0, 0)")
    assert isinstance(got, dask_fp.ClusterError) and "a worker died running it" in str(got)
    assert "ran it on 4 worker(s)" in str(got) and "tcp://10.0.0.7:4001" in str(got) and "= 3" in str(got)
    bad = describe_failure(ValueError("TIFFReadEncodedTile() failed"), "a.tif: block (0, 0)")
    assert isinstance(bad, dask_fp.RasterError) and "Is the file complete" in str(bad)
