"""Reading a few rows of a row-chunked array without decoding whole chunks.

Exact re-rank after a compact-code scan (:mod:`dask_fp.index`) needs the full
fingerprints of ~1,000 candidate rows scattered over the whole store. Through
Zarr, each candidate costs the decode of the whole chunk file holding it
(16 MiB for 512-d float32); 1,000 candidates over a 1M-row store decode most
of it. Stores created by dask-fp 0.x since issue 14 keep ``fingerprint``
uncompressed (the only codec is ``bytes``, little-endian; blosc-lz4 saved
~10 % of the disk on real fingerprints), so a chunk file is the rows in C order and row ``r`` is
``bytes_per_row`` bytes at offset ``(r mod rows) · bytes_per_row`` of file
``r // rows``: one ``pread`` per row. Arrays with compression (older stores)
are read through Zarr, one chunk at a time, as before: still correct, slower.

Measured in ``bench/rowread.py`` (docs/performance.md, section "Compact-code search").
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import StoreError
from .chunks import ChunkFiles

#: Threads reading chunk files at once (``pread`` releases the GIL; more requests in
#: flight hide the latency of a disk that the page cache does not cover).
READ_THREADS = 8


@dataclass(frozen=True)
class Layout:
    """How the chunk files of an unsharded row-chunked array hold their rows: C order, little-endian,
    one chunk across every axis but the first, either plain bytes or zstd-compressed bytes."""

    rows: int  # rows per chunk file
    dtype: str  # numpy dtype string, little-endian
    tail: tuple[int, ...]  # shape of one row
    zstd: bool

    @property
    def row_bytes(self) -> int:
        return np.dtype(self.dtype).itemsize * int(np.prod(self.tail, dtype=np.int64))


def span_layout(arr: Any) -> Layout | None:
    """The :class:`Layout` of Zarr v3 array ``arr``, or None unless its codecs are ``bytes``
    (little-endian) alone or followed by ``zstd``, unsharded, one chunk across the other axes."""
    try:
        codecs = list(arr.metadata.codecs)
    except AttributeError:  # Zarr v2 metadata
        return None
    names = [type(c).__name__ for c in codecs]
    if getattr(arr, "shards", None) is not None or names not in (["BytesCodec"], ["BytesCodec", "ZstdCodec"]):
        return None
    if tuple(arr.chunks[1:]) != tuple(arr.shape[1:]):
        return None
    dt = np.dtype(arr.dtype)
    endian = getattr(codecs[0], "endian", None)
    if dt.itemsize > 1 and getattr(endian, "value", endian) != "little":
        return None
    return Layout(int(arr.chunks[0]), dt.newbyteorder("<").str, tuple(int(s) for s in arr.shape[1:]),
                  len(codecs) == 2)


def raw_layout(arr: Any) -> Layout | None:
    """The :class:`Layout` of ``arr`` when its chunk files are plain rows (the ``bytes`` codec alone:
    row ``r`` of a file is ``row_bytes`` bytes at offset ``r · row_bytes``), else None."""
    lay = span_layout(arr)
    return lay if lay is not None and not lay.zstd else None


def read_rows(arr: Any, files: ChunkFiles, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` (any order, repeats allowed, all < the array's length) of ``arr``.

    Direct ``pread`` of each row when the array has a :func:`raw_layout`;
    otherwise Zarr's orthogonal selection (which decodes each chunk that holds some). The caller
    checks the range and that the chunk files exist (:meth:`Store.read`); a
    file that is shorter than its rows here is a "damaged store" error.
    """
    rows = np.asarray(rows, dtype=np.int64)
    lay = raw_layout(arr)
    uniq, inv = np.unique(rows, return_inverse=True)
    if lay is None:  # Zarr decodes every chunk that holds one of them
        return np.asarray(arr.get_orthogonal_selection(rows))
    return _read_raw(files, lay, uniq)[inv.reshape(rows.shape)]


def _read_raw(files: ChunkFiles, lay: Layout, uniq: np.ndarray) -> np.ndarray:
    out = np.empty((len(uniq), *lay.tail), dtype=lay.dtype)
    if not len(uniq):
        return out
    row_bytes = lay.row_bytes  # once: the loop below runs per row run
    flat = out.reshape(len(uniq), -1).view(np.uint8).reshape(len(uniq), row_bytes)
    which, local = np.divmod(uniq, lay.rows)
    # Runs of consecutive rows of one file are one read each, straight into ``out``.
    starts = np.flatnonzero(np.diff(which, prepend=-1) | (np.diff(local, prepend=-2) != 1))
    runs = list(zip(starts.tolist(), np.append(starts[1:], len(uniq)).tolist(), strict=True))

    def read_runs(lo: int, hi: int) -> None:
        fd, open_chunk, key = -1, -1, ""
        try:
            for s, e in runs[lo:hi]:
                chunk = int(which[s])
                if chunk != open_chunk:
                    if fd >= 0:
                        os.close(fd)
                        fd = -1
                    key = files.key(chunk, files.tails[0])
                    fd = os.open(os.path.join(files.root, key), os.O_RDONLY)
                    open_chunk = chunk
                got = os.preadv(fd, [flat[s:e].data], int(local[s]) * row_bytes)
                if got != (e - s) * row_bytes:
                    raise StoreError(
                        f"{files.root}: chunk file {key} is shorter than its rows ({got} of"
                        f" {(e - s) * row_bytes} bytes at row {int(uniq[s])}); the store is damaged. Restore"
                        " it from a backup, or ingest the sources again into a new store."
                    )
        finally:
            if fd >= 0:
                os.close(fd)

    # One slice of the runs per thread (a future per run costs more than its read).
    n = min(READ_THREADS, -(-len(runs) // 64))
    cuts = np.linspace(0, len(runs), n + 1).astype(int).tolist()
    if n <= 1:
        read_runs(0, len(runs))
    else:
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(read_runs, cuts[:-1], cuts[1:]))
    return out


def read_span(arr: Any, files: ChunkFiles, lo: int, hi: int) -> np.ndarray:
    """Rows ``[lo, hi)`` of ``arr``, read from its chunk files directly when :func:`span_layout` allows.

    Zarr's own read path costs ~0.5 ms per chunk on top of the decode, which a streamed
    scan pays for every small per-tile column (docs/performance.md); this reads each
    chunk file whole and decodes it with the same zstd. Other layouts go through Zarr.
    The caller checks that the chunk files exist (a missing file is damage, not fill values).
    """
    lay = span_layout(arr)
    if lay is None:
        return np.asarray(arr[lo:hi])
    out = np.empty((hi - lo, *lay.tail), dtype=lay.dtype)
    if hi <= lo:
        return out
    decode = _zstd_decode() if lay.zstd else None
    row_bytes = lay.row_bytes
    for chunk in range(lo // lay.rows, (hi - 1) // lay.rows + 1):
        key = files.key(chunk, files.tails[0])
        with open(os.path.join(files.root, key), "rb") as f:
            raw = f.read()
        c0 = chunk * lay.rows
        a, b = max(lo, c0), min(hi, c0 + lay.rows)
        try:
            buf = decode(raw) if decode is not None else raw
            if len(buf) != lay.rows * row_bytes:
                raise ValueError(f"{len(buf)} bytes, not {lay.rows * row_bytes}")
        except Exception as e:  # noqa: BLE001 - any decode failure of a stored chunk is damage
            raise StoreError(f"{files.root}: chunk file {key} cannot be read ({e}); the store is damaged. Restore it"
                             " from a backup, or ingest the sources again into a new store.") from None
        rows = np.frombuffer(buf, dtype=lay.dtype).reshape(-1, *lay.tail)
        out[a - lo : b - lo] = rows[a - c0 : b - c0]
    return out


def _zstd_decode() -> Any:
    from numcodecs import Zstd

    return Zstd().decode
