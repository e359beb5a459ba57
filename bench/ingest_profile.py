"""Where a worker's time goes in one ingest: tiles/s, CPU seconds, and Dask's profile of the block tasks.

    python bench/ingest_profile.py RASTER [--model colour-layout] [--chunk 2048] [--threads 1]

One worker process (``--threads`` threads), a warm-up ingest first (imports,
model load), then the timed ingest of ``RASTER`` into a fresh store. Prints
tiles/s, the user + system CPU seconds of the worker and of this (client)
process during the timed run, and the worker's statistical profile (Dask's
own sampler at 5 ms): functions by cumulative and by own share of samples.
The ``dask_fp`` imported is the first on ``PYTHONPATH``, so the same script
profiles another checkout (``PYTHONPATH=/path/to/other/checkout``).

With ``--stages`` (this checkout only), no Dask: the block tasks' steps run
in this process, one block after another, and their CPU seconds are summed
per stage (read with halo, read without halo for comparison, uint8 + empty
mask, empty fractions, model), next to the rasterio peer of bench/ingest.py
section 7 on the same raster.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def profile_summary(client, start: float, top: int = 30) -> str:
    """The worker profile since ``start``: functions by cumulative and by own share of samples."""
    import collections

    prof = client.profile(start=start)
    cum: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()

    def walk(node: dict, stack: frozenset) -> None:
        d = node.get("description") or {}
        key = f"{d.get('name')} ({Path(d.get('filename', '?')).name}:{d.get('line_number', '')})" if d else "all"
        kids = list(node.get("children", {}).values())
        if key not in stack:
            cum[key] += node["count"]
        own[key] += node["count"] - sum(k["count"] for k in kids)
        for k in kids:
            walk(k, stack | {key})

    walk(prof, frozenset())
    total = max(prof["count"], 1)
    lines = [f"worker profile: {total} samples", "cumulative:"]
    lines += [f"  {v / total:6.1%} {k}" for k, v in cum.most_common(top)]
    lines += ["own:"] + [f"  {v / total:6.1%} {k}" for k, v in own.most_common(top)]
    return "\n".join(lines)


def stages(raster: str, model_name: str, chunk: int) -> None:
    """CPU seconds per step of the block tasks, in this process, against the rasterio peer."""
    import numpy as np
    from ingest_peers import rasterio_windows

    from dask_fp.embedder import load_model
    from dask_fp.fingerprint import plan_blocks, read_block
    from dask_fp.inspection import inspect_raster
    from dask_fp.models import ModelOptions, resolve_weights
    from dask_fp.raster import limit_gdal_cache, open_raster, to_rgb_and_empty
    from dask_fp.tiling import Tiling, grid_shape, window_empty_fraction

    tiling = Tiling()
    model = ModelOptions(model_name, weights=None if model_name == "colour-layout" else "random")
    loaded = load_model(model, resolve_weights(model))
    spec = inspect_raster(raster, content_hash=False)
    chunks = open_raster(spec, tiling, chunk=chunk).chunks
    ys, xs = (np.concatenate([[0], np.cumsum(c)]).astype(int) for c in chunks[1:])
    plans = plan_blocks(chunks[1:], *grid_shape(spec.height, spec.width, tile=256, stride=128), 128)
    limit_gdal_cache()
    for _round in range(2):  # the first round warms up (page cache, imports)
        t = dict.fromkeys(["read with halo", "read without halo", "uint8 + empty mask", "empty fractions",
                           "model"], 0.0)
        kept = 0
        for plan in plans:
            i, j = plan.index
            rows = (int(ys[i]), int(min(ys[i + 1] + tiling.halo, ys[-1])))
            cols = (int(xs[j]), int(min(xs[j + 1] + tiling.halo, xs[-1])))
            c0 = time.process_time()
            read_block(spec, (int(ys[i]), int(ys[i + 1])), (int(xs[j]), int(xs[j + 1])))
            c1 = time.process_time()
            block = read_block(spec, rows, cols)
            c2 = time.process_time()
            rgb, empty = to_rgb_and_empty(block, n_colour=3, has_alpha=False, nodata=spec.nodata, scale=None)
            c3 = time.process_time()
            frac = window_empty_fraction(empty, tile=256, stride=128, n_wy=plan.wy1 - plan.wy0,
                                         n_wx=plan.wx1 - plan.wx0)
            iy, ix = np.nonzero(frac <= tiling.max_empty)
            c4 = time.process_time()
            loaded.embed_windows(rgb, iy, ix, tile=256, stride=128)
            c5 = time.process_time()
            kept += len(iy)
            for k, v in zip(t, (c2 - c1, c1 - c0, c3 - c2, c4 - c3, c5 - c4), strict=True):
                t[k] += v
        c0 = time.process_time()
        n_peer = rasterio_windows(Path(raster), model, tiling)
        peer = time.process_time() - c0
    print(f"{raster}: {kept} tiles, {len(plans)} blocks of {chunk} px, {model_name}; CPU seconds (2nd round):")
    for k, v in t.items():
        print(f"  {k:20s} {v:6.3f}")
    task = sum(v for k, v in t.items() if k != "read without halo")
    print(f"  block tasks total    {task:6.3f}  (read with halo + the rest)")
    print(f"  rasterio peer        {peer:6.3f}  ({n_peer} tiles: strips of 16 window rows, same steps)")


def main(argv: list[str] | None = None) -> int:
    import dask
    import psutil
    from distributed import Client, LocalCluster

    import dask_fp
    from dask_fp.inspection import RasterOptions
    from dask_fp.models import ModelOptions

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("raster")
    p.add_argument("--model", default="colour-layout")
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stages", action="store_true", help="per-step CPU of the block tasks, without Dask")
    a = p.parse_args(argv)
    if a.stages:
        stages(a.raster, a.model, a.chunk)
        return 0
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
