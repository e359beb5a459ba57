"""The index group of a store: its layout, and opening it (:class:`Index`).

See :mod:`dask_fp.index` for the layout table and what the query does.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..codes import CodeParams
from ..errors import StoreError
from ..store import Store, open_store

INDEX_GROUP = "index"
INDEX_VERSION = 1

#: Rows of codes scanned by one task (64 MiB of 512-bit codes). The FAISS Hamming
#: kernel scans 1M codes in a few ms, so smaller tasks would cost more in scheduling
#: than in scanning (bench/codes.py).
CODE_TASK_ROWS = 1 << 20


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
