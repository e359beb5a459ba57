"""Labelled examples: positives and negatives of any kind → fingerprints, and one combined query.

An example is

- an ``int``: the uid of a stored tile;
- a ``str`` or ``PathLike`` to a picture file (embedded with the store's model);
- a ``(lon, lat)`` pair in degrees: the stored tile that holds the point;
- a shapely geometry in WGS84: a point as above, a polygon means every stored
  tile whose centre lies in it (boundary included);
- a path to a vector file (``.geojson``, ``.gpkg``, …) of points and polygons,
  in any CRS the file declares.

Combination rule (Rocchio without an original query)::

    q = mean(P) + beta * (mean(P) - mean(N))        (q = mean(P) without negatives)

``mean(P)`` is the point that minimises the summed squared distance to the
positives, so with positives only the search ranks tiles by their distance to
the positives' centre. Negatives push the query away from their centre along
the line between the two centres. ``beta`` defaults to 0.5: the query moves at
most half the distance between the centres, so it stays on the positives'
side of the midpoint and near the data (large ``beta`` extrapolates into parts
of feature space where no tile lies, and distances there rank tiles mostly by
their norm). Every example counts once: a polygon of 40 tiles weighs 40 times a
single uid.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import QueryError
from .filters import is_vector_file, read_vector, rows_where
from .kernels import RowFilter
from .models import ModelOptions
from .query import Query, image_queries, lonlat_queries
from .query import uid_rows as rows_of_uids
from .store import Store

Example = Any  # int | str | os.PathLike | tuple[float, float] | shapely geometry

#: Default weight of the negatives in the combined query (see the module docstring).
BETA = 0.5


@dataclass(frozen=True)
class Labelled:
    """Resolved examples of one kind: their fingerprints, and which stored tiles they are.

    ``rows``/``tiles`` list the stored tiles among the examples (pictures are
    not stored tiles); ``vectors`` holds one fingerprint per example tile or
    picture, stored tiles first, in ``rows`` order, then pictures.
    """

    vectors: np.ndarray
    rows: np.ndarray
    tiles: tuple[tuple[int, int, int], ...]
    uids: np.ndarray
    lonlat: np.ndarray
    images: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.vectors)


def as_examples(examples: Example | Sequence[Example] | None) -> list[Example]:
    """A list of examples from a sequence, or from one example given alone (a uid, path or geometry)."""
    from shapely.geometry.base import BaseGeometry

    if examples is None:
        return []
    if isinstance(examples, str | os.PathLike | int | np.integer | BaseGeometry):
        return [examples]
    return list(examples)


def _split(examples: Sequence[Example],
           what: str) -> tuple[list[int], list[str], list[tuple[float, float, str]], list[tuple[Any, str]]]:
    """Sort examples by kind: uids, pictures, (lon, lat, where it came from), (WGS84 polygon, where from)."""
    from shapely.geometry.base import BaseGeometry

    uids: list[int] = []
    images: list[str] = []
    points: list[tuple[float, float, str]] = []
    polys: list[tuple[Any, str]] = []

    def geometry(g: Any, origin: str) -> None:
        if g is None or g.is_empty:
            raise QueryError(f"{what} {origin}: an empty geometry.")
        if g.geom_type == "Point":
            points.append((float(g.x), float(g.y), origin))
        elif g.geom_type in ("Polygon", "MultiPolygon"):
            polys.append((g, origin))
        elif hasattr(g, "geoms"):
            for part in g.geoms:
                geometry(part, origin)
        else:
            raise QueryError(f"{what} {origin}: a {g.geom_type} is neither a point nor a polygon.")

    for e in as_examples(examples):
        if isinstance(e, bool):
            raise QueryError(f"{what} {e!r}: not an example (a uid, picture, (lon, lat), geometry or vector file).")
        if isinstance(e, int | np.integer):
            uids.append(int(e))
        elif is_vector_file(e):
            geoms, _ = read_vector(e)
            for g in geoms:
                geometry(g, str(e))
        elif isinstance(e, str | os.PathLike):
            images.append(str(e))
        elif isinstance(e, BaseGeometry):
            geometry(e, "geometry")
        elif isinstance(e, Sequence) and len(e) == 2 and all(isinstance(v, int | float | np.number) for v in e):
            points.append((float(e[0]), float(e[1]), "point"))
        else:
            raise QueryError(f"{what} {e!r}: not an example; give a uid (int), a picture path, a (lon, lat)"
                             " pair, a shapely geometry in WGS84, or a .geojson/.gpkg file.")
    return uids, images, points, polys


def uid_rows(store: Store, uids: Sequence[int]) -> np.ndarray:
    """Store rows of tiles by uid (:func:`dask_fp.query.uid_rows`: the uid rows of their sources only,
    read once per opened store); unknown uids are a QueryError."""
    from .tiling import split_uid

    if not len(uids):
        return np.empty(0, np.int64)
    for u in uids:
        if not 0 <= int(u) < 2**63:
            raise QueryError(f"uid {u} is not a tile uid (uids are whole numbers from 0 to 2**63 - 1).")
    want = np.asarray(uids, dtype=np.int64)
    rows = rows_of_uids(store, want.tolist())
    found = rows >= 0
    if not found.all():
        u = int(want[~found][0])
        s, y, x = (int(v) for v in split_uid(u))
        raise QueryError(f"uid {u} (source {s}, window {y},{x}) is not in {store.path}; list uids with"
                         " xarray.open_zarr(store).uid or give the example as a lon/lat point.")
    return rows


def resolve(store: Store, examples: Sequence[Example], *, what: str = "positive",
            model: ModelOptions | None = None) -> Labelled:
    """Turn examples into fingerprints and stored rows (duplicates among stored tiles counted once)."""
    uids, images, points, polys = _split(examples, what)
    rows = [uid_rows(store, uids)]
    if points:
        pq = _point_queries(store, points, what)
        if pq:
            rows.append(uid_rows(store, [_uid_of(q) for q in pq]))
    for g, origin in polys:
        r = rows_where(store, RowFilter(geometry=g))
        if r.size == 0:
            minx, miny, maxx, maxy = g.bounds
            raise QueryError(f"{what} {origin}: the polygon with bounds {minx:g},{miny:g},{maxx:g},{maxy:g}"
                             f" (lon/lat) holds no stored tile centre of {store.path}; `dask-fp info` lists"
                             " the sources (a tile is in a polygon when its centre is).")
        rows.append(r)
    allrows = np.unique(np.concatenate(rows)) if rows else np.empty(0, np.int64)
    c = store.coords(allrows)
    vecs = (np.asarray(store.read("fingerprint", allrows), dtype=np.float32)  # one pread per row (store.rows)
            if allrows.size else np.empty((0, store.dim), np.float32))
    iq = image_queries(store, images, model)
    if iq:
        vecs = np.concatenate([vecs, np.stack([q.vector for q in iq]).astype(np.float32)])
    tiles = tuple((int(s), int(y), int(x)) for s, y, x in zip(c["source"], c["wy"], c["wx"], strict=True))
    return Labelled(vecs, allrows, tiles, np.asarray(c["uid"], np.int64),
                    np.column_stack([c["lon"], c["lat"]]) if allrows.size else np.empty((0, 2)), tuple(images))


def _point_queries(store: Store, points: list[tuple[float, float, str]], what: str) -> list[Query]:
    """:func:`lonlat_queries` of the points; an error names the example (and file) of the point that failed."""
    try:
        return lonlat_queries(store, [(lon, lat) for lon, lat, _ in points])
    except QueryError:
        for lon, lat, origin in points:  # only on failure: find the point and name where it came from
            try:
                lonlat_queries(store, [(lon, lat)])
            except QueryError as e:
                raise QueryError(f"{what} {origin}: {e}") from None
        raise


def _uid_of(q: Query) -> int:
    from .tiling import make_uid

    if q.own is None:  # lon/lat queries always come from a stored tile; anything else is a bug here
        raise QueryError(f"{q.label}: not a stored tile, so it has no uid.")
    s, y, x = q.own
    return int(make_uid(s, y, x))


def rocchio(pos: np.ndarray, neg: np.ndarray, beta: float = BETA) -> np.ndarray:
    """``mean(P) + beta * (mean(P) - mean(N))`` (``mean(P)`` without negatives), float32."""
    mp = np.asarray(pos, np.float64).mean(axis=0)
    if len(neg) == 0:
        return mp.astype(np.float32)
    mn = np.asarray(neg, np.float64).mean(axis=0)
    return (mp + beta * (mp - mn)).astype(np.float32)


def combined_query(store: Store, positives: Sequence[Example], negatives: Sequence[Example] = (), *,
                   beta: float = BETA, model: ModelOptions | None = None) -> Query:
    """One query from many positives and negatives (see the module docstring for the rule).

    The labelled stored tiles are the query's excluded tiles (``Query.exclude``).
    """
    if not np.isfinite(beta) or beta < 0:
        raise QueryError(f"beta must be a number >= 0, got {beta!r}")
    pos = resolve(store, positives, what="positive", model=model)
    if len(pos) == 0:
        raise QueryError("positives is empty: a combined query needs at least one positive example.")
    neg = resolve(store, negatives, what="negative", model=model)
    check_disjoint(pos, neg)
    label = _plural(len(pos), "positive") + (", " + _plural(len(neg), "negative") if len(neg) else "")
    return Query(label, rocchio(pos.vectors, neg.vectors, beta), None, None, exclude=pos.tiles + neg.tiles,
                 shown=pos.tiles[0] if pos.tiles else None)


def check_disjoint(pos: Labelled, neg: Labelled) -> None:
    """A QueryError naming the uids of stored tiles that are among both the positives and the negatives."""
    both = np.isin(pos.rows, neg.rows)
    if both.any():
        uids = sorted(int(u) for u in pos.uids[both])
        raise QueryError(f"tile{'s' * (len(uids) > 1)} {', '.join(map(str, uids[:5]))}"
                         f"{' …' if len(uids) > 5 else ''} labelled both positive and negative (a polygon or"
                         " point example may cover a tile labelled the other way); drop one label.")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"
