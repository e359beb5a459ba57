"""From a page request to the search engine and back: one library call per query, hits as map features.

:func:`run_query` hands the page's examples, counter-examples and area to
:func:`dask_fp.search` (or :func:`dask_fp.classify` in classifier mode), with the
search method chosen by the library's rule and reported back to the page;
:func:`hits_features` turns the resulting :class:`~dask_fp.hits.Hits` into
GeoJSON features for the map (pixel squares for sources without a CRS);
:func:`export_bytes` writes hits and labels as GeoJSON or GeoParquet.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import QueryError
from ..hits import Hits
from ..index import Index, choose_method
from ..store import Store

if TYPE_CHECKING:
    from .app import SearchRequest
    from .locate import TileIndex


def _area(req: SearchRequest) -> Any:
    if req.area is None:
        return None
    from shapely.geometry import shape

    try:
        geom = shape(req.area.model_dump())
    except Exception as e:
        raise QueryError(f"area is not a valid GeoJSON polygon: {e}") from None
    if geom.is_empty or not geom.is_valid:
        raise QueryError("area polygon is empty or self-intersecting; draw it again.")
    return geom


METHOD_DETAIL = {
    "exact": "exact scan of every stored fingerprint",
    "codes": "compact codes pick candidates (the rows of the query's nearest k-means lists, ranked by distances"
             " estimated from 1-bit residual codes); their full fingerprints are re-ranked: distances are exact,"
             " a true neighbour in an unprobed list or ranked below the cut can be missed",
    "classifier": "classifier trained on the labels, applied to every stored tile (exact pass)",
}


@dataclass(frozen=True)
class PageResult:
    """One page query's answer: the hits and the search method that produced them.

    ``method`` is ``exact`` or ``codes`` (:func:`dask_fp.index.choose_method`, the
    library's rule: ``auto`` is codes for a large store with an index, exact with
    an area) or ``classifier``; ``detail`` says what that means for the distances.
    """

    hits: Hits
    method: str

    @property
    def detail(self) -> str:
        return METHOD_DETAIL[self.method]


def run_query(store: Store, index: TileIndex, req: SearchRequest, code_index: Index | None = None) -> PageResult:
    """Run one page query: every positive and negative combined into one query (or one classifier).

    The search method is chosen as the library chooses it (``req.method``, default
    ``auto``); ``code_index`` is the store's opened (persisted) index, when it has one.
    """
    from ..classify import classify
    from ..search import search

    for u in (*req.positives, *req.negatives):
        if not index.has(u):
            raise QueryError(f"uid {u} is not a stored tile of this store.")
    if set(req.positives) & set(req.negatives):
        raise QueryError("a tile cannot be both a positive and a negative example.")
    area = _area(req)
    if req.mode == "classify":
        if len(req.positives) < 1 or len(req.negatives) < 1:
            raise QueryError("classifier mode needs at least one positive and one negative example.")
        if req.method == "codes":
            raise QueryError("classifier mode scores every tile; method 'codes' is for nearest-neighbour search.")
        return PageResult(classify(store, positives=list(req.positives), negatives=list(req.negatives),
                                   k=req.k, threshold=req.threshold, area=area), "classifier")
    method = choose_method(store, req.method, filtered=area is not None)
    if method == "codes" and code_index is None:
        raise QueryError(f"{store.path.name} has no compact-code index: search with method auto or exact, or"
                         f" build one with `dask-fp index {store.path}` and restart `dask-fp serve`.")
    hits = search(store, positives=list(req.positives), negatives=list(req.negatives), k=req.k,
                  area=area, method=method, index=code_index if method == "codes" else None)
    return PageResult(hits, method)


def _num(v: Any) -> float | None:
    f = float(v)
    return None if math.isnan(f) else f


def hits_features(index: TileIndex, hits: Hits) -> dict[str, Any]:
    """Hits of the first query as a GeoJSON FeatureCollection; ``pixel`` marks source-pixel geometries."""
    t = hits.table
    t = t[t["query"] == 0] if "query" in t.columns and len(t) else t
    feats: list[dict[str, Any] | None] = [None] * len(t)
    pos = {ix: i for i, ix in enumerate(t.index)}
    for sid, grp in t.groupby("source", sort=False):
        geoms = index.outline(index.source(int(sid)), grp["wy"].to_numpy(), grp["wx"].to_numpy())
        for ix, r, (g, pixel) in zip(grp.index, grp.itertuples(index=False), geoms, strict=True):
            props = {"rank": int(r.rank), "uid": str(int(r.uid)), "source": int(r.source), "wy": int(r.wy),
                     "wx": int(r.wx), "distance": _num(r.distance), "pixel": pixel,
                     "score": _num(getattr(r, "score", np.nan)), "name": str(r.path).rsplit("/", 1)[-1]}
            feats[pos[ix]] = {"type": "Feature", "geometry": g, "properties": props}
    return {"type": "FeatureCollection", "features": [f for f in feats if f is not None]}


def export_bytes(index: TileIndex, hits: Hits, req: SearchRequest, fmt: str) -> tuple[bytes, str]:
    """Hits (``kind: hit``) and labelled tiles (``kind: label``) as GeoJSON or GeoParquet bytes.

    Only tiles of sources with a CRS are written (both formats are WGS84);
    tiles of sources without one are counted in the ``dask_fp_left_out`` member (GeoJSON).
    """
    feats = [f for f in hits_features(index, hits)["features"]]
    for kind, uids in (("positive", req.positives), ("negative", req.negatives)):
        for u in uids:
            loc = index.locate(u)
            feats.append({"type": "Feature", "geometry": loc.geometry,
                          "properties": {"uid": str(u), "source": loc.source, "wy": loc.wy, "wx": loc.wx,
                                         "label": kind, "pixel": loc.pixel}})
    for f in feats:
        f["properties"].setdefault("label", None)
        f["properties"]["kind"] = "label" if f["properties"]["label"] else "hit"
        f["properties"]["source_name"] = index.sources[f["properties"]["source"]]["path"].rsplit("/", 1)[-1]
    geo = [f for f in feats if not f["properties"].pop("pixel")]
    left_out = len(feats) - len(geo)
    if fmt == "geojson":
        fc = {"type": "FeatureCollection", "features": geo, "dask_fp_left_out": left_out}
        return json.dumps(fc).encode(), "application/geo+json"
    import io

    import geopandas as gpd

    gdf = gpd.GeoDataFrame.from_features(geo, crs="EPSG:4326") if geo else gpd.GeoDataFrame(
        {"uid": []}, geometry=[], crs="EPSG:4326")
    buf = io.BytesIO()
    gdf.to_parquet(buf)
    return buf.getvalue(), "application/vnd.apache.parquet"
