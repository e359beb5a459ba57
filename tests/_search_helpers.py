"""Helpers for the search / export / CLI tests.

Stores are built through the real store API (``open_writer`` +
``StoreWriter.append``) with the same entry and batch layout as
``dask_fp.ingest``, but with fingerprints the test chooses instead of CNN
features, so they are fast to make and the expected answers are known.
Also: a numpy brute-force k-NN oracle (sorted by distance, then row) and a
textured GeoTIFF writer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import dask_fp.store.writer as store_mod
from dask_fp.store import Store, StoreSettings, open_store, open_writer
from dask_fp.tiling import Tiling, grid_shape, make_uid, window_centres

UTM17 = "EPSG:32617"
#: A north-up UTM zone 17N transform: 0.5 m pixels, origin in Georgia/Florida-ish.
UTM17_TRANSFORM = (0.5, 0.0, 500_000.0, 0.0, -0.5, 3_500_000.0)


# --------------------------------------------------------------------------- oracle


def brute_knn(
    x: np.ndarray, queries: np.ndarray, k: int, *, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``k`` nearest rows, sorted by (squared distance, row), in float64.

    With integer-valued (or coarse dyadic) data the float64 distances are exact,
    and so are the float32 ones of the code under test: results must then be
    identical, ties included.
    """
    x64 = np.asarray(x, dtype=np.float64)
    q64 = np.atleast_2d(np.asarray(queries, dtype=np.float64))
    n = x64.shape[0]
    rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    d = ((q64[:, None, :] - x64[None, :, :]) ** 2).sum(axis=-1)  # (q, n)
    r = np.broadcast_to(rows, d.shape)
    order = np.lexsort((r, d), axis=-1)[:, :k]
    return np.take_along_axis(d, order, axis=1), np.take_along_axis(r, order, axis=1)


def ranked(x: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All rows of ``x`` ranked for one query: (distances, rows)."""
    d, r = brute_knn(x, query[None], len(x))
    return d[0], r[0]


# --------------------------------------------------------------------------- rasters


def textured_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """``(3, h, w)`` uint8 with structure at several scales and no black pixels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.empty((3, height, width), dtype=np.float64)
    for b in range(3):
        coarse = rng.integers(0, 256, (max(2, height // 24), max(2, width // 24))).astype(np.uint8)
        up = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
        out[b] = up
    yy, xx = np.mgrid[0:height, 0:width]
    out += 30 * np.sin(xx / 7.0 + yy / 11.0)[None]
    out += rng.normal(0, 12, out.shape)
    return np.clip(out, 1, 255).astype(np.uint8)


def write_geotiff(
    path: str | Path,
    height: int,
    width: int,
    *,
    crs: str | None = UTM17,
    transform: Sequence[float] = UTM17_TRANSFORM,
    seed: int = 0,
) -> str:
    """A small textured 3-band uint8 GeoTIFF (no CRS and no transform when ``crs`` is None)."""
    import rasterio
    from affine import Affine

    profile: dict[str, Any] = {"driver": "GTiff", "height": height, "width": width, "count": 3,
                               "dtype": "uint8"}
    if crs is not None:
        profile.update(crs=crs, transform=Affine(*transform))
    with rasterio.open(str(path), "w", **profile) as ds:
        ds.write(textured_rgb(height, width, seed))
    return str(path)


# --------------------------------------------------------------------------- stores


def settings(dim: int, *, tile: int = 64, stride: int = 32, dtype: str = "float32",
             weights_sha256: str = "0" * 64) -> StoreSettings:
    """Store settings for a store of hand-made fingerprints (no CNN ran)."""
    return StoreSettings(
        model="resnet18", weights="random", weights_sha256=weights_sha256, feature_dim=dim,
        tile=tile, stride=stride, max_empty=0.5, dtype=dtype, normalisation="test", weights_seed=0,
    )


@dataclass
class SourceSpec:
    """One source of a synthetic store.

    ``shape`` is the raster's (height, width) in pixels; ``keep`` a boolean
    window grid (None: every window kept); ``fingerprints`` one row per kept
    window in row-major (wy, wx) order, or None for random integers 0..3.
    """

    shape: tuple[int, int]
    crs: str | None = UTM17
    transform: Sequence[float] = UTM17_TRANSFORM
    path: str = "synthetic.tif"
    keep: np.ndarray | None = None
    fingerprints: np.ndarray | None = None
    entry: dict[str, Any] | None = None  # a ready-made source entry (e.g. of a real raster)


@dataclass
class Built:
    """A store written by :func:`build_store`, and exactly what went into it."""

    path: Path
    tiling: Tiling
    fingerprint: np.ndarray  # as stored (float16 stores: the float16 values, as float32)
    cols: dict[str, np.ndarray] = field(default_factory=dict)

    def open(self) -> Store:
        st = open_store(self.path)
        st.task_chunks = 1  # one task per (small) Zarr chunk: many blocks for the reduction tests
        return st

    def row_of(self, source: int, wy: int, wx: int) -> int:
        hit = np.flatnonzero((self.cols["source"] == source) & (self.cols["wy"] == wy)
                             & (self.cols["wx"] == wx))
        assert hit.size == 1, (source, wy, wx)
        return int(hit[0])


@contextmanager
def chunk_rows(rows: int | None) -> Iterator[None]:
    """Create stores with ``rows`` rows per chunk (the real rule gives >= 1024)."""
    if rows is None:
        yield
        return
    old = store_mod.rows_per_chunk
    store_mod.rows_per_chunk = lambda dim, itemsize, target_bytes=0: int(rows)
    try:
        yield
    finally:
        store_mod.rows_per_chunk = old


def source_entry(spec: SourceSpec, index: int) -> dict[str, Any]:
    """A sources-table entry shaped like ``dask_fp.ingest._source_entry``."""
    if spec.entry is not None:
        return {**spec.entry, "index": index}
    crs_wkt = crs_name = None
    if spec.crs:
        from pyproj import CRS

        c = CRS.from_user_input(spec.crs)
        crs_wkt, crs_name = c.to_wkt(), f"EPSG:{c.to_epsg()}" if c.to_epsg() else c.name
    return {
        "index": index, "path": spec.path, "sha256": f"synthetic-{index}-{spec.path}",
        "crs": crs_wkt, "crs_name": crs_name, "transform": [float(v) for v in spec.transform[:6]],
        "shape": [int(spec.shape[0]), int(spec.shape[1])], "bands": [1, 2, 3], "alpha": None,
        "nodata": None, "scale": None, "dtype": "uint8",
    }


def source_rows(spec: SourceSpec, index: int, tiling: Tiling, dim: int,
                rng: np.random.Generator) -> dict[str, np.ndarray]:
    """All rows of one source (like ``dask_fp.ingest._rows``), as one dict of arrays."""
    ny, nx = grid_shape(*spec.shape, tile=tiling.tile, stride=tiling.stride)
    keep = np.ones((ny, nx), bool) if spec.keep is None else np.asarray(spec.keep, bool)
    assert keep.shape == (ny, nx), (keep.shape, (ny, nx))
    wy, wx = (a.astype(np.int32) for a in np.nonzero(keep))
    n = len(wy)
    fp = spec.fingerprints
    if fp is None:
        fp = rng.integers(0, 4, (n, dim)).astype(np.float32)
    assert fp.shape == (n, dim), (fp.shape, (n, dim))
    transform = spec.entry["transform"] if spec.entry else spec.transform
    crs = spec.entry["crs"] if spec.entry else spec.crs
    x, y = window_centres(tuple(transform[:6]), wy, wx, tile=tiling.tile, stride=tiling.stride)
    if crs:
        from pyproj import Transformer

        lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(x, y)
    else:
        lon = lat = np.full(n, np.nan)
    return {
        "fingerprint": np.asarray(fp, dtype=np.float32), "uid": make_uid(index, wy, wx),
        "source": np.full(n, index, dtype=np.int32), "wy": wy, "wx": wx,
        "x": np.asarray(x, np.float64), "y": np.asarray(y, np.float64),
        "lon": np.asarray(lon, np.float64), "lat": np.asarray(lat, np.float64),
    }


def _batches(rows: dict[str, np.ndarray], rng: np.random.Generator, max_batch: int
             ) -> Iterator[dict[str, np.ndarray]]:
    n = len(rows["uid"])
    i = 0
    while i < n:
        b = int(rng.integers(1, max_batch + 1))
        yield {k: v[i : i + b] for k, v in rows.items()}
        i += b


def build_store(
    path: str | Path,
    sources: Sequence[SourceSpec],
    *,
    dim: int,
    tile: int = 64,
    stride: int = 32,
    dtype: str = "float32",
    rows_per_chunk: int | None = None,
    max_batch: int = 97,
    seed: int = 0,
    weights_sha256: str = "0" * 64,
) -> Built:
    """Write ``sources`` into a new store at ``path`` through ``open_writer``/``append``.

    Rows go in as batches of random sizes (1..``max_batch``), so chunk
    boundaries and batch boundaries do not line up.
    """
    rng = np.random.default_rng(seed)
    tiling = Tiling(tile, stride)
    parts = []
    with chunk_rows(rows_per_chunk), open_writer(
        path, settings(dim, tile=tile, stride=stride, dtype=dtype, weights_sha256=weights_sha256)
    ) as w:
        for spec in sources:
            index = w.next_source_index
            rows = source_rows(spec, index, tiling, dim, rng)
            ny, nx = grid_shape(*spec.shape, tile=tile, stride=stride)
            batches = _batches(rows, rng, max_batch)
            n = w.append(source_entry(spec, index), batches, upper_bound=ny * nx)
            assert n == len(rows["uid"])
            parts.append(rows)
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    fp = cols.pop("fingerprint").astype(dtype).astype(np.float32)
    return Built(Path(path), tiling, fp, cols)


def raster_store(
    directory: str | Path,
    *,
    crs: Sequence[str | None] = (UTM17, None),
    size: tuple[int, int] = (256, 320),
    dim: int = 8,
    tile: int = 64,
    stride: int = 32,
    seed: int = 0,
) -> Built:
    """A store whose sources are real textured GeoTIFFs (one per entry of ``crs``;
    None: a plain TIFF without CRS), with random integer fingerprints.

    The sources table comes from the real ``inspect_raster`` and
    ``ingest._source_entry``, so tiles can be read back (mosaics) and placed on
    a map (GeoJSON) exactly as for an ingested store.
    """
    import warnings

    from dask_fp.ingest import _source_entry
    from dask_fp.inspection import inspect_raster

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    specs = []
    for i, c in enumerate(crs):
        tif = write_geotiff(d / f"ortho{i}.tif", *size, crs=c, seed=seed + i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NotGeoreferencedWarning for the plain TIFF
            entry = _source_entry(inspect_raster(tif), i, Tiling(tile, stride))
        specs.append(SourceSpec(shape=tuple(entry["shape"]), entry=entry, path=entry["path"]))
    return build_store(d / "store", specs, dim=dim, tile=tile, stride=stride, rows_per_chunk=50,
                       seed=seed)
