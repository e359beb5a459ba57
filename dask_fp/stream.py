"""Reading a store from Zarr inside scan tasks: a few chunks at a time, in cache, with reused buffers.

:func:`stream_blocks` makes the row blocks of a streamed scan (:func:`dask_fp.scan.stream_knn`):
one task per span of rows, which reads its rows :data:`STREAM_READ_BYTES` at a
time (whole Zarr chunks, each read's chunk files checked first) and applies the
scan's chunk step to each piece while it is in cache, merging as it goes.
Measured in docs/performance.md ("Issue 14 (items 3–5)") with ``bench/query.py``
and ``bench/stream_read.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .kernels import knn_merge
from .malloc import keep_buffers
from .store.chunks import ChunkFiles, damage_error
from .store.rows import read_span

if TYPE_CHECKING:
    from .store import Store

#: Bytes of fingerprints a streamed chunk task reads and scans at a time (whole Zarr chunks):
#: the block stays in cache between decompression and the distances.
STREAM_READ_BYTES = 16 << 20
#: Tasks per query row block (:attr:`~dask_fp.store.Store.task_rows`) of a streamed scan: so
#: that a store of one or two blocks still keeps both threads of a worker busy.
STREAM_TASK_SPLIT = 2


@dataclass(frozen=True)
class ZarrRows:
    """What a streamed chunk task reads: the store's Zarr arrays, a few chunks at a time.

    ``arrays`` are ``fingerprint``, ``norm2`` and, with a row filter, ``lon``,
    ``lat``, ``source``; ``files`` their chunk files, checked before each read
    so a deleted file is a "store is damaged" error, not fill values.
    """

    arrays: tuple[Any, ...]
    files: tuple[ChunkFiles, ...]
    root: str
    committed: int
    step: int  # rows per read: whole chunks of every array

    def read(self, lo: int, hi: int, which: Sequence[int] | None = None) -> list[np.ndarray]:
        """Rows ``[lo, hi)`` of the arrays at positions ``which`` (all when None)."""
        idx = range(len(self.arrays)) if which is None else which
        missing = [f for i in idx for f in self.files[i].missing(self.files[i].indices(lo, hi), self.committed)]
        if missing:
            raise damage_error(self.root, missing, self.committed)
        return [read_span(self.arrays[i], self.files[i], lo, hi) for i in idx]


def zarr_rows(store: Store, names: Sequence[str], step_bytes: int = STREAM_READ_BYTES) -> ZarrRows:
    """A :class:`ZarrRows` over ``fingerprint``, ``norm2`` and ``names`` of ``store``, reading whole
    chunks of every array, about ``step_bytes`` of fingerprints (at least one chunk) at a time."""
    arrays = [store.arrays[n] for n in ("fingerprint", "norm2", *names)]
    fp = arrays[0]
    chunk = math.lcm(*(int(a.chunks[0]) for a in arrays))
    row_bytes = int(np.prod(fp.shape[1:])) * fp.dtype.itemsize
    step = chunk * max(1, step_bytes // (chunk * row_bytes))
    files = tuple(store.files[n] for n in ("fingerprint", "norm2", *names))
    return ZarrRows(tuple(arrays), files, str(store.path), store.committed, step)


def _stream_block(*, reader: ZarrRows, starts: tuple[int, ...], chunk: Callable[..., Any], m: int,
                  block_info: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """One streamed chunk task: read its row block ``reader.step`` rows at a time, scan, keep ``m``."""
    keep_buffers()
    info = block_info[None]
    lo = starts[info["chunk-location"][0]]
    hi = lo + info["chunk-shape"][0]
    best: tuple[np.ndarray, np.ndarray] | None = None
    # A row filter's columns (8 B a row or less) are read once for the whole block, not per step.
    extra = reader.read(lo, hi, range(2, len(reader.arrays)))
    for s in range(lo, hi, reader.step):
        e = min(s + reader.step, hi)
        x, n2 = reader.read(s, e, (0, 1))
        part = chunk((x, n2, np.arange(s, e, dtype=np.int64), *(c[s - lo : e - lo] for c in extra)))
        best = part if best is None else knn_merge([best, part], m=m)
    return best  # type: ignore[return-value]  # every block holds rows


def _split(lo: int, hi: int, step: int, parts: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` cut into up to ``parts`` spans of whole ``step``s (the last may be shorter), as even as can be."""
    steps = -(-(hi - lo) // step)
    cuts = [lo + step * (steps * i // parts) for i in range(parts)] + [hi]
    return [(a, min(b, hi)) for a, b in zip(cuts, cuts[1:], strict=False) if min(b, hi) > a]


def stream_blocks(store: Store, chunk: Callable[..., Any], m: int, *, filtered: bool,
                  blocks: Sequence[int] | None = None, step_bytes: int = STREAM_READ_BYTES, token: str = "") -> Any:
    """A dask array whose blocks are the chunk step's ``(dist, rows)`` over spans of ``store``'s rows.

    ``chunk`` takes ``(x, norm2, rows[, lon, lat, source])`` (the latter with
    ``filtered``) and returns each query's ``m`` best pairs. Each row block of
    :meth:`~dask_fp.store.Store.fingerprints` (only ``blocks`` if given) is read by
    :data:`STREAM_TASK_SPLIT` tasks. None when there are no rows to read. The
    blocks are pairs, not arrays: reduce them with ``concatenate=False``.
    """
    import dask.array as da
    from dask.base import tokenize

    n, tr = store.committed, store.task_rows
    chosen = range(-(-n // tr)) if blocks is None else blocks
    reader = zarr_rows(store, ("lon", "lat", "source") if filtered else (), step_bytes)
    spans = [p for b in chosen for p in _split(b * tr, min(b * tr + tr, n), reader.step, STREAM_TASK_SPLIT)]
    if not spans:
        return None
    return da.map_blocks(_stream_block, chunks=(tuple(hi - lo for lo, hi in spans),), dtype=np.float32,
                         meta=np.empty((0,), np.float32), reader=reader, starts=tuple(lo for lo, _ in spans),
                         chunk=chunk, m=m, name="knn-stream-" + tokenize(str(store.path), n, spans, token))
