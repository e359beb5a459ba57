"""The distributed pass over the store: exact k-NN as one ``dask.array.reduction``.

The shape follows dask's own ``argtopk``: the chunk step computes squared
Euclidean distances ``‖x‖² − 2x·q + ‖q‖²`` for a batch of queries with one
matrix product and keeps each query's ``m`` best (distance, row) pairs; the
combine and aggregate steps merge candidate lists in a tree
(``split_every``). The kernels are in :mod:`.kernels`.

For a whole store, :func:`store_knn` picks the pass: over a persisted store
in cluster memory (:func:`knn_hits`: the hits' per-tile columns travel with
them through the merge, and the query-independent graph is kept per store),
or streamed from Zarr (:func:`stream_knn`: each task reads and scans its rows
a few chunks at a time).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
from dask.base import tokenize

from .errors import QueryError
from .kernels import RowFilter, hit_records, hits_merge, knn_chunk, knn_merge, score_chunk
from .store.reader import TILE_COLUMNS
from .stream import STREAM_READ_BYTES, stream_blocks

if TYPE_CHECKING:
    from .store import Store

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


def _packed(x: Any, columns: Sequence[Any], n_data: int, blocks: Sequence[int] | None,
            cache: dict[str, Any] | None) -> Any:
    """The query-independent part of a pass: row blocks of ``x`` packed with ``columns`` (see :func:`_pack`).

    ``cache`` (a store's :attr:`~dask_fp.store.Store.scan_cache`) keeps the last one
    built, keyed by the input arrays' names: a persisted store builds it once.
    """
    import dask.array as da

    key = (x.name, *(c.name for c in columns), n_data, None if blocks is None else tuple(blocks))
    if cache is not None and cache.get("packed", (None,))[0] == key:
        return cache["packed"][1]
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
    if cache is not None:
        cache["packed"] = (key, packed)
    return packed


def _tree(packed: Any, chunk: Callable[..., Any], m: int, split_every: int | None, name: str,
          merge: Callable[..., Any] = knn_merge) -> tuple[Any, ...]:
    """The ``dask.array.reduction`` over ``packed`` with ``chunk``, merged in a tree (``merge``), computed once."""
    import dask.array as da

    red = da.reduction(
        packed,
        chunk=chunk,
        combine=partial(merge, m=m),
        aggregate=partial(merge, m=m),
        axis=0,
        keepdims=True,
        concatenate=False,
        split_every=split_every,
        dtype=np.float32,
        meta=np.empty((0, 0), dtype=np.float32),
        name=name,
    )
    # The reduction's single block is a (values, rows[, records]) tuple, not an array: take it as is.
    (block,) = red.to_delayed().ravel()
    return tuple(block.compute())


def _reduce(
    x: Any,
    columns: Sequence[Any],
    chunk: Callable[..., Any],
    m: int,
    split_every: int | None,
    name: str,
    n_data: int,
    blocks: Sequence[int] | None = None,
    cache: dict[str, Any] | None = None,
    merge: Callable[..., Any] = knn_merge,
) -> tuple[Any, ...]:
    """One ``dask.array.reduction`` over row blocks of ``x`` packed with ``columns`` (see :func:`_pack`).

    ``blocks`` (row-block indices of ``x``) restricts the pass to those blocks;
    the others are not read.
    """
    return _tree(_packed(x, columns, n_data, blocks, cache), chunk, m, split_every, name, merge)


def _filter_columns(where: RowFilter | None, columns: Sequence[Any] | None) -> list[Any]:
    if where is None:
        return []
    if columns is None or len(columns) != 3:
        raise ValueError("a row filter needs the (lon, lat, source) columns of the rows")
    return list(columns)


def _queries(queries: np.ndarray, d: int, m: int) -> np.ndarray:
    if m < 1:
        raise QueryError(f"k must be at least 1, got {m}")
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != d:
        raise QueryError(f"queries must have shape (q, {d}), got {q.shape}")
    return q


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
    d, r, _ = knn_hits(x, norm2, queries, m, split_every=split_every, where=where, columns=columns, blocks=blocks)
    return d, r


def knn_hits(
    x: Any,
    norm2: Any,
    queries: np.ndarray,
    m: int,
    *,
    records: Any = None,
    split_every: int | None = None,
    where: RowFilter | None = None,
    columns: Sequence[Any] | None = None,
    blocks: Sequence[int] | None = None,
    cache: dict[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`knn`, and the ``records`` of each hit, from the same pass.

    ``records`` is a structured dask array ``(n,)`` chunked like ``x`` (a
    persisted store's :meth:`~dask_fp.store.Store.tiles`); each chunk task takes
    its kept rows' records and the merge carries them, so nothing is read
    afterwards. ``cache``: see :func:`_packed`.

    Returns
    -------
    dist, rows : as :func:`knn`
    records : structured ndarray of shape (q, ≤ m), or None without ``records``
    """
    q = _queries(queries, x.shape[1], m)
    if x.shape[0] == 0 or (blocks is not None and len(blocks) == 0):
        empty = None if records is None else np.empty((len(q), 0), dtype=records.dtype)
        return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64), empty
    qn = np.einsum("ij,ij->i", q, q)
    data = [norm2] if records is None else [norm2, records]
    chunk = partial(knn_chunk, q=q, qnorm2=qn, m=m, where=where, records=records is not None)
    out = _reduce(x, [*data, *_filter_columns(where, columns)], chunk, m, split_every, "knn", len(data), blocks,
                  cache, knn_merge if records is None else hits_merge)
    return out[0], out[1], None if records is None else out[2]


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


def _score_piece(block: tuple[np.ndarray, ...], **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """:func:`score_chunk` of a streamed piece ``(x, norm2, rows[, lon, lat, source])`` (``norm2`` unused)."""
    return score_chunk((block[0], *block[2:]), **kwargs)


def stream_score(store: Store, coef: np.ndarray, intercept: float, *, k: int | None = None,
                 min_logit: float | None = None, split_every: int | None = None, where: RowFilter | None = None,
                 blocks: Sequence[int] | None = None,
                 step_bytes: int = STREAM_READ_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """:func:`score_pass` over a store read from Zarr (not persisted), like :func:`stream_knn`.

    Each task reads its rows a few Zarr chunks at a time and scores each piece
    while it is in cache. Returns ``logits, rows`` as :func:`score_pass`.
    """
    from dask.base import tokenize

    coef = np.asarray(coef, dtype=np.float64).ravel()
    if coef.shape[0] != store.dim:
        raise QueryError(f"the classifier has {coef.shape[0]} weights; the store has {store.dim} features")
    m = ALL if k is None else int(k)
    if m < 1:
        raise QueryError(f"k must be at least 1, got {m}")
    chunk = partial(_score_piece, coef=coef, intercept=float(intercept), m=m, min_logit=min_logit, where=where)
    desc = stream_blocks(store, chunk, m, filtered=where is not None, blocks=blocks, step_bytes=step_bytes,
                         token=tokenize("score", coef, float(intercept), m, min_logit, where))
    if desc is None:
        return np.empty(0, np.float64), np.empty(0, np.int64)
    neg, rows = _tree(desc, _passthrough, m, split_every, "score")
    return -neg[0], rows[0]


# --------------------------------------------------------------------------- a whole store

#: Per-tile columns a search returns with its hits (what :class:`~dask_fp.hits.Hits` tables show):
#: those of :meth:`~dask_fp.store.Store.tiles`.
HIT_COLUMNS = TILE_COLUMNS


def _passthrough(block: Any, axis: Any = None, keepdims: bool = False) -> Any:
    return block


def stream_knn(store: Store, queries: np.ndarray, m: int, *, split_every: int | None = None,
               where: RowFilter | None = None, blocks: Sequence[int] | None = None,
               step_bytes: int = STREAM_READ_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """:func:`knn` over a store read from Zarr (not persisted), :data:`~dask_fp.stream.STREAM_TASK_SPLIT`
    tasks per row block.

    Each task reads its rows a few Zarr chunks at a time
    (:data:`~dask_fp.stream.STREAM_READ_BYTES`, :func:`dask_fp.stream.stream_blocks`) and
    scans each piece while it is in cache, instead of assembling a whole
    128 MiB block first. ``blocks`` are row blocks of
    :meth:`~dask_fp.store.Store.fingerprints`, as for :func:`knn`.
    """
    q = _queries(queries, store.dim, m)
    qn = np.einsum("ij,ij->i", q, q)
    chunk = partial(knn_chunk, q=q, qnorm2=qn, m=m, where=where)
    desc = stream_blocks(store, chunk, m, filtered=where is not None, blocks=blocks, step_bytes=step_bytes,
                         token=tokenize(q, m, where))
    if desc is None:
        return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
    out = _tree(desc, _passthrough, m, split_every, "knn")
    return out[0], out[1]


def read_hits(store: Store, rows: np.ndarray, names: Sequence[str] = HIT_COLUMNS) -> np.ndarray:
    """The ``names`` columns at ``rows`` (any shape), as one structured array: reads only their chunks."""
    rows = np.asarray(rows, dtype=np.int64)
    flat, inv = np.unique(rows, return_inverse=True)
    return hit_records(names, [store.read(n, flat) for n in names], inv.reshape(rows.shape))


def _take_rows(rows: Sequence[np.ndarray], *blocks: np.ndarray) -> np.ndarray:
    return np.concatenate([b[r] for b, r in zip(blocks, rows, strict=True)])


def store_hits(store: Store, rows: np.ndarray) -> np.ndarray:
    """The :data:`HIT_COLUMNS` records at ``rows`` (any shape), like :func:`read_hits`.

    From a persisted store they are taken from its per-tile columns in cluster
    memory (:meth:`Store.tiles`): one task per worker that holds blocks with
    those rows, instead of decoding every Zarr chunk of eight columns that the
    rows touch (hits found outside the scan's reduction: compact codes).
    """
    if not store.persisted:
        return read_hits(store, rows)
    from dask.core import flatten
    from distributed import futures_of

    rows = np.asarray(rows, dtype=np.int64)
    flat, inv = np.unique(rows, return_inverse=True)
    tiles = store.tiles()
    futures = {f.key: f for f in futures_of(tiles)}
    if flat.size == 0 or not futures:  # no rows, or persisted by a local scheduler (blocks in the graph)
        return np.asarray(tiles[flat].compute())[inv].reshape(rows.shape)
    if flat[-1] >= tiles.shape[0] or flat[0] < 0:
        raise IndexError(f"rows out of range 0..{tiles.shape[0] - 1} of {store.path}")
    keys = list(flatten(tiles.__dask_keys__()))
    bounds = np.cumsum((0, *tiles.chunks[0]))
    blk = np.searchsorted(bounds, flat, side="right") - 1
    need = [int(b) for b in np.unique(blk)]
    client = next(iter(futures.values())).client
    held = client.who_has([futures[keys[b]] for b in need])
    groups: dict[Any, list[int]] = {}
    for b in need:
        groups.setdefault(next(iter(held.get(keys[b]) or [None])), []).append(b)
    tasks, order = [], []
    for worker, bs in groups.items():
        tasks.append(client.submit(_take_rows, [flat[blk == b] - bounds[b] for b in bs],
                                   *[futures[keys[b]] for b in bs], pure=False,
                                   workers=None if worker is None else [worker],
                                   allow_other_workers=worker is not None))
        order += [np.flatnonzero(blk == b) for b in bs]
    out = np.empty(len(flat), dtype=tiles.dtype)
    out[np.concatenate(order)] = np.concatenate(client.gather(tasks))
    return out[inv].reshape(rows.shape)


def store_knn(store: Store, queries: np.ndarray, m: int, *, split_every: int | None = None,
              where: RowFilter | None = None, columns: Sequence[Any] | None = None,
              blocks: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ``m`` nearest rows of a store and their :data:`HIT_COLUMNS`, in one pass.

    A persisted store (:meth:`~dask_fp.store.Store.persist`) is scanned in cluster
    memory and its coordinate columns travel with the hits through the merge; the
    packed graph is kept in the store's ``scan_cache``. Otherwise the store is
    streamed from Zarr (:func:`stream_knn`) and the hits' columns are read
    afterwards, their rows only.

    Returns
    -------
    dist, rows : as :func:`knn`
    records : structured ndarray (q, ≤ m) with the :data:`HIT_COLUMNS` of each hit
    """
    if store.persisted:
        d, r, rec = knn_hits(store.fingerprints(), store.norm2(), queries, m, records=store.tiles(),
                             split_every=split_every, where=where, columns=columns, blocks=blocks,
                             cache=store.scan_cache)
        return d, r, rec  # type: ignore[return-value]  # with a payload, records come back
    store.scan_cache.clear()  # a graph over arrays no longer persisted would hold their memory
    d, r = stream_knn(store, queries, m, split_every=split_every, where=where, blocks=blocks)
    return d, r, read_hits(store, r)
