"""The allocator setting of worker tasks (dask_fp.malloc): applied once per worker by the block tasks."""

from __future__ import annotations

import dask_fp
from dask_fp.models import ModelOptions


def tuned() -> bool:
    from dask_fp import malloc

    return bool(malloc._malloc_tuned)


def test_block_tasks_tune_the_allocator_of_the_workers_that_run_them(tif, tmp_path):
    """A fresh worker (started by a nanny, with Dask's MALLOC_TRIM_THRESHOLD_) is untuned until it
    runs a block task of an ingest, and tuned after."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as lc, Client(lc) as c:
        assert set(c.run(lambda: __import__("os").environ.get("MALLOC_TRIM_THRESHOLD_")).values()) == {"65536"}
        assert set(c.run(tuned).values()) == {False}
        dask_fp.ingest([str(tif)], str(tmp_path / "s.zarr"), model=ModelOptions("colour-layout"),
                       tiling=dask_fp.Tiling(64, 32, 0.5), client=c, progress=False)
        assert set(c.run(tuned).values()) == {True}
