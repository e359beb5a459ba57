"""Building an index (train and encode every committed row) and extending it with new rows."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..codes import CodeParams, encode, train_itq
from ..errors import QueryError, StoreError
from ..store import Store, open_store, writer_lock
from ..store.schema import now
from .layout import INDEX_GROUP, INDEX_VERSION, Index


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


def _as_current(client: Any) -> Any:
    """``client.as_current()`` when a client is given, else nothing."""
    return client.as_current() if client is not None else contextlib.nullcontext()
