"""Tests of ``dask_fp.places``: dissolved hit polygons (against an independent union-find +
shapely oracle), GeoJSON / GeoParquet read back with geopandas, and score COGs opened with
rasterio (geotransform, values at known windows, tiling and overviews)."""

from __future__ import annotations

import dask
import numpy as np
import pandas as pd
import pytest

from dask_fp.hits import Hits
from dask_fp.places import dissolve, places, raster_transform, score_grid, score_rasters, write_places
from dask_fp.search import Query, search

try:
    from ._search_helpers import UTM17_TRANSFORM, raster_store
except ImportError:  # tests/ is not a package
    from _search_helpers import UTM17_TRANSFORM, raster_store

geopandas = pytest.importorskip("geopandas")
pytest.importorskip("pyarrow")
SYNC = {"scheduler": "sync"}
TILE, STRIDE = 64, 32  # raster_store's defaults: 256 x 320 px -> 7 x 9 windows per source

# Windows of one query in source 0 (UTM) and 1 (no CRS): overlapping (0,0)-(0,1)-(1,1);
# edge-adjacent (5,6)-(5,8) (64 px apart = one tile: they share an edge); (3,3) touches (1,1)
# only at a corner, so it is a place of its own; (0,5) is alone.
WINDOWS = [(0, 0), (0, 1), (1, 1), (5, 6), (5, 8), (3, 3), (0, 5)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return raster_store(tmp_path_factory.mktemp("places"))


def _hits(built, windows=WINDOWS, sources=(0, 1), score=None):
    """A Hits whose table lists ``windows`` of each source for one query, distances 1, 2, ..."""
    st = built.open()
    with dask.config.set(SYNC):
        full = search(st, queries=[Query("q", built.fingerprint[0])], k=len(built.fingerprint), dedup=False,
                      include_self=True)
    t = full.table
    parts = []
    for s in sources:
        for i, (wy, wx) in enumerate(windows):
            parts.append(t[(t.source == s) & (t.wy == wy) & (t.wx == wx)].assign(distance=float(i + 1 + 10 * s)))
    table = pd.concat(parts, ignore_index=True)
    table["rank"] = np.arange(1, len(table) + 1)
    if score is not None:
        table["score"] = score(table)
        table["distance"] = np.nan
        return Hits(table, full.queries, st, rank_by="score")
    return Hits(table, full.queries, st)


def _groups(windows):
    """Oracle: connected groups of windows whose footprints share more than a corner (union-find)."""
    parent = list(range(len(windows)))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i, (a, b) in enumerate(windows):
        for j, (c, d) in enumerate(windows[:i]):
            dy, dx = abs(a - c) * STRIDE, abs(b - d) * STRIDE
            if dy <= TILE and dx <= TILE and not (dy == TILE and dx == TILE):
                parent[root(i)] = root(j)
    out: dict[int, list[int]] = {}
    for i in range(len(windows)):
        out.setdefault(root(i), []).append(i)
    return list(out.values())


def _utm_box(wy, wx):
    from shapely.geometry import box

    a, _, c, _, e, f = UTM17_TRANSFORM
    x0, y0 = c + a * wx * STRIDE, f + e * wy * STRIDE
    return box(x0, y0 + e * TILE, x0 + a * TILE, y0)


def test_dissolve_kernel_merges_overlap_and_edges_not_corners():
    from shapely.geometry import box

    rings = np.array([np.array(box(x, y, x + 2, y + 2).exterior.coords)[:5]
                      for x, y in [(0, 0), (1, 0), (3, 0), (5, 2), (9, 9)]])
    parts = dissolve(rings)
    assert [round(p.area, 9) for p in parts] == [10.0, 4.0, 4.0]  # (0..5 x 0..2), corner-touching, alone
    assert all(p.geom_type == "Polygon" for p in parts)


def test_places_match_an_independent_dissolve(built):
    import shapely
    from pyproj import Transformer
    from shapely.ops import unary_union

    hits = _hits(built)
    geo, pix = places(hits)
    groups = _groups(WINDOWS)
    assert len(groups) == 4 and len(geo) == 4 and len(pix) == 4
    assert geo.crs.to_epsg() == 4326 and pix.crs is None
    to_wgs = Transformer.from_crs("EPSG:32617", "EPSG:4326", always_xy=True).transform
    for g in groups:
        union = unary_union([_utm_box(*WINDOWS[i]) for i in g])
        dists = [float(i + 1) for i in g]
        row = geo[geo.best == min(dists)].iloc[0]
        assert row.n_tiles == len(g) and row.measure == "distance"
        assert row["mean"] == pytest.approx(np.mean(dists))
        assert row.area_m2 == pytest.approx(union.area, rel=1e-12)  # UTM metres
        expected = shapely.transform(union.segmentize(1.0), lambda xy: np.stack(to_wgs(xy[:, 0], xy[:, 1]), 1))
        assert row.geometry.is_valid
        assert row.geometry.hausdorff_distance(expected) < 2e-9  # output rounded to 1e-9 degrees
        assert row.geometry.symmetric_difference(expected).area < 1e-4 * expected.area
        uids = [int(u) for u in row.uids.split()]
        assert len(uids) == len(g) and uids[0] == row.best_uid
        # the pixel places of the CRS-less source: the same shapes in (column, row) pixels
        prow = pix[pix.best == min(dists) + 10].iloc[0]
        assert prow.n_tiles == len(g) and np.isnan(prow.area_m2)
        assert prow.geometry.area == pytest.approx(union.area / 0.25)  # 0.5 m pixels
    assert list(geo.best) == sorted(geo.best)  # best places first


def test_places_of_a_classifier_rank_by_score(built):
    hits = _hits(built, sources=(0,), score=lambda t: 1.0 - t["wx"].to_numpy() / 100.0)
    geo, _ = places(hits)
    assert set(geo.measure) == {"score"}
    assert list(geo.best) == sorted(geo.best, reverse=True)
    top = geo.iloc[0]
    assert top.best == pytest.approx(1.0) and top.n_tiles == 3  # (0,0) has wx = 0


def test_geojson_and_geoparquet_read_back(built, tmp_path):
    hits = _hits(built)
    files = write_places(hits, tmp_path)
    geo, pix = places(hits)
    for key, ref in (("places_geoparquet", geo), ("places-pixels_geoparquet", pix)):
        back = geopandas.read_parquet(files[key])
        assert list(back.columns) == list(ref.columns)
        assert (back.crs is None) == (ref.crs is None)
        assert back.geometry.geom_equals_exact(ref.geometry, tolerance=0).all()
        pd.testing.assert_frame_equal(pd.DataFrame(back.drop(columns="geometry")),
                                      pd.DataFrame(ref.drop(columns="geometry")))
    gj = geopandas.read_file(files["places_geojson"])
    assert gj.crs.to_epsg() == 4326 and len(gj) == len(geo)
    assert gj.geometry.geom_equals_exact(geo.geometry, tolerance=1e-9).all()
    assert list(gj.n_tiles) == list(geo.n_tiles)
    # a second run without CRS-less hits removes the stale pixel files
    files2 = write_places(_hits(built, sources=(0,)), tmp_path)
    assert "places-pixels_geojson" not in files2 and not (tmp_path / "places-pixels.parquet").exists()


def test_score_raster_geotransform_values_and_cog_layout(built, tmp_path):
    import rasterio
    from affine import Affine

    hits = _hits(built)
    paths = score_rasters(hits, tmp_path)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["scores-q0-s0.tif", "scores-q0-s1.tif"]
    with rasterio.open(paths[0]) as r:
        assert (r.height, r.width) == (7, 9) and r.dtypes == ("float32",) and r.crs.to_epsg() == 32617
        # pixel size = stride in metres; the outer corner = first window centre - half a stride
        a, _, c, _, e, f = UTM17_TRANSFORM
        assert r.transform == Affine(a * STRIDE, 0, c + a * (TILE - STRIDE) / 2, 0, e * STRIDE,
                                     f + e * (TILE - STRIDE) / 2)
        grid = r.read(1)
        assert np.isnan(r.nodata)
        assert r.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert r.tags()["measure"] == "distance"
    t0 = hits.table[hits.table.source == 0]
    for row in t0.itertuples():
        assert grid[row.wy, row.wx] == np.float32(row.distance)
        # the pixel's centre is the window's centre stored in the store (x, y)
        cx, cy = r.transform * (row.wx + 0.5, row.wy + 0.5)
        assert (cx, cy) == pytest.approx((row.x, row.y), abs=1e-6)
    mask = np.zeros(grid.shape, bool)
    mask[t0.wy, t0.wx] = True
    assert np.isnan(grid[~mask]).all() and np.isfinite(grid[mask]).all()
    with rasterio.open(paths[1]) as r:
        assert r.crs is None and r.transform == Affine(*raster_transform((1, 0, 0, 0, 1, 0), tile=TILE,
                                                                         stride=STRIDE))


def test_score_raster_of_a_large_grid_is_tiled_with_overviews(tmp_path):
    import rasterio

    # 256 x 320 px, 64 px tiles at stride 2: a 97 x 129 window grid (12,513 tiles)
    big = raster_store(tmp_path / "big", crs=("EPSG:32617",), tile=64, stride=2)
    st = big.open()
    with dask.config.set(SYNC):
        hits = search(st, queries=[Query("q", big.fingerprint[0])], k=2000, dedup=False, include_self=True)
    (path,) = score_rasters(hits, tmp_path / "out", blocksize=128)
    with rasterio.open(path) as r:
        assert (r.height, r.width) == (97, 129)
        assert r.block_shapes == [(128, 128)] and r.profile["tiled"]
        assert r.overviews(1) == [2]  # GDAL adds levels until one fits in a 128 px block
        assert r.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        full = r.read(1)
    assert np.isfinite(full).sum() == 2000
    expected = score_grid(hits.table, (97, 129), "distance")
    np.testing.assert_array_equal(full, expected)


def test_write_outputs_includes_places_and_rasters(built, tmp_path):
    from dask_fp.export import write_outputs

    files = write_outputs(_hits(built, sources=(0,)), tmp_path)
    assert {"places_geojson", "places_geoparquet", "score_rasters"} <= set(files)
    assert [p.rsplit("/", 1)[1] for p in files["score_rasters"]] == ["scores-q0-s0.tif"]


def test_hits_methods_on_a_real_search(built, tmp_path):
    """The README's calls: a k-NN search with overlapping hits kept, as places and rasters."""
    st = built.open()
    uid = int(st.coords()["uid"][10])
    with dask.config.set(SYNC):
        hits = search(st, uids=[uid], k=20, dedup=False)
    gdf = hits.to_polygons()
    assert gdf.crs.to_epsg() == 4326 and gdf["n_tiles"].sum() == int((hits.table.source == 0).sum())
    back = geopandas.read_parquet(hits.to_geoparquet(tmp_path / "p.parquet"))
    assert len(back) == len(gdf) and back.geometry.geom_equals_exact(gdf.geometry, tolerance=0).all()
    assert len(hits.score_raster(tmp_path / "s")) == hits.table["source"].nunique()


def test_classifier_hits_give_probability_places_and_rasters(built, tmp_path):
    import rasterio

    from dask_fp import classify

    st = built.open()
    uids = st.coords()["uid"]
    with dask.config.set(SYNC):
        hits = classify(st, positives=[int(u) for u in uids[:3]], negatives=[int(u) for u in uids[-3:]], k=15)
    geo, pix = places(hits)
    assert set(geo.measure) | set(pix.measure) == {"score"}
    assert geo["n_tiles"].sum() + pix["n_tiles"].sum() == len(hits.table)
    assert ((geo.best >= 0) & (geo.best <= 1)).all()
    paths = score_rasters(hits, tmp_path)
    with rasterio.open(paths[0]) as r:
        grid = r.read(1)
        assert r.tags()["measure"] == "score"
    t = hits.table[hits.table.source == int(paths[0].rsplit("-s", 1)[1][:-4])]
    np.testing.assert_array_equal(grid[t.wy, t.wx], t.score.to_numpy(np.float32))
