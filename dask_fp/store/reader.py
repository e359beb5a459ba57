"""Reading a store: only committed rows are visible; summary numbers for ``dask-fp info``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError
from .chunks import ChunkFiles, check_all, checked_block, damage_error, require, sampled_bytes
from .rows import read_rows as read_array_rows
from .schema import COORD_DTYPES, COORDS, QUERY_TASK_CHUNKS, SETTING_KEYS, open_arrays, open_group
from .sources import read_rows, read_sources

#: Row chunks per array whose files ``dask-fp info`` stats for the bytes on disk.
INFO_SAMPLE_CHUNKS = 16
#: The per-tile columns of :meth:`Store.tiles` (every column but ``norm2``), and their record type.
TILE_COLUMNS = tuple(c for c in COORDS if c != "norm2")
TILE_DTYPE = np.dtype([(c, COORD_DTYPES[c]) for c in TILE_COLUMNS])


def _records(*cols: np.ndarray) -> np.ndarray:
    out = np.empty(len(cols[0]), dtype=TILE_DTYPE)
    for name, c in zip(TILE_COLUMNS, cols, strict=True):
        out[name] = c
    return out


def _field(block: np.ndarray, field: str) -> np.ndarray:
    return np.ascontiguousarray(block[field])


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
        self._persisted: Any = None
        #: Query-independent graph pieces of the scan (:mod:`dask_fp.scan`), rebuilt when the arrays change.
        self.scan_cache: dict[str, Any] = {}
        #: Each looked-up source's uids, sorted, and their order (:func:`dask_fp.query.uid_rows`); an opened
        #: store shows a fixed ``committed``, so they never go stale.
        self.uid_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._sources: list[dict[str, Any]] | None = None
        self._source_rows: np.ndarray | None = None
        # No per-chunk walk here: opening costs a fixed number of file reads (group and
        # array metadata). Each read checks the chunk files it touches (see .chunks).
        self.files = {name: ChunkFiles.of(self.path, name, arr) for name, arr in self.arrays.items()}

    @property
    def settings(self) -> dict[str, Any]:
        return {k: self.attrs.get(k) for k in (*SETTING_KEYS, "weights", "normalisation")}

    @property
    def sources(self) -> list[dict[str, Any]]:
        """The committed sources' records (read once, from the sources table)."""
        if self._sources is None:
            self._sources = read_sources(self.group, self.attrs)
        return list(self._sources)

    def source_rows(self) -> np.ndarray:
        """``(n_sources, 2)`` ``[start, stop)`` row range of each committed source (read once)."""
        if self._source_rows is None:
            self._source_rows = read_rows(self.group, self.attrs)
        return self._source_rows

    def verify(self) -> None:
        """Check that every chunk file of committed rows exists (one ``stat`` per file)."""
        check_all(self.path, self.arrays, self.committed, lambda: self.sources)

    def read(self, name: str, rows: np.ndarray | slice) -> np.ndarray:
        """Committed rows ``rows`` (indices or a slice) of array ``name``; reads only their chunks.

        The chunk files holding them are checked first, so a deleted file is a
        "store is damaged" error, not fill values.
        """
        f = self.files[name]
        if isinstance(rows, slice):
            lo, hi, step = rows.indices(self.committed)
            if step != 1:
                raise ValueError("Store.read takes a slice with step 1")
            require(self.path, [f], lambda g: g.indices(lo, hi), self.committed, lambda: self.sources)
            return np.asarray(self.arrays[name][lo:max(lo, hi)])
        idx = np.asarray(rows, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.committed):
            raise IndexError(f"rows out of range 0..{self.committed - 1} of {self.path}")
        if idx.size == 0:
            arr = self.arrays[name]
            return np.empty((0, *arr.shape[1:]), dtype=arr.dtype)
        require(self.path, [f], lambda g: g.indices_of_rows(idx), self.committed, lambda: self.sources)
        return read_array_rows(self.arrays[name], f, idx)

    @property
    def dim(self) -> int:
        return int(self.attrs["feature_dim"])

    def fingerprints(self) -> Any:
        """Committed fingerprints as a dask array ``(tile, feature)``, chunked like the store."""
        if self._persisted is not None:
            return self._persisted[0]
        import dask.array as da

        a = self.arrays["fingerprint"]
        return self._checked(da.from_zarr(a, chunks=(self.task_rows, a.shape[1]))[: self.committed], "fingerprint")

    def norm2(self) -> Any:
        """Committed squared norms as a dask array ``(tile,)``."""
        if self._persisted is not None:
            return self._persisted[1]
        import dask.array as da

        return self._checked(da.from_zarr(self.arrays["norm2"], chunks=self.task_rows)[: self.committed], "norm2")

    def _checked(self, x: Any, name: str) -> Any:
        """``x`` whose every block first checks that its chunk files exist (in the read task)."""
        return x.map_blocks(checked_block, files=self.files[name], committed=self.committed,
                            dtype=x.dtype, meta=np.empty((0,) * x.ndim, dtype=x.dtype))

    def column(self, name: str) -> Any:
        """A committed per-tile array (``lon``, ``lat``, ``source``, …) as a dask array ``(tile,)``,
        chunked like :meth:`fingerprints` (from memory after :meth:`persist`)."""
        import dask.array as da

        if name not in COORDS:
            raise StoreError(f"{self.path}: no per-tile column {name!r}; columns are {', '.join(COORDS)}.")
        if self._persisted is not None and name in TILE_COLUMNS:
            return self._persisted[2].map_blocks(_field, field=name, dtype=COORD_DTYPES[name],
                                                 meta=np.empty((0,), dtype=COORD_DTYPES[name]))
        return da.from_zarr(self.arrays[name], chunks=self.task_rows)[: self.committed]

    def tiles(self) -> Any:
        """The per-tile columns but ``norm2`` (:data:`TILE_COLUMNS`) as one structured dask array ``(tile,)``,
        chunked like :meth:`fingerprints` (from memory after :meth:`persist`)."""
        if self._persisted is not None:
            return self._persisted[2]
        import dask.array as da

        return da.map_blocks(_records, *[self.column(c) for c in TILE_COLUMNS], dtype=TILE_DTYPE,
                             meta=np.empty((0,), dtype=TILE_DTYPE))

    @property
    def task_rows(self) -> int:
        """Rows per query task: ``task_chunks`` Zarr chunks (fewer, larger tasks)."""
        return int(self.arrays["fingerprint"].chunks[0]) * self.task_chunks

    @property
    def persisted(self) -> bool:
        """Whether :meth:`persist` holds the store in (cluster) memory."""
        return self._persisted is not None

    def persist(self) -> Store:
        """Keep fingerprints, norms and the per-tile columns in (cluster) memory for repeated queries.

        The columns (:meth:`tiles`: 52 B per tile, 2.5 % of a 512-d float32
        fingerprint) let a query return its hits' coordinates from the same pass,
        and area filters read lon/lat/source from memory.
        """
        import dask

        self._persisted = None
        self.scan_cache.clear()
        self._persisted = dask.persist(self.fingerprints(), self.norm2(), self.tiles())
        return self

    def coords(self, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Per-tile coordinates of ``rows`` (all committed rows if None); reads only their chunks."""
        if rows is None:
            return {k: self.read(k, slice(0, self.committed)) for k in COORDS}
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return {k: np.empty(0, dtype=COORD_DTYPES[k]) for k in COORDS}
        return {k: self.read(k, rows) for k in COORDS}

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
    disk, stated, total = disk_bytes(store)
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
        "store_bytes_on_disk_estimated": stated < total,
        "chunk_files_stated": stated,
        "chunk_files": total,
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
        + ("~" if info.get("store_bytes_on_disk_estimated") else "")
        + f"{info['store_bytes_on_disk'] * mb:.2f} MiB"
        + (f" (estimated from {info['chunk_files_stated']} of {info['chunk_files']} chunk files)"
           if info.get("store_bytes_on_disk_estimated") else "")
        + (f" ({info['bytes_per_tile_on_disk']:.0f} B/tile)" if info["bytes_per_tile_on_disk"] else ""),
        f"compression {info['compression_uint8_pixels']:.0f}x vs uint8 pixels, "
        f"{info['compression_float32_pixels']:.0f}x vs float32 pixels",
        f"query cost {info['query_bytes_scanned'] * mb:.2f} MiB scanned per query (or batch of queries)",
    ]
    for s in info["source_table"]:
        lines.append(f"  [{s['index']}] {s['path']}: {s['tiles']} tiles of {s['windows']} windows, "
                     f"{s['crs_name'] or 'no CRS'}")
    ix = info.get("index")
    if ix and ix["usable"]:
        lines.append(f"index      {ix['format']}: {ix['indexed']} rows coded ({ix['nbits']} bits, {ix['lists']} lists,"
                     f" {ix['bytes_per_tile']} B/tile)"
                     + (f"; {ix['not_indexed']} newer rows scanned exactly" if ix["not_indexed"] else ""))
    elif ix:
        lines.append(f"index      {ix['format']}, an earlier format: not used; rebuild it with `{ix['rebuild']}`")
    if info.get("verified"):
        lines.append("verified   every chunk file of the committed rows is on disk")
    if "this_run" in info:
        r = info["this_run"]
        lines.append(f"this run   {r['tiles_added']} tiles in {r['seconds']} s ({r['tiles_per_second']} tiles/s)"
                     + (f"; skipped {len(r['skipped'])} already stored" if r["skipped"] else "")
                     + (f"; {r['indexed']} rows added to the index" if r.get("indexed") else ""))
    return "\n".join(lines)


def disk_bytes(store: Store, sample: int = INFO_SAMPLE_CHUNKS) -> tuple[int, int, int]:
    """Bytes on disk of the committed rows' chunk files: ``(bytes, files stat'ed, files)``.

    Bounded: at most ``sample`` row chunks per array are stat'ed (the first,
    the last and evenly spaced ones); with more chunks than that the total is
    the sampled mean times the file count, an estimate (``bytes`` is exact when
    ``stat'ed == files``). Metadata, the sources table and a crashed writer's
    leftovers past ``committed`` are not counted. A missing sampled file is a
    "store is damaged" error.
    """
    total = stated = files = 0
    missing = []
    for f in store.files.values():
        b, s, n, miss = sampled_bytes(f, store.committed, sample)
        total, stated, files = total + b, stated + s, files + n
        missing += miss
    if missing:
        raise damage_error(store.path, missing, store.committed, lambda: store.sources)
    return total, stated, files

