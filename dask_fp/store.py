"""The fingerprint store: Zarr v3 schema, crash-safe append/commit, open, info.

Layout (one Zarr v3 group; opens with ``xarray.open_zarr``):

=============  ===============  =======  =========================================
name           dims             dtype    meaning
=============  ===============  =======  =========================================
fingerprint    (tile, feature)  f4/f2    the features
uid            (tile)           int64    ``source << 42 | wy << 21 | wx``
source         (tile)           int32    index into the ``sources`` attribute
wy, wx         (tile)           int32    window indices in the source
x, y           (tile)           float64  window centre in the source CRS (pixels if none)
lon, lat       (tile)           float64  window centre in WGS84 (NaN without a CRS)
norm2          (tile)           float32  squared L2 norm of the stored fingerprint
=============  ===============  =======  =========================================

Commit protocol: rows of a new source are written past ``committed`` (the
arrays may be longer than that while a writer works); only when every row is
on disk does one metadata update move ``committed`` and append the source to
the ``sources`` table, after which the metadata is consolidated so plain
``xarray.open_zarr`` readers see the new snapshot. Readers of
:func:`open_store` only ever see rows below ``committed``. One writer at a
time holds ``writer.lock``.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import StoreError, StoreLockedError, StoreMismatchError

COORDS = ("uid", "source", "wy", "wx", "x", "y", "lon", "lat", "norm2")
COORD_DTYPES = {
    "uid": "int64", "source": "int32", "wy": "int32", "wx": "int32",
    "x": "float64", "y": "float64", "lon": "float64", "lat": "float64", "norm2": "float32",
}
LOCK_NAME = "writer.lock"
#: Settings that must match between a store and an ingest or query.
SETTING_KEYS = ("model", "weights_sha256", "feature_dim", "tile", "stride", "max_empty", "dtype", "input_size")


@dataclass(frozen=True)
class StoreSettings:
    """What a store was made with; every append must match it."""

    model: str
    weights: str
    weights_sha256: str
    feature_dim: int
    tile: int
    stride: int
    max_empty: float
    dtype: str
    normalisation: str
    weights_seed: int | None = None
    input_size: int | None = None

    def differences(self, attrs: dict[str, Any]) -> list[str]:
        mine = asdict(self)
        return [
            f"{k}: store has {attrs.get(k)!r}, this run uses {mine[k]!r}"
            for k in SETTING_KEYS
            if attrs.get(k) != mine[k]
        ]


def rows_per_chunk(dim: int, itemsize: int, target_bytes: int = 16 << 20) -> int:
    """Rows per chunk so one fingerprint chunk is about ``target_bytes`` (a power of two)."""
    rows = max(1, target_bytes // (dim * itemsize))
    return int(max(1024, 1 << (rows.bit_length() - 1)))


# --------------------------------------------------------------------------- locking


def _lock_info() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "argv": _argv()}


def _argv() -> str:
    import sys

    return " ".join(sys.argv)[:500]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_lock(path: Path) -> dict[str, Any] | None:
    """The lock holder's record, or None when the store is not locked."""
    try:
        return json.loads((path / LOCK_NAME).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": None, "host": None, "started": None, "argv": "unreadable lock file"}


def lock_is_stale(info: dict[str, Any]) -> bool:
    """A lock is stale when its holder ran on this host and that process is gone."""
    if info.get("host") != socket.gethostname() or not info.get("pid"):
        return False
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def describe_lock(info: dict[str, Any]) -> str:
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')} ({info.get('argv')})"


@contextmanager
def writer_lock(path: Path, *, wait: float = 0.0, poll: float = 0.5) -> Iterator[None]:
    """Hold the store's single-writer lock; stale locks of dead local processes are cleared.

    Parameters
    ----------
    wait : float
        Seconds to wait for another writer to finish (0: refuse at once).
    """
    lock = path / LOCK_NAME
    deadline = time.monotonic() + wait
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info = read_lock(path) or {}
            if lock_is_stale(info):
                lock.unlink(missing_ok=True)
                continue
            if time.monotonic() < deadline:
                time.sleep(poll)
                continue
            raise StoreLockedError(
                f"{path} is being written by another ingest: {describe_lock(info)}. Wait for it"
                f" (--wait), or if that process is dead on another host, run `dask-fp unlock {path}`."
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(_lock_info(), f)
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def break_lock(path: str | os.PathLike[str], *, force: bool = False) -> dict[str, Any] | None:
    """Remove a lock: at once if stale, otherwise only with ``force``. Returns the old record."""
    p = Path(path)
    info = read_lock(p)
    if info is None:
        return None
    if not (force or lock_is_stale(info)):
        raise StoreLockedError(
            f"{p} is locked by a live process ({describe_lock(info)}); use --force only if"
            " you are sure it is dead (e.g. it ran on another host)."
        )
    (p / LOCK_NAME).unlink(missing_ok=True)
    return info


# --------------------------------------------------------------------------- reading


def _open_group(path: Path, mode: str) -> Any:
    import zarr

    if path.exists() and not path.is_dir():
        raise StoreError(f"{path} is a file, not a fingerprint store (a directory). Choose another --store path.")
    try:
        return zarr.open_group(str(path), mode=mode, zarr_format=3, use_consolidated=False)
    except FileNotFoundError:
        raise StoreError(f"{path}: no fingerprint store here. Create one with `dask-fp ingest`.") from None
    except Exception as e:  # zarr raises many types for damaged metadata
        raise StoreError(f"{path}: not a readable Zarr v3 store ({type(e).__name__}: {e}).") from None


class Store:
    """A fingerprint store opened for reading: only committed rows are visible."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.group = _open_group(self.path, "r")
        attrs = dict(self.group.attrs)
        if attrs.get("format") != "dask-fp":
            raise StoreError(f"{self.path} is a Zarr group but not a dask-fp store (no 'format: dask-fp' attribute).")
        self.attrs = attrs
        self.committed = int(attrs.get("committed", 0))
        try:
            self.arrays = {name: self.group[name] for name in ("fingerprint", *COORDS)}
        except KeyError as e:
            raise StoreError(f"{self.path}: array {e} is missing; the store is damaged.") from None
        short = [n for n, a in self.arrays.items() if a.shape[0] < self.committed]
        if short:
            raise StoreError(
                f"{self.path}: arrays {short} hold fewer rows than the {self.committed} committed;"
                " the store is damaged."
            )
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

        return da.from_zarr(self.arrays["fingerprint"])[: self.committed]

    def norm2(self) -> Any:
        """Committed squared norms as a dask array ``(tile,)``."""
        if self._persisted is not None:
            return self._persisted[1]
        import dask.array as da

        a = self.arrays["norm2"]
        return da.from_zarr(a, chunks=self.arrays["fingerprint"].chunks[0])[: self.committed]

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


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --------------------------------------------------------------------------- writing


class StoreWriter:
    """Append sources to a store under the single-writer lock (use :func:`open_writer`)."""

    def __init__(self, path: Path, settings: StoreSettings) -> None:
        import zarr

        self.path = path
        self.settings = settings
        new = not (path / "zarr.json").exists()
        if new:
            if path.exists() and any(p.name != LOCK_NAME for p in path.iterdir()):
                raise StoreError(f"{path} exists and is not a fingerprint store; choose an empty or new path.")
            self.group = zarr.open_group(str(path), mode="a", zarr_format=3)
            self._create(settings)
        else:
            self.group = _open_group(path, "r+")
            attrs = dict(self.group.attrs)
            if attrs.get("format") != "dask-fp":
                raise StoreError(f"{path} is a Zarr group but not a dask-fp store.")
            diff = settings.differences(attrs)
            if diff:
                raise StoreMismatchError(
                    f"{path} was made with other settings; refusing to mix fingerprints. "
                    + "; ".join(diff)
                    + ". Use a new --store, or the store's settings."
                )
        self.attrs = dict(self.group.attrs)
        self.arrays = {name: self.group[name] for name in ("fingerprint", *COORDS)}
        self.rows = self.arrays["fingerprint"].chunks[0]
        self._repair()

    def _create(self, s: StoreSettings) -> None:
        rows = rows_per_chunk(s.feature_dim, np.dtype(s.dtype).itemsize)
        self.group.create_array(
            "fingerprint", shape=(0, s.feature_dim), chunks=(rows, s.feature_dim), dtype=s.dtype,
            dimension_names=("tile", "feature"), fill_value=0,
            attributes={"coordinates": " ".join(COORDS), "long_name": f"{s.model} fingerprint"},
        )
        for name in COORDS:
            fill = np.nan if COORD_DTYPES[name].startswith("float") else 0
            self.group.create_array(
                name, shape=(0,), chunks=(rows,), dtype=COORD_DTYPES[name],
                dimension_names=("tile",), fill_value=fill,
            )
        self.group.attrs.update({
            "format": "dask-fp", "format_version": 1, "dask_fp_version": __version__,
            **asdict(s), "sources": [], "committed": 0, "created": _now(),
        })
        self._consolidate()

    def _repair(self) -> None:
        """Drop rows an interrupted writer left past ``committed``."""
        committed = int(self.attrs.get("committed", 0))
        for name, arr in self.arrays.items():
            if arr.shape[0] < committed:
                raise StoreError(f"{self.path}: array {name} is shorter than the committed rows; damaged store.")
            if arr.shape[0] != committed:
                arr.resize((committed, *arr.shape[1:]))

    @property
    def committed(self) -> int:
        return int(self.attrs["committed"])

    def find_source(self, sha256: str) -> dict[str, Any] | None:
        for s in self.attrs.get("sources", []):
            if s["sha256"] == sha256:
                return s
        return None

    def append(self, entry: dict[str, Any], batches: Iterator[dict[str, np.ndarray]], upper_bound: int) -> int:
        """Write one source's rows past ``committed`` and commit them.

        ``batches`` yield dicts with ``fingerprint`` and the coordinate arrays
        (without ``norm2``, which is computed here from the stored values), in
        the order they must appear. At most ``upper_bound`` rows may come.
        Rows are buffered into whole chunks before they are written. Returns
        the number of rows committed.
        """
        start = self.committed
        for arr in self.arrays.values():
            arr.resize((start + upper_bound, *arr.shape[1:]))
        buf = _RowBuffer(self, start)
        for batch in batches:
            buf.add(batch)
        n = buf.finish()
        for arr in self.arrays.values():
            arr.resize((start + n, *arr.shape[1:]))
        entry = {**entry, "rows": [start, start + n], "tiles": n, "windows": upper_bound,
                 "dropped": upper_bound - n}
        self._commit(entry, start + n)
        return n

    def _commit(self, entry: dict[str, Any], committed: int) -> None:
        """Make a source visible: one metadata update of the group, then the consolidated view."""
        sources = [*self.attrs.get("sources", []), {**entry, "committed_at": _now()}]
        self.group.attrs.update({"sources": sources, "committed": committed})
        self.attrs = dict(self.group.attrs)
        self._consolidate()

    def _consolidate(self) -> None:
        import warnings

        import zarr

        with warnings.catch_warnings():
            # The lock file is not a Zarr node, and v3 consolidation is a zarr-python
            # extension; both warnings are expected here.
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(str(self.path), zarr_format=3)

    @property
    def next_source_index(self) -> int:
        return len(self.attrs.get("sources", []))


class _RowBuffer:
    """Collect rows and write them to the store one whole chunk at a time."""

    def __init__(self, writer: StoreWriter, start: int) -> None:
        self.w = writer
        self.pos = start  # next row to write to disk
        self.parts: list[dict[str, np.ndarray]] = []
        self.buffered = 0
        self.total = 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        n = len(batch["uid"])
        if not n:
            return
        fp = batch["fingerprint"].astype(self.w.settings.dtype)
        part = {**batch, "fingerprint": fp,
                "norm2": np.einsum("ij,ij->i", fp.astype(np.float32), fp.astype(np.float32))}
        self.parts.append(part)
        self.buffered += n
        self.total += n
        end_chunk = (self.pos // self.w.rows + 1) * self.w.rows
        if self.pos + self.buffered >= end_chunk:
            self._flush(upto=(self.pos + self.buffered) // self.w.rows * self.w.rows)

    def _flush(self, upto: int | None = None) -> None:
        if not self.parts:
            return
        merged = {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}
        n = len(merged["uid"]) if upto is None else upto - self.pos
        for name, arr in self.w.arrays.items():
            arr[self.pos : self.pos + n] = merged[name][:n]
        self.pos += n
        rest = {k: v[n:] for k, v in merged.items()}
        self.buffered = len(rest["uid"])
        self.parts = [rest] if self.buffered else []

    def finish(self) -> int:
        self._flush()
        return self.total


@contextmanager
def open_writer(path: str | os.PathLike[str], settings: StoreSettings, *, wait: float = 0.0) -> Iterator[StoreWriter]:
    """Lock the store (creating it if needed) and yield a :class:`StoreWriter`."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise StoreError(f"{p} is a file, not a fingerprint store (a directory). Choose another --store path.")
    p.mkdir(parents=True, exist_ok=True)
    with writer_lock(p, wait=wait):
        yield StoreWriter(p, settings)
