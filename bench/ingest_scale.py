"""Section 6 of bench/ingest.py: scale-out, many small sources against one raster of the same windows.

``--small-sources`` (16) small orthomosaics of 3 x 3 windows against one raster
holding the same number of windows, both cut from the same non-black imagery
so the model runs as often on each (goal: >= 0.9x the tiles/s; CPU seconds per
tile of the client and of the workers beside it), fresh files per repeat; then
the bytes the client process received (``IngestReport.client_bytes``) against
the fingerprint bytes written, and the client's RSS, as a store grows 10x.

Run through bench/ingest.py, which passes its imagery and helpers, e.g.::

    python bench/ingest.py --sections 6 --repeats 3 --data DEMO_DATA_DIR
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dask_fp.models import ModelOptions
from dask_fp.tiling import Tiling

#: Section 6 cuts its imagery from the first columns of the drone crop: right of about
#: x = 600 the crop turns black (42 % of it is), and a raster that is partly black drops
#: windows before the model runs, so it would do less work than the small sources.
SCALE_OUT_COLUMNS = 560


def _cpu_seconds(procs: list) -> float:
    """User + system CPU seconds of ``procs`` (psutil processes) so far."""
    return sum(sum(p.cpu_times()[:2]) for p in procs)


def section_scale_out(
    pix: np.ndarray, work: Path, repeats: int, threads: int, n_small: int, *, tiling: Tiling,
    write_mosaic: Callable[..., Path], cluster: Callable[..., Any], table: Callable[..., str],
) -> None:
    """Many small sources vs one raster with the same windows; client bytes and RSS as the store grows.

    Both inputs are cut from the same non-black imagery, so both keep (almost) all their windows
    and the model runs about as often; the table says how many tiles each kept, and rates are per
    kept tile. The one raster runs twice: in one block (one task, one worker busy), and in blocks
    of the small sources' size (as many tasks of the same size as the small sources: the peer that
    isolates the cost of a source). The order of the runs alternates between repeats (the
    machine's load drifts), and beside the
    wall-clock rates the CPU seconds that the client and the worker processes spent per tile are
    reported: on a shared machine they are the steadier measure of the work each path does.
    """
    import psutil

    import dask_fp
    from dask_fp.inspection import RasterOptions

    print(f"\n## 6. Scale-out: {n_small} small sources vs one raster of the same windows ({threads} threads)\n")
    model = ModelOptions("resnet18", weights="random", threads=1, batch_size=32)
    side = int(np.sqrt(n_small))
    small_px = 512  # 3 x 3 windows of 256 px at stride 128
    big_px = (side * 3 - 1) * tiling.stride + tiling.tile  # (3 side) x (3 side) windows
    core = pix[:, :, :SCALE_OUT_COLUMNS]
    lc, client = cluster(threads, 1)
    workers = [psutil.Process(pid) for pid in client.run(os.getpid).values()]
    me = psutil.Process()
    stats: dict[str, dict[str, list[float]]] = {
        k: {"rate": [], "tiles": [], "client_cpu": [], "worker_cpu": []} for k in ("small", "one", "blocks")}
    chunk = {"small": 2048, "one": 2048, "blocks": small_px}
    rows = []
    try:
        for r in range(repeats + 1):  # the first round warms up (model load), not counted
            d = work / f"scale-{r}"
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            crop = core[:, 8 * r:, 8 * r:]  # fresh inputs per repeat: new files, new content
            step = max(1, (crop.shape[2] - small_px) // max(side - 1, 1))
            smalls = [write_mosaic(crop[:, step * (i // side):, step * (i % side):], small_px, d / f"s{i}.tif")
                      for i in range(side * side)]
            one = write_mosaic(crop, big_px, d / "one.tif")
            runs = [("small", smalls), ("one", [one]), ("blocks", [one])]
            for name, paths in runs if r % 2 else runs[::-1]:
                c0, w0 = _cpu_seconds([me]), _cpu_seconds(workers)
                t0 = time.perf_counter()
                rep = dask_fp.ingest([str(p) for p in paths], str(d / f"{name}.zarr"), model=model, tiling=tiling,
                                     raster=RasterOptions(chunk=chunk[name]), client=client, progress=False,
                                     log=lambda m: None)
                dt = time.perf_counter() - t0
                if r:
                    s = stats[name]
                    s["rate"].append(rep.tiles / dt)
                    s["tiles"].append(rep.tiles)
                    s["client_cpu"].append((_cpu_seconds([me]) - c0) / rep.tiles)
                    s["worker_cpu"].append((_cpu_seconds(workers) - w0) / rep.tiles)
        med = {k: {m: statistics.median(v) for m, v in s.items()} for k, s in stats.items()}
        labels = {"small": f"{side * side} sources of {small_px} px", "one": f"1 raster of {big_px} px, one block",
                  "blocks": f"1 raster of {big_px} px, {small_px} px blocks"}
        for name, label in labels.items():
            m = med[name]
            rows.append([label, f"{m['tiles']:.0f}", f"{m['rate']:.2f}", f"{1e3 * m['client_cpu']:.0f}",
                         f"{1e3 * m['worker_cpu']:.0f}"])
        print(table(["input", "tiles kept", "tiles/s (median)", "client CPU ms/tile", "workers CPU ms/tile"], rows))
        cpu = {k: m["client_cpu"] + m["worker_cpu"] for k, m in med.items()}
        for peer in ("one", "blocks"):
            print(f"\nmany small / {labels[peer]} = {med['small']['rate'] / med[peer]['rate']:.2f} in tiles/s"
                  f" (goal >= 0.90), {cpu[peer] / cpu['small']:.2f} in tiles per CPU second (client + workers)")
        print(f"\nload average {os.getloadavg()[0]:.1f} (1 min) at the end of the section")

        print("\n### Client bytes and memory as the store grows 10x\n")
        d = work / "grow"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        proc = psutil.Process()
        store = d / "grow.zarr"
        out = []
        k = 0
        for step in (1, 9):  # 1 source, then 9 more: the store grows 10x
            paths = [write_mosaic(pix[:, 10 * (k + i):, :], 1024, d / f"g{k + i}.tif") for i in range(step)]
            k += step
            rep = dask_fp.ingest([str(p) for p in paths], str(store), model=model, tiling=tiling,
                                 raster=RasterOptions(chunk=2048), client=client, progress=False, log=lambda m: None)
            st = dask_fp.open_store(store)
            fp_bytes = rep.tiles * st.dim * 4
            out.append([st.committed, rep.tiles, rep.client_bytes, f"{100 * rep.client_bytes / fp_bytes:.3f} %",
                        f"{proc.memory_info().rss / 2**20:.0f}"])
        print(table(["store rows after", "rows this run", "client bytes received", "of fingerprint bytes",
                     "client RSS MiB"], out))
    finally:
        client.close()
        lc.close()
