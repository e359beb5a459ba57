"""The map page in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

Flow: open the page on a small real store (real GeoTIFFs, real uvicorn on
127.0.0.1, real LocalCluster) -> click a tile -> hits outlined on the map and
listed with thumbnails -> fly to a hit -> mark a positive and a negative ->
refine -> draw an area -> classifier mode -> export GeoJSON and GeoParquet.
Screenshots go to ``$DASK_FP_SCREENSHOTS`` (default: the test's tmp dir).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, rio-tiler) is not installed")
pytest.importorskip("playwright", reason="playwright (test extra) is not installed")

from _search_helpers import raster_store  # noqa: E402
from _serve_helpers import running_server  # noqa: E402

from dask_fp import open_store  # noqa: E402
from dask_fp.serve import ServeOptions, create_app  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (`make test` installs"
                                " it with apt-get; or: apt-get install -y chromium)")


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    d = Path(os.environ.get("DASK_FP_SCREENSHOTS") or tmp_path / "screenshots")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _click_lonlat(page: Any, lon: float, lat: float) -> None:
    pt = page.evaluate(f"(() => {{ const p = geoMap.latLngToContainerPoint([{lat}, {lon}]); return [p.x, p.y]; }})()")
    box = page.locator("#map").bounding_box()
    page.mouse.click(box["x"] + pt[0], box["y"] + pt[1])


def test_click_label_refine_area_export(tmp_path: Path, shots: Path, client: Any) -> None:
    from playwright.sync_api import expect, sync_playwright

    built = raster_store(tmp_path / "data", size=(512, 640))
    st = open_store(built.path).persist()
    i = int((built.cols["source"] == 0).nonzero()[0][60])
    lon, lat, uid = float(built.cols["lon"][i]), float(built.cols["lat"][i]), int(built.cols["uid"][i])
    with running_server(create_app(st, ServeOptions(dashboard=client.dashboard_link))) as url, \
            sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 800}, accept_downloads=True)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        external: list[str] = []
        page.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:")) else external.append(r.url))
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        expect(page.locator("#method")).to_contain_text("Searches: exact search (no compact-code index)")
        expect(page.locator("#dashboard")).to_have_attribute("href", client.dashboard_link)
        page.wait_for_function("document.querySelectorAll('#map .leaflet-tile-loaded').length > 0", timeout=30_000)
        page.screenshot(path=str(shots / "1-map.png"))

        # hover shows the stored window under the cursor; a click searches with it
        _click_lonlat(page, lon, lat)
        expect(page.locator("#hits li")).to_have_count(20, timeout=60_000)
        expect(page.locator("#status")).to_contain_text("20 hits")
        # the side panel names the search method that ran (a small store without an index: exact)
        expect(page.locator("#method")).to_have_attribute("data-method", "exact")
        expect(page.locator("#method")).to_contain_text("exact scan of every stored fingerprint")
        first_uid = page.locator("#hits li").first.get_attribute("data-uid")
        assert first_uid is not None and int(first_uid) != uid  # the query's own tile is not a hit
        n_geo = sum(1 for li in page.locator("#hits li").all() if int(li.get_attribute("data-uid") or 0) >> 42 == 0)
        assert page.locator("#map .leaflet-overlay-pane path").count() >= n_geo  # hits outlined on the map
        page.wait_for_function("[...document.querySelectorAll('#hits img')].every(i => i.complete && i.naturalWidth)")
        page.screenshot(path=str(shots / "2-hits.png"))

        # clicking a thumbnail flies to the hit (a geo hit: the map centre moves onto it)
        geo_li = next(li for li in page.locator("#hits li").all() if int(li.get_attribute("data-uid") or 0) >> 42 == 0)
        geo_li.locator("img").click()
        page.wait_for_timeout(1500)
        centre = page.evaluate("(() => { const c = geoMap.getCenter(); return [c.lng, c.lat]; })()")
        hit = json.loads(page.evaluate(
            f"JSON.stringify(state.hits.find(f => f.properties.uid === '{geo_li.get_attribute('data-uid')}'))"))
        ring = hit["geometry"]["coordinates"][0]
        assert min(p[0] for p in ring) <= centre[0] <= max(p[0] for p in ring)
        assert min(p[1] for p in ring) <= centre[1] <= max(p[1] for p in ring)

        # mark a positive and a negative
        items = page.locator("#hits li")
        items.nth(0).locator(".mark-positive").click()
        items.nth(1).locator(".mark-negative").click()
        expect(page.locator("#hits li.positive")).to_have_count(1)
        expect(page.locator("#hits li.negative")).to_have_count(1)
        expect(page.locator("#labels")).to_contain_text("2 positive, 1 negative")
        page.screenshot(path=str(shots / "3-labelled.png"))

        # export hits and labels (GeoJSON, GeoParquet)
        with page.expect_download() as dl:
            page.click("#export-geojson")
        fc = json.loads(Path(dl.value.path()).read_text())
        labels = {f["properties"]["uid"]: f["properties"]["label"] for f in fc["features"]
                  if f["properties"]["kind"] == "label"}
        pos, neg = page.evaluate("[state.positives, state.negatives]")
        assert len(pos) == 2 and len(neg) == 1
        on_map = {**{u: "positive" for u in pos if int(u) >> 42 == 0},
                  **{u: "negative" for u in neg if int(u) >> 42 == 0}}
        assert labels == on_map  # labels of the source without a CRS are left out of WGS84 files
        # the export is the query with the current labels (20 hits) plus the 3 labelled tiles
        assert len(fc["features"]) + fc["dask_fp_left_out"] == 20 + 3
        with page.expect_download() as dl:
            page.click("#export-geoparquet")
        import geopandas as gpd

        gdf = gpd.read_parquet(dl.value.path())
        assert len(gdf) == len(fc["features"])

        # refine with the labels
        page.click("#refine")
        expect(page.locator("#status")).to_contain_text("hits in", timeout=60_000)
        assert "failed" not in page.locator("#status").inner_text()

        # draw an area (rectangle over the west half of the source): every hit lies in it
        page.click("#map .leaflet-draw-draw-rectangle")
        box = page.locator("#map").bounding_box()
        w, s, e, n = page.evaluate("state.info.sources[0].bounds")
        page.evaluate(f"geoMap.fitBounds([[{s}, {w}], [{n}, {e}]], {{ animate: false }})")
        page.wait_for_timeout(300)
        a = page.evaluate(f"(() => {{ const p = geoMap.latLngToContainerPoint([{n}, {w}]); return [p.x, p.y]; }})()")
        b = page.evaluate(
            f"(() => {{ const p = geoMap.latLngToContainerPoint([{s}, {(w + e) / 2}]); return [p.x, p.y]; }})()")
        page.mouse.move(box["x"] + a[0] + 2, box["y"] + a[1] + 2)
        page.mouse.down()
        page.mouse.move(box["x"] + b[0], box["y"] + b[1], steps=8)
        page.mouse.up()
        page.wait_for_function("state.area !== null && !state.busy", timeout=60_000)
        expect(page.locator("#status")).to_contain_text("hits in", timeout=60_000)
        for f in page.evaluate("state.hits"):
            xs = [p[0] for p in f["geometry"]["coordinates"][0]]
            assert not f["properties"]["pixel"] and min(xs) <= (w + e) / 2
        page.screenshot(path=str(shots / "4-area.png"))

        # classifier mode with a threshold, once there are enough labels
        items = page.locator("#hits li")
        items.nth(2).locator(".mark-negative").click()
        page.select_option("#mode", "classify")
        expect(page.locator("#threshold-box")).to_be_visible()
        expect(page.locator("#status")).to_contain_text("classifier", timeout=60_000)
        page.screenshot(path=str(shots / "5-classifier.png"))

        # a source without a CRS: its own pixel view; hover and click work there too
        page.click("#reset")
        page.click("#sources li:nth-child(2) a")
        expect(page.locator("#pixmap")).to_be_visible()
        page.wait_for_function("[...document.querySelectorAll('#pixmap img.leaflet-image-layer')]"
                               ".some(i => i.complete && i.naturalWidth === 640)")
        pbox = page.locator("#pixmap").bounding_box()
        page.mouse.click(pbox["x"] + pbox["width"] / 2, pbox["y"] + pbox["height"] / 2)
        expect(page.locator("#hits li")).to_have_count(20, timeout=60_000)
        assert page.evaluate("state.positives.map(u => BigInt(u) >> 42n === 1n)") == [True]
        assert page.locator("#pixmap .leaflet-overlay-pane path").count() >= 1  # query (and pixel hits) outlined
        page.screenshot(path=str(shots / "6-pixel-view.png"))
        browser.close()
    assert not errors, errors
    assert not external, external  # no CDN, no network
