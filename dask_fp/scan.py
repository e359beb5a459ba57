"""The distributed pass over the store: exact k-NN as one ``dask.array.reduction``.

The shape follows dask's own ``argtopk``: the chunk step computes squared
Euclidean distances ``‖x‖² − 2x·q + ‖q‖²`` for a batch of queries with one
matrix product and keeps each query's ``m`` best (distance, row) pairs; the
combine and aggregate steps merge candidate lists in a tree
(``split_every``). The kernels are in :mod:`.kernels`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from .errors import QueryError
from .kernels import knn_chunk, knn_merge


def _column(a: np.ndarray) -> np.ndarray:
    return a[:, None]


def _pack(x: np.ndarray, norm2: np.ndarray, block_info: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A block and its norms → ``(x, norm2, global rows)``; the rows come from the block's location."""
    start, stop = block_info[0]["array-location"][0]
    return (x, norm2, np.arange(start, stop, dtype=np.int64))


def knn(
    x: Any, norm2: Any, queries: np.ndarray, m: int, *, split_every: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``m`` nearest rows of the dask array ``x`` for each query.

    Parameters
    ----------
    x : dask.array, shape (n, d), chunked along rows only
    norm2 : dask.array, shape (n,), chunked like ``x``
    queries : ndarray, shape (q, d)
    m : int
        Neighbours per query (all rows, sorted, when ``m >= n``).
    split_every : int, optional
        Fan-in of the merge tree.

    Returns
    -------
    dist, rows : ndarrays of shape (q, min(m, n)), sorted by (distance, row)
    """
    import dask.array as da

    if m < 1:
        raise QueryError(f"k must be at least 1, got {m}")
    n = x.shape[0]
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != x.shape[1]:
        raise QueryError(f"queries must have shape (q, {x.shape[1]}), got {q.shape}")
    if n == 0:
        return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
    if len(x.chunks[1]) != 1:
        x = x.rechunk({1: -1})
    qn = np.einsum("ij,ij->i", q, q)
    # Only blockwise layers here, so reading a block, its norms and the chunk step fuse
    # into one task per block (slicing or da.arange would add three more per block).
    n2 = norm2.rechunk((x.chunks[0],)).map_blocks(
        _column, new_axis=1, chunks=(x.chunks[0], (1,)), dtype=norm2.dtype
    )
    packed = da.map_blocks(_pack, x, n2, dtype=x.dtype, meta=np.empty((0, 0), dtype=x.dtype))
    red = da.reduction(
        packed,
        chunk=partial(knn_chunk, q=q, qnorm2=qn, m=m),
        combine=partial(knn_merge, m=m),
        aggregate=partial(knn_merge, m=m),
        axis=0,
        keepdims=True,
        concatenate=False,
        split_every=split_every,
        dtype=np.float32,
        meta=np.empty((0, 0), dtype=np.float32),
        name="knn",
    )
    # The reduction's single block is a (dist, rows) pair, not an array: take it as is.
    (block,) = red.to_delayed().ravel()
    dist, idx = block.compute()
    return dist, idx

