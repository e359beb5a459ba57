"""The map page's HTTP API: every endpoint, bad input, traversal attempts, a malformed-request flood.

Runs against a real store of real GeoTIFFs (one with a CRS, one without) on a
real LocalCluster (``client`` in conftest), through FastAPI's TestClient and a
real uvicorn on 127.0.0.1 for the flood.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, rio-tiler) is not installed")
pytest.importorskip("rio_tiler", reason="the serve extra (fastapi, uvicorn, rio-tiler) is not installed")

import httpx  # noqa: E402
from _search_helpers import raster_store  # noqa: E402
from _serve_helpers import running_server  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from dask_fp import open_store, search  # noqa: E402
from dask_fp.serve import ServeOptions, create_app  # noqa: E402
from dask_fp.tiling import make_uid  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return raster_store(tmp_path_factory.mktemp("serve"), size=(512, 640))


@pytest.fixture(scope="module")
def api(built: Any, client: Any) -> Any:
    st = open_store(built.path).persist()
    with TestClient(create_app(st, ServeOptions(dashboard=client.dashboard_link))) as c:
        yield c


def _centre(info: dict[str, Any]) -> tuple[float, float]:
    w, s, e, n = info["sources"][0]["bounds"]
    return (w + e) / 2, (s + n) / 2


def _png(body: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(body)))


def test_page_and_assets_ship_in_the_package(api: Any) -> None:
    page = api.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    for src in ("/static/vendor/leaflet/leaflet.js", "/static/vendor/leaflet-draw/leaflet.draw.js",
                "/static/vendor/leaflet/leaflet.css", "/static/app.js", "/static/app.css",
                "/static/vendor/leaflet/LICENSE", "/static/vendor/leaflet-draw/LICENSE"):
        assert api.get(src).status_code == 200, src
    # nothing on the page is fetched from another host
    assert "http://" not in page.text and "https://" not in page.text


def test_info_lists_sources_and_dashboard(api: Any, built: Any, client: Any) -> None:
    info = api.get("/api/info").json()
    assert info["tiles"] == len(built.cols["uid"])
    assert [s["crs"] for s in info["sources"]] == ["EPSG:32617", None]
    assert info["sources"][1]["bounds"] is None and info["dashboard"] == client.dashboard_link
    w, s, e, n = info["sources"][0]["bounds"]
    lon, lat = built.cols["lon"][built.cols["source"] == 0], built.cols["lat"][built.cols["source"] == 0]
    assert w < lon.min() and lon.max() < e and s < lat.min() and lat.max() < n


def test_map_tile_shows_the_source_pixels(api: Any, built: Any) -> None:
    import morecantile
    import rasterio
    from pyproj import Transformer

    info = api.get("/api/info").json()
    lon, lat = _centre(info)
    tms = morecantile.tms.get("WebMercatorQuad")
    t = tms.tile(lon, lat, 19)
    r = api.get(f"/api/tiles/0/{t.z}/{t.x}/{t.y}.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = _png(r.content)
    assert img.shape == (256, 256, 4)
    # Oracle: the source pixel under a few tile pixels, found with pyproj + the raster's transform.
    b = tms.xy_bounds(t)
    to_src = Transformer.from_crs("EPSG:3857", info["sources"][0]["crs"], always_xy=True)
    with rasterio.open(built.path.parent / "ortho0.tif") as ds:
        data = ds.read()
        checked = 0
        for py, px in ((128, 128), (60, 200), (200, 40)):
            mx = b.left + (px + 0.5) * (b.right - b.left) / 256
            my = b.top - (py + 0.5) * (b.top - b.bottom) / 256
            row, col = ds.index(*to_src.transform(mx, my))
            if not (0 <= row < ds.height and 0 <= col < ds.width) or img[py, px, 3] == 0:
                continue
            near = data[:, max(0, row - 1): row + 2, max(0, col - 1): col + 2].reshape(3, -1)
            assert np.abs(near.T.astype(int) - img[py, px, :3].astype(int)).sum(axis=1).min() <= 3
            checked += 1
    assert checked >= 2


def test_map_tile_errors(api: Any) -> None:
    assert api.get("/api/tiles/0/3/0/0.png").status_code == 404  # far away from the source
    assert api.get("/api/tiles/1/3/0/0.png").status_code == 404  # no CRS: use the preview
    assert "preview" in api.get("/api/tiles/1/3/0/0.png").json()["detail"]
    assert api.get("/api/tiles/7/3/0/0.png").status_code == 404  # no such source
    for bad in ("/api/tiles/0/25/0/0.png", "/api/tiles/0/3/8/0.png", "/api/tiles/0/3/0/99999999999.png",
                "/api/tiles/0/a/0/0.png", "/api/tiles/-1/3/0/0.png", "/api/tiles/0/3/0/1e9.png",
                "/api/tiles/0/99999999999999999999999/0/0.png"):
        r = api.get(bad)
        assert r.status_code == 422, bad
        assert r.json()["detail"], bad


def test_preview_of_a_source_without_crs(api: Any, built: Any) -> None:
    import rasterio

    r = api.get("/api/sources/1/preview.png")
    assert r.status_code == 200
    img = _png(r.content)
    with rasterio.open(built.path.parent / "ortho1.tif") as ds:
        data = ds.read()
    assert img.shape == (512, 640, 4)  # small: shown at full resolution
    assert np.array_equal(img[..., :3], data.transpose(1, 2, 0))
    assert api.get("/api/sources/9/preview.png").status_code == 404


def test_thumbnail_is_the_stored_window(api: Any, built: Any) -> None:
    import rasterio

    uid = int(make_uid(1, 3, 5))
    r = api.get(f"/api/thumbnails/{uid}.png")
    assert r.status_code == 200
    with rasterio.open(built.path.parent / "ortho1.tif") as ds:
        data = ds.read(window=((3 * 32, 3 * 32 + 64), (5 * 32, 5 * 32 + 64)))
    assert np.array_equal(_png(r.content), data.transpose(1, 2, 0))
    assert api.get(f"/api/thumbnails/{int(make_uid(5, 0, 0))}.png").status_code == 400  # not stored
    assert api.get("/api/thumbnails/-3.png").status_code == 422
    assert api.get(f"/api/thumbnails/{2**63}.png").status_code == 422
    assert api.get("/api/thumbnails/abc.png").status_code == 422


def test_locate_by_lonlat_and_by_pixel(api: Any, built: Any) -> None:
    i = int(np.flatnonzero(built.cols["source"] == 0)[40])
    lon, lat = float(built.cols["lon"][i]), float(built.cols["lat"][i])
    f = api.get("/api/locate", params={"lon": lon, "lat": lat}).json()
    assert int(f["properties"]["uid"]) == int(built.cols["uid"][i])  # a window centre picks that window
    ring = np.asarray(f["geometry"]["coordinates"][0])
    assert ring[:, 0].min() < lon < ring[:, 0].max() and ring[:, 1].min() < lat < ring[:, 1].max()
    p = api.get("/api/locate", params={"source": 1, "row": 3 * 32 + 32, "col": 5 * 32 + 32}).json()
    assert p["properties"] == {"uid": str(int(make_uid(1, 3, 5))), "source": 1, "wy": 3, "wx": 5, "pixel": True}
    assert p["geometry"]["coordinates"][0][0] == [160, 96]
    assert api.get("/api/locate", params={"lon": 10, "lat": 10}).status_code == 404
    assert api.get("/api/locate", params={"source": 1, "row": -500, "col": 5}).status_code == 404
    for bad in ({"lon": 200, "lat": 0}, {"lon": "x", "lat": 0}, {"lon": 1}, {},
                {"lon": 1, "lat": 1, "source": 0, "row": 1, "col": 1}, {"source": 4, "row": 1, "col": 1},
                {"lon": "nan", "lat": 0}):
        assert api.get("/api/locate", params=bad).status_code in (404, 422), bad


def _expected(built: Any, uid: int, k: int) -> list[tuple[int, float]]:
    hits = search(open_store(built.path), uids=[uid], k=k)
    return [(int(u), float(d)) for u, d in zip(hits.table["uid"], hits.table["distance"], strict=True)]


def test_search_returns_the_engines_hits_with_outlines(api: Any, built: Any) -> None:
    uid = int(make_uid(0, 4, 6))
    r = api.post("/api/search", json={"positives": [str(uid)], "k": 7})
    assert r.status_code == 200, r.text
    feats = r.json()["hits"]["features"]
    assert [(int(f["properties"]["uid"]), f["properties"]["distance"]) for f in feats] == _expected(built, uid, 7)
    assert [f["properties"]["rank"] for f in feats] == list(range(1, 8))
    for f in feats:
        ring = np.asarray(f["geometry"]["coordinates"][0])
        if f["properties"]["pixel"]:  # source without CRS: the window's pixel square
            assert ring[0].tolist() == [f["properties"]["wx"] * 32, f["properties"]["wy"] * 32]
        else:
            assert (-81.1 < ring[:, 0]).all() and (ring[:, 0] < -80.9).all()


def test_refine_area_and_classifier(api: Any, built: Any) -> None:
    from shapely.geometry import box, shape

    import dask_fp

    pos = [str(int(make_uid(0, 4, 6))), str(int(make_uid(0, 2, 2)))]
    neg = [str(int(make_uid(0, 8, 8))), str(int(make_uid(1, 1, 1)))]
    info = api.get("/api/info").json()
    w, s, e, n = info["sources"][0]["bounds"]
    area = box(w, s, (w + e) / 2, n)
    body = {"positives": pos, "negatives": neg, "k": 6, "area": area.__geo_interface__}
    r = api.post("/api/search", json=body)
    assert r.status_code == 200, r.text
    want = dask_fp.search(open_store(built.path), positives=[int(u) for u in pos], negatives=[int(u) for u in neg],
                          k=6, area=area)
    got = [int(f["properties"]["uid"]) for f in r.json()["hits"]["features"]]
    assert got == [int(u) for u in want.table["uid"]]
    for f in r.json()["hits"]["features"]:
        assert area.intersects(shape(f["geometry"]))
    c = api.post("/api/search", json={**body, "mode": "classify", "threshold": 0.0, "area": None})
    assert c.status_code == 200, c.text
    scores = [f["properties"]["score"] for f in c.json()["hits"]["features"]]
    assert scores and all(0 <= v <= 1 for v in scores) and scores == sorted(scores, reverse=True)


def test_export_geojson_and_geoparquet(api: Any, built: Any, tmp_path: Path) -> None:
    import geopandas as gpd

    uid = str(int(make_uid(0, 4, 6)))
    body = {"positives": [uid], "k": 5}
    r = api.post("/api/export/geojson", json=body)
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    fc = json.loads(r.content)
    geo_hits = [u for u, _ in _expected(built, int(uid), 5) if u >> 42 == 0]
    kinds = [(f["properties"]["kind"], int(f["properties"]["uid"])) for f in fc["features"]]
    assert kinds == [("hit", u) for u in geo_hits] + [("label", int(uid))]
    assert fc["dask_fp_left_out"] == 5 - len(geo_hits)
    p = api.post("/api/export/geoparquet", json=body)
    assert p.status_code == 200
    (tmp_path / "h.parquet").write_bytes(p.content)
    gdf = gpd.read_parquet(tmp_path / "h.parquet")
    assert gdf.crs.to_epsg() == 4326 and [int(u) for u in gdf["uid"]] == [u for _, u in kinds]
    assert api.post("/api/export/shapefile", json=body).status_code == 422


@pytest.mark.parametrize("body, fragment", [
    ({}, "positives"),
    ({"positives": []}, "positives"),
    ({"positives": ["abc"]}, "positives"),
    ({"positives": [-1]}, "positives"),
    ({"positives": [2**64]}, "positives"),
    ({"positives": [1], "k": 0}, "k"),
    ({"positives": [1], "k": 10**9}, "k"),
    ({"positives": [1], "mode": "magic"}, "mode"),
    ({"positives": [1], "threshold": 2}, "threshold"),
    ({"positives": [1], "area": {"type": "Point", "coordinates": [0, 0]}}, "area"),
    ({"positives": [1], "path": "/etc/passwd"}, "path"),
    ({"positives": list(range(501))}, "positives"),
])
def test_search_rejects_bad_bodies(api: Any, body: dict[str, Any], fragment: str) -> None:
    r = api.post("/api/search", json=body)
    assert r.status_code == 422, (body, r.text)
    assert fragment in r.json()["detail"]


def test_search_rejects_unknown_and_conflicting_tiles(api: Any) -> None:
    r = api.post("/api/search", json={"positives": [int(make_uid(3, 0, 0))]})
    assert r.status_code == 400 and "not a stored tile" in r.json()["detail"]
    u = int(make_uid(0, 4, 6))
    r = api.post("/api/search", json={"positives": [u], "negatives": [u]})
    assert r.status_code == 400 and "both" in r.json()["detail"]
    r = api.post("/api/search", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    big = json.dumps({"positives": [1] * 100_000}).encode()
    assert api.post("/api/search", content=big, headers={"content-type": "application/json"}).status_code == 413


@pytest.mark.parametrize("path", [
    "/static/../../../../etc/passwd", "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/static/..%2f..%2fapp.py",
    "/static//etc/passwd", "/static/%2Fetc%2Fpasswd", "/api/tiles/..%2f..%2fetc%2fpasswd/1/1/1.png",
    "/api/sources/..%2Fstore/preview.png", "/api/thumbnails/..%2f..%2fetc%2fpasswd.png",
    "/etc/passwd", "/static/vendor/../../app.py", "/static/../render.py",
])
def test_no_path_traversal(api: Any, path: str) -> None:
    r = api.get(path)
    assert r.status_code in (404, 422), (path, r.status_code)
    assert b"root:" not in r.content and b"import" not in r.content


def test_read_only_on_the_store(api: Any, built: Any) -> None:
    before = {p: p.stat().st_mtime_ns for p in Path(built.path).rglob("*") if p.is_file()}
    api.post("/api/search", json={"positives": [int(make_uid(0, 4, 6))], "k": 3})
    api.get(f"/api/thumbnails/{int(make_uid(0, 4, 6))}.png")
    after = {p: p.stat().st_mtime_ns for p in Path(built.path).rglob("*") if p.is_file()}
    assert after == before


def test_survives_a_flood_of_malformed_requests(built: Any, client: Any) -> None:
    st = open_store(built.path)
    bad = ["/api/tiles/0/x/y/z.png", "/api/locate?lon=abc", "/api/thumbnails/-1.png", "/static/../../etc/passwd",
           "/api/tiles/0/40/1/1.png", "/api/sources/99/preview.png", "/%00", "/api/locate?lon=1e400&lat=0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with running_server(create_app(st)) as url, httpx.Client(base_url=url, timeout=30) as http:
            codes = set()
            for i in range(500):
                if i % 3 == 0:
                    r = http.post("/api/search", content=b"\x00\xff" * (i % 50),
                                  headers={"content-type": "application/json"})
                else:
                    r = http.get(bad[i % len(bad)])
                codes.add(r.status_code)
            assert codes <= {400, 404, 411, 413, 422}, codes
            ok = http.post("/api/search", json={"positives": [str(int(make_uid(0, 4, 6)))], "k": 3})
            assert ok.status_code == 200 and len(ok.json()["hits"]["features"]) == 3


def test_cli_serve_prints_its_url_and_serves(built: Any) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "dask_fp.cli", "serve", str(built.path), "--port", "0",
                             "--workers", "1"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        lines = []
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "map page at " in line:
                url = line.split("map page at ", 1)[1].split()[0]
                break
        assert url is not None and url.startswith("http://127.0.0.1:"), lines
        assert any("dashboard: http" in ln for ln in lines), lines  # the Dask dashboard link, like ingest
        info = httpx.get(url + "api/info", timeout=30).json()
        assert info["tiles"] == len(built.cols["uid"]) and info["dashboard"].startswith("http")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_cli_serve_rejects_a_bad_port_and_a_missing_store(tmp_path: Path) -> None:
    from dask_fp.cli import main

    assert main(["serve", str(tmp_path / "nope.zarr"), "--port", "70000"]) == 1
    with pytest.raises(SystemExit) as e:
        main(["serve", str(tmp_path), "--port", "abc"])
    assert e.value.code == 2


def test_tiles_do_not_wait_for_queued_queries(built: Any, client: Any) -> None:
    """Searches queue on the query thread; a thumbnail asked for meanwhile is answered before they all end."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    st = open_store(built.path)  # streamed from Zarr: each search reads the store
    done: dict[str, float] = {}
    uids = [str(int(u)) for u in built.cols["uid"][:: max(1, len(built.cols["uid"]) // 8)][:8]]
    with running_server(create_app(st, ServeOptions(query_threads=1))) as url, \
            httpx.Client(base_url=url, timeout=120) as http, ThreadPoolExecutor(9) as pool:
        def one_search(u: str) -> None:
            assert http.post("/api/search", json={"positives": [u], "k": 5}).status_code == 200
            done[f"search {u}"] = time.perf_counter()

        futures = [pool.submit(one_search, u) for u in uids]
        time.sleep(0.05)
        r = http.get(f"/api/thumbnails/{int(make_uid(0, 2, 2))}.png")
        done["thumbnail"] = time.perf_counter()
        for f in futures:
            f.result()
    assert r.status_code == 200
    assert done["thumbnail"] < max(v for k, v in done.items() if k.startswith("search")), done


# ---------------------------------------------------------------- search method (exact / compact codes)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory, client: Any) -> Any:
    """A small store (64-d fingerprints) with a compact-code index built by the library."""
    from dask_fp.index import IndexOptions, build_index

    b = raster_store(tmp_path_factory.mktemp("serve-index"), size=(512, 640), dim=64)
    build_index(b.path, IndexOptions(nbits=64), client=client)
    return b


@pytest.fixture(scope="module")
def api_ix(indexed: Any, client: Any) -> Any:
    from dask_fp.serve.run import load

    st = open_store(indexed.path)
    code_index = load(st, persist=True, log=lambda m: None)
    with TestClient(create_app(st, code_index=code_index)) as c:
        yield c


def _hits(r: Any) -> list[tuple[int, float]]:
    assert r.status_code == 200, r.text
    return [(int(f["properties"]["uid"]), f["properties"]["distance"]) for f in r.json()["hits"]["features"]]


def test_serve_load_persists_fingerprints_and_codes(indexed: Any, client: Any) -> None:

    from dask_fp.serve.run import load

    said: list[str] = []
    st = open_store(indexed.path)
    idx = load(st, persist=True, log=said.append)
    assert idx is not None and idx.indexed == st.committed
    assert st.persisted and idx.blocks and all(b.status == "finished" for b in idx.blocks)  # held by the cluster
    assert any("scan every fingerprint exactly (the index is used from" in m for m in said), said
    st2 = open_store(indexed.path)
    idx2 = load(st2, persist=False, log=said.append)
    assert idx2 is not None and not st2.persisted and idx2.blocks is None


def test_serve_load_without_an_index(built: Any) -> None:
    from dask_fp.serve.run import load

    said: list[str] = []
    assert load(open_store(built.path), persist=False, log=said.append) is None
    assert said == ["serve: searches scan every fingerprint exactly"]


def test_search_names_its_method_and_codes_hits_equal_exact(api_ix: Any, indexed: Any) -> None:
    """On a small store ``auto`` is exact (as in the library); ``codes`` re-ranks every row here, so its
    hits and distances equal the exact search's; the response says which method ran."""
    info = api_ix.get("/api/info").json()
    st = open_store(indexed.path)
    assert info["method"] == "exact" and info["index"] == {"rows": st.committed, "bits": 64}
    uid = int(make_uid(0, 4, 6))
    want = search(st, positives=[uid], k=9, method="exact")
    exact = [(int(u), float(d)) for u, d in zip(want.table["uid"], want.table["distance"], strict=True)]
    auto = api_ix.post("/api/search", json={"positives": [str(uid)], "k": 9})
    assert auto.json()["method"] == "exact" and "exact scan" in auto.json()["method_detail"]
    assert _hits(auto) == exact
    codes = api_ix.post("/api/search", json={"positives": [str(uid)], "k": 9, "method": "codes"})
    assert codes.json()["method"] == "codes" and "distances are exact" in codes.json()["method_detail"]
    assert _hits(codes) == exact
    assert len(exact) == 9
    # hits' columns (from the persisted store's memory with codes) give the same outlines and properties
    assert codes.json()["hits"] == auto.json()["hits"]


def test_search_refuses_another_stores_index(indexed: Any, built: Any) -> None:
    from dask_fp import QueryError, open_index

    with pytest.raises(QueryError, match="index given is"):
        search(open_store(built.path), uids=[int(make_uid(0, 4, 6))], k=3, method="exact",
               index=open_index(indexed.path))


def test_auto_follows_the_librarys_rule(api_ix: Any, indexed: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` picks codes above index.AUTO_CODES_ROWS rows (lowered here so a small store crosses it),
    exact with an area; codes with an area, codes for the classifier, are refused with a 400."""
    from shapely.geometry import box

    import dask_fp.index

    monkeypatch.setattr(dask_fp.index.search, "AUTO_CODES_ROWS", 10)
    assert api_ix.get("/api/info").json()["method"] == "codes"
    uid = str(int(make_uid(0, 4, 6)))
    r = api_ix.post("/api/search", json={"positives": [uid], "k": 5})
    assert r.json()["method"] == "codes"
    assert _hits(r) == _hits(api_ix.post("/api/search", json={"positives": [uid], "k": 5, "method": "exact"}))
    w, s, e, n = api_ix.get("/api/info").json()["sources"][0]["bounds"]
    area = box(w, s, (w + e) / 2, n).__geo_interface__
    assert api_ix.post("/api/search", json={"positives": [uid], "k": 5, "area": area}).json()["method"] == "exact"
    bad = api_ix.post("/api/search", json={"positives": [uid], "k": 5, "area": area, "method": "codes"})
    assert bad.status_code == 400 and "exact scan" in bad.json()["detail"]
    neg = str(int(make_uid(0, 8, 8)))
    c = api_ix.post("/api/search", json={"positives": [uid], "negatives": [neg], "mode": "classify", "method": "codes"})
    assert c.status_code == 400 and "classifier" in c.json()["detail"]
    c = api_ix.post("/api/search", json={"positives": [uid], "negatives": [neg], "mode": "classify"})
    assert c.status_code == 200 and c.json()["method"] == "classifier"


def test_codes_without_an_index_is_a_clear_400(api: Any) -> None:
    assert api.get("/api/info").json()["index"] is None
    uid = str(int(make_uid(0, 4, 6)))
    assert api.post("/api/search", json={"positives": [uid], "k": 3}).json()["method"] == "exact"
    r = api.post("/api/search", json={"positives": [uid], "k": 3, "method": "codes"})
    assert r.status_code == 400 and "dask-fp index" in r.json()["detail"]
    r = api.post("/api/search", json={"positives": [uid], "k": 3, "method": "fast"})
    assert r.status_code == 422 and "method" in r.json()["detail"]


def test_served_connections_send_without_delay() -> None:
    """The socket ``dask-fp serve`` listens on is TCP (proto), so the connections asyncio (uvicorn) accepts on
    it get TCP_NODELAY: a response's header and body writes do not wait for the client's delayed ACK."""
    import asyncio
    import socket

    from dask_fp.serve.run import listen_socket

    async def accepted_nodelay() -> int:
        got: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: Any) -> None:
                got.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        sock = listen_socket("127.0.0.1", 0)
        assert sock.proto == socket.IPPROTO_TCP
        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
            value = await asyncio.wait_for(got, 10)
            writer.close()
        return value

    assert asyncio.run(accepted_nodelay()) != 0
