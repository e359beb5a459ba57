"""The index group of a store: its layout, and opening it (:class:`Index`).

See :mod:`dask_fp.index` for the layout table and what the query does.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..codes import CodeBlock, CodeParams, Encoded
from ..errors import StoreError
from ..store import Store, open_store

INDEX_GROUP = "index"
INDEX_VERSION = 2
INDEX_METHOD = "ivf-itq"

#: Per-row arrays of the index, in :class:`~dask_fp.codes.Encoded`'s field order.
ROW_ARRAYS = ("list", "codes", "rnorm2", "scale")

#: Rows read and scanned by one task of a query on an index that is not persisted
#: (whole Zarr chunks; 76 MiB of rows at 512 bits). A persisted index is held as one
#: block per worker thread instead: a query touches only its probed lists' rows of a
#: block, so its cost is per task, not per row (bench/codes_breakdown.py).
CODE_TASK_ROWS = 1 << 20


def load_block(arrays: tuple[Any, ...], start: int, stop: int, lists: int) -> CodeBlock:
    """Read rows ``start..stop`` of the index's row arrays (``ROW_ARRAYS``) and sort them by list."""
    lst, codes, rnorm2, scale = (np.asarray(a[start:stop]) for a in arrays)
    return CodeBlock.sort(Encoded(lst.astype(np.int32), codes, rnorm2, scale), start, lists)


class Index:
    """An opened index of a store (read-only).

    Attributes
    ----------
    params : CodeParams
    indexed : int
        Rows with codes (rows ``indexed..store.committed`` are scanned exactly).
    list_rows : ndarray of int64, shape (lists,)
        Indexed rows per list.
    centroid_projection : ndarray of float32, shape (lists, nbits)
        ``centroids @ projection`` (a query's ``(q − c) P`` is ``qP − cP``).
    """

    def __repr__(self) -> str:
        return (f"Index({self.store.path}: {self.indexed} rows, {self.params.nbits} bits, {self.params.lists} lists,"
                f" {'persisted' if self._blocks is not None else 'on disk'})")

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
        if a.get("version") != INDEX_VERSION or a.get("method") != INDEX_METHOD:
            raise StoreError(f"{store.path}: index version/method {a.get('version')}/{a.get('method')} is not"
                             f" supported; rebuild it with `dask-fp index {store.path}`.")
        if int(a.get("feature_dim", -1)) != store.dim:
            raise StoreError(f"{store.path}: the index is for {a.get('feature_dim')}-d fingerprints, the store"
                             f" holds {store.dim}-d; rebuild it with `dask-fp index {store.path}`.")
        self.attrs = a
        self.group = g
        self.indexed = min(int(a["indexed"]), store.committed)
        self.params = CodeParams(centroids=np.asarray(g["centroids"][:]), projection=np.asarray(g["projection"][:]))
        self.list_rows = np.asarray(a.get("list_rows", [0] * self.params.lists), dtype=np.int64)
        self.arrays = tuple(g[n] for n in ROW_ARRAYS)
        if len(self.list_rows) != self.params.lists or any(arr.shape[0] < self.indexed for arr in self.arrays):
            raise StoreError(f"{store.path}: the index's arrays disagree with its {self.indexed} indexed rows;"
                             f" rebuild it with `dask-fp index {store.path}`.")
        c = self.params.centroids
        self.centroid_norm2 = np.einsum("ij,ij->i", c, c)
        self.centroid_projection = c @ self.params.projection
        self._blocks: list[Any] | None = None

    def ranges(self, rows: int | None = None) -> list[tuple[int, int]]:
        """Row ranges ``(start, stop)`` of tasks of about ``rows`` rows (:data:`CODE_TASK_ROWS` when
        None), in whole Zarr chunks (at least one)."""
        c = int(self.arrays[1].chunks[0])
        step = max(c, -(-(CODE_TASK_ROWS if rows is None else rows) // c) * c)
        return [(s, min(s + step, self.indexed)) for s in range(0, self.indexed, step)]

    def persist(self) -> Index:
        """Keep the coded rows in memory, sorted by list: one block per thread of the current
        distributed client's workers (a query then runs one task per thread and one merge), or
        one block in this process without a distributed client."""
        try:
            from distributed import default_client, wait

            client = default_client()
        except (ImportError, ValueError):  # no distributed client: keep the rows here
            self._blocks = [load_block(self.arrays, 0, self.indexed, self.params.lists)] if self.indexed else []
            return self
        slots = [w for w, n in sorted(client.nthreads().items()) for _ in range(n)]
        ranges = self.ranges(-(-self.indexed // max(1, len(slots))))
        futs = [client.submit(load_block, self.arrays, s, e, self.params.lists, pure=False,
                              workers=[slots[i % len(slots)]], allow_other_workers=True)
                for i, (s, e) in enumerate(ranges)]
        wait(futs)
        for f in futs:
            if f.status == "error":
                f.result()  # raises the task's error
        self._blocks = futs
        return self

    @property
    def blocks(self) -> list[Any] | None:
        """The persisted blocks (futures on a distributed cluster, else :class:`CodeBlock`), or None."""
        return self._blocks


def open_index(store: Store | str | os.PathLike[str]) -> Index:
    """Open the index of a store (:class:`StoreError` if it has none)."""
    return Index(store if isinstance(store, Store) else open_store(store))


def has_index(store: Store) -> bool:
    """Whether ``store`` holds an index this version searches (not one of an earlier format:
    :func:`old_index` tells those, which only a rebuild with ``dask-fp index`` replaces)."""
    try:
        a = store.group[INDEX_GROUP].attrs
    except KeyError:
        return False
    return a.get("version") == INDEX_VERSION and a.get("method") == INDEX_METHOD


def old_index(store: Store) -> bool:
    """Whether ``store`` holds an index of an earlier format (ignored by searches and ingests)."""
    try:
        store.group[INDEX_GROUP]
    except KeyError:
        return False
    return not has_index(store)


def index_summary(store: Store) -> dict[str, Any] | None:
    """What ``dask-fp info`` says of the store's index (None without one)."""
    try:
        a = dict(store.group[INDEX_GROUP].attrs)
    except KeyError:
        return None
    if not has_index(store):
        return {"format": f"{a.get('method')} v{a.get('version')}", "usable": False,
                "rebuild": f"dask-fp index {store.path}"}
    nbits, indexed = int(a["nbits"]), min(int(a["indexed"]), store.committed)
    return {"format": f"{INDEX_METHOD} v{INDEX_VERSION}", "usable": True, "nbits": nbits, "lists": int(a["lists"]),
            "indexed": indexed, "not_indexed": store.committed - indexed, "bytes_per_tile": nbits // 8 + 12}
