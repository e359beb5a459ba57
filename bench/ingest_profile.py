"""Where a worker's time goes in one ingest: tiles/s, CPU seconds, and Dask's profile of the block tasks.

    python bench/ingest_profile.py RASTER [--model colour-layout] [--chunk 2048] [--threads 1]

One worker process (``--threads`` threads), a warm-up ingest first (imports,
model load), then the timed ingest of ``RASTER`` into a fresh store. Prints
tiles/s, the user + system CPU seconds of the worker and of this (client)
process during the timed run, and the worker's statistical profile (Dask's
own sampler at 5 ms): functions by cumulative and by own share of samples.
The ``dask_fp`` imported is the first on ``PYTHONPATH``, so the same script
profiles another checkout (``PYTHONPATH=/path/to/other/checkout``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    import dask
    import psutil
    from distributed import Client, LocalCluster
    from gpu import profile_summary

    import dask_fp
    from dask_fp.models import ModelOptions
    from dask_fp.raster import RasterOptions

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("raster")
    p.add_argument("--model", default="colour-layout")
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    model = ModelOptions(a.model, weights=None if a.model == "colour-layout" else "random")
    work = Path(tempfile.mkdtemp(prefix="dask-fp-profile-"))
    config = {"distributed.worker.profile.interval": "5ms", "distributed.worker.profile.cycle": "100ms"}
    try:
        with dask.config.set(config), LocalCluster(n_workers=1, threads_per_worker=a.threads, processes=True,
                                                   host="127.0.0.1", dashboard_address=None) as lc, \
                Client(lc) as client:
            def cpu() -> float:
                return sum(client.run(lambda: sum(psutil.Process().cpu_times()[:2])).values())

            def run(store: Path) -> int:
                rep = dask_fp.ingest([a.raster], str(store), model=model, client=client, progress=False,
                                     raster=RasterOptions(chunk=a.chunk), log=lambda m: None)
                return rep.tiles

            run(work / "warm.zarr")
            c0, m0 = cpu(), sum(psutil.Process().cpu_times()[:2])
            t0, wall0 = time.perf_counter(), time.time()
            n = run(work / "timed.zarr")
            dt = time.perf_counter() - t0
            worker_cpu, client_cpu = cpu() - c0, sum(psutil.Process().cpu_times()[:2]) - m0
            print(f"{n} tiles in {dt:.2f} s = {n / dt:,.0f} tiles/s; worker CPU {worker_cpu:.2f} s,"
                  f" client CPU {client_cpu:.2f} s ({a.model}, chunk {a.chunk}, 1 worker x {a.threads} threads)")
            time.sleep(1.0)  # the worker's last profile cycle
            print(profile_summary(client, wall0))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
