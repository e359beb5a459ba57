"""A compact-code index kept inside the store, and code search with exact re-rank.

Layout: one Zarr group ``index`` in the store directory, beside the
fingerprints; the rest of the store neither reads nor writes it.

====================  ==================  =======  ======================================
name                  shape               dtype    meaning
====================  ==================  =======  ======================================
index/codes           (tile, nbytes)      uint8    binary code of each indexed row;
                                                   chunked by rows like ``fingerprint``
index/mean            (feature,)          float32  training mean
index/projection      (feature, nbits)    float32  PCA axes × ITQ rotation
====================  ==================  =======  ======================================

Attributes of ``index``: ``method`` ("itq"), ``nbits``, ``indexed`` (rows
0..indexed−1 have codes), ``trained_on`` (training rows), ``feature_dim``,
``version``, ``built``. :func:`build_index` trains and encodes every
committed row (under the store's writer lock); :func:`extend_index` encodes
the rows added since (``indexed..committed``) with the trained parameters.

Query (:func:`code_search`): one ``dask.array.reduction`` over the codes; each
task keeps each query's ``pool`` nearest codes by Hamming distance (FAISS's
popcount kernel when installed) and re-scores them with the asymmetric score
of :mod:`.codes` (the query's projection, not its code, against the codes'
signs), keeping the best ``candidates``; the tasks' lists are merged in a
tree like the exact scan. The candidates' full
fingerprints are then read row by row (:mod:`dask_fp.store.rows`: one
``pread`` per row from an uncompressed store) and re-ranked with the exact distance of :mod:`.kernels`, so
every returned distance is exact, and rows added after the index was built
(``indexed..committed``) are scanned exactly and merged in. The answer can
only differ from the exact scan by missing a neighbour whose code ranked
below the candidate cut (recall, measured in ``bench/codes.py``).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .codes import CodeParams, asym_top_m, byte_tables, encode, hamming_top_m, project, train_itq
from .errors import QueryError, StoreError
from .kernels import chunk_distances, knn_merge, top_m
from .scan import knn
from .store import Store, open_store, writer_lock
from .store.schema import now

INDEX_GROUP = "index"
INDEX_VERSION = 1
#: Stores with at least this many committed rows are searched with codes by default
#: (``method="auto"``), when they have an index: the crossing point that bench/codes.py
#: computed from its 45,000 and 1M-row measurements (straight lines through the exact
#: persisted scan's and code search's medians cross at 39,302 rows; code search was the
#: faster at both sizes, with recall@10 >= 0.95), rounded up (docs/performance.md).
AUTO_CODES_ROWS = 40_000


#: Rows of codes scanned by one task (64 MiB of 512-bit codes). The FAISS Hamming
#: kernel scans 1M codes in a few ms, so smaller tasks would cost more in scheduling
#: than in scanning (bench/codes.py).
CODE_TASK_ROWS = 1 << 20


@dataclass(frozen=True)
class IndexOptions:
    """How to build an index.

    Attributes
    ----------
    nbits : int
        Code length (a multiple of 64, at most the fingerprint dimension); bytes per tile = nbits / 8.
    train_rows : int
        At most this many evenly spaced rows train the code.
    iterations : int
        ITQ iterations.
    seed : int
        Seed of ITQ's initial rotation.
    """

    nbits: int = 512
    train_rows: int = 20_000
    iterations: int = 20
    seed: int = 0


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


class Index:
    """An opened index of a store (read-only).

    Attributes
    ----------
    params : CodeParams
    indexed : int
        Rows with codes (rows ``indexed..store.committed`` are scanned exactly).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        try:
            g = store.group[INDEX_GROUP]
        except KeyError:
            raise StoreError(
                f"{store.path}: no compact-code index. Build one with `dask-fp index {store.path}`,"
                " or search exactly (--method exact)."
            ) from None
        a = dict(g.attrs)
        if a.get("version") != INDEX_VERSION or a.get("method") != "itq":
            raise StoreError(f"{store.path}: index version/method {a.get('version')}/{a.get('method')} is not"
                             f" supported; rebuild it with `dask-fp index {store.path}`.")
        if int(a.get("feature_dim", -1)) != store.dim:
            raise StoreError(f"{store.path}: the index is for {a.get('feature_dim')}-d fingerprints, the store"
                             f" holds {store.dim}-d; rebuild it with `dask-fp index {store.path}`.")
        self.attrs = a
        self.group = g
        self.indexed = min(int(a["indexed"]), store.committed)
        self.params = CodeParams(mean=np.asarray(g["mean"][:]), projection=np.asarray(g["projection"][:]))
        self.codes_array = g["codes"]
        if self.codes_array.shape[0] < self.indexed:
            raise StoreError(f"{store.path}: index/codes holds fewer rows than its {self.indexed} indexed;"
                             f" rebuild it with `dask-fp index {store.path}`.")
        self._persisted: Any = None
        self._blocks: list[tuple[Any, int]] | None = None

    def codes(self) -> Any:
        """Codes of the indexed rows as a dask array, :data:`CODE_TASK_ROWS` rows (whole Zarr chunks) per task."""
        if self._persisted is not None:
            return self._persisted
        import dask.array as da

        c = int(self.codes_array.chunks[0])
        rows = max(c, CODE_TASK_ROWS // c * c)
        return da.from_zarr(self.codes_array, chunks=(rows, -1))[: self.indexed]

    def persist(self) -> Index:
        """Keep the codes in (cluster) memory.

        On a distributed cluster the blocks' futures are kept too, so a query submits
        one task per block and one merge (:func:`code_candidates`), with no array graph to
        build and optimise per query.
        """
        import dask

        (arr,) = dask.persist(self.codes())
        self._persisted, self._blocks = arr, None
        try:
            from distributed import futures_of
        except ImportError:  # pragma: no cover - distributed is a dependency
            return self
        futs = {f.key: f for f in futures_of(arr)}
        keys = [k[0] for k in arr.__dask_keys__()]  # one chunk across the code bytes
        if futs and all(k in futs for k in keys):
            starts = np.concatenate([[0], np.cumsum(arr.chunks[0])[:-1]]).astype(int).tolist()
            self._blocks = list(zip([futs[k] for k in keys], starts, strict=True))
        return self

    @property
    def blocks(self) -> list[tuple[Any, int]] | None:
        """``(future, first row)`` of each persisted block on a distributed cluster, else None."""
        return self._blocks


def open_index(store: Store | str | os.PathLike[str]) -> Index:
    """Open the index of a store (:class:`StoreError` if it has none)."""
    return Index(store if isinstance(store, Store) else open_store(store))


def has_index(store: Store) -> bool:
    """Whether ``store`` holds an index group."""
    try:
        store.group[INDEX_GROUP]
    except KeyError:
        return False
    return True


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


# --------------------------------------------------------------------------- building


def _encode_block(x: np.ndarray, *, params: CodeParams) -> np.ndarray:
    return encode(x, params)


def _write_codes(store: Store, group: Any, params: CodeParams, start: int, stop: int) -> None:
    """Encode rows ``start..stop`` on the cluster into ``index/codes`` (one task per Zarr chunk)."""
    import dask.array as da

    arr = group["codes"]
    if arr.shape[0] != stop:
        arr.resize((stop, params.nbytes))
    if stop <= start:
        return
    c = int(arr.chunks[0])
    # Task boundaries on the Zarr chunk boundaries: no two tasks write one chunk.
    edges = [start, *range((start // c + 1) * c, stop, c), stop]
    fp = da.from_zarr(store.arrays["fingerprint"], chunks=(c, -1))[start:stop]
    fp = fp.rechunk((tuple(np.diff(edges).tolist()), -1))
    codes = fp.map_blocks(partial(_encode_block, params=params), dtype=np.uint8,
                          chunks=(fp.chunks[0], (params.nbytes,)))
    da.store(codes, arr, regions=(slice(start, stop), slice(None)), lock=False)


def _training_sample(store: Store, rows: int) -> tuple[np.ndarray, int]:
    n = store.committed
    step = max(1, n // rows)
    x = np.asarray(store.fingerprints()[::step][:rows].compute(), dtype=np.float32)
    return x, len(x)


def build_index(
    path: str | os.PathLike[str], options: IndexOptions = IndexOptions(), *, client: Any = None, wait: float = 0.0
) -> dict[str, Any]:
    """Train a code on the committed rows and encode them all, replacing any index.

    Takes the store's writer lock. The computation runs on ``client`` (or the
    current Dask scheduler when None). Returns the index attributes plus
    ``seconds``.
    """
    import time

    import zarr

    t0 = time.perf_counter()
    open_store(path)  # a clear error for a path that is not a store, before locking
    with writer_lock(Path(path), wait=wait), _as_current(client):
        st = open_store(path)
        if st.committed < 2:
            raise StoreError(f"{st.path}: {st.committed} committed rows; ingest some before building an index.")
        if options.nbits > st.dim:
            raise QueryError(f"--nbits {options.nbits} exceeds the fingerprint dimension {st.dim}")
        sample, trained_on = _training_sample(st, options.train_rows)
        params = train_itq(sample, options.nbits, iterations=options.iterations, seed=options.seed)
        root = zarr.open_group(str(st.path), mode="r+", zarr_format=3, use_consolidated=False)
        if INDEX_GROUP in root:
            del root[INDEX_GROUP]
        g = root.create_group(INDEX_GROUP, attributes={"method": "itq", "version": INDEX_VERSION, "indexed": 0})
        g.create_array("mean", data=params.mean)
        g.create_array("projection", data=params.projection)
        g.create_array("codes", shape=(0, params.nbytes), chunks=(st.arrays["fingerprint"].chunks[0], params.nbytes),
                       dtype="uint8", fill_value=0, compressors=None, dimension_names=("tile", "code_byte"))
        _write_codes(st, g, params, 0, st.committed)
        attrs: dict[str, Any] = {"method": "itq", "version": INDEX_VERSION, "nbits": params.nbits,
                                 "feature_dim": st.dim, "indexed": st.committed, "trained_on": trained_on,
                                 "built": now()}
        g.attrs.update(attrs)  # last: an interrupted build leaves indexed = 0 (nothing claimed)
    return {**attrs, "seconds": round(time.perf_counter() - t0, 3)}


def extend_index(path: str | os.PathLike[str] | Store, *, client: Any = None, wait: float = 0.0) -> int:
    """Encode the rows committed since the index was built or last extended.

    Uses the trained parameters (no retraining); takes the writer lock unless
    the caller holds it (pass the ``Store`` opened under the lock: ingest does,
    right after its commit). Returns the number of rows encoded.
    """
    if isinstance(path, Store):
        return _extend(path, client)
    open_store(path)
    with writer_lock(Path(path), wait=wait):
        return _extend(open_store(path), client)


def _extend(st: Store, client: Any) -> int:
    import zarr

    st = open_store(st.path)  # the committed count as of now
    idx = Index(st)
    start, stop = idx.indexed, st.committed
    if stop <= start:
        return 0
    root = zarr.open_group(str(st.path), mode="r+", zarr_format=3, use_consolidated=False)
    g = root[INDEX_GROUP]
    with _as_current(client):
        _write_codes(st, g, idx.params, start, stop)
    g.attrs.update({"indexed": stop, "extended": now()})
    return stop - start


# --------------------------------------------------------------------------- searching


def _pack_codes(c: np.ndarray, block_info: Any = None) -> tuple[np.ndarray, np.ndarray]:
    start, stop = block_info[0]["array-location"][0]
    return (c, np.arange(start, stop, dtype=np.int64))


def hamming_chunk(
    block: tuple[np.ndarray, np.ndarray], *, qcodes: np.ndarray, m: int, axis: Any = None, keepdims: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Chunk step: a block ``(codes, rows)`` → each query's ``m`` nearest codes (Hamming, then row)."""
    codes, rows = block
    return hamming_top_m(codes, qcodes, rows, m)


def asym_chunk(
    block: tuple[np.ndarray, np.ndarray], *, qcodes: np.ndarray, tables: np.ndarray, m: int, pool: int,
    axis: Any = None, keepdims: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Chunk step: a block ``(codes, rows)`` → each query's ``m`` best of its ``pool`` nearest codes
    by asymmetric score (:func:`dask_fp.codes.asym_top_m`)."""
    codes, rows = block
    return asym_top_m(codes, qcodes, tables, rows, m, pool)


def block_candidates(codes: np.ndarray, start: int, *, qcodes: np.ndarray, tables: np.ndarray | None, m: int,
                     pool: int) -> tuple[np.ndarray, np.ndarray]:
    """One persisted block of codes (first row ``start``) → each query's ``m`` best, as :func:`code_candidates`."""
    rows = np.arange(start, start + len(codes), dtype=np.int64)
    if tables is None:
        return hamming_top_m(codes, qcodes, rows, m)
    return asym_top_m(codes, qcodes, tables, rows, m, pool)


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


def _as_current(client: Any) -> Any:
    """``client.as_current()`` when a client is given, else nothing."""
    return client.as_current() if client is not None else contextlib.nullcontext()
