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

Test hook (for the crash tests in ``tests/test_reliability.py`` only; inert
unless set): ``DASK_FP_TEST_PAUSE=POINT[:N]`` makes the writer print
``dask-fp-test-pause: POINT`` to stderr and sleep
``DASK_FP_TEST_PAUSE_SECONDS`` (default 300; less if the file named by
``DASK_FP_TEST_RELEASE`` is removed) the N-th time (default the first) it
reaches ``POINT``, so a test can kill it exactly there. Points: ``rows``
(inside a row write: fingerprints on disk, coordinates not yet) and
``before-commit`` (all rows of a source on disk, not yet committed).
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from . import __version__
from .errors import StoreError, StoreLockedError, StoreMismatchError

COORDS = ("uid", "source", "wy", "wx", "x", "y", "lon", "lat", "norm2")
COORD_DTYPES = {
    "uid": "int64", "source": "int32", "wy": "int32", "wx": "int32",
    "x": "float64", "y": "float64", "lon": "float64", "lat": "float64", "norm2": "float32",
}
LOCK_NAME = "writer.lock"
#: Zarr chunks read by one query task. One task per 8 chunks (65,536 rows of 512-d
#: float32, 128 MiB) cut single-query latency at 1M rows by 40 % against one task per
#: chunk (bench/query.py, docs/performance.md) while keeping task memory bounded.
QUERY_TASK_CHUNKS = 8
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


# --------------------------------------------------------------------------- test hook

_PAUSES: dict[str, int] = {}


def _test_pause(point: str) -> None:
    """The crash-test hook described in the module docstring (a no-op unless set)."""
    spec = os.environ.get("DASK_FP_TEST_PAUSE")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _PAUSES[point] = _PAUSES.get(point, 0) + 1
    if _PAUSES[point] != int(nth or 1):
        return
    print(f"dask-fp-test-pause: {point}", file=sys.stderr, flush=True)
    end = time.monotonic() + float(os.environ.get("DASK_FP_TEST_PAUSE_SECONDS", "300"))
    release = os.environ.get("DASK_FP_TEST_RELEASE")
    while time.monotonic() < end and (release is None or os.path.exists(release)):
        time.sleep(0.05)


# --------------------------------------------------------------------------- locking


def _lock_info() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "argv": _argv(),
            "pid_started": _process_started(os.getpid())}


def _argv() -> str:
    return " ".join(sys.argv)[:500]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _process_started(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None if unknown."""
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:
        return None


def read_lock(path: Path) -> dict[str, Any] | None:
    """The lock holder's record, or None when the store is not locked."""
    try:
        return json.loads((path / LOCK_NAME).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": None, "host": None, "started": None, "argv": "unreadable lock file"}


def lock_is_stale(info: dict[str, Any]) -> bool:
    """A lock is stale when its holder ran on this host and that process is gone.

    "Gone" includes a zombie, and a pid that now belongs to a process started
    after the lock was taken (the pid was reused).
    """
    if info.get("host") != socket.gethostname() or not info.get("pid"):
        return False
    pid = int(info["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    try:
        import psutil

        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return True
        started = info.get("pid_started")
        if started is not None and abs(proc.create_time() - float(started)) > 1.0:
            return True
    except ImportError:  # pragma: no cover - psutil comes with distributed
        return False
    except psutil.NoSuchProcess:  # it ended meanwhile
        return True
    except psutil.Error:  # e.g. access denied: it exists, so the lock is not stale
        return False
    return False


def describe_lock(info: dict[str, Any]) -> str:
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')} ({info.get('argv')})"


@contextmanager
def _local_guard(path: Path) -> Iterator[None]:
    """Serialise stale-lock removal among processes of this host (flock on the store directory).

    Without it, two new writers could both find the same stale lock, and the
    second could remove the fresh lock the first has just taken.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_if_stale(path: Path) -> dict[str, Any] | None:
    """Remove the lock if it is stale (checked again under the local guard); return its record."""
    with _local_guard(path):
        info = read_lock(path)
        if info is not None and lock_is_stale(info):
            (path / LOCK_NAME).unlink(missing_ok=True)
            return info
    return None


def _try_create_lock(path: Path) -> bool:
    """Create ``writer.lock`` with its full record in one step; False if it exists."""
    lock = path / LOCK_NAME
    tmp = path / f"{LOCK_NAME}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps(_lock_info()))
    try:
        try:
            os.link(tmp, lock)  # atomic, fails if the lock exists: never a half-written lock
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system: exclusive create instead
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(tmp.read_text())
            return True
    finally:
        tmp.unlink(missing_ok=True)


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
    said = False
    while not _try_create_lock(path):
        old = _remove_if_stale(path)
        if old is not None:
            print(f"dask-fp: removed the stale lock of {describe_lock(old)}: that process is gone.",
                  file=sys.stderr)
            continue
        if time.monotonic() < deadline:
            if not said:
                print(f"dask-fp: {path} is being written by {describe_lock(read_lock(path) or {})};"
                      f" waiting up to {wait:g} s.", file=sys.stderr, flush=True)
                said = True
            time.sleep(poll)
            continue
        info = read_lock(path) or {}
        raise StoreLockedError(
            f"{path} is being written by another ingest: {describe_lock(info)}. Wait for it"
            f" (--wait SECONDS), or if that process is dead on another host, run `dask-fp unlock {path}`."
        )
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def break_lock(path: str | os.PathLike[str], *, force: bool = False) -> dict[str, Any] | None:
    """Remove a lock: at once if stale, otherwise only with ``force``. Returns the old record."""
    p = Path(path)
    if not p.is_dir():
        raise StoreError(f"{p}: no fingerprint store here (not a directory).")
    info = read_lock(p)
    if info is None:
        return None
    old = _remove_if_stale(p)
    if old is not None:
        return old
    if not force:
        raise StoreLockedError(
            f"{p} is locked by a live process ({describe_lock(info)}); use --force only if"
            " you are sure it is dead (e.g. it ran on another host)."
        )
    (p / LOCK_NAME).unlink(missing_ok=True)
    return info


# --------------------------------------------------------------------------- reading


def _open_group(path: Path, mode: Literal["r", "r+"]) -> Any:
    import zarr

    if path.exists() and not path.is_dir():
        raise StoreError(f"{path} is a file, not a fingerprint store (a directory). Choose another --store path.")
    try:
        return zarr.open_group(str(path), mode=mode, zarr_format=3, use_consolidated=False)
    except FileNotFoundError:
        raise StoreError(f"{path}: no fingerprint store here. Create one with `dask-fp ingest`.") from None
    except Exception as e:  # zarr raises many types for damaged metadata
        raise StoreError(f"{path}: not a readable Zarr v3 store ({type(e).__name__}: {e}).") from None


def _open_arrays(group: Any, path: Path) -> dict[str, Any]:
    out = {}
    for name in ("fingerprint", *COORDS):
        try:
            out[name] = group[name]
        except KeyError:
            raise StoreError(f"{path}: array {name!r} is missing; the store is damaged.") from None
        except Exception as e:  # damaged array metadata
            raise StoreError(
                f"{path}: the metadata of array {name!r} is unreadable ({type(e).__name__}: {e});"
                " the store is damaged."
            ) from None
    return out


def _check_chunks(path: Path, arrays: dict[str, Any], committed: int, sources: list[dict[str, Any]]) -> None:
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
        self.group = _open_group(self.path, "r")
        attrs = dict(self.group.attrs)
        if attrs.get("format") != "dask-fp":
            raise StoreError(f"{self.path} is a Zarr group but not a dask-fp store (no 'format: dask-fp' attribute).")
        self.attrs = attrs
        self.committed = int(attrs.get("committed", 0))
        self.arrays = _open_arrays(self.group, self.path)
        short = [n for n, a in self.arrays.items() if a.shape[0] < self.committed]
        if short:
            raise StoreError(
                f"{self.path}: arrays {short} hold fewer rows than the {self.committed} committed;"
                " the store is damaged."
            )
        _check_chunks(self.path, self.arrays, self.committed, self.sources)
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


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --------------------------------------------------------------------------- writing


class StoreWriter:
    """Append sources to a store under the single-writer lock (use :func:`open_writer`)."""

    def __init__(self, path: Path, settings: StoreSettings) -> None:
        self.path = path
        self.settings = settings
        new = not (path / "zarr.json").exists()
        if new:
            if path.exists() and any(not p.name.startswith(LOCK_NAME) for p in path.iterdir()):
                raise StoreError(f"{path} exists and is not a fingerprint store; choose an empty or new path.")
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
            if int(attrs.get("committed", 0)) == 0 and not attrs.get("sources"):
                self._create_arrays(settings)  # finish a creation that was interrupted
        self.attrs = dict(self.group.attrs)
        self.arrays = _open_arrays(self.group, path)
        self.rows = self.arrays["fingerprint"].chunks[0]
        # Appending to a damaged store would bury the damage under new rows: refuse.
        _check_chunks(path, self.arrays, int(self.attrs.get("committed", 0)), self.attrs.get("sources", []))
        self._repair()

    def _create(self, s: StoreSettings) -> None:
        import zarr

        # The group and its attributes in one write: an interrupted creation is
        # recognisable (committed 0, no sources) and finished by the next writer.
        self.group = zarr.open_group(str(self.path), mode="a", zarr_format=3, attributes={
            "format": "dask-fp", "format_version": 1, "dask_fp_version": __version__,
            **asdict(s), "sources": [], "committed": 0, "created": _now(),
        })
        self._create_arrays(s)

    def _create_arrays(self, s: StoreSettings) -> None:
        """Create the empty arrays that are missing (all of them for a new store)."""
        import warnings

        rows = rows_per_chunk(s.feature_dim, np.dtype(s.dtype).itemsize)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the lock file is not a Zarr node
            have = set(self.group.array_keys())
        if "fingerprint" not in have:
            from zarr.codecs import BloscCodec

            # blosc-lz4 with byte shuffle: reads faster than zstd or no compression and
            # still saves ~10 % (bench/ingest.py section 5, docs/performance.md).
            self.group.create_array(
                "fingerprint", shape=(0, s.feature_dim), chunks=(rows, s.feature_dim), dtype=s.dtype,
                compressors=[BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
                dimension_names=("tile", "feature"), fill_value=0,
                attributes={"coordinates": " ".join(COORDS), "long_name": f"{s.model} fingerprint"},
            )
        for name in COORDS:
            if name in have:
                continue
            fill = np.nan if COORD_DTYPES[name].startswith("float") else 0
            self.group.create_array(
                name, shape=(0,), chunks=(rows,), dtype=COORD_DTYPES[name],
                dimension_names=("tile",), fill_value=fill,
            )
        if len(have) < 1 + len(COORDS):
            self._consolidate()

    def _repair(self) -> None:
        """Undo what an interrupted writer left: rows past ``committed``, temporary files,
        and a commit whose consolidated view was not written."""
        committed = int(self.attrs.get("committed", 0))
        changed = False
        for name, arr in self.arrays.items():
            if arr.shape[0] < committed:
                raise StoreError(f"{self.path}: array {name} is shorter than the committed rows; damaged store.")
            if arr.shape[0] != committed:
                arr.resize((committed, *arr.shape[1:]))
                changed = True
        for tmp in self.path.rglob("*.partial"):  # Zarr's atomic-write temporaries
            tmp.unlink(missing_ok=True)
        try:
            consolidated = json.loads((self.path / "zarr.json").read_text()).get("consolidated_metadata")
        except (OSError, ValueError):
            consolidated = None
        if changed or not consolidated:
            self._consolidate()

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
        Rows are buffered into whole chunks before they are written; the
        arrays grow only when rows are written, so a source that fails before
        its first write leaves the store as it was. Returns the number of rows
        committed.
        """
        start = self.committed
        buf = _RowBuffer(self, start)
        try:
            for batch in batches:
                buf.add(batch)
            n = buf.finish()
            if n > upper_bound:
                raise StoreError(f"{entry.get('path')}: {n} rows for at most {upper_bound} windows.")
            for arr in self.arrays.values():
                if arr.shape[0] != start + n:
                    arr.resize((start + n, *arr.shape[1:]))
        except BaseException:
            self._rollback(start)
            raise
        _test_pause("before-commit")
        entry = {**entry, "rows": [start, start + n], "tiles": n, "windows": upper_bound,
                 "dropped": upper_bound - n}
        self._commit(entry, start + n)
        return n

    def _rollback(self, start: int) -> None:
        """Best effort after a failed source: shrink the arrays back to ``committed``.

        Not needed for safety (readers never look past ``committed``, and the
        next writer repairs), only to leave the store as it was.
        """
        for arr in self.arrays.values():
            try:
                if arr.shape[0] != start:
                    arr.resize((start, *arr.shape[1:]))
            except Exception:
                pass

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
        for i, (name, arr) in enumerate(self.w.arrays.items()):
            if arr.shape[0] < self.pos + n:
                arr.resize((self.pos + n, *arr.shape[1:]))
            # Store every chunk, even one equal to the fill value, so that a missing
            # chunk file always means damage (see _check_chunks).
            arr.with_config({"write_empty_chunks": True})[self.pos : self.pos + n] = merged[name][:n]
            if i == 0:
                _test_pause("rows")
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
