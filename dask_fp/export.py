"""Hits as files people can open: GeoJSON footprints, CSV, and a mosaic PNG.

GeoJSON follows RFC 7946: WGS84 longitude/latitude, one Polygon per hit
(the tile's footprint reprojected from its source CRS, corners densified so
the outline stays true after reprojection). Hits from sources without a CRS
cannot be placed on a map; their pixel footprints go to a separate file
named ``*-pixels.geojson`` whose coordinates are (column, row) pixels.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .raster import read_window
from .tiling import window_rings

if TYPE_CHECKING:
    from .hits import Hits

DENSIFY = 8  # points per footprint edge when reprojecting


def footprints(src: dict[str, Any], wy: np.ndarray, wx: np.ndarray, tile: int, stride: int) -> list[dict[str, Any]]:
    """WGS84 footprints of windows ``(wy, wx)`` of one source, as GeoJSON geometries.

    Each tile's edges are densified (``DENSIFY`` points each) and the lot is
    reprojected in one :func:`rasterio.warp.transform_geom` call, which cuts a
    footprint that crosses the antimeridian into a MultiPolygon (RFC 7946
    §3.1.9). Exterior rings are counter-clockwise; coordinates are rounded to
    1e-9 degrees.
    """
    from rasterio.warp import transform_geom

    rings = window_rings(tuple(src["transform"]), np.asarray(wy), np.asarray(wx), tile=tile, stride=stride)
    t = np.arange(DENSIFY) / DENSIFY
    geoms = []
    for corners in rings:
        a, b = corners[:-1], corners[1:]
        pts = (a[:, None, :] + (b - a)[:, None, :] * t[None, :, None]).reshape(-1, 2)
        geoms.append({"type": "Polygon", "coordinates": [[*pts.tolist(), corners[0].tolist()]]})
    out = transform_geom(src["crs"], "EPSG:4326", geoms, antimeridian_cutting=True, precision=9)
    return [_ccw(dict(g)) for g in out]


def _ccw(geom: dict[str, Any]) -> dict[str, Any]:
    polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
    fixed = []
    for poly in polys:
        ring = np.asarray(poly[0], dtype=np.float64)
        fixed.append([(ring if _signed_area(ring) >= 0 else ring[::-1]).tolist(), *poly[1:]])
    return {"type": geom["type"], "coordinates": fixed[0] if geom["type"] == "Polygon" else fixed}


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def _number(v: Any) -> float | None:
    """A float for JSON; None (null) for NaN, which JSON cannot hold (k-NN hits have no score)."""
    return None if v is None or v != v else float(v)


def hits_geojson(hits: Hits, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """FeatureCollection of hit footprints (WGS84); writes ``path`` if given.

    Hits from sources without a CRS are left out of it and written (when
    ``path`` is given) to ``<stem>-pixels.geojson`` in pixel coordinates.
    """
    st = hits.store
    tile, stride = int(st.attrs["tile"]), int(st.attrs["stride"])
    sources = {s["index"]: s for s in st.sources}
    geo, pix = [], []
    table = hits.table
    shapes: dict[int, Any] = {}  # table position -> WGS84 geometry, one reprojection per source
    for sid, grp in table.groupby("source", sort=False):
        if sources[int(sid)].get("crs"):
            geoms = footprints(sources[int(sid)], grp["wy"].to_numpy(), grp["wx"].to_numpy(), tile, stride)
            shapes.update(zip(grp.index, geoms, strict=True))
    for i, r in zip(table.index, table.itertuples(index=False), strict=True):
        src = sources[r.source]
        props = {"query": int(r.query), "query_label": r.label, "rank": int(r.rank), "uid": int(r.uid),
                 "distance": _number(r.distance), "score": _number(getattr(r, "score", float("nan"))),
                 "source": src["path"], "wy": int(r.wy), "wx": int(r.wx)}
        if i in shapes:
            geo.append({"type": "Feature", "geometry": shapes[i], "properties": props})
        else:
            c0, r0 = r.wx * stride, r.wy * stride
            ring = [[c0, r0], [c0, r0 + tile], [c0 + tile, r0 + tile], [c0 + tile, r0], [c0, r0]]
            pix.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                        "properties": props})
    fc = {"type": "FeatureCollection", "features": geo}
    if path is not None:
        p = Path(path)
        p.write_text(json.dumps(fc))
        other = p.with_name(p.stem + "-pixels.geojson")
        other.unlink(missing_ok=True)  # never leave one from an earlier run beside new hits
        if pix:
            note = "coordinates are (column, row) pixels of each source, which has no CRS"
            other.write_text(json.dumps({"type": "FeatureCollection", "features": pix, "dask_fp_note": note}))
    return fc


def tile_pixels(hits: Hits, source: int, wy: int, wx: int) -> np.ndarray:
    """A stored tile's pixels, read back from its source orthomosaic."""
    st = hits.store
    src = {s["index"]: s for s in st.sources}[source]
    return read_window(src, wy, wx, tile=int(st.attrs["tile"]), stride=int(st.attrs["stride"]))


def mosaic(hits: Hits, query: int, path: str | os.PathLike[str], *, columns: int = 6, panel: int = 192) -> str:
    """Write the query tile and its hits as a grid PNG (rank and distance under each).

    The first panel is the query (framed in blue): its picture or stored tile,
    for a combined query or a classifier the positive stored tile that comes
    first in the store (``Query.shown``), else blank. The others are the hits in rank order.
    Each panel is ``panel`` pixels square with a caption strip.
    """
    from PIL import Image, ImageDraw

    q = hits.queries[query]
    rows = hits.for_query(query)
    caption = "query"
    if q.pixels is not None:
        first = q.pixels
    elif q.own is not None:
        first = tile_pixels(hits, *q.own)
    elif q.shown is not None:
        first, caption = tile_pixels(hits, *q.shown), "query: its first positive"
    else:
        first = np.zeros((panel, panel, 3), np.uint8)
    panels = [(first, caption, q.label)]
    for r in rows.itertuples(index=False):
        value = f"p={r.score:.3f}" if hits.rank_by == "score" else f"d={r.distance:.3g}"
        panels.append((tile_pixels(hits, r.source, r.wy, r.wx), f"#{r.rank}  {value}",
                       f"{Path(r.path).name} ({r.wy},{r.wx})"))
    cap = 30
    ncol = min(columns, len(panels))
    nrow = -(-len(panels) // ncol)
    pad = 6
    canvas = Image.new("RGB", (ncol * (panel + pad) + pad, nrow * (panel + cap + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (pix, line1, line2) in enumerate(panels):
        x0 = pad + (i % ncol) * (panel + pad)
        y0 = pad + (i // ncol) * (panel + cap + pad)
        canvas.paste(Image.fromarray(pix).resize((panel, panel), Image.Resampling.BILINEAR), (x0, y0))
        if i == 0:
            draw.rectangle([x0 - 3, y0 - 3, x0 + panel + 2, y0 + panel + 2], outline=(30, 90, 220), width=3)
        draw.text((x0 + 2, y0 + panel + 2), _fit(draw, line1, panel - 4), fill="black")
        draw.text((x0 + 2, y0 + panel + 15), _fit(draw, line2, panel - 4), fill=(90, 90, 90))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(p)
    return str(p)


def _fit(draw: Any, text: str, width: int) -> str:
    """``text`` shortened from the front (``...`` + its end) so it fits ``width`` pixels.

    The end is kept because captions end with what tells hits apart: the
    window ``(wy,wx)`` after a file name.
    """
    if draw.textlength(text) <= width:
        return text
    for i in range(1, len(text)):
        if draw.textlength("..." + text[i:]) <= width:
            return "..." + text[i:]
    return ""


def write_outputs(hits: Hits, out_dir: str | os.PathLike[str], *, mosaic_hits: int | None = None) -> dict[str, Any]:
    """``hits.csv``, ``hits.geojson`` (+ ``hits-pixels.geojson``), one mosaic per query, and
    the places (``places.geojson``, ``places.parquet``) and score rasters (``scores-*.tif``)
    of :mod:`dask_fp.places`.

    Every file holds every hit, except the mosaics: with ``mosaic_hits``, each
    shows only the best ``mosaic_hits`` hits of its query (a classifier's
    thousands of hits do not fit in one picture).
    """
    from .places import score_rasters, write_places

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    hits.table.to_csv(d / "hits.csv", index=False)
    hits_geojson(hits, d / "hits.geojson")
    files: dict[str, Any] = {"csv": str(d / "hits.csv"), "geojson": str(d / "hits.geojson"), "mosaics": []}
    if (d / "hits-pixels.geojson").exists():
        files["geojson_pixels"] = str(d / "hits-pixels.geojson")
    for i in range(len(hits.queries)):
        name = "mosaic.png" if len(hits.queries) == 1 else f"mosaic-{i}.png"
        files["mosaics"].append(mosaic(hits if mosaic_hits is None else hits.head(mosaic_hits), i, d / name))
    for old in d.glob("scores-q*-s*.tif"):  # never leave rasters of an earlier run beside new ones
        old.unlink()
    try:
        import geopandas  # noqa: F401
    except ImportError:
        files["places"] = "not written: install the places extra (pip install 'dask-fp[places]')"
    else:
        files.update(write_places(hits, d))
    files["score_rasters"] = score_rasters(hits, d)
    return files
