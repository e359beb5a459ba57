"""Pure numpy kernels of the search pass: distances, top-m, merge, de-duplication.

Like dask's ``chunk.py`` beside ``reductions.py``: these take and return plain
arrays and are tested against brute force without Dask or I/O; :mod:`.scan`
wires them into one ``dask.array.reduction``. Ties are broken by row, so
results equal a brute-force sort on (distance, row).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .tiling import Tiling, windows_overlap


def top_m(dist: np.ndarray, rows: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``m`` smallest (distance, row) pairs, sorted by (distance, row).

    Parameters
    ----------
    dist : ndarray, shape (q, n)
    rows : ndarray of int64, shape (n,) or (q, n)
    m : int

    Returns
    -------
    (dist, rows), each of shape (q, min(m, n))
    """
    q, n = dist.shape
    rows = np.broadcast_to(rows, (q, n))
    if n > m:
        # Candidates: everything up to the m-th smallest distance (ties included).
        kth = np.partition(dist, m - 1, axis=1)[:, m - 1 : m]
        sel = dist <= kth
        if not (sel.sum(axis=1) == m).all():
            # Ties at the m-th distance: settle them by row, query by query.
            out_d = np.empty((q, m), dtype=dist.dtype)
            out_r = np.empty((q, m), dtype=np.int64)
            for i in range(q):
                cand = np.flatnonzero(sel[i])
                o = np.lexsort((rows[i, cand], dist[i, cand]))[:m]
                out_d[i], out_r[i] = dist[i, cand[o]], rows[i, cand[o]]
            return out_d, out_r
        idx = np.nonzero(sel)[1].reshape(q, m)
        dist = np.take_along_axis(dist, idx, axis=1)
        rows = np.take_along_axis(rows, idx, axis=1)
    order = np.lexsort((rows, dist), axis=1) if dist.size else np.zeros(dist.shape, dtype=np.intp)
    return np.take_along_axis(dist, order, axis=1), np.take_along_axis(rows, order, axis=1).astype(np.int64)


def chunk_distances(x: np.ndarray, norm2: np.ndarray, q: np.ndarray, qnorm2: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``(n_queries, n_rows)`` with one matrix product."""
    x = x.astype(np.float32, copy=False)
    d = q @ x.T
    d *= -2.0
    d += norm2[None, :].astype(np.float32)
    d += qnorm2[:, None]
    np.maximum(d, 0.0, out=d)
    return d


def knn_chunk(
    block: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    q: np.ndarray,
    qnorm2: np.ndarray,
    m: int,
    axis: Any = None,
    keepdims: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Chunk step: a block ``(x, norm2, rows)`` → each query's ``m`` best pairs."""
    x, norm2, rows = block
    return top_m(chunk_distances(x, norm2.ravel(), q, qnorm2), rows.ravel().astype(np.int64), m)


def knn_merge(
    parts: list[tuple[np.ndarray, np.ndarray]] | tuple[np.ndarray, np.ndarray],
    *,
    m: int,
    axis: Any = None,
    keepdims: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Combine/aggregate step: merge candidate lists, keep ``m`` per query."""
    if isinstance(parts, tuple):
        parts = [parts]
    parts = _flatten(parts)
    dist = np.concatenate([p[0] for p in parts], axis=1)
    rows = np.concatenate([p[1] for p in parts], axis=1)
    return top_m(dist, rows, m)


def _flatten(parts: list) -> list[tuple[np.ndarray, np.ndarray]]:
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for p in parts:
        if isinstance(p, list):
            out.extend(_flatten(p))
        else:
            out.append(p)
    return out


def dedup_mask(
    source: np.ndarray,
    wy: np.ndarray,
    wx: np.ndarray,
    *,
    tiling: Tiling,
    exclude: Sequence[tuple[int, int, int]] = (),
) -> np.ndarray:
    """Greedy de-duplication of a ranked hit list (best first).

    A hit is kept unless it overlaps an already-kept hit of the same source,
    or one of the ``exclude`` windows ``(source, wy, wx)`` (the query's own).
    """
    keep = np.zeros(len(source), dtype=bool)
    kept: dict[int, list[tuple[int, int]]] = {}
    for s, y, x in exclude:
        kept.setdefault(int(s), []).append((int(y), int(x)))
    for i, (s, y, x) in enumerate(zip(source.tolist(), wy.tolist(), wx.tolist(), strict=True)):
        prev = kept.get(s)
        if prev:
            py, px = np.array(prev).T
            if windows_overlap(py, px, y, x, tile=tiling.tile, stride=tiling.stride).any():
                continue
        keep[i] = True
        kept.setdefault(s, []).append((y, x))
    return keep


def candidates_needed(k: int, tiling: Tiling, *, dedup: bool, from_store: bool) -> int:
    """How many raw neighbours to fetch so ``k`` survive de-duplication."""
    if not dedup:
        return k + (1 if from_store else 0)
    block = (2 * tiling.reach + 1) ** 2
    return k * block + (block if from_store else 0)

