"""Code search: the distributed code scan, the exact re-rank of its candidates, and the method choice."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from ..codes import asym_chunk, block_candidates, byte_tables, hamming_chunk, project
from ..errors import QueryError
from ..kernels import chunk_distances, knn_merge, top_m
from ..scan import knn
from ..store import Store
from .layout import Index, has_index

#: Stores with at least this many committed rows are searched with codes by default
#: (``method="auto"``), when they have an index: the crossing point that bench/codes.py
#: computed from its 45,000 and 1M-row measurements (straight lines through the exact
#: persisted scan's and code search's medians cross at 39,302 rows; code search was the
#: faster at both sizes, with recall@10 >= 0.95), rounded up (docs/performance.md).
AUTO_CODES_ROWS = 40_000


def default_candidates(m: int, rows: int) -> int:
    """Candidates re-ranked exactly per query (one row read each): ``max(100·m, 1000, rows / 2000)``.

    The share of rows grows the list with the store: the denser the store, the
    more codes tie or nearly tie with the true neighbours'. On vectors that
    follow real fingerprints (bench/codes.py, docs/performance.md), 1,000
    candidates hold the true 10 nearest at recall 0.996 at 1M rows (300: 0.76),
    and at 10M rows 5,000 candidates (each scan task's 5,000 nearest codes,
    re-scored asymmetrically) at 0.985.
    """
    return int(min(rows, max(100 * m, 1000, -(-rows // 2000))))


def choose_method(store: Store, method: str, *, filtered: bool = False) -> str:
    """``exact`` or ``codes`` for ``method`` in (``auto``, ``exact``, ``codes``).

    ``auto`` picks codes for stores of at least :data:`AUTO_CODES_ROWS` rows with an index.
    Area and source filters (``filtered``) run on the exact scan: ``auto`` is then
    exact, and ``codes`` is refused.
    """
    if method not in ("auto", "exact", "codes"):
        raise QueryError(f"method must be auto, exact or codes, got {method!r}")
    if filtered:
        if method == "codes":
            raise QueryError("area and source filters run on the exact scan; drop --method codes, or the filter.")
        return "exact"
    if method == "auto":
        return "codes" if store.committed >= AUTO_CODES_ROWS and has_index(store) else "exact"
    return method


def _pack_codes(c: np.ndarray, block_info: Any = None) -> tuple[np.ndarray, np.ndarray]:
    start, stop = block_info[0]["array-location"][0]
    return (c, np.arange(start, stop, dtype=np.int64))


def code_candidates(codes: Any, qcodes: np.ndarray, m: int, *, tables: np.ndarray | None = None,
                    pool: int | None = None, split_every: int | None = None,
                    blocks: list[tuple[Any, int]] | None = None) -> np.ndarray:
    """Rows of each query's ``m`` best codes: one reduction over the dask array ``codes``.

    With ``tables`` (the queries' :func:`~dask_fp.codes.byte_tables`), each task
    keeps its ``pool`` nearest codes by Hamming distance and ranks them by the
    asymmetric score; without, by Hamming distance alone. With ``blocks``
    (:attr:`Index.blocks` of a persisted index), the same tasks are submitted
    straight to the cluster, one per block, and merged by one task.
    """
    import dask.array as da

    if codes.shape[0] == 0:
        return np.empty((len(qcodes), 0), np.int64)
    if blocks:
        client = blocks[0][0].client
        parts = [client.submit(block_candidates, fut, start, qcodes=qcodes, tables=tables, m=m, pool=pool or m,
                               pure=False) for fut, start in blocks]
        _, rows = client.submit(knn_merge, parts, m=m, pure=False).result()
        return np.asarray(rows)
    packed = da.map_blocks(_pack_codes, codes, dtype=np.uint8, meta=np.empty((0, 0), dtype=np.uint8))
    if tables is None:
        chunk = partial(hamming_chunk, qcodes=qcodes, m=m)
    else:
        chunk = partial(asym_chunk, qcodes=qcodes, tables=tables, m=m, pool=pool or m)
    red = da.reduction(
        packed, chunk=chunk, combine=partial(knn_merge, m=m),
        aggregate=partial(knn_merge, m=m), axis=0, keepdims=True, concatenate=False,
        split_every=split_every, dtype=np.int32, meta=np.empty((0, 0), dtype=np.int32), name="code-knn",
    )
    (block,) = red.to_delayed().ravel()
    _, rows = block.compute()
    return rows


def rerank(store: Store, queries: np.ndarray, cand: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``m`` best of each query's candidate rows, reading only the candidates' fingerprints.

    The rows are read by :meth:`Store.read` (one ``pread`` per row from an
    uncompressed store, see :mod:`dask_fp.store.rows`); their squared norms are
    computed from them as the writer computes the stored ``norm2`` (float32
    ``einsum``), so every distance equals the exact scan's.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    flat = np.unique(cand)
    if flat.size == 0:
        return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
    x = store.read("fingerprint", flat).astype(np.float32, copy=False)
    n2 = np.einsum("ij,ij->i", x, x)
    d = chunk_distances(x, n2, q, np.einsum("ij,ij->i", q, q))  # (q, |flat|)
    pos = np.searchsorted(flat, cand)
    dist = np.take_along_axis(d, pos, axis=1)
    return top_m(dist, cand, m)


def code_search(
    store: Store,
    queries: np.ndarray,
    m: int,
    *,
    index: Index | None = None,
    candidates: int | None = None,
    pool: int | None = None,
    asymmetric: bool = True,
    split_every: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate ``m`` nearest rows with exact distances: code scan, exact re-rank, exact tail.

    Parameters
    ----------
    store : Store
    queries : ndarray, shape (q, d)
    m : int
    index : Index, optional
        An opened (possibly persisted) index of ``store``; opened when None.
    candidates : int, optional
        Rows re-ranked exactly per query (:func:`default_candidates` when None).
    pool : int, optional
        Hamming shortlist per scan task, re-scored asymmetrically to pick the
        candidates (``candidates`` when None; at least ``candidates``).
    asymmetric : bool
        Re-score each shortlist asymmetrically (default); False ranks by Hamming
        distance alone (the baseline bench/codes.py measures against).

    Returns
    -------
    dist, rows : like :func:`dask_fp.scan.knn`, distances exact
    """
    if m < 1:
        raise QueryError(f"k must be at least 1, got {m}")
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != store.dim:
        raise QueryError(f"queries must have shape (q, {store.dim}), got {q.shape}")
    idx = index if index is not None else Index(store)
    c = candidates if candidates is not None else default_candidates(m, idx.indexed)
    if c < m:
        raise QueryError(f"candidates ({c}) must be at least k ({m})")
    z = project(q, idx.params)
    cand = code_candidates(idx.codes(), np.packbits(z >= 0, axis=1), c, tables=byte_tables(z) if asymmetric else None,
                           pool=max(c, pool or c), split_every=split_every, blocks=idx.blocks)
    parts = [rerank(store, q, cand, m)]
    if idx.indexed < store.committed:  # rows added since the index: scanned exactly
        lo = idx.indexed
        td, tr = knn(store.fingerprints()[lo:], store.norm2()[lo:], q, m, split_every=split_every)
        parts.append((td, tr + lo))
    return knn_merge(parts, m=m)
