"""Appending to a store under the single-writer lock: growth, commits (one or several sources at
once), rollback and repair. The rows themselves are written by worker tasks (:mod:`.region`)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..errors import StoreError, StoreMismatchError
from . import chunks, sources
from .lock import LOCK_NAME, read_lock, writer_lock
from .region import write_granularity
from .schema import COORD_DTYPES, COORDS, StoreSettings, now, open_arrays, open_group, rows_per_chunk


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
            self.group = open_group(path, "r+")
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
            if int(attrs.get("format_version", 1)) < sources.FORMAT_VERSION:
                attrs = sources.migrate_v1(self.group, attrs)
            if int(attrs.get("committed", 0)) == 0 and not sources.committed_count(attrs):
                self._create_arrays(settings)  # finish a creation that was interrupted
        self.attrs = dict(self.group.attrs)
        self.arrays = open_arrays(self.group, path)
        self.rows = self.arrays["fingerprint"].chunks[0]
        # The chunk holding the last committed row is rewritten by the first append (its rows
        # past ``committed`` are filled): if its file is gone, appending would bury the damage
        # under new rows, so refuse. Only that chunk of each array is checked (a bounded cost);
        # damage elsewhere is reported by the reads that touch it (``store/chunks.py``).
        committed = int(self.attrs.get("committed", 0))
        chunks.require(path, [chunks.ChunkFiles.of(path, n, a) for n, a in self.arrays.items()],
                       lambda f: f.indices(max(committed - 1, 0), committed), committed, lambda: self.sources)
        self._repair()

    def _create(self, s: StoreSettings) -> None:
        import zarr

        # The group and its attributes in one write: an interrupted creation is
        # recognisable (committed 0, no sources) and finished by the next writer.
        self.group = zarr.open_group(str(self.path), mode="a", zarr_format=3, attributes={
            "format": "dask-fp", "format_version": sources.FORMAT_VERSION, "dask_fp_version": __version__,
            **asdict(s), "committed_sources": 0, "committed": 0, "created": now(),
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
            # Uncompressed: a row is one ``pread`` at a known offset of its chunk file, so
            # the exact re-rank of code-search candidates reads ~2 KB per candidate instead
            # of decoding a 16 MiB chunk (``store/rows.py``; bench/rowread.py). blosc-lz4
            # saved ~10 % of the disk on real fingerprints; stores made with it still read.
            self.group.create_array(
                "fingerprint", shape=(0, s.feature_dim), chunks=(rows, s.feature_dim), dtype=s.dtype,
                compressors=None, dimension_names=("tile", "feature"), fill_value=0,
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
        sources.create_arrays(self.group)
        if len(have) < 1 + len(COORDS) + len(sources.NAMES):
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
        changed |= sources.truncate(self.group, sources.committed_count(self.attrs))
        for tmp in self._temporaries(committed):
            tmp.unlink(missing_ok=True)
        try:
            consolidated = json.loads((self.path / "zarr.json").read_text()).get("consolidated_metadata")
        except (OSError, ValueError):
            consolidated = None
        if changed or not consolidated:
            self._consolidate()

    def _temporaries(self, committed: int) -> Iterator[Path]:
        """Zarr's atomic-write temporaries (``*.partial``) an interrupted writer can have left.

        Only where a writer writes past ``committed``: the root and array folders
        (metadata), and the chunk folders of the write units from the one that
        holds row ``committed`` on; never a walk of the whole store, whose chunk
        folders grow with it.
        """
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            names = list(self.group.array_keys())
        dirs = {self.path}
        for name in names:
            arr = self.group[name]
            unit = write_granularity(arr)
            dirs |= {self.path / name, self.path / name / "c"}
            if arr.ndim > 1:
                first = committed // unit if name in self.arrays else 0
                dirs |= {self.path / name / "c" / str(k) for k in range(first, -(-arr.shape[0] // unit) + 1)}
        for d in dirs:
            try:
                with os.scandir(d) as it:
                    yield from (Path(e.path) for e in it if e.name.endswith(".partial"))
            except (FileNotFoundError, NotADirectoryError):
                continue

    @property
    def committed(self) -> int:
        return int(self.attrs["committed"])

    def find_source(self, sha256: str) -> dict[str, Any] | None:
        for s in self.sources:
            if s["sha256"] == sha256:
                return s
        return None

    def append(self, entry: dict[str, Any], batches: Iterator[dict[str, np.ndarray]], upper_bound: int) -> int:
        """Write one source's rows from this process and commit them (no cluster needed).

        ``batches`` yield dicts with ``fingerprint`` and the coordinate arrays
        (without ``norm2``, computed here from the stored values), in row
        order; at most ``upper_bound`` rows. ``ingest`` does not use this (its
        rows are written by worker tasks, :mod:`.region`); it serves tools and
        tests that build stores from arrays. Returns the rows committed.
        """
        start = self.committed
        parts = [b for b in batches if len(b["uid"])]
        n = sum(len(b["uid"]) for b in parts)
        if n > upper_bound:
            raise StoreError(f"{entry.get('path')}: {n} rows for at most {upper_bound} windows.")
        try:
            if n:
                rows = {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
                fp = rows["fingerprint"].astype(self.settings.dtype)
                f32 = fp.astype(np.float32)
                rows.update(fingerprint=fp, norm2=np.einsum("ij,ij->i", f32, f32))
                self.grow_to(start + n)
                for name, arr in self.arrays.items():
                    arr.with_config({"write_empty_chunks": True})[start : start + n] = rows[name]
        except BaseException:
            self.rollback()
            raise
        self._commit([{**entry, "rows": [start, start + n], "tiles": n, "windows": upper_bound,
                       "dropped": upper_bound - n}], start + n)
        self.rollback()  # trim growth to committed (a no-op here)
        return n

    @property
    def holder(self) -> dict[str, Any]:
        """This writer's lock record; write tasks check it before writing (see :mod:`.region`)."""
        info = read_lock(self.path)
        if info is None:
            raise StoreError(f"{self.path}: the writer lock disappeared; another process removed it.")
        return info

    def grow_to(self, rows: int) -> None:
        """Make every row array at least ``rows`` long (metadata only; the client calls this
        before it submits a write task, so the region exists when the task runs)."""
        for arr in self.arrays.values():
            if arr.shape[0] < rows:
                arr.resize((rows, *arr.shape[1:]))

    def commit(self, entries: list[dict[str, Any]], committed: int) -> None:
        """Make ``entries`` (consecutive sources whose rows end at ``committed``) visible at once."""
        self._commit(entries, committed)

    def finish(self) -> None:
        """Trim the arrays to the committed rows (growth steps are whole write units)."""
        self.rollback()

    def rollback(self) -> None:
        """Shrink the arrays back to ``committed`` (after a failure, or to drop growth slack).

        Not needed for safety (readers never look past ``committed``, and the
        next writer repairs), only to leave the store as it was.
        """
        start = self.committed
        changed = False
        for arr in self.arrays.values():
            try:
                if arr.shape[0] != start:
                    arr.resize((start, *arr.shape[1:]))
                    changed = True
            except Exception:  # noqa: S110 - best effort; the next writer repairs
                pass
        if changed:
            self._consolidate()

    def _commit(self, entries: list[dict[str, Any]], committed: int) -> None:
        """Make sources visible: their table entries past ``committed_sources``, then one metadata
        update of the group (``committed`` and ``committed_sources``), then the consolidated view."""
        n = self.next_source_index
        at = now()
        sources.write_entries(self.group, n, [{**e, "committed_at": at} for e in entries])
        self._publish({"committed_sources": n + len(entries), "committed": committed})
        self.group = open_group(self.path, "r+")
        self.attrs = dict(self.group.attrs)

    def _publish(self, update: dict[str, Any]) -> None:
        """The commit point: ONE atomic replace of the root ``zarr.json`` with the new attributes and
        a consolidated view in which the row arrays are ``committed`` long.

        Write tasks may have grown the arrays past ``committed`` (rows of later
        sources being written); readers of the consolidated metadata (xarray)
        then still see exactly the committed rows, and the attributes and the
        shapes they see come from the same file.
        """
        import uuid
        import warnings

        root = self.path / "zarr.json"
        doc = json.loads(root.read_text())
        doc["attributes"] = {**doc.get("attributes", {}), **update}
        committed = int(doc["attributes"]["committed"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the lock file is not a Zarr node
            names = sorted(self.group.array_keys())
        meta = {}
        for name in names:
            m = json.loads((self.path / name / "zarr.json").read_text())
            if name in self.arrays and m["shape"][0] > committed:
                m["shape"] = [committed, *m["shape"][1:]]
            meta[name] = m
        doc["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": meta}
        tmp = root.with_name(f"zarr.json.{uuid.uuid4().hex}.partial")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, root)

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
        return sources.committed_count(self.attrs)

    @property
    def sources(self) -> list[dict[str, Any]]:
        """The committed sources' records."""
        return sources.read_sources(self.group, self.attrs)


@contextmanager
def open_writer(path: str | os.PathLike[str], settings: StoreSettings, *, wait: float = 0.0) -> Iterator[StoreWriter]:
    """Lock the store (creating it if needed) and yield a :class:`StoreWriter`."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise StoreError(f"{p} is a file, not a fingerprint store (a directory). Choose another --store path.")
    p.mkdir(parents=True, exist_ok=True)
    with writer_lock(p, wait=wait):
        yield StoreWriter(p, settings)
