"""Worker-side row writes: one task writes one region of rows into every array of a store.

The client (:mod:`dask_fp.pipeline`) assigns row offsets and submits
:func:`write_rows` with the block results that cover the region as inputs, so
fingerprints travel worker to worker and straight to disk, never through the
client. The client guarantees that no two running tasks touch the same Zarr
chunk (shard) file: a task covers rows of one write unit only, and a later
task for the same unit depends on the earlier one.

A task first checks that the writer that submitted it still holds the store's
lock (:func:`check_holder`): a write task orphaned by a killed client finds a
new holder, or none, and writes nothing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError
from ..tiling import make_uid, window_centres
from .lock import read_lock
from .schema import COORDS


@dataclass(frozen=True)
class SourceGeo:
    """What a write task needs to turn a block's windows into store coordinates."""

    index: int
    transform: tuple[float, float, float, float, float, float]
    crs_wkt: str | None
    tile: int
    stride: int


@dataclass(frozen=True)
class Piece:
    """Kept rows ``lo:hi`` of one block result, written at store row ``row``."""

    row: int
    lo: int
    hi: int
    geo: SourceGeo


def write_granularity(arr: Any) -> int:
    """Rows per write unit: a shard when the array is sharded, else a chunk."""
    shards = getattr(arr, "shards", None)
    return int(shards[0]) if shards is not None else int(arr.chunks[0])


def check_holder(path: str, holder: dict[str, Any]) -> None:
    """Raise :class:`StoreError` unless the lock of ``path`` is still ``holder``'s."""
    now = read_lock(Path(path))
    if now != holder:
        raise StoreError(f"{path}: the writer that started this write no longer holds the lock; not writing.")


@functools.lru_cache(maxsize=64)
def _to_lonlat(crs_wkt: str) -> Any:
    from pyproj import Transformer

    return Transformer.from_crs(crs_wkt, "EPSG:4326", always_xy=True)


def region_rows(pieces: list[Piece], results: list[Any], dtype: str, dim: int) -> dict[str, np.ndarray]:
    """The rows of a region (fingerprints, uids, coordinates, ``norm2``) from block results.

    Pure numpy (and pyproj for lon/lat): tested without Dask or I/O.
    """
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("fingerprint", *COORDS)}
    for p, r in zip(pieces, results, strict=True):
        wy, wx = r.wy[p.lo : p.hi], r.wx[p.lo : p.hi]
        fp = np.asarray(r.features[p.lo : p.hi]).astype(dtype)
        g = p.geo
        x, y = window_centres(g.transform, wy, wx, tile=g.tile, stride=g.stride)
        if g.crs_wkt is None:
            lon = lat = np.full(len(wy), np.nan)
        else:
            lon, lat = _to_lonlat(g.crs_wkt).transform(x, y)
        f32 = fp.astype(np.float32)
        parts["fingerprint"].append(fp)
        parts["uid"].append(make_uid(g.index, wy, wx))
        parts["source"].append(np.full(len(wy), g.index, dtype=np.int32))
        parts["wy"].append(wy)
        parts["wx"].append(wx)
        parts["x"].append(np.asarray(x, dtype=np.float64))
        parts["y"].append(np.asarray(y, dtype=np.float64))
        parts["lon"].append(np.asarray(lon, dtype=np.float64))
        parts["lat"].append(np.asarray(lat, dtype=np.float64))
        parts["norm2"].append(np.einsum("ij,ij->i", f32, f32))
    out = {}
    for k, v in parts.items():
        if v:
            out[k] = np.concatenate(v)
        else:
            out[k] = np.empty((0, dim) if k == "fingerprint" else (0,))
    return out


def write_rows(
    path: str, holder: dict[str, Any], start: int, pieces: list[Piece], results: list[Any],
    dtype: str, dim: int, after: Any = None,
) -> int:
    """Write the region ``start : start + n`` (a Dask task on a worker); returns ``n``.

    ``results`` are the :class:`~dask_fp.fingerprint.BlockResult` of each
    piece (Dask resolves the futures); ``after`` is the previous write task of
    the same write unit, a dependency only. Fingerprints are written before the
    coordinates, every chunk stored even when equal to the fill value (so a
    missing chunk file always means damage).
    """
    import zarr

    del after
    rows = region_rows(pieces, results, dtype, dim)
    n = len(rows["uid"])
    if not n:
        return 0
    check_holder(path, holder)
    for name in ("fingerprint", *COORDS):
        arr = zarr.open_array(str(Path(path) / name), mode="r+", zarr_format=3)
        if arr.shape[0] < start + n:
            raise StoreError(f"{path}: array {name} holds {arr.shape[0]} rows, the write needs {start + n}.")
        arr.with_config({"write_empty_chunks": True})[start : start + n] = rows[name]
    return n
