"""Reading a store: only committed rows are visible; summary numbers for ``dask-fp info``."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError
from .schema import COORD_DTYPES, COORDS, QUERY_TASK_CHUNKS, SETTING_KEYS, open_arrays, open_group


def check_chunks(path: Path, arrays: dict[str, Any], committed: int, sources: list[dict[str, Any]]) -> None:
    """Every chunk file that holds committed rows must exist.

    Zarr silently reads a missing chunk as fill values (zeros, NaN), which
    would turn a deleted file into wrong answers. Writers store every chunk,
    even one equal to the fill value, so a missing chunk file means damage.
    Cost: one ``stat`` per chunk (a chunk holds thousands of rows).
    """
    missing: list[tuple[str, int, int]] = []
    for name, arr in arrays.items():
        rows = arr.chunks[0]
        enc = arr.metadata.chunk_key_encoding
        rest = [range(-(-s // c)) for s, c in zip(arr.shape[1:], arr.chunks[1:], strict=True)]
        for i in range(-(-committed // rows)):
            for tail in itertools.product(*rest):
                key = enc.encode_chunk_key((i, *tail))
                if not (path / name / key).is_file():
                    missing.append((f"{name}/{key}", i * rows, min((i + 1) * rows, committed)))
    if not missing:
        return
    lo, hi = min(m[1] for m in missing), max(m[2] for m in missing)
    hit = sorted({s.get("path", "?") for s in sources
                  if "rows" in s and s["rows"][0] < hi and s["rows"][1] > lo})
    files = ", ".join(m[0] for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    raise StoreError(
        f"{path}: chunk file(s) {files} missing (rows {lo}..{hi - 1} of {committed} committed,"
        f" from {', '.join(hit) or 'unknown sources'}); the store is damaged. Restore it from a"
        " backup, or ingest the sources again into a new store."
    )


class Store:
    """A fingerprint store opened for reading: only committed rows are visible.

    ``task_chunks`` (default :data:`QUERY_TASK_CHUNKS`) is how many Zarr chunks one
    query task reads.
    """

    task_chunks: int = QUERY_TASK_CHUNKS

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.group = open_group(self.path, "r")
        attrs = dict(self.group.attrs)
        if attrs.get("format") != "dask-fp":
            raise StoreError(f"{self.path} is a Zarr group but not a dask-fp store (no 'format: dask-fp' attribute).")
        self.attrs = attrs
        self.committed = int(attrs.get("committed", 0))
        self.arrays = open_arrays(self.group, self.path)
        short = [n for n, a in self.arrays.items() if a.shape[0] < self.committed]
        if short:
            raise StoreError(
                f"{self.path}: arrays {short} hold fewer rows than the {self.committed} committed;"
                " the store is damaged."
            )
        check_chunks(self.path, self.arrays, self.committed, self.sources)
        self._persisted: Any = None

    @property
    def settings(self) -> dict[str, Any]:
        return {k: self.attrs.get(k) for k in (*SETTING_KEYS, "weights", "normalisation")}

    @property
    def sources(self) -> list[dict[str, Any]]:
        return list(self.attrs.get("sources", []))

    @property
    def dim(self) -> int:
        return int(self.attrs["feature_dim"])

    def fingerprints(self) -> Any:
        """Committed fingerprints as a dask array ``(tile, feature)``, chunked like the store."""
        if self._persisted is not None:
            return self._persisted[0]
        import dask.array as da

        a = self.arrays["fingerprint"]
        return da.from_zarr(a, chunks=(self.task_rows, a.shape[1]))[: self.committed]

    def norm2(self) -> Any:
        """Committed squared norms as a dask array ``(tile,)``."""
        if self._persisted is not None:
            return self._persisted[1]
        import dask.array as da

        return da.from_zarr(self.arrays["norm2"], chunks=self.task_rows)[: self.committed]

    def column(self, name: str) -> Any:
        """A committed per-tile array (``lon``, ``lat``, ``source``, …) as a dask array ``(tile,)``,
        chunked like :meth:`fingerprints`."""
        import dask.array as da

        if name not in COORDS:
            raise StoreError(f"{self.path}: no per-tile column {name!r}; columns are {', '.join(COORDS)}.")
        return da.from_zarr(self.arrays[name], chunks=self.task_rows)[: self.committed]

    @property
    def task_rows(self) -> int:
        """Rows per query task: ``task_chunks`` Zarr chunks (fewer, larger tasks)."""
        return int(self.arrays["fingerprint"].chunks[0]) * self.task_chunks

    def persist(self) -> Store:
        """Keep fingerprints and norms in (cluster) memory for repeated queries."""
        import dask

        fp, n2 = self.fingerprints(), self.norm2()
        self._persisted = dask.persist(fp, n2)
        return self

    def coords(self, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Per-tile coordinates of ``rows`` (all committed rows if None)."""
        if rows is None:
            return {k: np.asarray(self.arrays[k][: self.committed]) for k in COORDS}
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return {k: np.empty(0, dtype=COORD_DTYPES[k]) for k in COORDS}
        return {k: self.arrays[k].get_orthogonal_selection(rows) for k in COORDS}

    def dataset(self) -> Any:
        """The committed rows as a lazy ``xarray.Dataset``."""
        import xarray as xr

        ds = xr.open_zarr(str(self.path), consolidated=False, zarr_format=3)
        return ds.isel(tile=slice(0, self.committed))

    def info(self) -> dict[str, Any]:
        """Summary numbers: sources, tiles, bytes, compression, query cost."""
        return store_summary(self)


def open_store(path: str | os.PathLike[str]) -> Store:
    """Open a fingerprint store for reading (see :class:`Store`)."""
    return Store(path)


def store_summary(store: Store) -> dict[str, Any]:
    """Numbers for ``dask-fp info`` and the end-of-ingest summary."""
    a = store.attrs
    n = store.committed
    dim, tile = int(a["feature_dim"]), int(a["tile"])
    itemsize = np.dtype(a["dtype"]).itemsize
    fp_bytes = n * dim * itemsize
    per_tile_scan = dim * itemsize + 4  # fingerprint + norm2
    disk = _disk_bytes(store.path)
    return {
        "path": str(store.path),
        "model": a["model"],
        "weights": a["weights"],
        "weights_sha256": a["weights_sha256"],
        "feature_dim": dim,
        "dtype": a["dtype"],
        "tile": tile,
        "stride": int(a["stride"]),
        "max_empty": a["max_empty"],
        "sources": len(store.sources),
        "tiles": n,
        "windows": sum(int(s["windows"]) for s in store.sources),
        "dropped_empty": sum(int(s["dropped"]) for s in store.sources),
        "fingerprint_bytes": fp_bytes,
        "store_bytes_on_disk": disk,
        "bytes_per_tile_on_disk": (disk / n) if n else None,
        "compression_uint8_pixels": tile * tile * 3 / (dim * itemsize),
        "compression_float32_pixels": tile * tile * 3 * 4 / (dim * itemsize),
        "query_bytes_scanned": n * per_tile_scan,
        "source_table": [
            {k: s[k] for k in ("index", "path", "tiles", "dropped", "windows", "crs_name")}
            for s in store.sources
        ],
    }


def format_summary(info: dict[str, Any]) -> str:
    """:func:`store_summary` (plus an optional ``this_run``) as the text of ``dask-fp info``."""
    mb = 1 / 2**20
    lines = [
        f"store      {info['path']}",
        f"model      {info['model']} ({info['weights']}, sha256 {info['weights_sha256'][:12]}…), "
        f"{info['feature_dim']}-d {info['dtype']}",
        f"tiling     {info['tile']} px tiles, stride {info['stride']}, max empty {info['max_empty']}",
        f"sources    {info['sources']}",
        f"tiles      {info['tiles']} kept of {info['windows']} windows ({info['dropped_empty']} dropped as empty)",
        f"bytes      fingerprints {info['fingerprint_bytes'] * mb:.2f} MiB, on disk "
        f"{info['store_bytes_on_disk'] * mb:.2f} MiB"
        + (f" ({info['bytes_per_tile_on_disk']:.0f} B/tile)" if info["bytes_per_tile_on_disk"] else ""),
        f"compression {info['compression_uint8_pixels']:.0f}x vs uint8 pixels, "
        f"{info['compression_float32_pixels']:.0f}x vs float32 pixels",
        f"query cost {info['query_bytes_scanned'] * mb:.2f} MiB scanned per query (or batch of queries)",
    ]
    for s in info["source_table"]:
        lines.append(f"  [{s['index']}] {s['path']}: {s['tiles']} tiles of {s['windows']} windows, "
                     f"{s['crs_name'] or 'no CRS'}")
    if "this_run" in info:
        r = info["this_run"]
        lines.append(f"this run   {r['tiles_added']} tiles in {r['seconds']} s ({r['tiles_per_second']} tiles/s)"
                     + (f"; skipped {len(r['skipped'])} already stored" if r["skipped"] else ""))
    return "\n".join(lines)


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

