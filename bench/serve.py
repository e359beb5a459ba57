"""Click-to-hits round trip of the map page (`dask-fp serve`) on a persisted store.

A "click" is what the page does: ``GET /api/locate`` (the stored window under
the pointer) then ``POST /api/search`` with that tile as the example (k = 20,
de-duplicated hits with their outlines). Each click is at a fresh random
place, so no answer is cached anywhere. In the same run, on the same
persisted store and the same places, the library call the route makes
(``dask_fp.search(store, positives=[uid], k=20)``) is timed as the peer: the
ratio is the web app's own overhead.

Run::

    .venv/bin/python bench/serve.py                  # 1,000,000 rows (builds the store once, ~1 min)
    .venv/bin/python bench/serve.py --rows 45000 --clicks 10   # quick

The store (random 512-d fingerprints, bench/query.py's builder) is kept in
``--workdir`` and reused. The Dask cluster is a LocalCluster of 1 worker x 2
threads (the fastest layout for persisted queries in docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from query import build_store  # noqa: E402  (bench/query.py)


def start_server(app: Any) -> tuple[str, Any]:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--clicks", type=int, default=20)
    p.add_argument("--workdir", default="bench-output/serve")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import httpx
    from distributed import Client, LocalCluster

    import dask_fp
    from dask_fp.serve import ServeOptions, create_app

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    build_store(work / f"store-{args.rows}.zarr", args.rows, seed=args.seed, log=print)
    rng = np.random.default_rng(args.seed)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        st = dask_fp.open_store(work / f"store-{args.rows}.zarr")
        t0 = time.perf_counter()
        st.persist()
        from distributed import wait

        wait(list(st._persisted))
        print(f"persisted {st.committed:,} rows in {time.perf_counter() - t0:.1f} s")
        src = st.sources[0]
        h, w = src["shape"]
        url, server = start_server(create_app(st, ServeOptions(dashboard=client.dashboard_link)))
        rounds, library = [], []
        with httpx.Client(base_url=url, timeout=120) as http:
            def click() -> tuple[float, str]:
                row, col = float(rng.uniform(0, h)), float(rng.uniform(0, w))
                t = time.perf_counter()
                loc = http.get("/api/locate", params={"source": 0, "row": row, "col": col})
                if loc.status_code != 200:
                    return click()
                uid = loc.json()["properties"]["uid"]
                r = http.post("/api/search", json={"positives": [uid], "k": 20})
                r.raise_for_status()
                assert len(r.json()["hits"]["features"]) == 20
                return time.perf_counter() - t, uid

            click()  # warm-up
            for _ in range(args.clicks):
                dt, _uid = click()
                rounds.append(dt)
                u2 = int(st.coords(np.array([int(rng.integers(st.committed))]))["uid"][0])
                t = time.perf_counter()
                dask_fp.search(st, positives=[u2], k=20)
                library.append(time.perf_counter() - t)
        server.should_exit = True
    res = {"rows": st.committed, "clicks": args.clicks, "round_trip_median_s": statistics.median(rounds),
           "round_trip_p90_s": float(np.percentile(rounds, 90)), "library_median_s": statistics.median(library),
           "overhead_ratio": statistics.median(rounds) / statistics.median(library),
           "goal_s": 0.5, "cluster": "LocalCluster 1 worker x 2 threads, store persisted"}
    print(json.dumps(res, indent=2))
    print(f"click-to-hits median {res['round_trip_median_s']:.3f} s (goal <= 0.5 s: "
          f"{'met' if res['round_trip_median_s'] <= 0.5 else 'MISSED'}); library search() alone "
          f"{res['library_median_s']:.3f} s; web app / library = {res['overhead_ratio']:.2f}x")
    (work / "serve-results.json").write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
