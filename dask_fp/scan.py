"""The distributed pass over the store: exact k-NN as one ``dask.array.reduction``.

The shape follows dask's own ``argtopk``: the chunk step computes squared
Euclidean distances ``‖x‖² − 2x·q + ‖q‖²`` for a batch of queries with one
matrix product and keeps each query's ``m`` best (distance, row) pairs; the
combine and aggregate steps merge candidate lists in a tree
(``split_every``). The kernels are in :mod:`.kernels`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np

from .errors import QueryError
from .kernels import RowFilter, knn_chunk, knn_merge, score_chunk

#: ``m`` that keeps every row (the threshold mode of the classifier pass).
ALL = 2**62


def _column(a: np.ndarray) -> np.ndarray:
    return a[:, None]


def _pack(x: np.ndarray, *cols: np.ndarray, n_data: int = 0, starts: tuple[int, ...] | None = None,
          block_info: Any = None) -> tuple[np.ndarray, ...]:
    """A block and its columns → ``(x, data columns…, global rows, filter columns…)``.

    The rows come from the block's location (or, when only some blocks are
    scanned, from ``starts``: the first global row of each scanned block); the
    first ``n_data`` columns are the chunk step's data (the norms of the k-NN
    pass; none for the classifier pass), the rest the ``lon, lat, source`` of a
    row filter.
    """
    if starts is None:
        start = block_info[0]["array-location"][0][0]
    else:
        start = starts[block_info[0]["chunk-location"][0]]
    rows = np.arange(start, start + x.shape[0], dtype=np.int64)
    return (x, *cols[:n_data], rows, *cols[n_data:])


def _reduce(
    x: Any,
    columns: Sequence[Any],
    chunk: Callable[..., Any],
    m: int,
    split_every: int | None,
    name: str,
    n_data: int,
    blocks: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One ``dask.array.reduction`` over row blocks of ``x`` packed with ``columns`` (see :func:`_pack`).

    ``blocks`` (row-block indices of ``x``) restricts the pass to those blocks;
    the others are not read.
    """
    import dask.array as da

    if len(x.chunks[1]) != 1:
        x = x.rechunk({1: -1})
    columns = [c.rechunk((x.chunks[0],)) for c in columns]
    starts = None
    if blocks is not None:
        offsets = np.concatenate([[0], np.cumsum(x.chunks[0])]).tolist()
        starts = tuple(int(offsets[b]) for b in blocks)
        x = x.blocks[list(blocks)]
        columns = [c.blocks[list(blocks)] for c in columns]
    # Only blockwise layers here, so reading a block, its columns and the chunk step fuse
    # into one task per block (slicing or da.arange would add more per block).
    cols = [c.map_blocks(_column, new_axis=1, chunks=(x.chunks[0], (1,)), dtype=c.dtype) for c in columns]
    packed = da.map_blocks(_pack, x, *cols, n_data=n_data, starts=starts, dtype=x.dtype,
                           meta=np.empty((0, 0), dtype=x.dtype))
    red = da.reduction(
        packed,
        chunk=chunk,
        combine=partial(knn_merge, m=m),
        aggregate=partial(knn_merge, m=m),
        axis=0,
        keepdims=True,
        concatenate=False,
        split_every=split_every,
        dtype=np.float32,
        meta=np.empty((0, 0), dtype=np.float32),
        name=name,
    )
    # The reduction's single block is a (values, rows) pair, not an array: take it as is.
    (block,) = red.to_delayed().ravel()
    dist, idx = block.compute()
    return dist, idx


def _filter_columns(where: RowFilter | None, columns: Sequence[Any] | None) -> list[Any]:
    if where is None:
        return []
    if columns is None or len(columns) != 3:
        raise ValueError("a row filter needs the (lon, lat, source) columns of the rows")
    return list(columns)


def knn(
    x: Any,
    norm2: Any,
    queries: np.ndarray,
    m: int,
    *,
    split_every: int | None = None,
    where: RowFilter | None = None,
    columns: Sequence[Any] | None = None,
    blocks: Sequence[int] | None = None,
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
    where : RowFilter, optional
        Only rows it keeps are candidates (applied inside each chunk task).
    columns : (lon, lat, source) dask arrays, required with ``where``
        Chunked along rows like ``x`` (or rechunked to it).
    blocks : sequence of int, optional
        Scan only these row blocks of ``x`` (those that may hold rows ``where``
        keeps, see :func:`dask_fp.filters.candidate_blocks`).

    Returns
    -------
    dist, rows : ndarrays of shape (q, ≤ m), sorted by (distance, row)
        Fewer than ``m`` columns when fewer rows (pass the filter).
    """
    if m < 1:
        raise QueryError(f"k must be at least 1, got {m}")
    n = x.shape[0]
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != x.shape[1]:
        raise QueryError(f"queries must have shape (q, {x.shape[1]}), got {q.shape}")
    if n == 0 or (blocks is not None and len(blocks) == 0):
        return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
    qn = np.einsum("ij,ij->i", q, q)
    cols = [norm2, *_filter_columns(where, columns)]
    return _reduce(x, cols, partial(knn_chunk, q=q, qnorm2=qn, m=m, where=where), m, split_every, "knn", 1,
                   blocks)


def score_pass(
    x: Any,
    coef: np.ndarray,
    intercept: float,
    *,
    k: int | None = None,
    min_logit: float | None = None,
    split_every: int | None = None,
    where: RowFilter | None = None,
    columns: Sequence[Any] | None = None,
    blocks: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Linear scores ``x @ coef + intercept`` of every row, in one pass: the top ``k`` or all ≥ ``min_logit``.

    Each chunk task applies the fitted linear model with one matrix product
    (float64) and keeps its ``k`` best rows, or its rows scoring at least
    ``min_logit``; the tree merge keeps the best ``k`` (or all of them).

    Returns
    -------
    logits, rows : 1-D ndarrays sorted by (−logit, row), best first
    """
    coef = np.asarray(coef, dtype=np.float64).ravel()
    if coef.shape[0] != x.shape[1]:
        raise QueryError(f"the classifier has {coef.shape[0]} weights; the store has {x.shape[1]} features")
    m = ALL if k is None else int(k)
    if m < 1:
        raise QueryError(f"k must be at least 1, got {m}")
    if x.shape[0] == 0 or (blocks is not None and len(blocks) == 0):
        return np.empty(0, np.float64), np.empty(0, np.int64)
    chunk = partial(score_chunk, coef=coef, intercept=float(intercept), m=m, min_logit=min_logit, where=where)
    neg, rows = _reduce(x, _filter_columns(where, columns), chunk, m, split_every, "score", 0, blocks)
    return -neg[0], rows[0]
