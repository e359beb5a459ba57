"""Building an index (train and encode every committed row) and extending it with new rows."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..codes import CodeParams, check_nbits, encode, train
from ..errors import QueryError, StoreError
from ..store import Store, open_store, writer_lock
from ..store.schema import now
from .layout import INDEX_GROUP, INDEX_METHOD, INDEX_VERSION, ROW_ARRAYS, Index


@dataclass(frozen=True)
class IndexOptions:
    """How to build an index.

    Attributes
    ----------
    nbits : int
        Code length (a multiple of 64, at most the fingerprint dimension); bytes per tile = nbits / 8.
    lists : int, optional
        Coarse lists (k-means centroids); :func:`default_lists` of the committed rows when None.
    train_rows : int
        Evenly spaced rows that train the code: at most this many, but at least
        :data:`TRAIN_PER_LIST` per list (or every row).
    iterations : int
        k-means and ITQ iterations.
    seed : int
        Seed of k-means and of ITQ's initial rotation.
    """

    nbits: int = 512
    lists: int | None = None
    train_rows: int = 20_000
    iterations: int = 20
    seed: int = 0


#: Training rows per list at least (FAISS's guidance for k-means: 39).
TRAIN_PER_LIST = 40

#: The most lists :func:`default_lists` picks: encoding assigns every row to its nearest
#: centroid (one product of the fingerprints with the centroids), so build time grows with it.
MAX_LISTS = 1024


def default_lists(rows: int) -> int:
    """Lists for a store of ``rows`` rows: ``√rows``, between 1 and :data:`MAX_LISTS`
    (about 1,000 rows per list at 1M rows, 10,000 at 10M)."""
    return int(min(MAX_LISTS, max(1, round(np.sqrt(rows)))))


def _encode_rows(fp: Any, out: tuple[Any, ...], start: int, stop: int, params: CodeParams) -> np.ndarray:
    """Encode fingerprint rows ``start..stop`` into the index's row arrays; the rows per list."""
    enc = encode(np.asarray(fp[start:stop], dtype=np.float32), params)
    for arr, v in zip(out, (enc.lists, enc.codes, enc.rnorm2, enc.scale), strict=True):
        arr[start:stop] = v
    return np.bincount(enc.lists, minlength=params.lists).astype(np.int64)


def _write_codes(store: Store, group: Any, params: CodeParams, start: int, stop: int) -> np.ndarray:
    """Encode rows ``start..stop`` on the cluster into the row arrays (one task per Zarr chunk);
    returns the encoded rows per list."""
    import dask

    out = tuple(group[n] for n in ROW_ARRAYS)
    for arr in out:
        if arr.shape[0] != stop:
            arr.resize((stop, *arr.shape[1:]))
    if stop <= start:
        return np.zeros(params.lists, np.int64)
    c = int(out[1].chunks[0])
    # Task boundaries on the Zarr chunk boundaries: no two tasks write one chunk.
    edges = [start, *range((start // c + 1) * c, stop, c), stop]
    fp = store.arrays["fingerprint"]
    task = dask.delayed(_encode_rows, pure=False)
    trained = dask.delayed(params, pure=True)  # one key: the centroids travel once per worker, not per task
    counts = dask.compute(*[task(fp, out, a, b, trained) for a, b in zip(edges[:-1], edges[1:], strict=True)])
    return np.sum(counts, axis=0)


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
        check_nbits(options.nbits, st.dim)
        lists = options.lists if options.lists is not None else default_lists(st.committed)
        if not 1 <= lists <= st.committed:
            raise QueryError(f"--lists must be between 1 and the {st.committed} committed rows, got {lists}")
        sample, trained_on = _training_sample(st, max(options.train_rows, TRAIN_PER_LIST * lists))
        params = train(sample, lists, options.nbits, iterations=options.iterations, seed=options.seed)
        root = zarr.open_group(str(st.path), mode="r+", zarr_format=3, use_consolidated=False)
        if INDEX_GROUP in root:
            del root[INDEX_GROUP]
        g = root.create_group(INDEX_GROUP, attributes={"method": INDEX_METHOD, "version": INDEX_VERSION,
                                                       "indexed": 0})
        g.create_array("centroids", data=params.centroids)
        g.create_array("projection", data=params.projection)
        rows = st.arrays["fingerprint"].chunks[0]
        for name, dtype, width in zip(ROW_ARRAYS, ("int32", "uint8", "float32", "float32"),
                                      (None, params.nbytes, None, None), strict=True):
            shape, chunks, dims = ((0,), (rows,), ("tile",)) if width is None else \
                ((0, width), (rows, width), ("tile", "code_byte"))
            g.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0, compressors=None,
                           dimension_names=dims)
        counts = _write_codes(st, g, params, 0, st.committed)
        attrs: dict[str, Any] = {"method": INDEX_METHOD, "version": INDEX_VERSION, "nbits": params.nbits,
                                 "lists": params.lists, "feature_dim": st.dim, "indexed": st.committed,
                                 "trained_on": trained_on, "built": now()}
        # Last, in one write: an interrupted build leaves indexed = 0 (nothing claimed).
        g.attrs.update({**attrs, "list_rows": counts.tolist()})
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
    if INDEX_GROUP not in st.group:
        raise StoreError(f"{st.path}: no index to extend; build one with `dask-fp index {st.path}`"
                         " (without --extend).")
    idx = Index(st)
    start, stop = idx.indexed, st.committed
    if stop <= start:
        return 0
    root = zarr.open_group(str(st.path), mode="r+", zarr_format=3, use_consolidated=False)
    g = root[INDEX_GROUP]
    with _as_current(client):
        counts = _write_codes(st, g, idx.params, start, stop)
    # One write: rows counted per list only once they are claimed as indexed.
    g.attrs.update({"indexed": stop, "list_rows": (idx.list_rows + counts).tolist(), "extended": now()})
    return stop - start


def _as_current(client: Any) -> Any:
    """``client.as_current()`` when a client is given, else nothing."""
    return client.as_current() if client is not None else contextlib.nullcontext()
