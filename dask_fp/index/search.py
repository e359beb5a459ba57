"""Code search: the distributed code scan, the exact re-rank of its candidates, and the method choice."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..codes import CodeBlock, block_candidates
from ..errors import QueryError
from ..kernels import chunk_distances, knn_merge, top_m
from ..scan import knn
from ..store import Store
from .layout import Index, has_index, load_block

#: Stores with at least this many committed rows are searched with codes by default
#: (``method="auto"``), when they have an index: the crossing point that bench/codes.py
#: computed from its 45,000 and 1M-row measurements (straight lines through the exact
#: persisted scan's and code search's medians cross at 39,302 rows; code search was the
#: faster at both sizes, with recall@10 >= 0.95), rounded up (docs/performance.md).
AUTO_CODES_ROWS = 40_000


#: Lists probed per query at least: more are probed until they hold ``candidates`` rows.
#: On the real UC Merced fingerprints (32 lists) recall@10 at 50 candidates was 0.94 with 1 or
#: 2 lists probed, 0.98 with 4 and 0.996 with 8 (bench/codes.py, docs/performance.md).
DEFAULT_PROBES = 8


def default_candidates(m: int, rows: int) -> int:
    """Candidates re-ranked exactly per query (one row read each): ``max(10·m, 500)``, at most ``rows``.

    Measured with :data:`DEFAULT_PROBES` lists probed (bench/codes.py, docs/performance.md): on
    10M vectors that follow real fingerprints, 100 candidates hold the true 10 nearest at
    recall 0.991 and 500 at 0.999; on the real UC Merced fingerprints 50 reach 0.996. The
    default keeps a margin over the cheapest setting: a candidate costs one row read (~50 µs
    from the page cache), a missed neighbour is a wrong answer.
    """
    return int(min(rows, max(10 * m, 500)))


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
            raise QueryError("area and source filters run on the exact scan; search with method exact"
                             " (--method exact) or auto, or drop the filter.")
        return "exact"
    if method == "auto":
        return "codes" if store.committed >= AUTO_CODES_ROWS and has_index(store) else "exact"
    return method


def probe_lists(index: Index, q: np.ndarray, probes: int, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The lists each query probes: its nearest ``probes``, and more until they hold ``rows`` indexed rows.

    Returns ``(lists int64 (q, p), ‖q − c‖² float32 (q, p), (q − c)P float32 (q, p, nbits))``; ``p`` is the
    same for every query (the most any one needs).
    """
    c2 = index.centroid_norm2
    qc2 = np.maximum(np.einsum("ij,ij->i", q, q)[:, None] + c2[None, :] - 2 * (q @ index.params.centroids.T), 0)
    order = np.argsort(qc2, axis=1, kind="stable")
    held = np.cumsum(index.list_rows[order], axis=1)
    need = np.minimum(rows, held[:, -1])  # every list when the index holds fewer rows
    p = max(min(probes, len(c2)), int(np.max(np.argmax(held >= need[:, None], axis=1))) + 1)
    lists = order[:, :p]
    z = (q @ index.params.projection)[:, None, :] - index.centroid_projection[lists]
    return lists, np.take_along_axis(qc2, lists, axis=1).astype(np.float32), z.astype(np.float32)


def code_candidates(index: Index, q: np.ndarray, m: int, *, probes: int = DEFAULT_PROBES) -> np.ndarray:
    """Rows ``(q, ≤ m)`` of each query's ``m`` best coded rows by estimated distance (``-1``: none).

    One task per block of the index: per worker thread when the index is persisted on a
    distributed cluster (:meth:`Index.persist`; the blocks' lists are merged here), in this
    process when persisted without one, else one task per :meth:`Index.ranges` block that
    reads its rows from the store, and a merge task.
    """
    import dask

    if index.indexed == 0:
        return np.empty((len(q), 0), np.int64)
    lists, qc2, z = probe_lists(index, q, probes, m)
    kw: dict[str, Any] = {"probes": lists, "qc2": qc2, "z": z, "m": m}
    blocks = index.blocks
    if blocks and not isinstance(blocks[0], CodeBlock):  # futures on a distributed cluster
        client = blocks[0].client
        # The blocks' lists are small (m rows each): merged here, without one more task's round trip.
        parts = client.gather([client.submit(block_candidates, f, **kw, pure=False) for f in blocks])
        return knn_merge(parts, m=m)[1]
    if blocks:
        return knn_merge([block_candidates(b, **kw) for b in blocks], m=m)[1]
    load = dask.delayed(load_block, pure=False)
    scan = dask.delayed(block_candidates, pure=False)
    parts = [scan(load(index.arrays, s, e, index.params.lists), **kw) for s, e in index.ranges()]
    return np.asarray(dask.delayed(knn_merge)(parts, m=m).compute()[1])


def rerank(store: Store, queries: np.ndarray, cand: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``m`` best of each query's candidate rows, reading only the candidates' fingerprints.

    The rows are read by :meth:`Store.read` (one ``pread`` per row from an
    uncompressed store, see :mod:`dask_fp.store.rows`); their squared norms are
    computed from them as the writer computes the stored ``norm2`` (float32
    ``einsum``), so every distance equals the exact scan's.
    Rows ``-1`` (no candidate: fewer rows were probed) are dropped.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    flat = np.unique(cand[cand >= 0])
    if flat.size == 0:
        return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
    x = store.read("fingerprint", flat).astype(np.float32, copy=False)
    n2 = np.einsum("ij,ij->i", x, x)
    d = chunk_distances(x, n2, q, np.einsum("ij,ij->i", q, q))  # (q, |flat|)
    pos = np.searchsorted(flat, cand).clip(max=len(flat) - 1)
    dist = np.where(cand >= 0, np.take_along_axis(d, pos, axis=1), np.inf)
    dist, rows = top_m(dist, cand, m)
    keep = int(np.isfinite(dist).all(axis=0).sum())  # every query probed the same rows when any came short
    return dist[:, :keep], rows[:, :keep]


def code_search(
    store: Store,
    queries: np.ndarray,
    m: int,
    *,
    index: Index | None = None,
    candidates: int | None = None,
    probes: int = DEFAULT_PROBES,
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
    probes : int
        Lists probed per query at least (more when they hold fewer than ``candidates`` rows).
    split_every : int, optional
        Tree width of the exact scan of rows added since the index.

    Returns
    -------
    dist, rows : like :func:`dask_fp.scan.knn`, distances exact
    """
    if m < 1:
        raise QueryError(f"k must be at least 1, got {m}")
    if probes < 1:
        raise QueryError(f"probes must be at least 1, got {probes}")
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != store.dim:
        raise QueryError(f"queries must have shape (q, {store.dim}), got {q.shape}")
    idx = index if index is not None else Index(store)
    c = candidates if candidates is not None else max(m, default_candidates(m, idx.indexed))
    if c < m:
        raise QueryError(f"candidates ({c}) must be at least k ({m})")
    parts = [rerank(store, q, code_candidates(idx, q, c, probes=probes), m)]
    if idx.indexed < store.committed:  # rows added since the index: scanned exactly
        lo = idx.indexed
        td, tr = knn(store.fingerprints()[lo:], store.norm2()[lo:], q, m, split_every=split_every)
        parts.append((td, tr + lo))
    return knn_merge(parts, m=m)
