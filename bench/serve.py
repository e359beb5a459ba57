"""Click-to-hits round trip of the map page (`dask-fp serve`) on a persisted store: exact and compact codes.

A "click" is what the page does: ``GET /api/locate`` (the stored window under
the pointer) then ``POST /api/search`` with that tile as the example (k = 20,
de-duplicated hits with their outlines). Each click is at a fresh random
place, so no answer is cached anywhere.

One store, with a compact-code index (``dask_fp.index.build_index``, 512 bits),
persisted in cluster memory with its codes as ``dask-fp serve`` does
(``dask_fp.serve.run.load``); four rows timed in the same run, interleaved
click by click, each at its own fresh places:

- ``codes``: the page's default (``method`` auto: codes above
  ``index.AUTO_CODES_ROWS`` rows with an index), over HTTP;
- ``exact``: the page asked for ``method: exact``, over HTTP;
- the library calls the route makes (``dask_fp.search(store, positives=[uid],
  k=20, index=...)`` with codes, and with ``method="exact"``): the peers, whose
  ratio to the round trips is the web app's own overhead.

Recall: the codes clicks' hits against the exact search's hits for the same
tiles (computed after the timing), |codes ∩ exact| / 20 per click.

Data (``--data``): ``ucm`` (default) vectors that follow real fingerprints
(bench/codes_data.py: EfficientNet-Lite0 over UC Merced projected to 512-d,
plus Gaussian noise with the real covariance x sigma², as bench/codes.py's
synthetic stores), or ``random`` (uniform, bench/query.py's: no structure, so
codes cannot rank neighbours and recall is low, exact time is unchanged).
Both are laid out as one source of 256 px tiles at stride 128, so the page's
de-duplication is the real one (k = 20 needs 189 raw neighbours).

Run::

    .venv/bin/python bench/serve.py                  # 1,000,000 rows (store + index built once, ~3 min)
    .venv/bin/python bench/serve.py --rows 45000 --clicks 10   # quick

The store and its index are kept in ``--workdir`` and reused (the index is
rebuilt when it does not cover the store). The Dask cluster is a LocalCluster
of 1 worker x 2 threads (the fastest layout for persisted queries in
docs/performance.md). Results: ``<workdir>/serve-results-<data>-<rows>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from query import build_store  # noqa: E402  (bench/query.py)

K = 20


def start_server(app: Any) -> tuple[str, Any]:
    import uvicorn

    from dask_fp.serve.run import listen_socket

    sock = listen_socket("127.0.0.1", 0)  # as `dask-fp serve` listens
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server


def make_store(args: argparse.Namespace, path: Path) -> Any:
    if args.data == "random":
        st, _ = build_store(path, args.rows, seed=args.seed, log=print)
        return st
    import codes_data as cd  # bench/codes_data.py

    real = cd.real_fingerprints(Path(args.ucm_cache))
    gen = cd.Synthetic(cd.reduce_dim(real, 512), sigma=args.sigma, seed=args.seed)
    block_rows = 65_536  # query.ROWS_PER_BATCH: one generator block per write batch
    st, _ = build_store(path, args.rows, seed=args.seed, log=print, tag=f"ucm-sigma{args.sigma}",
                        block=lambda rows, start: gen.block(start // block_rows, rows))
    return st


def make_index(path: Path, client: Any) -> float | None:
    """Build the store's index unless one covering every row is there; seconds taken (None: reused)."""
    from dask_fp.errors import StoreError
    from dask_fp.index import IndexOptions, build_index, has_index, open_index
    from dask_fp.store import open_store

    st = open_store(path)
    if has_index(st):
        try:
            idx = open_index(st)
        except StoreError as e:  # an index of an earlier format: rebuilt below
            print(f"index of {path}: {e}")
        else:
            if idx.indexed == st.committed and int(idx.attrs["nbits"]) == IndexOptions().nbits:
                print(f"index of {path}: reusing ({idx.indexed:,} rows)")
                return None
    t0 = time.perf_counter()
    build_index(path, IndexOptions(), client=client)
    took = time.perf_counter() - t0
    print(f"index of {path}: built in {took:.1f} s")
    return took


def summary(xs: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(xs), "p90_s": float(np.percentile(xs, 90)), "n": len(xs)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--clicks", type=int, default=20, help="timed clicks per row")
    p.add_argument("--data", choices=("ucm", "random"), default="ucm")
    p.add_argument("--sigma", type=float, default=0.3, help="noise scale of --data ucm (bench/codes.py's)")
    p.add_argument("--ucm-cache", default=None,
                   help="UC Merced fingerprints cache (.npy, made when missing; default <workdir>/ucm_lite0_rot1.npy)")
    p.add_argument("--workdir", default="bench-output/serve")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    args.ucm_cache = args.ucm_cache or str(work / "ucm_lite0_rot1.npy")

    import httpx
    from distributed import Client, LocalCluster, futures_of, wait

    import dask_fp
    from dask_fp.serve import ServeOptions, create_app
    from dask_fp.serve.run import load

    load_start = os.getloadavg()
    path = work / f"store-{args.data}-{args.rows}.zarr"
    make_store(args, path)
    rng = np.random.default_rng(args.seed)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        index_s = make_index(path, client)
        st = dask_fp.open_store(path)
        t0 = time.perf_counter()
        idx = load(st, persist=True, log=print)  # what `dask-fp serve` does: fingerprints and codes persisted
        assert idx is not None
        wait(futures_of(st.fingerprints()) + futures_of(st.tiles()) + list(idx.blocks or []))
        persist_s = time.perf_counter() - t0
        print(f"persisted {st.committed:,} rows and their codes in {persist_s:.1f} s")
        h, w = st.sources[0]["shape"]
        url, server = start_server(create_app(st, ServeOptions(dashboard=client.dashboard_link), code_index=idx))
        times: dict[str, list[float]] = {"codes": [], "exact": [], "codes_locate": [], "codes_server": [],
                                         "exact_locate": [], "exact_server": [], "library_codes": [],
                                         "library_exact": []}
        codes_hits: list[tuple[int, list[int]]] = []

        def place() -> int:
            return int(st.coords(np.array([int(rng.integers(st.committed))]))["uid"][0])

        with httpx.Client(base_url=url, timeout=120) as http:
            def click(method: str) -> tuple[int, list[int]]:
                row, col = float(rng.uniform(0, h)), float(rng.uniform(0, w))
                t = time.perf_counter()
                loc = http.get("/api/locate", params={"source": 0, "row": row, "col": col})
                if loc.status_code != 200:
                    return click(method)
                t_loc = time.perf_counter() - t
                uid = loc.json()["properties"]["uid"]
                body: dict[str, Any] = {"positives": [uid], "k": K}
                if method == "exact":
                    body["method"] = "exact"
                r = http.post("/api/search", json=body)
                r.raise_for_status()
                dt = time.perf_counter() - t
                res = r.json()
                assert res["method"] == method, (res["method"], method)
                assert len(res["hits"]["features"]) == K
                times[method].append(dt)
                times[f"{method}_locate"].append(t_loc)
                times[f"{method}_server"].append(res["seconds"])
                return int(uid), [int(f["properties"]["uid"]) for f in res["hits"]["features"]]

            click("codes")  # warm-up of both paths
            click("exact")
            for _ in range(args.clicks):
                codes_hits.append(click("codes"))
                click("exact")
                u = place()
                t = time.perf_counter()
                dask_fp.search(st, positives=[u], k=K, index=idx)
                times["library_codes"].append(time.perf_counter() - t)
                u = place()
                t = time.perf_counter()
                dask_fp.search(st, positives=[u], k=K, method="exact")
                times["library_exact"].append(time.perf_counter() - t)
        server.should_exit = True
        recalls = []
        for uid, got in codes_hits:  # the oracle, after the clock: the exact search for the same tile
            want = dask_fp.search(st, positives=[uid], k=K, method="exact").table["uid"].tolist()
            recalls.append(len(set(want) & set(got)) / len(want))
    load_end = os.getloadavg()
    rows = {name: summary(v) for name, v in times.items()}
    res = {"rows": st.committed, "data": args.data, "sigma": args.sigma if args.data == "ucm" else None,
           "clicks": args.clicks, "k": K, "index_build_s": index_s, "persist_s": persist_s, **rows,
           "codes_recall_at_20_mean": float(np.mean(recalls)), "codes_recall_at_20_min": float(np.min(recalls)),
           "overhead_codes": rows["codes"]["median_s"] / rows["library_codes"]["median_s"],
           "overhead_exact": rows["exact"]["median_s"] / rows["library_exact"]["median_s"],
           "goal_s": 0.5, "loadavg_start": load_start, "loadavg_end": load_end,
           "cluster": "LocalCluster 1 worker x 2 threads, store and codes persisted"}
    print(json.dumps(res, indent=2))
    for m in ("codes", "exact"):
        med = rows[m]["median_s"]
        print(f"{m}: click-to-hits median {med:.3f} s, p90 {rows[m]['p90_s']:.3f} s (goal <= 0.5 s: "
              f"{'met' if med <= 0.5 else 'MISSED'}); locate {rows[m + '_locate']['median_s']:.3f} s, server "
              f"{rows[m + '_server']['median_s']:.3f} s; library search() alone "
              f"{rows['library_' + m]['median_s']:.3f} s; web app / library = {res['overhead_' + m]:.2f}x")
    print(f"codes recall@{K} vs exact on the same clicks: mean {res['codes_recall_at_20_mean']:.3f},"
          f" min {res['codes_recall_at_20_min']:.3f}; load average {load_start[0]:.2f} -> {load_end[0]:.2f}")
    (work / f"serve-results-{args.data}-{args.rows}.json").write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
