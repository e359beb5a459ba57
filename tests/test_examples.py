"""Tests of many-example queries (positives/negatives) and area/source filters.

Oracles are independent numpy/shapely brute force: the Rocchio vector is
computed here from the written fingerprints, distances by
``_search_helpers.brute_knn``, and area membership point by point with
``shapely.Point.intersects`` after a pyproj transform. Integer fingerprints
and 4 positives / 2 negatives make every float32 distance exact.
"""

from __future__ import annotations

import json

import dask
import numpy as np
import pytest
import shapely
from pyproj import Transformer
from shapely.geometry import Point, box

from dask_fp import classify, search
from dask_fp.errors import QueryError
from dask_fp.examples import combined_query, rocchio
from dask_fp.kernels import RowFilter, knn_chunk, knn_merge
from dask_fp.tiling import windows_overlap

try:
    from ._search_helpers import UTM17, SourceSpec, brute_knn, build_store
except ImportError:  # tests/ is not a package
    from _search_helpers import UTM17, SourceSpec, brute_knn, build_store

# --------------------------------------------------------------------------- oracles


def inside(geom, lon, lat, crs=None):
    """Point-by-point membership (boundary included), after transforming lon/lat to ``crs``."""
    x, y = np.asarray(lon), np.asarray(lat)
    if crs is not None:
        x, y = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(x, y)
    return np.array([bool(np.isfinite(a) and np.isfinite(b) and Point(a, b).intersects(geom))
                     for a, b in zip(x, y, strict=True)], dtype=bool)


def brute_ranked(fp, q, allowed):
    """All allowed rows ranked for one query by (squared distance, row), float64."""
    rows = np.flatnonzero(allowed)
    d, r = brute_knn(fp[rows], q[None], len(rows), rows=rows)
    return d[0], r[0]


# --------------------------------------------------------------------------- store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A UTM 17N source (some windows dropped) and a source without a CRS; 37-row chunks (uneven)."""
    rng = np.random.default_rng(21)
    keep0 = rng.random((19, 25)) > 0.1
    sources = [SourceSpec(shape=(640, 832), keep=keep0, path="a.tif"),
               SourceSpec(shape=(320, 384), crs=None, transform=(1, 0, 0, 0, 1, 0), path="b.tif")]
    return build_store(tmp_path_factory.mktemp("examples") / "store", sources, dim=12, rows_per_chunk=37,
                       seed=21)


def _rows(built, source, n, rng):
    return sorted(rng.choice(np.flatnonzero(built.cols["source"] == source), n, replace=False).tolist())


# --------------------------------------------------------------------------- kernels (no Dask)


def test_row_filter_mask_matches_pointwise_oracle():
    rng = np.random.default_rng(0)
    lon = rng.uniform(-81.2, -80.8, 500)
    lat = rng.uniform(31.5, 31.8, 500)
    lon[:5] = np.nan
    lat[:5] = np.nan
    src = rng.integers(0, 3, 500).astype(np.int32)
    poly = shapely.Polygon([(-81.1, 31.55), (-80.9, 31.6), (-80.95, 31.75), (-81.15, 31.7)])
    # the same area in UTM 17N: the test transforms the centres, not the polygon
    utm = box(480_000, 3_500_000, 500_000, 3_520_000)
    lon[5], lat[5] = -80.9, 31.6  # a centre on a vertex of the polygon counts as inside
    rect = box(-81.1, 31.55, -80.9, 31.75)  # rectangles take a comparison path, not shapely's
    lon[6], lat[6] = -81.1, 31.6  # on its left edge: inside
    lon[7], lat[7] = -81.1000001, 31.6  # just outside
    for f, exp in [
        (RowFilter(geometry=rect), inside(rect, lon, lat)),
        (RowFilter(geometry=poly), inside(poly, lon, lat)),
        (RowFilter(geometry=utm, crs=UTM17), inside(utm, lon, lat, UTM17)),
        (RowFilter(sources=(0, 2)), np.isin(src, [0, 2])),
        (RowFilter(geometry=poly, sources=(1,)), inside(poly, lon, lat) & (src == 1)),
    ]:
        got = f.mask(lon, lat, src)
        np.testing.assert_array_equal(got, exp)
    assert inside(poly, lon, lat)[5] and not shapely.contains_xy(poly, lon[5], lat[5])
    assert 0 < inside(poly, lon, lat).sum() < 495


def test_knn_chunk_with_filter_equals_brute_force_over_kept_rows():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 4, (200, 6)).astype(np.float32)
    q = rng.integers(0, 4, (3, 6)).astype(np.float32)
    lon, lat = rng.uniform(0, 1, 200), rng.uniform(0, 1, 200)
    src = rng.integers(0, 2, 200).astype(np.int32)
    f = RowFilter(geometry=box(0.2, 0.1, 0.7, 0.8), sources=(1,))
    keep = inside(f.geometry, lon, lat) & (src == 1)
    rows = np.arange(1000, 1200)
    n2 = (x * x).sum(1)
    parts = [knn_chunk((x[a:b], n2[a:b, None], rows[a:b, None], lon[a:b, None], lat[a:b, None],
                        src[a:b, None]), q=q, qnorm2=(q * q).sum(1), m=9, where=f)
             for a, b in [(0, 13), (13, 14), (14, 150), (150, 200)]]
    d, r = knn_merge(parts, m=9)
    ed, er = brute_knn(x[keep], q, 9, rows=rows[keep])
    np.testing.assert_array_equal(r, er)
    np.testing.assert_array_equal(d, ed.astype(np.float32))
    # a filter that keeps nothing: empty candidate lists, not an error
    none = knn_chunk((x, n2[:, None], rows[:, None], lon[:, None], lat[:, None], src[:, None]), q=q,
                     qnorm2=(q * q).sum(1), m=5, where=RowFilter(sources=(7,)))
    assert none[0].shape == none[1].shape == (3, 0)


def test_rocchio_rule():
    p = np.array([[0.0, 4], [2, 0], [4, 4], [2, 0]])
    n = np.array([[0.0, 0], [4, 0]])
    # mean(P) = (2, 2); mean(N) = (2, 0); q = (2, 2) + 0.5 * (0, 2)
    np.testing.assert_array_equal(rocchio(p, n), [2, 3])
    np.testing.assert_array_equal(rocchio(p, n[:0]), [2, 2])
    np.testing.assert_array_equal(rocchio(p, n, beta=0), [2, 2])


# --------------------------------------------------------------------------- combined queries


def test_positives_and_negatives_by_uid_match_brute_force(client, store):
    st = store.open()
    fp = store.fingerprint
    rng = np.random.default_rng(2)
    prow, nrow = _rows(store, 0, 4, rng), _rows(store, 1, 2, rng)
    uid = store.cols["uid"]
    with dask.config.set(scheduler=client):
        hits = search(st, positives=[int(uid[r]) for r in prow], negatives=[int(uid[r]) for r in nrow],
                      k=15, dedup=False, split_every=3)
    q = fp[prow].mean(0) + 0.5 * (fp[prow].mean(0) - fp[nrow].mean(0))
    allowed = np.ones(len(fp), bool)
    allowed[prow + nrow] = False  # labelled tiles are excluded
    d, r = brute_ranked(fp, q, allowed)
    t = hits.table
    assert set(t["label"]) == {"4 positives, 2 negatives"} and len(hits.queries) == 1
    np.testing.assert_array_equal(t["row"], r[:15])
    np.testing.assert_array_equal(t["distance"], d[:15].astype(np.float32))
    np.testing.assert_array_equal(t["uid"], uid[r[:15]])
    assert t["score"].isna().all() and hits.rank_by == "distance"


def test_combined_query_in_a_batch_is_one_pass(store):
    st = store.open()
    fp = store.fingerprint
    uid = store.cols["uid"]
    hits = search(st, uids=[int(uid[3])], positives=[int(uid[10]), int(uid[20])], k=4, dedup=False)
    assert [q.label for q in hits.queries] == [f"uid {int(uid[3])}", "2 positives"]
    allowed = np.ones(len(fp), bool)
    allowed[[10, 20]] = False
    d, r = brute_ranked(fp, fp[[10, 20]].mean(0), allowed)
    np.testing.assert_array_equal(hits.for_query(1)["row"], r[:4])


def test_dedup_drops_tiles_overlapping_any_labelled_tile(store):
    st = store.open()
    uid = store.cols["uid"]
    labelled = [5, 60, 200]
    hits = search(st, positives=[int(uid[r]) for r in labelled[:2]], negatives=[int(uid[labelled[2]])], k=12)
    t = hits.table
    assert len(t) == 12
    tl = store.tiling
    for r in labelled:
        s, y, x = store.cols["source"][r], store.cols["wy"][r], store.cols["wx"][r]
        same = t["source"].to_numpy() == s
        ov = windows_overlap(t["wy"].to_numpy(), t["wx"].to_numpy(), y, x, tile=tl.tile, stride=tl.stride)
        assert not (same & ov).any()


def test_polygon_point_and_vector_file_examples(store, tmp_path):
    import geopandas as gpd

    st = store.open()
    fp = store.fingerprint
    lon, lat = store.cols["lon"], store.cols["lat"]
    a = np.flatnonzero(store.cols["source"] == 0)
    # a polygon around a handful of tile centres of source 0
    c = np.array([lon[a[40]], lat[a[40]]])
    poly = box(c[0] - 2e-4, c[1] - 2e-4, c[0] + 2e-4, c[1] + 2e-4)
    in_poly = np.flatnonzero(inside(poly, lon, lat))
    assert 2 <= len(in_poly) <= 30
    pt_row = int(a[300])
    point = (float(lon[pt_row]), float(lat[pt_row]))
    neg_row = int(a[100])
    exp_q = combined_query(st, [poly, point], [int(store.cols["uid"][neg_row])]).vector
    pos_rows = np.union1d(in_poly, [pt_row])
    oracle_q = fp[pos_rows].mean(0) + 0.5 * (fp[pos_rows].mean(0) - fp[neg_row])
    np.testing.assert_allclose(exp_q, oracle_q, rtol=1e-6)
    # the same examples as a GeoJSON file (WGS84) and as a GeoPackage in UTM
    gj = tmp_path / "pos.geojson"
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": shapely.geometry.mapping(g), "properties": {}}
        for g in (poly, Point(point))]}))
    gpkg = tmp_path / "pos.gpkg"
    gpd.GeoDataFrame(geometry=[poly, Point(point)], crs="EPSG:4326").to_crs(UTM17).to_file(gpkg)
    for f in (gj, gpkg):
        hits = search(st, positives=[f], negatives=[int(store.cols["uid"][neg_row])], k=5, dedup=False)
        q = combined_query(st, [f], [int(store.cols["uid"][neg_row])])
        np.testing.assert_allclose(q.vector, oracle_q, rtol=1e-5, atol=1e-5)
        assert hits.queries[0].label == f"{len(pos_rows)} positives, 1 negative"
        assert not set(hits.table["row"]) & set(pos_rows.tolist())


# --------------------------------------------------------------------------- area and source filters


@pytest.mark.parametrize("kind", ["bbox", "utm-polygon", "sources", "bbox+sources", "file"])
def test_filtered_search_equals_brute_force_over_filtered_rows(client, store, tmp_path, kind):
    st = store.open()
    fp = store.fingerprint
    lon, lat, src = store.cols["lon"], store.cols["lat"], store.cols["source"]
    a = np.flatnonzero(src == 0)
    lo, la = lon[a], lat[a]
    bbox = (float(np.quantile(lo, 0.2)), float(np.quantile(la, 0.3)), float(np.quantile(lo, 0.6)),
            float(np.quantile(la, 0.9)))
    utm = shapely.Polygon([(500_030, 3_499_800), (500_300, 3_499_900), (500_200, 3_499_700),
                           (500_060, 3_499_690)])
    kw: dict = {}
    if kind == "bbox":
        kw, allowed = {"area": bbox}, inside(box(*bbox), lon, lat)
    elif kind == "utm-polygon":
        kw, allowed = {"area": utm, "area_crs": UTM17}, inside(utm, lon, lat, UTM17)
    elif kind == "sources":
        kw, allowed = {"sources": ["b.tif"]}, src == 1
    elif kind == "bbox+sources":
        kw, allowed = {"area": bbox, "sources": [0]}, inside(box(*bbox), lon, lat) & (src == 0)
    else:
        f = tmp_path / "area.geojson"
        f.write_text(json.dumps({"type": "Feature", "properties": {},
                                 "geometry": shapely.geometry.mapping(box(*bbox))}))
        kw, allowed = {"area": str(f)}, inside(box(*bbox), lon, lat)
    assert 5 < allowed.sum() < len(fp) - 5
    rng = np.random.default_rng(4)
    qv = rng.integers(0, 4, fp.shape[1]).astype(np.float32)
    from dask_fp.search import Query

    with dask.config.set(scheduler=client):
        hits = search(st, [Query("v", qv)], k=10, dedup=False, **kw)
    d, r = brute_ranked(fp, qv, allowed)
    np.testing.assert_array_equal(hits.table["row"], r[:10])
    np.testing.assert_array_equal(hits.table["distance"], d[:10].astype(np.float32))


def test_a_filter_that_keeps_every_row_is_dropped(client, tmp_path):
    """An area containing every source's whole raster, with all sources, filters nothing: make_filter
    gives None (the pass runs unfiltered); an area that misses one window centre stays a filter."""
    from dask_fp.filters import make_filter
    from dask_fp.search import Query

    built = build_store(tmp_path / "s", [SourceSpec(shape=(640, 832), path="a.tif"),
                                         SourceSpec(shape=(320, 384), path="c.tif",
                                                    transform=(0.5, 0.0, 500_600.0, 0.0, -0.5, 3_500_000.0))],
                        dim=12, rows_per_chunk=37, seed=5)
    st = built.open()
    lon, lat = built.cols["lon"], built.cols["lat"]
    x, y = Transformer.from_crs("EPSG:4326", UTM17, always_xy=True).transform(lon, lat)
    around = box(x.min() - 400, y.min() - 400, x.max() + 400, y.max() + 400)  # beyond half a tile of margin
    assert make_filter(st, around, UTM17) is None
    assert make_filter(st, around, UTM17, sources=[0, 1]) is None
    assert make_filter(st, around, UTM17, sources=[0]) is not None  # drops source 1
    tight = box(x.min(), y.min(), x.max() - 1e-3, y.max())  # misses the right-most centres
    f = make_filter(st, tight, UTM17)
    assert f is not None and 0 < (~f.mask(lon, lat, built.cols["source"])).sum() < len(lon)
    qv = np.random.default_rng(2).integers(0, 4, 12).astype(np.float32)
    with dask.config.set(scheduler=client):
        a = search(st, [Query("v", qv)], k=10, dedup=False, area=around, area_crs=UTM17)
        b = search(st, [Query("v", qv)], k=10, dedup=False)
    np.testing.assert_array_equal(a.table["row"], b.table["row"])


def test_filter_keeping_fewer_than_k_returns_them_all(store):
    st = store.open()
    fp = store.fingerprint
    lon, lat = store.cols["lon"], store.cols["lat"]
    r0 = int(np.flatnonzero(store.cols["source"] == 0)[50])
    area = box(lon[r0] - 1e-5, lat[r0] - 1e-5, lon[r0] + 1e-5, lat[r0] + 1e-5)
    allowed = inside(area, lon, lat)
    assert allowed.sum() == 1
    from dask_fp.search import Query

    hits = search(st, [Query("v", fp[0])], k=10, area=area, dedup=False)
    assert hits.table["row"].tolist() == [r0]


# --------------------------------------------------------------------------- bad input


def test_bad_examples_and_areas_are_query_errors(store, tmp_path):
    st = store.open()
    uid = int(store.cols["uid"][3])
    from dask_fp.search import Query

    q = [Query("v", store.fingerprint[0])]
    cases = [
        (dict(negatives=[uid]), "positives is empty"),
        (dict(positives=[123456789]), "is not in"),
        (dict(positives=[uid], negatives=[uid]), "both positive and negative"),
        (dict(positives=[(-300.0, 10.0)]), "longitude,latitude"),
        (dict(positives=[True]), "not an example"),
        (dict(positives=[shapely.LineString([(0, 0), (1, 1)])]), "neither a point nor a polygon"),
        (dict(positives=[box(10, 10, 11, 11)]), "holds no stored tile centre"),
        (dict(positives=[str(tmp_path / "missing.geojson")]), "no such file"),
        (dict(queries=q, area=(500_000, 3_499_000, 501_000, 3_500_000)), "not longitudes/latitudes"),
        (dict(queries=q, area=(0, 0, 1, 1), area_crs="EPSG:999999"), "not a CRS pyproj knows"),
        (dict(queries=q, area=(1e9, 1e9, 2e9, 2e9), area_crs=UTM17), "outside the area where"),
        (dict(queries=q, area=(10, 10, 11, 11)), "no stored tile centre"),
        (dict(queries=q, area=(2, 2, 1, 1)), "minx <= maxx"),
        (dict(queries=q, area=Point(0, 0)), "has no area"),
        (dict(queries=q, sources=["nope.tif"]), "not a source"),
        (dict(queries=q, sources=[5]), "no such source"),
        (dict(queries=q, sources=[]), "sources is empty"),
    ]
    for kw, msg in cases:
        with pytest.raises(QueryError, match=msg):
            search(st, **kw)
    for kw, msg in [
        (dict(positives=[uid], negatives=[int(store.cols["uid"][9])], threshold=1.5), "from 0 to 1"),
        (dict(positives=[uid], negatives=[int(store.cols["uid"][9])], threshold=-0.1), "from 0 to 1"),
        (dict(positives=[uid], negatives=[int(store.cols["uid"][9])]), "needs k"),
        (dict(positives=[uid], negatives=[], k=5), "at least one positive and one negative"),
        (dict(positives=[uid], negatives=[int(store.cols["uid"][9])], k=0), "k must be"),
    ]:
        with pytest.raises(QueryError, match=msg):
            classify(st, **kw)


# --------------------------------------------------------------------------- feedback session


def test_session_feedback_loop_and_labels_round_trip(store, tmp_path):
    from dask_fp import SearchSession, read_labels

    st = store.open()
    fp = store.fingerprint
    uid, lon, lat, src = store.cols["uid"], store.cols["lon"], store.cols["lat"], store.cols["source"]
    a = np.flatnonzero(src == 0)
    b = np.flatnonzero(src == 1)
    poly = box(lon[a[40]] - 2e-4, lat[a[40]] - 2e-4, lon[a[40]] + 2e-4, lat[a[40]] + 2e-4)
    in_poly = np.flatnonzero(inside(poly, lon, lat))
    s = SearchSession(st).add(positives=[int(uid[a[5]]), (float(lon[a[300]]), float(lat[a[300]])), poly],
                              negatives=[int(uid[b[3]])])
    h1 = s.search(k=6, dedup=False)
    # mark hits 1 and 2 positive, 3 negative; the next query uses them, and they leave the hits
    s.add_hits(h1, [1, 2]).add_hits(h1, [3], positive=False)
    h2 = s.search(k=6, dedup=False)
    prow = np.union1d(np.union1d(in_poly, [a[5], a[300]]), h1.table["row"].to_numpy()[:2])
    nrow = np.array([b[3], h1.table["row"].to_numpy()[2]])
    q = fp[prow].mean(0) + 0.5 * (fp[prow].mean(0) - fp[nrow].mean(0))
    allowed = np.ones(len(fp), bool)
    allowed[np.concatenate([prow, nrow])] = False
    d, r = brute_ranked(fp, q, allowed)
    np.testing.assert_array_equal(h2.table["row"], r[:6])
    assert h2.queries[0].label == f"{len(prow)} positives, 2 negatives"
    # relabelling a tile moves it
    s2 = SearchSession(st).add(positives=[int(uid[7])]).add(negatives=[int(uid[7])])
    assert s2.positives == [] and s2.negatives == [int(uid[7])]

    path = s.save(tmp_path / "labels.geojson")
    fc = json.loads((tmp_path / "labels.geojson").read_text())
    kinds = [(f["geometry"] or {}).get("type") for f in fc["features"]]
    assert kinds.count("Polygon") == 1
    pts = [f for f in fc["features"] if f["properties"].get("uid") is not None]
    # one Point per labelled tile at its centre; tiles of the source without a CRS have no geometry
    assert len(pts) == 2 + 2 + 2
    for f in pts:
        r0 = int(np.flatnonzero(uid == f["properties"]["uid"])[0])
        if f["geometry"] is None:
            assert src[r0] == 1
        else:
            assert f["geometry"]["coordinates"] == pytest.approx([lon[r0], lat[r0]])
    pos, neg = read_labels(path)
    assert len(pos) == 5 and len(neg) == 2
    again = SearchSession.load(st, path).search(k=6, dedup=False)
    np.testing.assert_array_equal(again.table["row"], h2.table["row"])
    # the labels file also drives the classifier
    c = SearchSession.load(st, path).classify(k=5)
    assert len(c) == 5 and c.rank_by == "score"


def test_bad_labels_are_query_errors(store, tmp_path):
    from dask_fp import SearchSession

    st = store.open()
    f = tmp_path / "bad.geojson"
    f.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [-81.0, 31.6]},
         "properties": {"label": "maybe"}}]}))
    with pytest.raises(QueryError, match="feature 0 has label 'maybe'"):
        SearchSession.load(st, f)
    with pytest.raises(QueryError, match="is not in"):
        SearchSession(st).add(positives=[987654321])
    h = search(st, uids=[int(store.cols["uid"][0])], k=3)
    with pytest.raises(QueryError, match=r"ranks \[9\] are not among the 3 hits"):
        SearchSession(st).add_hits(h, [9])


def test_blocks_of_sources_outside_the_filter_are_not_read(tmp_path):
    from dask_fp.filters import candidate_blocks, make_filter
    from dask_fp.search import Query

    specs = [SourceSpec(shape=(320, 384), path=f"s{i}.tif",
                        transform=(0.5, 0.0, 500_000.0 + 1000.0 * i, 0.0, -0.5, 3_500_000.0)) for i in range(3)]
    built = build_store(tmp_path / "store", specs, dim=8, rows_per_chunk=16, seed=5)
    st = built.open()
    fp, lon, lat, src = built.fingerprint, built.cols["lon"], built.cols["lat"], built.cols["source"]
    two = src == 2
    area = box(lon[two].min() - 1e-6, lat[two].min() - 1e-6, lon[two].max() + 1e-6, lat[two].max() + 1e-6)
    x = st.fingerprints()
    cases = [({"area": area}, inside(area, lon, lat)), ({"sources": [0, 2]}, src != 1),
             ({"area": area, "sources": [0]}, None)]
    for kw, allowed in cases:
        where = make_filter(st, **kw)
        blocks = candidate_blocks(st, where, x.chunks[0])
        starts = np.concatenate([[0], np.cumsum(x.chunks[0])])
        # every block scanned holds a row of an allowed source; every allowed row is in a scanned block
        want_src = {2} if "area" in kw else set(kw["sources"])
        if "sources" in kw and "area" in kw:
            want_src = set()
        read = np.zeros(len(fp), bool)
        for b in blocks:
            assert want_src & set(src[starts[b]:starts[b + 1]].tolist())
            read[starts[b]:starts[b + 1]] = True
        assert len(blocks) < x.numblocks[0]
        if allowed is None:
            assert blocks == []
            with pytest.raises(QueryError, match="no stored tile centre"):
                search(st, [Query("v", fp[0])], k=3, **kw)
            continue
        assert read[allowed].all()
        qv = fp[int(np.flatnonzero(allowed)[3])] + 1
        hits = search(st, [Query("v", qv)], k=7, dedup=False, **kw)
        d, r = brute_ranked(fp, qv, allowed)
        np.testing.assert_array_equal(hits.table["row"], r[:7])


def test_store_column_is_chunked_like_the_fingerprints(store):
    from dask_fp.errors import StoreError

    st = store.open()
    for name in ("lon", "lat", "source", "uid"):
        col = st.column(name)
        assert col.chunks[0] == st.fingerprints().chunks[0]
        np.testing.assert_array_equal(col.compute(scheduler="sync"), store.cols[name])
    with pytest.raises(StoreError, match="no per-tile column 'fingerprint'"):
        st.column("fingerprint")


def test_label_errors_name_the_file_and_the_tiles(store, tmp_path):
    from dask_fp import SearchSession, read_labels

    st = store.open()
    u = int(store.cols["uid"][4])

    def labels(name, *features):
        p = tmp_path / name
        p.write_text(json.dumps({"type": "FeatureCollection", "features": [
            {"type": "Feature", "geometry": None, "properties": props} for props in features]}))
        return p

    with pytest.raises(QueryError, match=r"labels file .*baduid.geojson: feature 1 has uid 'abc'"):
        read_labels(labels("baduid.geojson", {"label": "positive", "uid": u}, {"label": "negative", "uid": "abc"}))
    with pytest.raises(QueryError, match=r"labels file .*unknown.geojson: uid 987654321 .* is not in"):
        SearchSession.load(st, labels("unknown.geojson", {"label": "positive", "uid": 987654321}))
    # a picture path in a labels file is relative to the file's folder
    sub = tmp_path / "round1"
    sub.mkdir()
    pics = labels("round1/pics.geojson", {"label": "positive", "image": "chip.png"},
                  {"label": "negative", "image": "/abs/other.png"})
    assert read_labels(pics) == ([str(sub / "chip.png")], ["/abs/other.png"])
    # a tile labelled both ways is named by its uid (not by a store row)
    for kw in (dict(positives=[u], negatives=[u]),
               dict(positives=[(float(store.cols["lon"][4]), float(store.cols["lat"][4]))], negatives=[u])):
        with pytest.raises(QueryError, match=f"tile {u} labelled both positive and negative"):
            search(st, k=3, **kw)
        with pytest.raises(QueryError, match=f"tile {u} labelled both positive and negative"):
            classify(st, k=3, **kw)
    # a polygon file over no stored tile is named, with the label it was given
    far = tmp_path / "far.geojson"
    far.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": shapely.geometry.mapping(box(10, 10, 11, 11))}]}))
    with pytest.raises(QueryError, match=r"negative .*far.geojson: the polygon .* holds no stored tile centre"):
        SearchSession(st).add(positives=[u], negatives=[far])
    # so is a point file whose point no stored tile holds (the first point is fine, the second is not)
    pts = tmp_path / "points.geojson"
    pts.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Point", "coordinates": list(xy)}}
        for xy in ((float(store.cols["lon"][9]), float(store.cols["lat"][9])), (10.5, 10.5))]}))
    with pytest.raises(QueryError, match=r"negative .*points.geojson: no stored tile contains lon/lat 10.5,10.5"):
        search(st, positives=[u], negatives=[pts], k=3)


def test_labels_saved_from_another_store_are_refused(store, tmp_path):
    """A uid names a window of a source index: in another store it is another tile. The saved points tell."""
    from dask_fp import SearchSession

    st = store.open()
    a = np.flatnonzero(store.cols["source"] == 0)
    uid = store.cols["uid"]
    path = SearchSession(st).add(positives=[int(uid[a[3]])], negatives=[int(uid[a[60]])]).save(tmp_path / "l.geojson")
    assert SearchSession.load(st, path).negatives == [int(uid[a[60]])]  # the store it came from: fine
    fc = json.loads((tmp_path / "l.geojson").read_text())
    fc["features"][1]["geometry"]["coordinates"][0] += 0.01  # as if tile a[60] lay elsewhere
    moved = tmp_path / "moved.geojson"
    moved.write_text(json.dumps(fc))
    with pytest.raises(QueryError, match=rf"moved.geojson: feature 1 has uid {int(uid[a[60]])}, .* another store"):
        SearchSession.load(st, moved)
