"""The ``ingest`` verb: rasters → block tasks on the cluster → rows in the store.

The client checks every input first (so a bad file fails before anything is
written), then, per source: submits one task per raster block, collects the
results as they finish, hands them to the store writer in block order, and
commits. A source whose content hash is already committed is skipped.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .errors import DaskFpError, RasterError, StoreMismatchError
from .fingerprint import BlockResult, block_tasks
from .models import ModelOptions, ResolvedWeights, get_spec, resolve_weights
from .raster import RasterOptions, RasterSpec, inspect_raster, open_raster
from .store import StoreSettings, open_writer
from .tiling import Tiling, grid_shape, make_uid, window_centres


@dataclass
class SourceReport:
    path: str
    index: int
    windows: int
    tiles: int
    dropped: int
    seconds: float
    skipped: bool = False


@dataclass
class IngestReport:
    store: str
    sources: list[SourceReport] = field(default_factory=list)

    @property
    def tiles(self) -> int:
        return sum(s.tiles for s in self.sources if not s.skipped)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.sources)


def make_settings(model: ModelOptions, weights: ResolvedWeights, tiling: Tiling, dtype: str) -> StoreSettings:
    spec = get_spec(model.name)
    if dtype not in ("float32", "float16"):
        raise DaskFpError(f"fingerprint dtype must be float32 or float16, got {dtype!r}")
    return StoreSettings(
        model=spec.name, weights=weights.kind, weights_sha256=weights.sha256, feature_dim=spec.dim,
        tile=tiling.tile, stride=tiling.stride, max_empty=float(tiling.max_empty), dtype=dtype,
        normalisation=spec.normalisation, weights_seed=model.seed if weights.kind == "random" else None,
        input_size=model.input_size,
    )


def ingest(
    paths: Sequence[str],
    store: str,
    *,
    model: ModelOptions = ModelOptions(),
    tiling: Tiling = Tiling(),
    raster: RasterOptions = RasterOptions(),
    dtype: str = "float32",
    client: Any = None,
    wait: float = 0.0,
    progress: bool | Callable[[int, int, float], None] = True,
    log: Callable[[str], None] | None = None,
) -> IngestReport:
    """Fingerprint orthomosaics into a store (created if missing).

    Parameters
    ----------
    paths : sequence of str
        GeoTIFF / COG files (anything GDAL reads).
    store : str
        Store directory.
    model, tiling, raster : options
        See :class:`~dask_fp.models.ModelOptions`, :class:`~dask_fp.tiling.Tiling`,
        :class:`~dask_fp.raster.RasterOptions`.
    dtype : {"float32", "float16"}
        Fingerprint storage type.
    client : distributed.Client, optional
        Cluster to run on; the current default client when None.
    wait : float
        Seconds to wait for another writer's lock.
    progress : bool or callable
        Print a progress bar to stderr, or call ``progress(done, total, tiles_per_s)``.
    log : callable, optional
        Where messages go (default: stderr).
    """
    from distributed import default_client

    say = log or (lambda m: print(m, file=sys.stderr))
    if not paths:
        raise DaskFpError("no input rasters given.")
    weights = resolve_weights(model)
    settings = make_settings(model, weights, tiling, dtype)
    specs = [inspect_raster(p, raster) for p in paths]  # fail fast, before any write
    for s in specs:
        if s.crs_wkt is None:
            say(f"note: {s.path} has no CRS; tiles get pixel coordinates and NaN lon/lat.")
    client = client or default_client()
    if model.threads == 0 and not model.device.startswith("cuda"):
        from .cluster import torch_threads_per_task

        model = replace(model, threads=torch_threads_per_task(client))
    report = IngestReport(store=str(store))
    with open_writer(store, settings, wait=wait) as writer:
        seen: set[str] = set()
        for spec in specs:
            t0 = time.perf_counter()
            prior = writer.find_source(spec.sha256)
            if prior is not None or spec.sha256 in seen:
                if prior is not None and (
                    prior["bands"] != list(spec.bands) or prior["scale"] != _jsonable(spec.scale)
                ):
                    raise StoreMismatchError(
                        f"{spec.path} is already in {store} (as {prior['path']}) read with bands"
                        f" {prior['bands']} and scale {prior['scale']}; this run asks for bands"
                        f" {list(spec.bands)} and scale {_jsonable(spec.scale)}. Use a new store."
                    )
                say(f"skip: {spec.path} is already in the store (same content hash).")
                report.sources.append(SourceReport(spec.path, -1, 0, 0, 0, 0.0, skipped=True))
                continue
            seen.add(spec.sha256)
            index = writer.next_source_index
            n_wy, n_wx = grid_shape(spec.height, spec.width, tile=tiling.tile, stride=tiling.stride)
            if n_wy * n_wx == 0:
                say(f"warning: {spec.path} ({spec.height}x{spec.width} px) is smaller than one"
                    f" {tiling.tile} px tile; it adds no tiles.")
            da_raster = open_raster(spec, tiling, chunk=raster.chunk)
            tasks = block_tasks(da_raster, spec, tiling, model, weights)
            bar = _Progress(spec.path, n_wy * n_wx, progress)
            results = _run_blocks(client, tasks, bar, spec.path)
            batches = _rows(results, spec, index, tiling)
            entry = _source_entry(spec, index)
            n = writer.append(entry, batches, upper_bound=n_wy * n_wx)
            bar.close()
            dropped = n_wy * n_wx - n
            if n == 0 and n_wy * n_wx:
                say(f"warning: {spec.path}: all {n_wy * n_wx} windows are empty (>{tiling.max_empty:.0%}"
                    " black/nodata/transparent); it adds no tiles.")
            report.sources.append(SourceReport(spec.path, index, n_wy * n_wx, n, dropped, time.perf_counter() - t0))
    return report


def _jsonable(scale: Any) -> Any:
    return None if scale is None else [list(s) for s in scale]


def _source_entry(spec: RasterSpec, index: int) -> dict[str, Any]:
    crs_name = None
    if spec.crs_wkt:
        from pyproj import CRS

        crs = CRS.from_wkt(spec.crs_wkt)
        epsg = crs.to_epsg()
        crs_name = f"EPSG:{epsg}" if epsg else crs.name
    return {
        "index": index, "path": spec.path, "sha256": spec.sha256, "crs": spec.crs_wkt,
        "crs_name": crs_name, "transform": list(spec.transform), "shape": [spec.height, spec.width],
        "bands": list(spec.bands), "alpha": spec.alpha, "nodata": spec.nodata,
        "scale": _jsonable(spec.scale), "dtype": spec.dtype,
    }


def _run_blocks(client: Any, tasks: list, bar: _Progress, path: str) -> Iterator[BlockResult]:
    """Run block tasks on the cluster; yield results in block order as they become available.

    Blocks are submitted in row-major order through a sliding window of
    :func:`in_flight` blocks, so worker memory is bounded by a strip of the
    raster, not the whole image; the window spans a row of blocks plus two
    per thread, so a chunk read for one block is still there for the
    neighbours that borrow its halo. A failure inside a task (say, a read
    error in a damaged file) is raised as a :class:`DaskFpError` naming the
    file and the block.
    """
    from distributed import as_completed

    if not tasks:
        return
    pending = iter(enumerate(tasks))
    order: dict[str, int] = {}
    live: dict[str, Any] = {}
    ac = as_completed([], loop=client.loop)

    def submit() -> None:
        item = next(pending, None)
        if item is not None:
            fut = client.compute(item[1][1])
            order[fut.key], live[fut.key] = item[0], fut
            ac.add(fut)

    ncols = 1 + max(plan.index[1] for plan, _ in tasks)
    for _ in range(in_flight(client, ncols)):
        submit()
    ready: dict[int, BlockResult] = {}
    nxt = 0
    try:
        for fut in ac:
            try:
                res: BlockResult = fut.result()
            except DaskFpError:
                raise
            except Exception as e:
                plan = tasks[order[fut.key]][0]
                # Errors that cannot be pickled arrive from the worker as Exception("Type('text')").
                why = str(e) if type(e) is Exception else f"{type(e).__name__}: {e}"
                raise RasterError(
                    f"{path}: block {plan.index} (windows {plan.wy0}..{plan.wy1 - 1} x"
                    f" {plan.wx0}..{plan.wx1 - 1}) failed: {why}. Is the file"
                    " complete and readable? Nothing of it was committed."
                ) from None
            bar.update(res.n_windows, len(res.wy))
            ready[order[fut.key]] = res
            live.pop(fut.key, None)
            fut.release()
            submit()
            while nxt in ready:
                yield ready.pop(nxt)
                nxt += 1
    finally:
        for f in live.values():
            f.cancel()


def in_flight(client: Any, blocks_per_row: int) -> int:
    """Blocks submitted at once: a row of blocks plus two per worker thread."""
    try:
        threads = sum(client.nthreads().values())
    except Exception:  # a cluster still starting
        threads = 0
    return blocks_per_row + 2 * max(threads, 2)


def _rows(
    results: Iterator[BlockResult], spec: RasterSpec, index: int, tiling: Tiling
) -> Iterator[dict[str, np.ndarray]]:
    """Block results → store rows (uids, coordinates, fingerprints)."""
    to_lonlat = _lonlat_transformer(spec.crs_wkt)
    for r in results:
        if not len(r.wy):
            continue
        x, y = window_centres(spec.transform, r.wy, r.wx, tile=tiling.tile, stride=tiling.stride)
        if to_lonlat is None:
            lon = lat = np.full(len(r.wy), np.nan)
        else:
            lon, lat = to_lonlat.transform(x, y)
        yield {
            "fingerprint": r.features, "uid": make_uid(index, r.wy, r.wx),
            "source": np.full(len(r.wy), index, dtype=np.int32), "wy": r.wy, "wx": r.wx,
            "x": x, "y": y, "lon": np.asarray(lon, dtype=np.float64), "lat": np.asarray(lat, dtype=np.float64),
        }


def _lonlat_transformer(crs_wkt: str | None) -> Any:
    if not crs_wkt:
        return None
    from pyproj import Transformer

    return Transformer.from_crs(crs_wkt, "EPSG:4326", always_xy=True)


class _Progress:
    """Tiles done / total and tiles per second, on one stderr line (or a callback)."""

    def __init__(self, name: str, total: int, sink: bool | Callable[[int, int, float], None]) -> None:
        self.name, self.total, self.sink = name, total, sink
        self.done = self.kept = 0
        self.t0 = time.perf_counter()
        self.last = 0.0

    def update(self, windows: int, kept: int) -> None:
        self.done += windows
        self.kept += kept
        rate = self.kept / max(time.perf_counter() - self.t0, 1e-9)
        if callable(self.sink):
            self.sink(self.done, self.total, rate)
        elif self.sink and (time.perf_counter() - self.last > 0.5 or self.done == self.total):
            self.last = time.perf_counter()
            width = 30
            filled = int(width * self.done / max(self.total, 1))
            name = self.name if len(self.name) < 40 else "…" + self.name[-39:]
            sys.stderr.write(
                f"\r{name} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} windows,"
                f" {self.kept} tiles, {rate:.1f} tiles/s"
            )
            sys.stderr.flush()

    def close(self) -> None:
        if self.sink is True and self.total:
            sys.stderr.write("\n")
