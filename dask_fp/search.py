"""The ``search`` verb: queries in, one exact k-NN pass over the store, de-duplicated Hits out.

The pass is :func:`dask_fp.scan.store_knn` (one ``dask.array.reduction``, over
a persisted store in memory or streamed from Zarr; the hits' coordinates come
with it); query inputs are assembled by :mod:`dask_fp.query`.

De-duplication (on by default) drops a hit that overlaps a better hit of the
same source, and the query's own tiles. Each kept hit can suppress at most
``(2r+1)² − 1`` others (``r`` = :attr:`Tiling.reach`), so fetching
``k·(2r+1)²`` candidates, plus ``(2r+1)²`` for the query's own tiles, always
leaves ``k`` distinct hits when the store has them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from .errors import DaskFpError, QueryError, StoreError
from .examples import BETA, Example, as_examples, combined_query
from .filters import Area, candidate_blocks, filter_columns, make_filter
from .hits import TABLE_COLUMNS, Hits
from .index import DEFAULT_PROBES, Index, choose_method, code_search
from .kernels import RowFilter, candidates_needed, dedup_mask
from .models import ModelOptions
from .query import Query, image_queries, lonlat_queries, store_tiling, uid_queries
from .scan import knn, store_hits, store_knn
from .store import Store, open_store
from .tiling import Tiling

__all__ = ["Hits", "Query", "TABLE_COLUMNS", "knn", "search"]

T = TypeVar("T")


def reading(st: Store, fn: Callable[[], T]) -> T:
    """Run a pass over the store; an unexpected failure inside it becomes a StoreError naming the store."""
    try:
        return fn()
    except DaskFpError:
        raise
    except Exception as e:  # a damaged chunk (bad bytes) fails inside the codec, on a worker
        raise StoreError(
            f"{st.path}: reading the stored fingerprints failed ({type(e).__name__}: {e}). The store"
            " may be damaged (run `dask-fp info` on it), or the cluster lost its workers."
        ) from None


def keep_mask(src: np.ndarray, wy: np.ndarray, wx: np.ndarray, *, tiling: Tiling, dedup: bool,
              exclude: list[tuple[int, int, int]]) -> np.ndarray:
    """Which of a ranked hit list to keep: de-duplicated, without the ``exclude`` tiles."""
    if dedup:
        return dedup_mask(src, wy, wx, tiling=tiling, exclude=exclude)
    if not exclude:
        return np.ones(len(src), dtype=bool)
    ex = set(exclude)
    return np.array([(int(s), int(y), int(x)) not in ex for s, y, x in zip(src, wy, wx, strict=True)], dtype=bool)


def hit_table(qs: Sequence[Query], dist: np.ndarray, rows: np.ndarray, rec: np.ndarray, st: Store, *, k: int,
              tiling: Tiling, dedup: bool, include_self: bool) -> pd.DataFrame:
    """The Hits table: each query's ranked candidates de-duplicated, its best ``k`` kept.

    ``rec`` holds the candidates' :data:`~dask_fp.scan.HIT_COLUMNS` (shape of ``rows``).
    """
    qi, cj, rank = [], [], []
    for n, q in enumerate(qs):
        r = rec[n]
        own = q.excluded() if not include_self else []
        sel = np.flatnonzero(keep_mask(r["source"], r["wy"], r["wx"], tiling=tiling, dedup=dedup, exclude=own))[:k]
        qi.append(np.full(len(sel), n, dtype=np.int64))
        cj.append(sel)
        rank.append(np.arange(1, len(sel) + 1, dtype=np.int64))
    i, j = np.concatenate(qi), np.concatenate(cj).astype(np.int64)
    h = rec[i, j]
    paths = {s["index"]: s["path"] for s in st.sources}
    src = h["source"].astype(np.int64)
    cols: dict[str, Any] = {
        "query": i, "label": np.array([q.label for q in qs], dtype=object)[i], "rank": np.concatenate(rank),
        "uid": h["uid"].astype(np.int64), "distance": dist[i, j].astype(np.float64), "score": np.full(len(i), np.nan),
        "source": src, "path": np.array([paths.get(int(s), "") for s in src], dtype=object),
        "wy": h["wy"].astype(np.int64), "wx": h["wx"].astype(np.int64),
        **{c: h[c].astype(np.float64) for c in ("x", "y", "lon", "lat")}, "row": rows[i, j].astype(np.int64),
    }
    return pd.DataFrame(cols, columns=TABLE_COLUMNS)


def no_hits_in_area(st: Store, where: RowFilter | None, area: Any) -> None:
    """Refuse an area filter that keeps no stored tile (most often a CRS or x/y-order mistake)."""
    raise QueryError(
        f"no stored tile centre of {st.path} lies in the area/sources given (area {area!r}); check the"
        " area's CRS (area_crs / --area-crs) and its x/y order, and `dask-fp info` for the sources."
    )


def search(
    store: Store | str | os.PathLike[str],
    queries: Sequence[Query] | None = None,
    *,
    images: Sequence[str] = (),
    uids: Sequence[int] = (),
    lonlats: Sequence[tuple[float, float]] = (),
    positives: Sequence[Example] = (),
    negatives: Sequence[Example] = (),
    k: int = 10,
    dedup: bool = True,
    include_self: bool = False,
    area: Area | None = None,
    area_crs: Any = None,
    sources: Iterable[int | str | os.PathLike[str]] | None = None,
    beta: float = BETA,
    model: ModelOptions | None = None,
    split_every: int | None = None,
    method: str = "auto",
    candidates: int | None = None,
    probes: int = DEFAULT_PROBES,
    index: Index | None = None,
) -> Hits:
    """k nearest tiles for a batch of queries, in one pass over the store.

    Parameters
    ----------
    store : Store or path
    queries : list of Query, optional
        Ready-made queries; ``images``, ``uids`` and ``lonlats`` add one query per example.
    positives, negatives : sequences of examples
        Together ONE combined query (labelled e.g. "5 positives, 2 negatives"),
        added to the batch. An example is a uid (int), a picture path, a
        ``(lon, lat)`` pair, a shapely geometry in WGS84 (a polygon means every
        stored tile whose centre lies in it), or a ``.geojson``/``.gpkg`` file of
        points and polygons. The query is ``mean(P) + beta * (mean(P) - mean(N))``
        (:mod:`dask_fp.examples` explains the rule). The labelled tiles are left
        out of its hits like a query's own tile (unless ``include_self``).
    k : int
        Hits per query (all tiles, sorted, when the store has fewer).
    dedup : bool
        Drop hits that overlap a better hit of the same source.
    include_self : bool
        Keep the query's own tile (and, with ``dedup``, its overlapping tiles).
    area : shapely geometry, (minx, miny, maxx, maxy) or path, optional
        Only tiles whose stored centre lies in the area (boundary included) are
        hits. A bbox or geometry is in ``area_crs``; a vector file in its own CRS.
        Tiles of sources without a CRS are never in an area.
    area_crs : CRS input for pyproj, optional
        The CRS of ``area`` (default WGS84 longitude/latitude, x = lon).
    sources : iterable of int or path, optional
        Only tiles of these sources (indices or paths as ``dask-fp info`` lists them).
    beta : float
        Weight of the negatives in the combined query.
    method : {"auto", "exact", "codes"}
        ``exact``: scan every fingerprint. ``codes``: scan the store's compact-code
        index and re-rank the candidates exactly (:func:`dask_fp.index.code_search`).
        ``auto``: codes for large stores with an index (:func:`dask_fp.index.choose_method`).
    candidates : int, optional
        Rows re-ranked exactly per query with ``codes`` (default :func:`dask_fp.index.default_candidates`);
        at least the rows fetched per query: ``k``, or ``k·(2r+1)²`` with ``dedup`` (see the module doc).
    probes : int
        Index lists probed per query with ``codes``, at least (:data:`dask_fp.index.DEFAULT_PROBES`).
    index : Index, optional
        The store's opened index (e.g. :meth:`~dask_fp.index.Index.persist`-ed, so its codes stay in
        cluster memory between queries); opened from the store for each query when None.

    Notes
    -----
    Area and source filters are applied inside the same distributed pass (each
    chunk task masks its rows before the distances), so a filtered search costs
    no more than an unfiltered one. With a filter, fewer than ``k`` hits come back
    when fewer tiles pass it; a filter that keeps no tile at all is a QueryError.
    """
    if not isinstance(k, int | np.integer) or isinstance(k, bool) or k < 1:
        raise QueryError(f"k must be a whole number >= 1, got {k!r}")
    st = store if isinstance(store, Store) else open_store(store)
    where = make_filter(st, area, area_crs, sources)
    qs = list(queries or [])
    qs += image_queries(st, list(images), model)
    qs += uid_queries(st, list(uids))
    qs += lonlat_queries(st, list(lonlats))
    pos_ex, neg_ex = as_examples(positives), as_examples(negatives)
    if pos_ex or neg_ex:
        qs.append(combined_query(st, pos_ex, neg_ex, beta=beta, model=model))
    if not qs:
        raise QueryError("no query given: pass an image, a uid, a lon/lat point or positives.")
    tiling = store_tiling(st)
    n_own = max(len(q.excluded()) for q in qs)
    from_store = n_own > 0 and not include_self
    m = candidates_needed(int(k), tiling, dedup=dedup, from_store=from_store, n_own=n_own)
    if candidates is not None and candidates < min(m, st.committed):
        raise QueryError(f"candidates ({candidates}) is below the {m} rows fetched per query for k = {k}"
                         + (" with de-duplication" if dedup else "") + f"; pass at least {min(m, st.committed)},"
                         " or leave it unset (the default re-ranks 10 times that, at least 500).")
    vecs = np.stack([q.vector for q in qs]).astype(np.float32)

    how = choose_method(st, method, filtered=where is not None)
    if index is not None and index.store.path.resolve() != st.path.resolve():
        raise QueryError(f"the index given is {index.store.path}'s, not {st.path}'s; open the store's own index.")

    def run() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if how == "codes":
            d, r = code_search(st, vecs, m, index=index, candidates=candidates, probes=probes,
                               split_every=split_every)
            return d, r, store_hits(st, r)
        blocks = None if where is None else candidate_blocks(st, where, st.fingerprints().chunks[0])
        return store_knn(st, vecs, m, split_every=split_every, where=where, columns=filter_columns(st, where),
                         blocks=blocks)

    dist, rows, rec = reading(st, run)
    if where is not None and rows.shape[1] == 0:
        no_hits_in_area(st, where, area if area is not None else sources)
    table = hit_table(qs, dist, rows, rec, st, k=int(k), tiling=tiling, dedup=dedup, include_self=include_self)
    return Hits(table, qs, st)

