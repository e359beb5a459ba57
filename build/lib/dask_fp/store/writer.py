"""Appending to a store under the single-writer lock, with one commit point per source."""

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
from . import sources
from .lock import LOCK_NAME, writer_lock
from .reader import check_chunks
from .schema import COORD_DTYPES, COORDS, StoreSettings, now, open_arrays, open_group, rows_per_chunk
from .testhook import test_pause


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
        # Appending to a damaged store would bury the damage under new rows: refuse.
        check_chunks(path, self.arrays, int(self.attrs.get("committed", 0)), lambda: self.sources)
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
        for s in self.sources:
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
        test_pause("before-commit")
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
            except Exception:  # noqa: S110 - best effort; the next writer repairs
                pass

    def _commit(self, entry: dict[str, Any], committed: int) -> None:
        """Make a source visible: its table entry past ``committed_sources``, then one metadata
        update of the group (``committed`` and ``committed_sources``), then the consolidated view."""
        n = self.next_source_index
        sources.write_entries(self.group, n, [{**entry, "committed_at": now()}])
        self.group.attrs.update({"committed_sources": n + 1, "committed": committed})
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
        return sources.committed_count(self.attrs)

    @property
    def sources(self) -> list[dict[str, Any]]:
        """The committed sources' records."""
        return sources.read_sources(self.group, self.attrs)


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
                test_pause("rows")
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
