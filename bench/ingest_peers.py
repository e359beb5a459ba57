"""Sections 7 and 8 of bench/ingest.py: dask-fp ingest against single-process peers.

7. **Pipeline ceiling.** With the colour-layout model (a near-zero-cost numpy
   fingerprint, :mod:`dask_fp.layout`), ``dask_fp.ingest`` (GeoTIFF -> Zarr,
   whole call, fixed costs included) against reading and windowing the same
   raster with rasterio alone in one process: strips of 16 window rows (the
   same 2048 px + halo a dask-fp block reads), the same empty-window rule, the
   same model call (``embed_windows`` on the strip). Goal: dask-fp >= 0.8x.
   A fresh raster per repeat (new content, so nothing is skipped or cached
   from the previous repeat), the peer and dask-fp alternating which goes first.
8. **Model-bound.** EfficientNet-Lite0 with its real ImageNet weights (from
   the installed package) on the drone imagery: dask-fp against the plain
   single-process torch loop of section 1 (``plain_loop``: strip reads,
   numpy windows, the same ``LoadedModel.embed`` in batches of 32) with the
   same total threads. Goal: dask-fp >= 0.9x.

Run through bench/ingest.py, e.g.::

    python bench/ingest.py --sections 7 --size 8192 --repeats 3 --data DEMO_DATA_DIR
    python bench/ingest.py --sections 8 --size 2048 --repeats 2 --data DEMO_DATA_DIR
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dask_fp.embedder import load_model
from dask_fp.models import ModelOptions, resolve_weights
from dask_fp.raster import to_rgb_and_empty
from dask_fp.tiling import Tiling, grid_shape, window_empty_fraction

LAYOUT = ModelOptions("colour-layout")


def rasterio_windows(path: Path, model: ModelOptions, tiling: Tiling, *, rows_per_read: int = 16) -> int:
    """Read and window ``path`` with rasterio in this process; run ``model`` on the kept windows.

    Reads strips of ``rows_per_read`` window rows (``(k - 1) * S + T`` pixel rows), so every
    pixel row is read about once; returns the number of kept windows.
    """
    import rasterio
    from rasterio.windows import Window

    loaded = load_model(model, resolve_weights(model))
    kept = 0
    t, s = tiling.tile, tiling.stride
    with rasterio.open(path) as ds:
        ny, nx = grid_shape(ds.height, ds.width, tile=t, stride=s)
        width = (nx - 1) * s + t
        for wy0 in range(0, ny, rows_per_read):
            k = min(rows_per_read, ny - wy0)
            strip = ds.read([1, 2, 3], window=Window(0, wy0 * s, width, (k - 1) * s + t))
            rgb, empty = to_rgb_and_empty(strip, n_colour=3, has_alpha=False, nodata=ds.nodata, scale=None)
            frac = window_empty_fraction(empty, tile=t, stride=s, n_wy=k, n_wx=nx)
            iy, ix = np.nonzero(frac <= tiling.max_empty)
            loaded.embed_windows(rgb, iy, ix, tile=t, stride=s)
            kept += len(iy)
    return kept


def _cpu_seconds(client) -> float:
    """User + system CPU seconds so far of this process and, with a client, of its workers."""
    import psutil

    own = sum(psutil.Process().cpu_times()[:2])
    if client is None:
        return own
    return own + sum(client.run(lambda: sum(__import__("psutil").Process().cpu_times()[:2])).values())


def alternating_runs(files: list[Path], clients: dict[Any, Any], run: Callable[[Path, Any, Any], int],
                     *, cpu: bool = False) -> tuple[dict[Any, list[float]], dict[Any, list[float]], int]:
    """Time the peer (``run(f, "peer", None)``) and each of ``clients`` (``run(f, name, client)``) on
    every file, the order reversed on every other file; all must keep the same number of windows.

    Returns tiles/s and (with ``cpu``) tiles per CPU second of every process involved, per name,
    and the tiles of the last file.
    """
    rates: dict[Any, list[float]] = {n: [] for n in ["peer", *clients]}
    per_cpu: dict[Any, list[float]] = {n: [] for n in rates}
    n = 0
    for r, f in enumerate(files):
        runs = [("peer", None), *clients.items()]
        kept = set()
        for name, client in (runs if r % 2 == 0 else runs[::-1]):
            c0 = _cpu_seconds(client) if cpu else 0.0
            t0 = time.perf_counter()
            n = run(f, name, client)
            rates[name].append(n / (time.perf_counter() - t0))
            if cpu:
                per_cpu[name].append(n / (_cpu_seconds(client) - c0))
            kept.add(n)
        assert len(kept) == 1, f"{f}: the pipelines kept different numbers of windows {kept}"
    return rates, per_cpu, n


def _fixed_cost(client, work: Path, ingest: Callable, pix: np.ndarray, write_mosaic: Callable) -> float:
    """Seconds of one ingest of a one-window raster (the per-call cost the tiles/s include)."""
    tiny = write_mosaic(pix, 256, work / "tiny-256.tif")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        ingest(client, tiny, work / "tiny.zarr", LAYOUT, 2048)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def section_ceiling(pix: np.ndarray, work: Path, size: int, repeats: int, threads: int, *, tiling: Tiling,
                    write_mosaic: Callable, ingest: Callable, cluster: Callable, table: Callable) -> None:
    """Section 7: colour-layout ingest against rasterio read + window in one process."""
    print(f"\n## 7. Pipeline ceiling: colour-layout ingest vs rasterio read + window in one process"
          f" ({size} px, {threads} cores; load average {os.getloadavg()[0]:.1f} at start)\n")
    files = [write_mosaic(pix[:, 7 * r:, 5 * r:], size, work / f"ceiling-{size}-{r}.tif") for r in range(repeats + 1)]
    configs = [(1, 1), (1, threads), (threads, 1)] if threads > 1 else [(1, 1)]
    fixed: dict[tuple[int, int], float] = {}
    clusters = {c: cluster(*c) for c in configs}
    try:
        for c, (_, client) in clusters.items():  # warm-up: imports, store code paths, GDAL on each worker
            ingest(client, files[0], work / "ceiling-warm.zarr", LAYOUT, 2048)
            fixed[c] = _fixed_cost(client, work, ingest, pix, write_mosaic)
        rasterio_windows(files[0], LAYOUT, tiling)
        ours, cpu, n_peer = alternating_runs(
            files[1:], {c: clusters[c][1] for c in configs},
            lambda f, name, client: (rasterio_windows(f, LAYOUT, tiling) if client is None
                                     else ingest(client, f, work / "ceiling.zarr", LAYOUT, 2048)),
            cpu=True)
    finally:
        for lc, client in clusters.values():
            client.close()
            lc.close()
    peer = ours.pop("peer")
    base, base_cpu = statistics.median(peer), statistics.median(cpu["peer"])
    rows = [["rasterio read + window + colour-layout (no Dask)", "1 process, 1 thread", n_peer, "",
             f"{base:,.0f}", "1.00", f"{base_cpu:,.0f}", "1.00"]]
    for (w, t), rates in ours.items():
        med, med_cpu = statistics.median(rates), statistics.median(cpu[(w, t)])
        rows.append(["dask_fp.ingest -> Zarr", f"{w} worker x {t} thread", n_peer, f"{fixed[(w, t)]:.2f}",
                     f"{med:,.0f}", f"{med / base:.2f}", f"{med_cpu:,.0f}", f"{med_cpu / base_cpu:.2f}"])
    print(table(["pipeline", "threads", "tiles (last repeat)", "fixed s per call", f"tiles/s (median of {repeats})",
                 "vs rasterio", "tiles per CPU s (all processes)", "vs rasterio"], rows))
    print(f"\nload average at end {os.getloadavg()[0]:.1f}; goal: dask-fp >= 0.80x rasterio alone")


def section_model_bound(pix: np.ndarray, work: Path, size: int, repeats: int, threads: int, *,
                        plain_loop: Callable, write_mosaic: Callable, ingest: Callable, cluster: Callable,
                        table: Callable) -> None:
    """Section 8: EfficientNet-Lite0 (ImageNet weights) ingest against a plain torch loop."""
    import torch

    print(f"\n## 8. Model-bound: EfficientNet-Lite0 (ImageNet weights) vs a plain torch loop"
          f" ({size} px, {threads} threads; load average {os.getloadavg()[0]:.1f} at start)\n")
    files = [write_mosaic(pix[:, 9 * r:, 3 * r:], size, work / f"lite0-{size}-{r}.tif") for r in range(repeats + 1)]
    torch.set_num_threads(threads)
    loop_model = ModelOptions("efficientnet-lite0", threads=threads, batch_size=32)
    configs = [(1, 1, threads), (threads, 1, 1)] if threads > 1 else [(1, 1, 1)]
    clusters = {c: cluster(c[0], c[1]) for c in configs}
    models = {c: ModelOptions("efficientnet-lite0", threads=c[2], batch_size=32) for c in configs}
    try:
        plain_loop(files[0], loop_model)  # warm-up: model load, page cache
        for c, (_, client) in clusters.items():
            ingest(client, files[0], work / "lite0-warm.zarr", models[c], 2048)
        ours, _, n_peer = alternating_runs(
            files[1:], {c: clusters[c][1] for c in configs},
            lambda f, name, client: (plain_loop(f, loop_model)[0] if client is None
                                     else ingest(client, f, work / "lite0.zarr", models[name], 2048)))
    finally:
        for lc, client in clusters.values():
            client.close()
            lc.close()
    peer = ours.pop("peer")
    base = statistics.median(peer)
    rows = [["plain torch loop (no Dask)", f"1 process, torch {threads} threads", n_peer, f"{base:.2f}", "1.00"]]
    for (w, t, tt), rates in ours.items():
        med = statistics.median(rates)
        rows.append(["dask_fp.ingest -> Zarr", f"{w} worker x {t} thread, torch {tt}", n_peer, f"{med:.2f}",
                     f"{med / base:.2f}"])
    print(table(["pipeline", "threads", "tiles (last repeat)", f"tiles/s (median of {repeats})", "vs loop"], rows))
    print(f"\nload average at end {os.getloadavg()[0]:.1f}; goal: dask-fp >= 0.90x the loop")
