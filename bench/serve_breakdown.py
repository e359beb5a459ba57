"""Where a map-page click's time goes, stage by stage, with compact codes and exact search.

Reuses the store and index that ``bench/serve.py`` left in ``--workdir``
(``store-<data>-<rows>.zarr``), persisted with its codes as ``dask-fp serve``
does, on the same cluster layout (LocalCluster, 1 worker x 2 threads). For
each of ``--repeats`` fresh random tiles (after one warm-up), the stages of
``POST /api/search`` are timed one after the other, through the functions the
route calls:

- ``check``: the page's uid checks (``TileIndex.has``);
- ``query``: the example's fingerprint read and the combined query (``combined_query``);
- ``code_scan``: the distributed pass over the probed lists' codes (``index.code_candidates``);
- ``rerank``: the candidates' rows read by ``pread`` and re-ranked (``index.rerank``);
- ``exact_scan``: the exact reduction over the persisted store (``scan.store_knn``, with the hits' columns);
- ``hit_columns``: the codes hits' coordinate columns, from cluster memory (``scan.store_hits``, what
  ``search`` calls), and for reference ``hit_columns_from_zarr``, read from the store (``scan.read_hits``);
- ``dedup``: de-duplication and the hits table (``search.hit_table``);
- ``outlines``: the hits as GeoJSON features for the map (``serve.results.hits_features``);
- ``search_codes`` / ``search_exact``: the whole library call, for comparison with the sum.

Run::

    .venv/bin/python bench/serve_breakdown.py                   # the 1,000,000-row ucm store of bench/serve.py
    .venv/bin/python bench/serve_breakdown.py --rows 45000 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

K = 20


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--data", choices=("ucm", "random"), default="ucm")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--workdir", default="bench-output/serve")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)

    from distributed import Client, LocalCluster, futures_of, wait

    import dask_fp
    from dask_fp.examples import BETA, as_examples, combined_query
    from dask_fp.index import code_candidates, default_candidates, rerank
    from dask_fp.kernels import candidates_needed
    from dask_fp.query import store_tiling
    from dask_fp.scan import read_hits, store_hits, store_knn
    from dask_fp.search import hit_table
    from dask_fp.serve.locate import TileIndex
    from dask_fp.serve.results import hits_features
    from dask_fp.serve.run import load

    path = Path(args.workdir) / f"store-{args.data}-{args.rows}.zarr"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run bench/serve.py --rows {args.rows} --data {args.data} first")
    load_start = os.getloadavg()
    rng = np.random.default_rng(args.seed)
    stages: dict[str, list[float]] = {}

    def timed(name: str, fn: Any, *a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        out = fn(*a, **kw)
        stages.setdefault(name, []).append(time.perf_counter() - t)
        return out

    def place() -> int:
        return int(st.coords(np.array([int(rng.integers(st.committed))]))["uid"][0])

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster):
        st = dask_fp.open_store(path)
        idx = load(st, persist=True, log=print)
        assert idx is not None, f"{path} has no index: run bench/serve.py first"
        wait(futures_of(st.fingerprints()) + futures_of(st.tiles()) + list(idx.blocks or []))
        tiles = TileIndex(st)
        tiling = store_tiling(st)
        m = candidates_needed(K, tiling, dedup=True, from_store=True, n_own=1)
        cands = default_candidates(m, idx.indexed)
        print(f"k = {K}: {m} raw neighbours for de-duplication, {cands} code candidates")
        for rep in range(args.repeats + 1):
            if rep == 1:
                stages.clear()  # the first round was the warm-up
            uid = place()
            timed("check", tiles.has, uid)
            q = timed("query", combined_query, st, as_examples([uid]), [], beta=BETA)
            vecs = q.vector[None, :].astype(np.float32)
            cand = timed("code_scan", code_candidates, idx, vecs, cands)
            d, r = timed("rerank", rerank, st, vecs, cand, m)
            rec = timed("hit_columns", store_hits, st, r)
            timed("hit_columns_from_zarr", read_hits, st, r)
            table = timed("dedup", hit_table, [q], d, r, rec, st, k=K, tiling=tiling, dedup=True, include_self=False)
            timed("outlines", hits_features, tiles, dask_fp.Hits(table, [q], st))
            timed("exact_scan", store_knn, st, vecs, m)
            timed("search_codes", dask_fp.search, st, positives=[place()], k=K, index=idx)
            timed("search_exact", dask_fp.search, st, positives=[place()], k=K, method="exact")
    res = {"rows": st.committed, "data": args.data, "k": K, "raw_neighbours": m, "candidates": cands,
           "repeats": args.repeats, **{f"{n}_median_s": statistics.median(v) for n, v in stages.items()},
           "loadavg_start": load_start, "loadavg_end": os.getloadavg()}
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
