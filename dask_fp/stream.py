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
from .store.chunks import ChunkFiles, damage_error

if TYPE_CHECKING:
    from .store import Store

#: Bytes of fingerprints a streamed chunk task reads and scans at a time (whole Zarr chunks):
#: the block stays in cache between decompression and the distances.
STREAM_READ_BYTES = 16 << 20
#: Tasks per query row block (:attr:`~dask_fp.store.Store.task_rows`) of a streamed scan: so
#: that a store of one or two blocks still keeps both threads of a worker busy.
STREAM_TASK_SPLIT = 2
#: glibc ``mallopt`` parameters and the values :func:`keep_buffers` sets: mmap threshold 32 MiB
#: (the largest glibc allows), 64 MiB of padding kept at the top of each heap.
MALLOC_SETTINGS = ((-3, 32 << 20), (-2, 64 << 20))  # M_MMAP_THRESHOLD, M_TOP_PAD
_malloc_tuned: list[bool] = []  # per process: whether keep_buffers ran here


def keep_buffers() -> None:
    """Let this process reuse freed read buffers instead of mapping fresh zeroed pages for each.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also
    pins glibc's mmap threshold at 128 KiB: every 16 MiB buffer of a Zarr read
    (file bytes, decompressed chunk) is then a new ``mmap`` whose 4,096 pages
    fault and are zeroed on first touch, and is unmapped when freed. Raising
    the mmap threshold and the heap's top padding (:data:`MALLOC_SETTINGS`)
    keeps those buffers in the heap for the next read; the trim threshold stays,
    so memory beyond the padding still goes back to the OS. Runs once per
    process, in its first streamed scan task; a no-op where glibc is not the allocator.
    """
    if _malloc_tuned:
        return
    _malloc_tuned.append(True)
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        for param, value in MALLOC_SETTINGS:
            libc.mallopt(param, value)
    except (OSError, AttributeError):  # not glibc
        pass


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

    def read(self, lo: int, hi: int) -> list[np.ndarray]:
        missing = [f for cf in self.files for f in cf.missing(cf.indices(lo, hi), self.committed)]
        if missing:
            raise damage_error(self.root, missing, self.committed)
        return [np.asarray(a[lo:hi]) for a in self.arrays]


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
    for s in range(lo, hi, reader.step):
        e = min(s + reader.step, hi)
        x, n2, *cols = reader.read(s, e)
        part = chunk((x, n2, np.arange(s, e, dtype=np.int64), *cols))
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
