"""The README's picture of the map page: serve a store, click a place in headless Chromium, save a PNG.

Run (after ``make demo``)::

    .venv/bin/python bench/serve_screenshot.py demo-output/fp.zarr docs/figures/serve-demo.png

It clicks the centre of the first stored tile of the source whose file name
contains ``--source`` (default: the drone orthomosaic), waits for the hits and
their thumbnails, and saves a 1280 x 800 screenshot.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import threading
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("store")
    p.add_argument("out")
    p.add_argument("--source", default="drone")
    p.add_argument("--row", type=float, default=0.55, help="where to click, as a fraction of the source height")
    p.add_argument("--col", type=float, default=0.45, help="... and of its width")
    args = p.parse_args(argv)

    import uvicorn
    from distributed import Client, LocalCluster
    from playwright.sync_api import sync_playwright

    import dask_fp
    from dask_fp.serve import ServeOptions, create_app

    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("needs Debian's chromium (apt-get install -y chromium)")
    with LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address="127.0.0.1:0") as cl, Client(cl) as c:
        st = dask_fp.open_store(args.store).persist()
        src = next(s for s in st.sources if args.source in s["path"])
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(create_app(st, ServeOptions(dashboard=c.dashboard_link)),
                                               log_level="warning"))
        threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        h, w = src["shape"]
        from affine import Affine
        from pyproj import Transformer

        x, y = Affine(*src["transform"][:6]) * (args.col * w, args.row * h)
        lon, lat = Transformer.from_crs(src["crs"], "EPSG:4326", always_xy=True).transform(x, y)
        with sync_playwright() as pw:
            b = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = b.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url)
            page.wait_for_selector("body[data-ready='1']")
            page.evaluate(f"geoMap.setView([{lat}, {lon}], 20, {{ animate: false }})")
            page.wait_for_timeout(500)
            pt = page.evaluate(f"(() => {{ const q = geoMap.latLngToContainerPoint([{lat}, {lon}]);"
                               " return [q.x, q.y]; })()")
            page.mouse.click(pt[0], pt[1])
            page.wait_for_function("state.hits.length > 0 && !state.busy", timeout=120_000)
            page.evaluate("hitsLayer.getBounds().isValid() && geoMap.fitBounds(hitsLayer.getBounds()"
                          ".extend(labelsLayer.getBounds()), { animate: false, padding: [20, 20] })")
            page.wait_for_function("[...document.querySelectorAll('#hits img')].every(i => i.complete)")
            page.wait_for_function("document.querySelectorAll('#map .leaflet-tile-loading').length === 0")
            page.wait_for_timeout(500)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out)
            b.close()
        server.should_exit = True
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
