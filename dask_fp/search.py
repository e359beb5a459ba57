"""The ``search`` verb: queries in, one exact k-NN pass over the store, de-duplicated Hits out.

The pass is :func:`dask_fp.scan.knn` (one ``dask.array.reduction``); query
inputs are assembled by :mod:`dask_fp.query`.

De-duplication (on by default) drops a hit that overlaps a better hit of the
same source, and the query's own tiles. Each kept hit can suppress at most
``(2r+1)² − 1`` others (``r`` = :attr:`Tiling.reach`), so fetching
``k·(2r+1)²`` candidates, plus ``(2r+1)²`` for the query's own tiles, always
leaves ``k`` distinct hits when the store has them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .errors import DaskFpError, QueryError, StoreError
from .hits import TABLE_COLUMNS, Hits
from .index import choose_method, code_search
from .kernels import candidates_needed, dedup_mask
from .models import ModelOptions
from .query import Query, image_queries, lonlat_queries, store_tiling, uid_queries
from .scan import knn
from .store import Store, open_store

__all__ = ["Hits", "Query", "TABLE_COLUMNS", "knn", "search"]


def search(
    store: Store | str | os.PathLike[str],
    queries: Sequence[Query] | None = None,
    *,
    images: Sequence[str] = (),
    uids: Sequence[int] = (),
    lonlats: Sequence[tuple[float, float]] = (),
    k: int = 10,
    dedup: bool = True,
    include_self: bool = False,
    model: ModelOptions | None = None,
    split_every: int | None = None,
    method: str = "auto",
    candidates: int | None = None,
) -> Hits:
    """k nearest tiles for a batch of queries, in one pass over the store.

    Parameters
    ----------
    store : Store or path
    queries : list of Query, optional
        Ready-made queries; ``images``, ``uids`` and ``lonlats`` add more.
    k : int
        Hits per query (all tiles, sorted, when the store has fewer).
    dedup : bool
        Drop hits that overlap a better hit of the same source.
    include_self : bool
        Keep the query's own tile (and, with ``dedup``, its overlapping tiles).
    method : {"auto", "exact", "codes"}
        ``exact``: scan every fingerprint. ``codes``: scan the store's compact-code
        index and re-rank the candidates exactly (:func:`dask_fp.index.code_search`).
        ``auto``: codes for large stores with an index (:func:`dask_fp.index.choose_method`).
    candidates : int, optional
        Codes re-ranked per query with ``codes`` (default :func:`dask_fp.index.default_candidates`).
    """
    if not isinstance(k, int | np.integer) or k < 1:
        raise QueryError(f"k must be a whole number >= 1, got {k!r}")
    st = store if isinstance(store, Store) else open_store(store)
    qs = list(queries or [])
    qs += image_queries(st, list(images), model)
    qs += uid_queries(st, list(uids))
    qs += lonlat_queries(st, list(lonlats))
    if not qs:
        raise QueryError("no query given: pass an image, a uid or a lon/lat point.")
    tiling = store_tiling(st)
    from_store = any(q.own is not None for q in qs) and not include_self
    m = candidates_needed(int(k), tiling, dedup=dedup, from_store=from_store)
    vecs = np.stack([q.vector for q in qs]).astype(np.float32)
    try:
        if choose_method(st, method) == "codes":
            dist, rows = code_search(st, vecs, m, candidates=candidates, split_every=split_every)
        else:
            dist, rows = knn(st.fingerprints(), st.norm2(), vecs, m, split_every=split_every)
        flat = np.unique(rows)
        meta = st.coords(flat)
    except DaskFpError:
        raise
    except Exception as e:  # a damaged chunk (bad bytes) fails inside the codec, on a worker
        raise StoreError(
            f"{st.path}: reading the stored fingerprints failed ({type(e).__name__}: {e}). The store"
            " may be damaged (run `dask-fp info` on it), or the cluster lost its workers."
        ) from None
    pos = {int(r): i for i, r in enumerate(flat)}
    paths = {s["index"]: s["path"] for s in st.sources}
    records = []
    for qi, q in enumerate(qs):
        idx = np.array([pos[int(r)] for r in rows[qi]], dtype=np.int64)
        src, wy, wx = meta["source"][idx], meta["wy"][idx], meta["wx"][idx]
        keep = np.ones(len(idx), dtype=bool)
        own = [q.own] if (q.own is not None and not include_self) else []
        if dedup:
            keep = dedup_mask(src, wy, wx, tiling=tiling, exclude=own)
        elif own:
            keep = ~((src == own[0][0]) & (wy == own[0][1]) & (wx == own[0][2]))
        sel = np.flatnonzero(keep)[: int(k)]
        for rank, j in enumerate(sel, start=1):
            i = idx[j]
            records.append((qi, q.label, rank, int(meta["uid"][i]), float(dist[qi, j]), int(src[j]),
                            paths.get(int(src[j]), ""), int(wy[j]), int(wx[j]), float(meta["x"][i]),
                            float(meta["y"][i]), float(meta["lon"][i]), float(meta["lat"][i]), int(rows[qi, j])))
    table = pd.DataFrame.from_records(records, columns=TABLE_COLUMNS)
    return Hits(table, qs, st)

