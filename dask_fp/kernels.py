"""Pure numpy kernels of the search pass: distances, top-m, merge, de-duplication.

Like dask's ``chunk.py`` beside ``reductions.py``: these take and return plain
arrays and are tested against brute force without Dask or I/O; :mod:`.scan`
wires them into one ``dask.array.reduction``. Ties are broken by row, so
results equal a brute-force sort on (distance, row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from .tiling import Tiling


def top_m_index(dist: np.ndarray, rows: np.ndarray, m: int) -> np.ndarray:
    """Column indices of each query's ``m`` smallest (distance, row) pairs, sorted by (distance, row).

    Parameters
    ----------
    dist : ndarray, shape (q, n)
    rows : ndarray of int64, shape (n,) or (q, n)
    m : int

    Returns
    -------
    idx : ndarray of intp, shape (q, min(m, n)), indices into ``dist``'s columns
    """
    q, n = dist.shape
    rows = np.broadcast_to(rows, (q, n))
    if n > m:
        # Candidates: everything up to the m-th smallest distance (ties included).
        kth = np.partition(dist, m - 1, axis=1)[:, m - 1 : m]
        sel = dist <= kth
        if not (sel.sum(axis=1) == m).all():
            # Ties at the m-th distance: settle them by row, query by query.
            out = np.empty((q, m), dtype=np.intp)
            for i in range(q):
                cand = np.flatnonzero(sel[i])
                out[i] = cand[np.lexsort((rows[i, cand], dist[i, cand]))[:m]]
            return out
        idx = np.nonzero(sel)[1].reshape(q, m)
        sub_d, sub_r = np.take_along_axis(dist, idx, axis=1), np.take_along_axis(rows, idx, axis=1)
    else:
        idx = np.broadcast_to(np.arange(n, dtype=np.intp), (q, n))
        sub_d, sub_r = dist, rows
    if not dist.size:
        return np.zeros(dist.shape, dtype=np.intp)
    order = np.lexsort((sub_r, sub_d), axis=1)
    return np.take_along_axis(idx, order, axis=1)


def top_m(dist: np.ndarray, rows: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``m`` smallest (distance, row) pairs, sorted by (distance, row).

    Parameters
    ----------
    dist : ndarray, shape (q, n)
    rows : ndarray of int64, shape (n,) or (q, n)
    m : int

    Returns
    -------
    (dist, rows), each of shape (q, min(m, n))
    """
    idx = top_m_index(dist, rows, m)
    rows = np.broadcast_to(rows, dist.shape)
    return np.take_along_axis(dist, idx, axis=1), np.take_along_axis(rows, idx, axis=1).astype(np.int64)


def top_m_hits(dist: np.ndarray, rows: np.ndarray, records: np.ndarray,
               m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`top_m`, with ``records`` (shape of ``dist``: values that travel with the rows) taken alike."""
    idx = top_m_index(dist, rows, m)
    rows = np.broadcast_to(rows, dist.shape)
    return (np.take_along_axis(dist, idx, axis=1), np.take_along_axis(rows, idx, axis=1).astype(np.int64),
            np.take_along_axis(records, idx, axis=1))


def hit_records(names: Sequence[str], columns: Sequence[np.ndarray], idx: np.ndarray | None = None) -> np.ndarray:
    """One structured array of per-row ``columns`` (field ``names``), at positions ``idx`` if given."""
    cols = [np.ravel(c) for c in columns]
    out = np.empty(cols[0].shape if idx is None else idx.shape,
                   dtype=[(nm, c.dtype) for nm, c in zip(names, cols, strict=True)])
    for nm, c in zip(names, cols, strict=True):
        out[nm] = c if idx is None else c[idx]
    return out


def chunk_distances(x: np.ndarray, norm2: np.ndarray, q: np.ndarray, qnorm2: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``(n_queries, n_rows)`` with one matrix product."""
    x = x.astype(np.float32, copy=False)
    d = q @ x.T
    d *= -2.0
    d += norm2[None, :].astype(np.float32)
    d += qnorm2[:, None]
    np.maximum(d, 0.0, out=d)
    return d


#: Rows converted to float64 at a time by :func:`score_chunk` (8 MiB at D = 512).
SCORE_SLICE = 2048


@dataclass(frozen=True)
class RowFilter:
    """Which stored rows a pass may return: an area and/or a set of sources.

    A row is kept when its source is in ``sources`` (all sources if None)
    and its stored window centre lies in ``geometry`` (boundary included;
    everywhere if None). ``geometry`` is a shapely geometry in ``crs``
    (a WKT/authority string; None means WGS84 longitude/latitude, x = lon):
    the rows' stored ``lon``/``lat`` are transformed into ``crs`` before the
    test, so the test is exact in the area's own CRS. Rows without a CRS
    (NaN lon/lat) are never inside an area.
    """

    geometry: Any = None
    crs: str | None = None
    sources: tuple[int, ...] | None = None

    def mask(self, lon: np.ndarray, lat: np.ndarray, source: np.ndarray) -> np.ndarray:
        """Boolean keep-mask of rows with these centres and sources."""
        lon, lat, source = np.ravel(lon), np.ravel(lat), np.ravel(source)
        keep = np.ones(lon.shape, dtype=bool)
        if self.sources is not None:
            keep &= np.isin(source, np.asarray(self.sources, dtype=source.dtype))
        if self.geometry is not None and keep.any():
            import shapely

            idx = np.flatnonzero(keep)
            x, y = lon[idx], lat[idx]
            if self.crs is not None:
                x, y = _to_crs(self.crs).transform(x, y)
            x, y = np.asarray(x), np.asarray(y)
            g = self.geometry
            if g.geom_type == "Polygon" and shapely.equals(g, g.envelope):  # a rectangle: four comparisons
                minx, miny, maxx, maxy = g.bounds
                keep[idx] = (x >= minx) & (x <= maxx) & (y >= miny) & (y <= maxy)
            else:
                shapely.prepare(g)
                keep[idx] = shapely.intersects_xy(g, x, y)
        return keep


@lru_cache(maxsize=16)
def _to_crs(crs: str) -> Any:
    from pyproj import Transformer

    return Transformer.from_crs("EPSG:4326", crs, always_xy=True)


def _filtered(block: Sequence[np.ndarray], where: RowFilter | None, n_data: int) -> list[np.ndarray]:
    """The block's first ``n_data`` arrays (the first a 2-D ``x``, the rest flattened columns),
    rows outside ``where`` dropped.

    With a filter, the block carries ``lon, lat, source`` after the data arrays.
    """
    data = [block[0], *(b.ravel() for b in block[1:n_data])]
    if where is None:
        return data
    keep = where.mask(*block[n_data : n_data + 3])
    if keep.all():
        return data
    return [d[keep] for d in data]


def knn_chunk(
    block: tuple[np.ndarray, ...],
    *,
    q: np.ndarray,
    qnorm2: np.ndarray,
    m: int,
    where: RowFilter | None = None,
    records: bool = False,
    axis: Any = None,
    keepdims: bool = False,
) -> tuple[np.ndarray, ...]:
    """Chunk step: a block ``(x, norm2[, records], rows[, lon, lat, source])`` → each query's ``m`` best.

    Returns ``(dist, rows)``, or with ``records`` (the block carries a
    structured array of per-row values, e.g. the tiles' coordinates)
    ``(dist, rows, records at the kept rows)``. Rows outside ``where`` are
    dropped before the distances (a chunk wholly outside costs only the mask).
    """
    x, norm2, *rec, rows = _filtered(block, where, 4 if records else 3)
    d = chunk_distances(x, norm2, q, qnorm2)
    rows = rows.astype(np.int64)
    if not records:
        return top_m(d, rows, m)
    idx = top_m_index(d, rows, m)
    return np.take_along_axis(d, idx, axis=1), rows[idx], rec[0][idx]


def score_chunk(
    block: tuple[np.ndarray, ...],
    *,
    coef: np.ndarray,
    intercept: float,
    m: int,
    min_logit: float | None,
    where: RowFilter | None = None,
    axis: Any = None,
    keepdims: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Chunk step of the classifier pass: linear scores (logits) of a block's rows.

    Returns ``(-logit, rows)`` of shape ``(1, ≤ m)`` sorted by (−logit, row), i.e.
    the best first, in the same form as :func:`knn_chunk` so :func:`knn_merge`
    merges them. ``min_logit`` (if given) drops rows scoring below it first.
    Scores are computed in float64.
    """
    x, rows = _filtered(block, where, 2)
    w = np.asarray(coef, dtype=np.float64)
    s = np.empty(len(x), dtype=np.float64)
    for i in range(0, len(x), SCORE_SLICE):  # float64 copies of a slice, not of the whole block
        s[i : i + SCORE_SLICE] = x[i : i + SCORE_SLICE].astype(np.float64) @ w
    s += float(intercept)
    rows = rows.astype(np.int64)
    if min_logit is not None:
        sel = s >= min_logit
        s, rows = s[sel], rows[sel]
    return top_m(-s[None, :], rows, m)


def knn_merge(
    parts: list[tuple[np.ndarray, np.ndarray]] | tuple[np.ndarray, np.ndarray],
    *,
    m: int,
    axis: Any = None,
    keepdims: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Combine/aggregate step: merge candidate lists ``(dist, rows)``, keep ``m`` per query."""
    flat = _flatten([parts] if isinstance(parts, tuple) else parts)
    return top_m(np.concatenate([p[0] for p in flat], axis=1), np.concatenate([p[1] for p in flat], axis=1), m)


def hits_merge(
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    m: int,
    axis: Any = None,
    keepdims: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`knn_merge` of ``(dist, rows, records)`` lists (the records travel with their rows)."""
    flat = _flatten([parts] if isinstance(parts, tuple) else parts)
    d, r, rec = (np.concatenate([p[i] for p in flat], axis=1) for i in range(3))
    return top_m_hits(d, r, rec, m)


def _flatten(parts: list) -> list[Any]:
    out: list[Any] = []
    for p in parts:
        if isinstance(p, list):
            out.extend(_flatten(p))
        else:
            out.append(p)
    return out


def dedup_mask(
    source: np.ndarray,
    wy: np.ndarray,
    wx: np.ndarray,
    *,
    tiling: Tiling,
    exclude: Sequence[tuple[int, int, int]] = (),
) -> np.ndarray:
    """Greedy de-duplication of a ranked hit list (best first).

    A hit is kept unless it overlaps an already-kept hit of the same source,
    or one of the ``exclude`` windows ``(source, wy, wx)`` (the query's own).
    """
    keep = np.zeros(len(source), dtype=bool)
    kept: dict[int, list[tuple[int, int]]] = {}
    for s, y, x in exclude:
        kept.setdefault(int(s), []).append((int(y), int(x)))
    t, st = int(tiling.tile), int(tiling.stride)
    # Plain Python ints: a ranked list is short (k·(2r+1)² rows), numpy per row would cost more.
    for i, (s, y, x) in enumerate(zip(source.tolist(), wy.tolist(), wx.tolist(), strict=True)):
        prev = kept.setdefault(s, [])
        if any(abs(y - py) * st < t and abs(x - px) * st < t for py, px in prev):  # tiling.windows_overlap
            continue
        keep[i] = True
        prev.append((y, x))
    return keep


def candidates_needed(k: int, tiling: Tiling, *, dedup: bool, from_store: bool, n_own: int = 1) -> int:
    """How many raw neighbours to fetch so ``k`` survive de-duplication.

    ``n_own`` is how many stored tiles are excluded (a query's own tile, or
    every labelled tile of a combined query) when ``from_store``.
    """
    own = max(int(n_own), 1) if from_store else 0
    if not dedup:
        return k + own
    block = (2 * tiling.reach + 1) ** 2
    return k * block + own * block

