"""The ``ingest`` verb: rasters → block tasks on the cluster → rows written by the workers.

The client checks every input's header first, all files at once in a thread
pool (so a bad file fails before anything is written, and a survey of remote
COGs does not pay its network round trips one file after another), has the
workers hash the files (all at once), skips
sources whose content hash is already committed, and then runs every
remaining source's blocks through one :class:`~dask_fp.pipeline.Pipeline`:
block tasks and row writes run on the workers; the client receives only
per-block counts, assigns row offsets and commits sources in order.
"""

from __future__ import annotations

import functools
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from dask.sizeof import sizeof

from .errors import DaskFpError, RasterError, StoreMismatchError
from .fingerprint import block_tasks
from .inputs import file_sha256
from .inspection import RasterOptions, RasterSpec, inspect_rasters
from .models import ModelOptions, ResolvedWeights, get_spec, precision_label, resolve_weights
from .pipeline import Pipeline, SourceJob, in_flight, progress_printer
from .raster import open_raster
from .store import StoreSettings, open_store, open_writer
from .store.region import SourceGeo
from .tiling import Tiling, grid_shape


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
    client_bytes: int = 0  # result bytes the client received (block counts, write acknowledgements)
    indexed: int = 0  # rows added to the store's compact-code index (0 without an index)

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
        GeoTIFF / COG files (anything GDAL reads): local paths, ``http(s)://``
        URLs (read through ``/vsicurl/`` with range requests) and S3 objects
        (``s3://bucket/key`` or ``/vsis3/bucket/key``: GDAL reads the pixels,
        boto3 streams the bytes for the content hash, both from the endpoint
        and with the credentials of the ``AWS_*`` environment variables GDAL
        reads, see :mod:`dask_fp.s3`; every worker needs them too).
    store : str
        Store directory.
    model, tiling, raster : options
        See :class:`~dask_fp.models.ModelOptions`, :class:`~dask_fp.tiling.Tiling`,
        :class:`~dask_fp.inspection.RasterOptions`.
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
    specs = inspect_rasters(paths, raster, content_hash=False)  # all at once; fail fast, before any write
    for s in specs:
        if s.crs_wkt is None:
            say(f"note: {s.path} has no CRS; tiles get pixel coordinates and NaN lon/lat.")
    client = client or default_client()
    specs, hash_bytes = hash_on_workers(client, specs)
    if model.threads == 0 and not model.device.startswith("cuda"):
        from .cluster import torch_threads_per_task

        model = replace(model, threads=torch_threads_per_task(client))
    report = IngestReport(store=str(store))
    with open_writer(store, settings, wait=wait) as writer:
        seen: set[str] = set()
        jobs: list[SourceJob] = []
        slots: list[SourceJob | None] = []
        for spec in specs:
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
                slots.append(None)
                continue
            seen.add(spec.sha256)
            job = _job(spec, writer.next_source_index + len(jobs), tiling, model, weights, raster, say)
            jobs.append(job)
            slots.append(job)
        bar, close = _progress_sink(progress, f"{len(jobs)} source(s)")
        pipe = Pipeline(client, writer, jobs, progress=bar, say=say)
        try:
            pipe.run()
        finally:
            if close is not None:
                close()
        writer.finish()
        report.client_bytes = pipe.received + hash_bytes
        if jobs:  # the compact-code index (if the store has one) follows, still under the lock
            from .index import extend_index, has_index, old_index

            st = open_store(store)
            if has_index(st):
                report.indexed = extend_index(st, client=client)
            elif old_index(st):
                say(f"warning: {store}: its compact-code index is of an earlier format and was not extended;"
                    " --method auto searches the store exactly (--method codes refuses it) until it is"
                    f" rebuilt: `dask-fp index {store}`.")
    for spec, slot in zip(specs, slots, strict=True):
        if slot is None:
            report.sources.append(SourceReport(spec.path, -1, 0, 0, 0, 0.0, skipped=True))
            continue
        n = slot.stop - slot.start  # type: ignore[operator]
        if n == 0 and slot.windows:
            say(f"warning: {spec.path}: all {slot.windows} windows are empty (>{tiling.max_empty:.0%}"
                " black/nodata/transparent); it adds no tiles.")
        report.sources.append(SourceReport(spec.path, slot.index, slot.windows, n, slot.windows - n, slot.seconds))
    return report


def hash_on_workers(client: Any, specs: list[RasterSpec]) -> tuple[list[RasterSpec], int]:
    """Every file's sha256, computed on the workers, all files at once (the client reads no pixels).

    Returns the specs with their hashes and the bytes the client received.
    """
    keys = [f"sha256-{uuid.uuid4().hex}" for _ in specs]
    futs = client.map(file_sha256, [s.path for s in specs], pure=False, key=keys)
    try:
        digests = client.gather(futs)
    except Exception as e:
        raise RasterError(f"hashing the input files on the workers failed ({type(e).__name__}: {e});"
                          " can every worker read the input paths?") from None
    return [replace(s, sha256=d) for s, d in zip(specs, digests, strict=True)], sizeof(digests)


def _job(spec: RasterSpec, index: int, tiling: Tiling, model: ModelOptions, weights: ResolvedWeights,
         raster: RasterOptions, say: Callable[[str], None]) -> SourceJob:
    n_wy, n_wx = grid_shape(spec.height, spec.width, tile=tiling.tile, stride=tiling.stride)
    if n_wy * n_wx == 0:
        say(f"warning: {spec.path} ({spec.height}x{spec.width} px) is smaller than one"
            f" {tiling.tile} px tile; it adds no tiles.")
    tasks = block_tasks(open_raster(spec, tiling, chunk=raster.chunk), spec, tiling, model, weights)
    geo = SourceGeo(index, spec.transform, spec.crs_wkt, tiling.tile, tiling.stride)
    entry = {**_source_entry(spec, index, tiling), "compute_precision": compute_precision(model)}
    return SourceJob(spec, index, entry, n_wy * n_wx, tasks, geo)


def compute_precision(model: ModelOptions) -> str:
    """The precision the model is expected to run in, from the options alone (see
    :func:`dask_fp.models.precision_label`). The record a source commits with takes what the
    workers' models report instead; this stands only for a source whose model never ran."""
    return precision_label(model.precision, cuda=model.device.startswith("cuda"))


def _progress_sink(progress: bool | Callable[[int, int, float], None], name: str) -> tuple[Any, Any]:
    if callable(progress):
        return progress, None
    if progress:
        return progress_printer(name)
    return None, None


def _jsonable(scale: Any) -> Any:
    return None if scale is None else [list(s) for s in scale]


@functools.lru_cache(maxsize=64)
def crs_name(crs_wkt: str) -> str:
    """``EPSG:n`` for a CRS with an EPSG code, else its name (cached: a survey's sources share a few CRSs)."""
    from pyproj import CRS

    crs = CRS.from_wkt(crs_wkt)
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else str(crs.name)


@functools.lru_cache(maxsize=64)
def _rasterio_crs(crs_wkt: str) -> Any:
    from rasterio.crs import CRS

    return CRS.from_wkt(crs_wkt)


def _source_entry(spec: RasterSpec, index: int, tiling: Tiling = Tiling()) -> dict[str, Any]:
    return {
        "index": index, "path": spec.path, "sha256": spec.sha256, "crs": spec.crs_wkt,
        "crs_name": crs_name(spec.crs_wkt) if spec.crs_wkt else None, "transform": list(spec.transform),
        "shape": [spec.height, spec.width],
        "bands": list(spec.bands), "alpha": spec.alpha, "nodata": spec.nodata,
        "scale": _jsonable(spec.scale), "dtype": spec.dtype, "bbox_wgs84": bbox_wgs84(spec, tiling),
    }


def bbox_wgs84(spec: RasterSpec, tiling: Tiling) -> list[float] | None:
    """``[minlon, minlat, maxlon, maxlat]`` of the cropped window grid (None without a CRS or windows)."""
    n_wy, n_wx = grid_shape(spec.height, spec.width, tile=tiling.tile, stride=tiling.stride)
    if not spec.crs_wkt or not n_wy or not n_wx:
        return None
    from rasterio.transform import Affine
    from rasterio.warp import transform_bounds

    t = Affine(*spec.transform)
    h, w = (n_wy - 1) * tiling.stride + tiling.tile, (n_wx - 1) * tiling.stride + tiling.tile
    xs, ys = zip(*(t * c for c in ((0, 0), (w, 0), (0, h), (w, h))), strict=True)
    b = transform_bounds(_rasterio_crs(spec.crs_wkt), "EPSG:4326", min(xs), min(ys), max(xs), max(ys), densify_pts=21)
    return [float(v) for v in b]


__all__ = ["IngestReport", "SourceReport", "bbox_wgs84", "hash_on_workers", "in_flight", "ingest", "make_settings"]
