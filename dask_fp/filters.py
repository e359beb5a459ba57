"""Area and source filters: user input (bbox, polygon, vector file, CRS, sources) → a :class:`RowFilter`.

The filter itself is applied inside the distributed pass (:mod:`dask_fp.kernels`):
each chunk task reads its rows' ``lon``, ``lat`` and ``source`` beside the
fingerprints (20 bytes a row beside ~2 KiB) and drops the rows outside before
computing distances or scores, so a filtered search reads what an unfiltered
one reads and computes less.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import QueryError
from .kernels import RowFilter
from .store import Store

#: File name endings read as vector files (GeoJSON, GeoPackage, and what else GDAL/OGR reads).
VECTOR_SUFFIXES = (".geojson", ".json", ".gpkg", ".shp", ".fgb", ".kml", ".gml")

Area = Any  # shapely geometry | (minx, miny, maxx, maxy) | str | os.PathLike


def is_vector_file(value: Any) -> bool:
    return isinstance(value, str | os.PathLike) and str(value).lower().endswith(VECTOR_SUFFIXES)


def read_vector(path: str | os.PathLike[str]) -> tuple[list[Any], list[dict[str, Any]]]:
    """Geometries (shapely, WGS84 lon/lat) and properties of every feature of a vector file.

    Any CRS the file declares is transformed to WGS84; a file without one is
    taken as WGS84 (the GeoJSON rule).
    """
    import pyogrio
    import shapely

    p = str(path)
    if not os.path.isfile(p):
        raise QueryError(f"vector file {p}: no such file.")
    try:
        meta, _, wkb, fields = pyogrio.raw.read(p)
    except Exception as e:  # pyogrio raises DataSourceError and friends
        raise QueryError(f"vector file {p}: GDAL cannot read it ({type(e).__name__}: {e}).") from None
    if wkb is None:
        raise QueryError(f"vector file {p}: has no geometries.")
    geoms = list(shapely.from_wkb(wkb))
    crs = meta.get("crs")
    if crs:
        geoms = [to_wgs84(g, crs, what=f"vector file {p}") if g is not None else None for g in geoms]
    names = list(meta.get("fields", []))
    props = [{n: _plain(fields[j][i]) for j, n in enumerate(names)} for i in range(len(geoms))]
    return geoms, props


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _crs(crs: Any, what: str) -> Any:
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    try:
        return CRS.from_user_input(crs)
    except CRSError as e:
        raise QueryError(f"{what}: {crs!r} is not a CRS pyproj knows ({e}). Use e.g. 'EPSG:32617'.") from None


def _is_wgs84(crs: Any) -> bool:
    from pyproj import CRS

    return bool(crs.is_geographic and crs.equals(CRS.from_epsg(4326), ignore_axis_order=True))


def to_wgs84(geom: Any, crs: Any, *, what: str) -> Any:
    """``geom`` (in ``crs``) in WGS84 lon/lat; a clear error where the transform gives no finite point."""
    import shapely
    from pyproj import Transformer

    c = _crs(crs, what)
    if _is_wgs84(c):
        return geom
    t = Transformer.from_crs(c, "EPSG:4326", always_xy=True)
    out = shapely.transform(geom, lambda xy: np.column_stack(t.transform(xy[:, 0], xy[:, 1])))
    if not np.isfinite(shapely.get_coordinates(out)).all():
        raise QueryError(f"{what}: coordinates {shapely.bounds(geom).tolist()} are outside the area where"
                         f" {c.name} is defined; check the CRS (and the x/y order).")
    return out


def _check_lonlat(geom: Any, what: str) -> None:
    import shapely

    minx, miny, maxx, maxy = shapely.bounds(geom).tolist()
    if not (-180 <= minx <= maxx <= 180 and -90 <= miny <= maxy <= 90):
        raise QueryError(
            f"{what}: bounds {minx:g},{miny:g},{maxx:g},{maxy:g} are not longitudes/latitudes in degrees;"
            " coordinates in another CRS need area_crs (CLI: --area-crs), e.g. 'EPSG:32617'."
        )


def area_geometry(area: Area, area_crs: Any = None) -> tuple[Any, str | None]:
    """``area`` as (shapely geometry, CRS string or None for WGS84), checked."""
    import shapely
    from shapely.geometry.base import BaseGeometry

    what = "area"
    if is_vector_file(area):
        geoms, _ = read_vector(area)
        geom = shapely.union_all([g for g in geoms if g is not None])
        crs = None
        what = f"area {area}"
    elif isinstance(area, str | os.PathLike):
        raise QueryError(f"area {area}: not a vector file (expected one of {', '.join(VECTOR_SUFFIXES)}).")
    elif isinstance(area, BaseGeometry):
        geom, crs = area, area_crs
    elif isinstance(area, Sequence) and len(area) == 4:
        try:
            minx, miny, maxx, maxy = (float(v) for v in area)
        except (TypeError, ValueError):
            raise QueryError(f"area bbox {area!r}: expected four numbers minx, miny, maxx, maxy.") from None
        if not (minx <= maxx and miny <= maxy):
            raise QueryError(f"area bbox {area!r}: needs minx <= maxx and miny <= maxy.")
        geom, crs = shapely.box(minx, miny, maxx, maxy), area_crs
    else:
        raise QueryError(f"area {area!r}: expected a shapely geometry, a (minx, miny, maxx, maxy) bbox or a"
                         " path to a GeoJSON/GeoPackage file.")
    if geom is None or geom.is_empty:
        raise QueryError(f"{what}: the geometry is empty.")
    if geom.geom_type not in ("Polygon", "MultiPolygon") and not (
        geom.geom_type == "GeometryCollection" and all(g.geom_type in ("Polygon", "MultiPolygon") for g in geom.geoms)
    ):
        raise QueryError(f"{what}: a {geom.geom_type} has no area; give a polygon or a bbox.")
    if crs is None:
        _check_lonlat(geom, what)
        return geom, None
    c = _crs(crs, what)
    if _is_wgs84(c):
        _check_lonlat(geom, what)
        return geom, None
    to_wgs84(geom, c, what=what)  # only to refuse coordinates outside the CRS's domain
    return geom, c.to_wkt()


def source_indices(store: Store, sources: Iterable[int | str | os.PathLike[str]]) -> tuple[int, ...]:
    """Source indices from indices or paths (as listed by ``dask-fp info``)."""
    table = store.sources
    by_path: dict[str, int] = {}
    for s in table:
        by_path[str(s["path"])] = int(s["index"])
        by_path[os.path.abspath(str(s["path"]))] = int(s["index"])
    known = {int(s["index"]) for s in table}
    listing = "; ".join(f"[{s['index']}] {s['path']}" for s in table) or "none"
    out = []
    for v in sources:
        if isinstance(v, int | np.integer) and not isinstance(v, bool):
            if int(v) not in known:
                raise QueryError(f"source {v}: {store.path} has no such source (sources: {listing}).")
            out.append(int(v))
        elif isinstance(v, str | os.PathLike):
            key = str(v)
            if key.isdigit() and int(key) in known:
                out.append(int(key))
                continue
            hit = by_path.get(key, by_path.get(os.path.abspath(key)))
            if hit is None:
                names = [i for p, i in by_path.items() if Path(p).name == Path(key).name]
                if len(set(names)) == 1:
                    hit = names[0]
            if hit is None:
                raise QueryError(f"source {key}: not a source of {store.path} (sources: {listing}).")
            out.append(hit)
        else:
            raise QueryError(f"source {v!r}: expected a source index or path.")
    if not out:
        raise QueryError("sources is empty: give at least one source index or path, or None for all.")
    return tuple(sorted(set(out)))


def make_filter(
    store: Store, area: Area | None = None, area_crs: Any = None,
    sources: Iterable[int | str | os.PathLike[str]] | None = None,
) -> RowFilter | None:
    """A :class:`RowFilter` for ``area`` (in ``area_crs``, default WGS84) and ``sources``; None when there is
    neither, or when the filter keeps every stored row (:func:`keeps_every_row`)."""
    if area is None and sources is None:
        if area_crs is not None:
            raise QueryError("area_crs given without an area.")
        return None
    geom, crs = area_geometry(area, area_crs) if area is not None else (None, None)
    idx = source_indices(store, sources) if sources is not None else None
    where = RowFilter(geometry=geom, crs=crs, sources=idx)
    # A filter that keeps every row (e.g. an area around all the imagery) is no filter:
    # the pass then costs what an unfiltered one does.
    return None if keeps_every_row(store, where) else where


def filter_columns(store: Store, where: RowFilter | None) -> list[Any] | None:
    """The ``(lon, lat, source)`` dask columns a filtered pass reads, or None without a filter."""
    if where is None:
        return None
    return [store.column("lon"), store.column("lat"), store.column("source")]


def rows_where(store: Store, where: RowFilter) -> np.ndarray:
    """Rows of the store that ``where`` keeps (one distributed pass over lon/lat/source)."""
    import dask.array as da

    lon, lat, src = filter_columns(store, where) or []
    mask = da.map_blocks(where.mask, lon, lat, src, dtype=bool)
    return np.flatnonzero(mask.compute()).astype(np.int64)


def _footprint(src: dict[str, Any], crs: str | None) -> Any:
    """Source ``src``'s raster outline (densified) in ``crs`` (None: WGS84), or None without a CRS or
    where the transform fails."""
    import shapely
    from pyproj import Transformer

    if not src.get("crs"):
        return None
    a, b, c, d, e, f = (float(v) for v in src["transform"][:6])
    h, w = (float(v) for v in src["shape"][:2])
    ring = shapely.segmentize(shapely.box(0, 0, w, h).exterior, max(w, h) / 32)
    px = shapely.get_coordinates(ring)
    xs, ys = a * px[:, 0] + b * px[:, 1] + c, d * px[:, 0] + e * px[:, 1] + f
    t = Transformer.from_crs(src["crs"], crs or "EPSG:4326", always_xy=True)
    tx, ty = t.transform(xs, ys)
    pts = np.column_stack([tx, ty])
    return shapely.Polygon(pts) if np.isfinite(pts).all() else None


def _source_may_hold(src: dict[str, Any], where: RowFilter) -> bool:
    """False only when no window centre of ``src`` can lie in ``where``'s area (conservative)."""
    if where.geometry is None:
        return True
    if not src.get("crs"):
        return False  # no CRS: NaN lon/lat, never inside an area
    foot = _footprint(src, where.crs)
    if foot is None:
        return True
    minx, miny, maxx, maxy = foot.bounds
    margin = 0.02 * max(maxx - minx, maxy - miny) + 1e-9
    return bool(foot.buffer(margin).intersects(where.geometry))


def keeps_every_row(store: Store, where: RowFilter) -> bool:
    """True when ``where`` keeps every stored row: all sources, and an area that contains every
    source's whole raster outline (window centres lie at least half a tile inside it)."""
    indices = {int(s["index"]) for s in store.sources}
    if where.sources is not None and not indices <= set(where.sources):
        return False
    if where.geometry is None:
        return True
    for s in store.sources:
        foot = _footprint(s, where.crs)
        if foot is None or not where.geometry.contains(foot):
            return False
    return True


def candidate_blocks(store: Store, where: RowFilter | None, row_chunks: Sequence[int]) -> list[int] | None:
    """Row blocks that may hold rows ``where`` keeps (None: scan all).

    Uses only the sources table: a block is skipped when every row in it
    belongs to a source the filter excludes (not in ``sources``, or whose
    footprint, densified and widened by 2 %, does not meet the area). The
    rows inside the blocks that are scanned are still masked exactly.
    """
    if where is None:
        return None
    ranges = []
    for s in store.sources:
        if "rows" not in s:
            return None
        if where.sources is not None and int(s["index"]) not in where.sources:
            continue
        if _source_may_hold(s, where):
            ranges.append((int(s["rows"][0]), int(s["rows"][1])))
    out, start = [], 0
    for i, n in enumerate(row_chunks):
        if any(lo < start + n and hi > start for lo, hi in ranges):
            out.append(i)
        start += n
    return out
