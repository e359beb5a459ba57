"""Hits as places: dissolved polygons (GeoJSON, GeoParquet) and per-source score rasters.

Places
------
The footprints of one query's hits in one source are dissolved
(:func:`shapely.unary_union`) in the **source CRS**, where tiles of the same
grid share exact edge coordinates, so overlapping and edge-adjacent tiles
merge into one polygon; tiles that touch only at a corner stay separate
places. Each connected part is one place, with the hits whose centre lies in
it. The polygons are then reprojected once to WGS84 (edges densified first,
antimeridian cut as in :mod:`dask_fp.export`). ``area_m2`` is computed in the
source CRS when it is projected (source units converted to metres), and
geodesically on the WGS84 ellipsoid (:class:`pyproj.Geod`) otherwise.

Hits from sources without a CRS cannot be placed on a map: their places are
returned separately in (column, row) pixel coordinates and ``area_m2`` is NaN.

Score rasters
-------------
One float32 Cloud-Optimized GeoTIFF per (query, source), one pixel per
window of the source's window grid: pixel ``(i, j)`` is window
``(wy=i, wx=j)``. With the source's affine ``A``, tile ``T`` and stride ``S``
(pixels), the raster's geotransform is::

    A * Affine.translation(T/2 - S/2, T/2 - S/2) * Affine.scale(S)

so each pixel is centred on its window's centre and is ``S`` source pixels
wide (the first pixel's outer corner is the first window's centre minus half
a stride). Values are the hit's distance (k-NN; smaller is closer) or its
probability (classifier), NaN (the nodata value) where the window is not a
hit. For a map of every window, search with ``k`` = the store's tile count
and ``dedup=False``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .errors import DaskFpError
from .tiling import grid_shape, window_rings

if TYPE_CHECKING:
    from .hits import Hits

PLACE_COLUMNS = ["query", "label", "source", "path", "n_tiles", "measure", "best", "mean", "area_m2",
                 "best_uid", "uids"]
DENSIFY = 8  # points per tile edge when a dissolved outline is reprojected


def measure(hits: Hits) -> tuple[str, bool]:
    """The column that ranks the hits (``Hits.rank_by``), and whether larger is better.

    ``score`` (a classifier's probability) is larger-better; ``distance``
    (k-NN, squared Euclidean) is smaller-better.
    """
    col = getattr(hits, "rank_by", "distance")
    return col, col == "score"


def dissolve(rings: np.ndarray) -> list[Any]:
    """Connected parts of the union of closed rings ``(n, 5, 2)``, as shapely Polygons.

    Overlapping and edge-sharing rings merge; rings that meet only at a
    corner are separate parts. Parts are ordered by their lowest ring index.
    """
    import shapely

    polys = shapely.polygons(np.asarray(rings, dtype=np.float64))
    union = shapely.unary_union(polys)
    parts = list(shapely.get_parts(union))
    centres = np.asarray(rings, dtype=np.float64)[:, :4].mean(axis=1)
    first = [int(np.flatnonzero(shapely.contains_xy(p, centres[:, 0], centres[:, 1]))[0]) for p in parts]
    return [parts[i] for i in np.argsort(first, kind="stable")]


def _area_m2(geoms_src: list[Any], geoms_wgs: list[Any], crs: Any) -> np.ndarray:
    from pyproj import CRS, Geod

    c = CRS.from_user_input(crs)
    if c.is_projected:
        unit = c.axis_info[0].unit_conversion_factor if c.axis_info else 1.0
        return np.array([g.area * unit * unit for g in geoms_src], dtype=np.float64)
    geod = Geod(ellps="WGS84")
    return np.array([abs(geod.geometry_area_perimeter(g)[0]) for g in geoms_wgs], dtype=np.float64)


def _to_wgs84(geoms: list[Any], crs: Any, tile_edge: float) -> list[Any]:
    import shapely
    from rasterio.warp import transform_geom
    from shapely.geometry import mapping, shape

    dense = [shapely.segmentize(g, tile_edge / DENSIFY) for g in geoms]
    out = transform_geom(crs, "EPSG:4326", [mapping(g) for g in dense], antimeridian_cutting=True, precision=9)
    return [shapely.orient_polygons(shape(g)) for g in out]


def places(hits: Hits) -> tuple[Any, Any]:
    """Dissolved hit footprints per (query, source).

    Returns
    -------
    (geopandas.GeoDataFrame, geopandas.GeoDataFrame)
        Places of georeferenced sources in EPSG:4326, and places of sources
        without a CRS in (column, row) pixel coordinates (no CRS). Columns:
        ``query``, ``label``, ``source`` (index), ``path``, ``n_tiles``,
        ``measure`` (``distance`` or ``score``), ``best`` (smallest distance
        or largest score), ``mean``, ``area_m2``, ``best_uid`` and ``uids``
        (space-separated, best first).
    """
    import geopandas
    import shapely

    st = hits.store
    tile, stride = int(st.attrs["tile"]), int(st.attrs["stride"])
    sources = {int(s["index"]): s for s in st.sources}
    col, larger = measure(hits)
    geo_rows: list[dict[str, Any]] = []
    geo_shapes: list[Any] = []
    pix_rows: list[dict[str, Any]] = []
    pix_shapes: list[Any] = []
    for (qi, sid), grp in hits.table.groupby(["query", "source"], sort=True):
        src = sources[int(sid)]
        grp = grp.sort_values(col, ascending=not larger, kind="stable")
        has_crs = bool(src.get("crs"))
        affine = tuple(src["transform"]) if has_crs else (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
        rings = window_rings(affine, grp["wy"].to_numpy(), grp["wx"].to_numpy(), tile=tile, stride=stride)
        parts = dissolve(rings)
        centres = rings[:, :4].mean(axis=1)
        members = [np.flatnonzero(shapely.contains_xy(p, centres[:, 0], centres[:, 1])) for p in parts]
        rows = []
        for idx in members:
            vals = grp[col].to_numpy()[idx]
            uids = grp["uid"].to_numpy()[idx]
            rows.append({"query": int(qi), "label": str(grp["label"].iloc[0]), "source": int(sid),
                         "path": src["path"], "n_tiles": len(idx), "measure": col,
                         "best": float(vals[0]), "mean": float(np.mean(vals)), "area_m2": np.nan,
                         "best_uid": int(uids[0]), "uids": " ".join(str(int(u)) for u in uids)})
        if has_crs:
            edge = float(np.hypot(*np.asarray(rings[0, 1] - rings[0, 0])))
            wgs = _to_wgs84(parts, src["crs"], edge)
            for r, a in zip(rows, _area_m2(parts, wgs, src["crs"]), strict=True):
                r["area_m2"] = float(a)
            geo_rows += rows
            geo_shapes += wgs
        else:
            pix_rows += rows
            pix_shapes += parts
    geo = geopandas.GeoDataFrame(pd.DataFrame(geo_rows, columns=PLACE_COLUMNS), geometry=geo_shapes or None,
                                 crs="EPSG:4326")
    if not geo_shapes:
        geo = geopandas.GeoDataFrame(pd.DataFrame(columns=PLACE_COLUMNS), geometry=[], crs="EPSG:4326")
    pix = geopandas.GeoDataFrame(pd.DataFrame(pix_rows, columns=PLACE_COLUMNS),
                                 geometry=pix_shapes if pix_shapes else [], crs=None)
    return _ranked(geo, larger), _ranked(pix, larger)


def _ranked(gdf: Any, larger: bool) -> Any:
    if len(gdf) == 0:
        return gdf
    return gdf.sort_values(["query", "best"], ascending=[True, not larger], kind="stable").reset_index(drop=True)


def write_places(hits: Hits, out_dir: str | os.PathLike[str], *, stem: str = "places") -> dict[str, str]:
    """Write ``<stem>.geojson`` and ``<stem>.parquet`` (GeoParquet), plus ``<stem>-pixels.*``.

    The pixel files are written only when some hits come from sources
    without a CRS; stale ones from an earlier run are removed.
    """
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    geo, pix = places(hits)
    files: dict[str, str] = {}
    for name, gdf in ((stem, geo), (f"{stem}-pixels", pix)):
        gj, pq = d / f"{name}.geojson", d / f"{name}.parquet"
        gj.unlink(missing_ok=True)
        pq.unlink(missing_ok=True)
        if name != stem and len(gdf) == 0:
            continue
        gj.write_text(gdf.to_json(drop_id=True))
        gdf.to_parquet(pq)
        files[f"{name}_geojson"] = str(gj)
        files[f"{name}_geoparquet"] = str(pq)
    return files


def raster_transform(transform: Any, *, tile: int, stride: int) -> tuple[float, ...]:
    """Geotransform ``(a, b, c, d, e, f)`` of the one-pixel-per-window grid (see the module doc)."""
    from affine import Affine

    a = Affine(*tuple(transform)[:6]) * Affine.translation(tile / 2 - stride / 2, tile / 2 - stride / 2) \
        * Affine.scale(stride)
    return (a.a, a.b, a.c, a.d, a.e, a.f)


def score_grid(table: pd.DataFrame, shape: tuple[int, int], column: str) -> np.ndarray:
    """``(ny, nx)`` float32 grid: ``column`` at each hit's ``(wy, wx)``, NaN elsewhere.

    A window listed twice (it cannot be, for one query) keeps its first value.
    """
    grid = np.full(shape, np.nan, dtype=np.float32)
    wy, wx = table["wy"].to_numpy()[::-1], table["wx"].to_numpy()[::-1]
    grid[wy, wx] = table[column].to_numpy(dtype=np.float32)[::-1]
    return grid


def score_rasters(hits: Hits, out_dir: str | os.PathLike[str], *, blocksize: int = 256) -> list[str]:
    """Write one float32 COG per (query, source) with hits: ``scores-q<query>-s<source>.tif``.

    Internal tiles are ``blocksize`` pixels square (a multiple of 16, at least
    128); GDAL adds averaged overviews until one fits in a tile. Sources
    without a CRS get the pixel-grid transform and no CRS. Returns the paths.
    """
    import rasterio
    from affine import Affine

    st = hits.store
    tile, stride = int(st.attrs["tile"]), int(st.attrs["stride"])
    sources = {int(s["index"]): s for s in st.sources}
    col, _ = measure(hits)
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    written = []
    for (qi, sid), grp in hits.table.groupby(["query", "source"], sort=True):
        src = sources[int(sid)]
        h, w = (int(v) for v in src["shape"])
        ny, nx = grid_shape(h, w, tile=tile, stride=stride)
        grid = score_grid(grp, (ny, nx), col)
        affine = src["transform"] if src.get("crs") else (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
        profile = {"driver": "COG", "width": nx, "height": ny, "count": 1, "dtype": "float32",
                   "nodata": float("nan"), "transform": Affine(*raster_transform(affine, tile=tile, stride=stride)),
                   "crs": src.get("crs") or None, "BLOCKSIZE": int(blocksize), "OVERVIEW_RESAMPLING": "AVERAGE",
                   "COMPRESS": "DEFLATE"}
        path = d / f"scores-q{int(qi)}-s{int(sid)}.tif"
        try:
            with rasterio.open(path, "w", **profile) as dst:
                dst.write(grid, 1)
                dst.update_tags(measure=col, query=str(grp["label"].iloc[0]), source=src["path"],
                                tile=str(tile), stride=str(stride))
        except rasterio.errors.RasterioError as e:
            raise DaskFpError(f"{path}: writing the score raster failed ({e}).") from None
        written.append(str(path))
    return written
