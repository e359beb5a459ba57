"""The map page's own HTTP cost per click, on the socket `dask-fp serve` listens on vs a plain one.

Two uvicorn servers of the same app (the store bench/serve.py left in
``--workdir``) run side by side: one on ``serve.run.listen_socket`` (a TCP
socket, so asyncio sets TCP_NODELAY on its connections), one on a socket made
as ``socket.socket(AF_INET, SOCK_STREAM)`` (what ``dask-fp serve`` used
before: proto 0, no TCP_NODELAY). A "click" without the search is ``GET
/api/locate`` at a fresh random pixel then, at once, ``POST /api/search`` of an
unknown uid (answered 400 before any search runs), on one kept-alive
connection, as the page does. Clicks alternate between the two servers;
medians over ``--clicks``.

Run::

    .venv/bin/python bench/serve_http.py              # the 45,000-row store of `bench/serve.py --rows 45000`
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def start(app: Any, sock: socket.socket) -> tuple[str, Any]:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=45_000)
    p.add_argument("--data", choices=("ucm", "random"), default="ucm")
    p.add_argument("--clicks", type=int, default=50)
    p.add_argument("--workdir", default="bench-output/serve")
    args = p.parse_args(argv)

    import httpx

    import dask_fp
    from dask_fp.serve import create_app
    from dask_fp.serve.run import listen_socket
    from dask_fp.tiling import make_uid

    path = Path(args.workdir) / f"store-{args.data}-{args.rows}.zarr"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run bench/serve.py --rows {args.rows} --data {args.data} first")
    st = dask_fp.open_store(path)  # no search runs: no cluster needed
    h, w = st.sources[0]["shape"]
    plain = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    plain.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    plain.bind(("127.0.0.1", 0))
    plain.listen(128)
    servers = {"listen_socket (TCP_NODELAY)": start(create_app(st), listen_socket("127.0.0.1", 0)),
               "plain socket (before)": start(create_app(st), plain)}
    rng = np.random.default_rng(0)
    unknown = str(int(make_uid(len(st.sources) + 7, 0, 0)))  # a source the store does not have
    times: dict[str, list[float]] = {name: [] for name in servers}
    load_start = os.getloadavg()
    clients = {name: httpx.Client(base_url=url, timeout=30) for name, (url, _) in servers.items()}
    try:
        for i in range(args.clicks + 1):
            for name, http in clients.items():
                t = time.perf_counter()
                r = http.get("/api/locate", params={"source": 0, "row": float(rng.uniform(0, h)),
                                                    "col": float(rng.uniform(0, w))})
                bad = http.post("/api/search", json={"positives": [unknown], "k": 20})
                if i:  # the first round opens the connections
                    times[name].append(time.perf_counter() - t)
                assert r.status_code in (200, 404) and bad.status_code == 400, (r.text, bad.text)
    finally:
        for http in clients.values():
            http.close()
        for _, server in servers.values():
            server.should_exit = True
    res = {"store": str(path), "clicks": args.clicks,
           **{name: {"median_s": statistics.median(v), "p90_s": float(np.percentile(v, 90))}
              for name, v in times.items()},
           "loadavg_start": load_start, "loadavg_end": os.getloadavg()}
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
