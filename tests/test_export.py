"""Tests of ``dask_fp.export``: GeoJSON footprints (read back with geopandas and shapely)
and the mosaic PNG."""

from __future__ import annotations

import json

import dask
import numpy as np
import pandas as pd
import pytest

from dask_fp.export import DENSIFY, hits_geojson, mosaic, write_outputs
from dask_fp.search import Query, search
from dask_fp.tiling import window_rings

try:
    from ._search_helpers import raster_store
except ImportError:  # tests/ is not a package
    from _search_helpers import raster_store

SYNC = {"scheduler": "sync"}
COLUMNS, PANEL, CAPTION, PAD = 6, 192, 30, 6  # export.mosaic's layout


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two real 256 x 320 px rasters (64 px tiles, stride 32: 7 x 9 windows each):
    source 0 in EPSG:32617, source 1 without a CRS."""
    return raster_store(tmp_path_factory.mktemp("export"))


def _all_hits(built, **kw):
    """Every tile as a hit of one vector query (both sources, no dedup)."""
    vec = built.fingerprint.mean(axis=0)
    with dask.config.set(SYNC):
        return search(built.open(), queries=[Query("mean", vec)], k=len(built.fingerprint),
                      dedup=False, **kw)


def _expected_footprint(src, wy, wx, tile, stride):
    """The tile's corners in the source CRS (tiling.window_rings), reprojected with pyproj."""
    from pyproj import Transformer
    from shapely.geometry import Polygon

    ring = window_rings(tuple(src["transform"]), np.array([wy]), np.array([wx]), tile=tile,
                        stride=stride)[0]
    t = Transformer.from_crs(src["crs"], "EPSG:4326", always_xy=True)
    lon, lat = t.transform(ring[:, 0], ring[:, 1])
    return Polygon(np.stack([lon, lat], 1))


def test_geojson_footprints_are_valid_and_match_the_tiles(built, tmp_path):
    import geopandas
    from pyproj import Transformer
    from shapely.geometry import LinearRing, Point, Polygon, shape

    hits = _all_hits(built)
    files = write_outputs(hits, tmp_path)
    table = hits.table
    geo_rows = table[table["source"] == 0].reset_index(drop=True)
    assert len(geo_rows) == int((built.cols["source"] == 0).sum())

    gdf = geopandas.read_file(files["geojson"])
    assert gdf.crs.to_epsg() == 4326
    assert len(gdf) == len(geo_rows)
    assert set(gdf.geom_type) == {"Polygon"}
    assert gdf.is_valid.all()
    b = gdf.total_bounds
    assert -180 <= b[0] <= b[2] <= 180 and -90 <= b[1] <= b[3] <= 90
    assert -82 < b[0] < b[2] < -80 and 31 < b[1] < b[3] < 32.5  # UTM 17N near (-81, 31.6)

    raw = json.loads((tmp_path / "hits.geojson").read_text())
    assert raw["type"] == "FeatureCollection"
    src = built.open().sources[0]
    to_src = Transformer.from_crs("EPSG:4326", src["crs"], always_xy=True)
    for feat, (_, row) in zip(raw["features"], geo_rows.iterrows(), strict=True):
        ring = feat["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) == 4 * DENSIFY + 1  # closed, densified
        assert LinearRing(ring).is_ccw  # RFC 7946 exterior ring
        p = feat["properties"]
        keys = ("rank", "uid", "wy", "wx")
        assert [p[c] for c in keys] == [row[c] for c in keys]
        assert p["distance"] == pytest.approx(row["distance"]) and p["source"] == src["path"]
        assert p["query"] == 0 and p["query_label"] == "mean"
        got = shape(feat["geometry"])
        exp = _expected_footprint(src, int(row["wy"]), int(row["wx"]), 64, 32)
        # (coordinates are rounded to 1e-9 degrees, ~0.1 mm)
        assert got.symmetric_difference(exp).area < 1e-4 * exp.area
        assert got.hausdorff_distance(exp) < 1e-8  # degrees (~1 mm)
        assert got.contains(Point(row["lon"], row["lat"]))  # the stored centre is inside
        # Back in the source CRS, every densified point lies on the tile's edge (within 1 mm).
        tile_box = Polygon(window_rings(tuple(src["transform"]), np.array([row["wy"]]),
                                        np.array([row["wx"]]), tile=64, stride=32)[0])
        x, y = to_src.transform(*np.array(ring).T)
        off = [tile_box.exterior.distance(Point(a, b)) for a, b in zip(x, y, strict=True)]
        assert max(off) < 1e-3
        assert Polygon(np.stack([x, y], 1)).hausdorff_distance(tile_box) < 1e-3
    # geopandas read the same geometries
    for g, feat in zip(gdf.geometry, raw["features"], strict=True):
        assert g.equals_exact(shape(feat["geometry"]), 1e-12)
    assert list(gdf["uid"]) == list(geo_rows["uid"])


def test_sources_without_crs_go_to_the_pixels_file(built, tmp_path):
    from shapely.geometry import box, shape

    hits = _all_hits(built)
    files = write_outputs(hits, tmp_path)
    assert files["geojson_pixels"] == str(tmp_path / "hits-pixels.geojson")
    pix = json.loads((tmp_path / "hits-pixels.geojson").read_text())
    rows = hits.table[hits.table["source"] == 1].reset_index(drop=True)
    assert len(pix["features"]) == len(rows) == int((built.cols["source"] == 1).sum())
    geo = json.loads((tmp_path / "hits.geojson").read_text())
    geo_uids = {f["properties"]["uid"] for f in geo["features"]}
    assert geo_uids.isdisjoint(rows["uid"])
    for feat, (_, row) in zip(pix["features"], rows.iterrows(), strict=True):
        g = shape(feat["geometry"])
        assert g.is_valid and feat["properties"]["uid"] == row["uid"]
        r0, c0 = row["wy"] * 32, row["wx"] * 32
        assert g.equals(box(c0, r0, c0 + 64, r0 + 64))  # (column, row) pixels of the source
    # The dict returned is the WGS84 collection only.
    fc = hits_geojson(hits)
    assert fc == json.loads((tmp_path / "hits.geojson").read_text())


def test_no_pixels_file_when_every_hit_has_a_crs(built, tmp_path):
    b = raster_store(tmp_path / "geo", crs=("EPSG:32617",), size=(192, 192), seed=5)
    with dask.config.set(SYNC):
        hits = search(b.open(), uids=[int(b.cols["uid"][3])], k=4)
    assert "geojson_pixels" in write_outputs(_all_hits(built), tmp_path / "out")  # an earlier run
    files = write_outputs(hits, tmp_path / "out")
    assert "geojson_pixels" not in files and not (tmp_path / "out" / "hits-pixels.geojson").exists()
    assert len(json.loads((tmp_path / "out" / "hits.geojson").read_text())["features"]) == 4
    csv = pd.read_csv(files["csv"])
    assert list(csv["uid"]) == list(hits.table["uid"]) and list(csv["rank"]) == [1, 2, 3, 4]


def _layout(n_panels):
    ncol = min(COLUMNS, n_panels)
    nrow = -(-n_panels // ncol)
    return ncol * (PANEL + PAD) + PAD, nrow * (PANEL + CAPTION + PAD) + PAD


def _panel(img, i):
    x0 = PAD + (i % COLUMNS) * (PANEL + PAD)
    y0 = PAD + (i // COLUMNS) * (PANEL + CAPTION + PAD)
    return img[y0 : y0 + PANEL, x0 : x0 + PANEL], (x0, y0)


def _resized(tile):
    from PIL import Image

    return np.asarray(Image.fromarray(tile).resize((PANEL, PANEL), Image.Resampling.BILINEAR))


@pytest.mark.parametrize("k", [1, 3, 7])
def test_mosaic_has_k_plus_one_panels(built, tmp_path, k):
    import rasterio
    from PIL import Image
    from rasterio.windows import Window

    own_row = built.row_of(0, 3, 4)
    with dask.config.set(SYNC):
        hits = search(built.open(), uids=[int(built.cols["uid"][own_row])], k=k)
    assert len(hits) == k
    out = mosaic(hits, 0, tmp_path / "sub" / "m.png")
    img = np.asarray(Image.open(out).convert("RGB"))
    assert (img.shape[1], img.shape[0]) == _layout(k + 1)
    sources = {s["index"]: s["path"] for s in built.open().sources}

    def tile(source, wy, wx):
        with rasterio.open(sources[source]) as ds:
            return ds.read(window=Window(wx * 32, wy * 32, 64, 64)).transpose(1, 2, 0)

    panel0, (x0, y0) = _panel(img, 0)
    np.testing.assert_array_equal(panel0, _resized(tile(0, 3, 4)))  # the query's own tile
    assert tuple(img[y0 + 50, x0 - 2]) == (30, 90, 220)  # framed in blue
    for i, r in enumerate(hits.table.itertuples(index=False), start=1):
        got, (x0, y0) = _panel(img, i)
        np.testing.assert_array_equal(got, _resized(tile(r.source, r.wy, r.wx)))
        assert tuple(img[y0 + 50, x0 - 2]) == (255, 255, 255)
        caption = img[y0 + PANEL : y0 + PANEL + CAPTION, x0 : x0 + PANEL]
        assert (caption < 128).any()  # rank and distance are written under the panel


def test_mosaic_of_a_vector_query_and_of_an_image_query(built, tmp_path):
    from PIL import Image

    vec = built.fingerprint[0]
    pix = np.full((64, 64, 3), 77, np.uint8)
    with dask.config.set(SYNC):
        hits = search(built.open(), queries=[Query("v", vec), Query("img", vec, None, pix)], k=2)
    files = write_outputs(hits, tmp_path)
    assert files["mosaics"] == [str(tmp_path / "mosaic-0.png"), str(tmp_path / "mosaic-1.png")]
    a = np.asarray(Image.open(files["mosaics"][0]).convert("RGB"))
    b = np.asarray(Image.open(files["mosaics"][1]).convert("RGB"))
    assert (a.shape[1], a.shape[0]) == (b.shape[1], b.shape[0]) == _layout(3)
    assert (_panel(a, 0)[0] == 0).all()  # no pixels to show: a black panel
    assert (_panel(b, 0)[0] == 77).all()  # the query picture


def test_mosaic_of_a_combined_query_and_a_classifier_shows_the_first_positive(built, tmp_path):
    import rasterio
    from PIL import Image
    from rasterio.windows import Window

    from dask_fp import classify

    uid = built.cols["uid"]
    pos = [int(uid[built.row_of(0, 3, 4)]), int(uid[built.row_of(0, 1, 1)])]
    neg = [int(uid[built.row_of(0, 5, 7)])]
    with dask.config.set(SYNC):
        combined = search(built.open(), positives=pos, negatives=neg, k=3)
        scored = classify(built.open(), positives=pos, negatives=neg, k=3)
    with rasterio.open(built.open().sources[0]["path"]) as ds:  # the first positive's pixels, read here
        first = ds.read(window=Window(1 * 32, 1 * 32, 64, 64)).transpose(1, 2, 0)
    # the first positive is the lowest stored row among the positives: window (1, 1)
    for hits, name in ((combined, "c.png"), (scored, "s.png")):
        img = np.asarray(Image.open(mosaic(hits, 0, tmp_path / name)).convert("RGB"))
        np.testing.assert_array_equal(_panel(img, 0)[0], _resized(first))
