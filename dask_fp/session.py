"""Relevance feedback: a session that holds positive and negative labels between searches.

The loop of the "find every X" tools: label a few tiles, search, mark hits as
positive or negative, search again; when the labels suffice, train the
classifier. Labels are saved as GeoJSON (one Point feature per labelled tile
at its centre, properties ``uid`` and ``label``; polygons given as examples
stay polygon features; pictures are features without geometry and an
``image`` property), so they open in QGIS and come back with
:meth:`SearchSession.load` or ``dask-fp query --labels FILE``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .classify import classify
from .errors import QueryError
from .examples import Example, as_examples, resolve
from .filters import is_vector_file, read_vector
from .hits import Hits
from .models import ModelOptions
from .search import search
from .store import Store, open_store

LABELS = ("positive", "negative")


def read_labels(path: str | os.PathLike[str]) -> tuple[list[Example], list[Example]]:
    """(positives, negatives) from a labels file (GeoJSON, GeoPackage, … in any CRS).

    Each feature needs a ``label`` property, ``positive`` or ``negative``. A
    feature with a ``uid`` property is that stored tile; else one with an
    ``image`` property is that picture (a relative path is relative to the
    labels file's folder); else its geometry (a point: the tile that holds it;
    a polygon: every tile whose centre lies in it).
    """
    p = str(path)
    if not is_vector_file(p):
        raise QueryError(f"labels file {p}: expected a .geojson or .gpkg file.")
    geoms, props = read_vector(p)
    out: dict[str, list[Example]] = {"positive": [], "negative": []}
    for i, (g, pr) in enumerate(zip(geoms, props, strict=True)):
        label = str(pr.get("label", "")).strip().lower()
        if label not in LABELS:
            raise QueryError(f"labels file {p}: feature {i} has label {pr.get('label')!r}; expected 'positive'"
                             " or 'negative' in a 'label' property.")
        uid, image = pr.get("uid"), pr.get("image")
        if uid is not None and uid == uid:  # not null / NaN
            try:
                out[label].append(int(uid))
            except (TypeError, ValueError):
                raise QueryError(f"labels file {p}: feature {i} has uid {uid!r}; a uid is a whole number (as"
                                 " in a hits table or a file written by SearchSession.save).") from None
        elif image:
            out[label].append(os.path.join(os.path.dirname(p), str(image)))
        elif g is not None:
            out[label].append(g)
        else:
            raise QueryError(f"labels file {p}: feature {i} has no uid, image or geometry.")
    return out["positive"], out["negative"]


class SearchSession:
    """Labels for relevance feedback over one store.

    Parameters
    ----------
    store : Store or path
    model : ModelOptions, optional
        For picture examples (default: the store's own model).

    Examples
    --------
    >>> s = SearchSession("store.zarr").add(positives=[uid1, uid2], negatives=[(-81.0, 31.6)])
    >>> hits = s.search(k=20)
    >>> s.add_hits(hits, [1, 2, 5]).add_hits(hits, [3], positive=False)
    >>> hits = s.search(k=20, area=(-81.1, 31.5, -80.9, 31.7))
    >>> every = s.classify(threshold=0.9)
    >>> s.save("labels.geojson")
    """

    def __init__(self, store: Store | str | os.PathLike[str], *, model: ModelOptions | None = None) -> None:
        self.store = store if isinstance(store, Store) else open_store(store)
        self.model = model
        self.positives: list[Example] = []
        self.negatives: list[Example] = []

    def __repr__(self) -> str:
        return (f"SearchSession({self.store.path}, {len(self.positives)} positive,"
                f" {len(self.negatives)} negative examples)")

    def add(self, positives: Example | Sequence[Example] = (),
            negatives: Example | Sequence[Example] = ()) -> SearchSession:
        """Add examples (see :func:`dask_fp.search`); a uid labelled again takes its new label."""
        pos, neg = as_examples(positives), as_examples(negatives)
        self._check(pos, neg)
        for new, other in ((pos, self.negatives), (neg, self.positives)):
            uids = {int(e) for e in new if isinstance(e, int | np.integer)}
            other[:] = [e for e in other if not (isinstance(e, int | np.integer) and int(e) in uids)]
        self.positives += [e for e in pos if not _has(self.positives, e)]
        self.negatives += [e for e in neg if not _has(self.negatives, e)]
        return self

    def _check(self, positives: list[Example], negatives: list[Example]) -> None:
        """Resolve the new examples once now, so a bad one is refused when added, not at the next search."""
        for what, examples in (("positive", positives), ("negative", negatives)):
            if examples:
                resolve(self.store, examples, what=what, model=self.model)

    def add_hits(self, hits: Hits, ranks: Iterable[int], positive: bool = True, query: int = 0) -> SearchSession:
        """Label the hits of ``query`` at these 1-based ``ranks`` (as in ``hits.table``)."""
        t = hits.for_query(query)
        by_rank = dict(zip(t["rank"].tolist(), t["uid"].tolist(), strict=True))
        ranks = list(ranks)
        missing = [r for r in ranks if r not in by_rank]
        if missing:
            raise QueryError(f"ranks {missing} are not among the {len(by_rank)} hits of query {query}.")
        uids = [int(by_rank[r]) for r in ranks]
        return self.add(positives=uids) if positive else self.add(negatives=uids)

    def search(self, k: int = 10, **kwargs: Any) -> Hits:
        """:func:`dask_fp.search` with this session's labels as the combined query."""
        return search(self.store, positives=self.positives, negatives=self.negatives, k=k, model=self.model,
                      **kwargs)

    def classify(self, **kwargs: Any) -> Hits:
        """:func:`dask_fp.classify` trained on this session's labels."""
        return classify(self.store, positives=self.positives, negatives=self.negatives, model=self.model,
                        **kwargs)

    def features(self) -> list[dict[str, Any]]:
        """The labels as GeoJSON features (points at labelled tiles, polygons, pictures)."""
        import shapely
        from shapely.geometry.base import BaseGeometry

        feats: list[dict[str, Any]] = []
        for label, examples in (("positive", self.positives), ("negative", self.negatives)):
            tiles: list[Example] = []
            for e in examples:
                if isinstance(e, BaseGeometry) and e.geom_type in ("Polygon", "MultiPolygon"):
                    feats.append({"type": "Feature", "geometry": shapely.geometry.mapping(e),
                                  "properties": {"label": label}})
                elif is_vector_file(e):
                    for g, _ in zip(*read_vector(e), strict=True):
                        if g is not None and g.geom_type in ("Polygon", "MultiPolygon"):
                            feats.append({"type": "Feature", "geometry": shapely.geometry.mapping(g),
                                          "properties": {"label": label}})
                        elif g is not None:
                            tiles.append(g)
                elif isinstance(e, str | os.PathLike):  # absolute: the labels file may be read elsewhere
                    feats.append({"type": "Feature", "geometry": None,
                                  "properties": {"label": label, "image": os.path.abspath(e)}})
                else:
                    tiles.append(e)
            r = resolve(self.store, tiles, what=label, model=self.model)
            for uid, (lon, lat) in zip(r.uids.tolist(), r.lonlat.tolist(), strict=True):
                geom = {"type": "Point", "coordinates": [lon, lat]} if np.isfinite([lon, lat]).all() else None
                feats.append({"type": "Feature", "geometry": geom, "properties": {"label": label, "uid": int(uid)}})
        return feats

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the labels as a GeoJSON FeatureCollection (WGS84) and return its path."""
        p = Path(path)
        fc = {"type": "FeatureCollection", "features": self.features(),
              "dask_fp_store": os.path.abspath(str(self.store.path))}
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(fc))
        os.replace(tmp, p)
        return str(p)

    @classmethod
    def load(cls, store: Store | str | os.PathLike[str], path: str | os.PathLike[str], *,
             model: ModelOptions | None = None) -> SearchSession:
        """A session with the labels of ``path`` (see :func:`read_labels`).

        A label the store cannot resolve (an unknown uid, a missing picture, a
        polygon over no stored tile), or a uid whose tile is not where the
        feature's point says (labels saved from another store), is a
        QueryError that names ``path``.
        """
        pos, neg = read_labels(path)
        session = cls(store, model=model)
        try:
            _check_uid_points(session.store, path)
            return session.add(positives=pos, negatives=neg)
        except QueryError as e:
            raise QueryError(f"labels file {path}: {e}") from None


#: Largest distance (degrees) between a labels file's point and the centre of the tile its uid names.
UID_POINT_TOLERANCE = 1e-6


def _check_uid_points(store: Store, path: str | os.PathLike[str]) -> None:
    """Refuse a labels file whose uid features' points are not at their tiles' centres in ``store``.

    :meth:`SearchSession.save` writes each labelled tile as its uid and a Point
    at its centre. A uid names a window of a source *index*, so in another
    store it is another tile (or none): the points tell.
    """
    from .examples import uid_rows

    geoms, props = read_vector(path)
    feats = [(i, int(pr["uid"]), g) for i, (g, pr) in enumerate(zip(geoms, props, strict=True))
             if pr.get("uid") is not None and pr["uid"] == pr["uid"] and g is not None and g.geom_type == "Point"]
    if not feats:
        return
    c = store.coords(uid_rows(store, [u for _, u, _ in feats]))
    for (i, u, g), lon, lat in zip(feats, c["lon"], c["lat"], strict=True):
        if not (abs(g.x - lon) <= UID_POINT_TOLERANCE and abs(g.y - lat) <= UID_POINT_TOLERANCE):
            raise QueryError(f"feature {i} has uid {u}, the tile centred at {lon:.7f},{lat:.7f} in {store.path},"
                             f" but its point is at {g.x:.7f},{g.y:.7f}: these labels were saved from another"
                             " store. Load them into that store, or drop the uid properties to label the tiles"
                             " under the points.")


def _has(examples: list[Example], e: Example) -> bool:
    from shapely.geometry.base import BaseGeometry

    for x in examples:
        if isinstance(x, BaseGeometry) or isinstance(e, BaseGeometry):
            if isinstance(x, BaseGeometry) and isinstance(e, BaseGeometry) and x.equals(e):
                return True
        elif type(x) is type(e) and x == e:
            return True
    return False
