"""Where a code search's time goes at one store size: code scan vs candidate-row reads.

Reuses a store and index that ``bench/codes.py --reuse`` left in ``--workdir``
(``syn-<rows>.zarr``, index built), so it needs no rebuild: codes persisted on a
LocalCluster (2 workers x 1 thread), then for fresh queries each repeat:
``code_candidates`` (the distributed pass: each task scores the rows of the
``--probes`` nearest lists and keeps the best ``--candidates``), ``rerank`` (the candidates'
rows read from disk with ``--threads`` reader threads, exact distances) and the
whole ``code_search``; recall@10 is not re-measured here (bench/codes.py does).

Run::

    .venv/bin/python bench/codes_breakdown.py --rows 10000000 --candidates 500 \\
        --threads 8 --workdir /work/bench-codes10
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import codes_data as cd  # noqa: E402


def main() -> None:
    import os

    from distributed import Client, LocalCluster

    import dask_fp.store.rows as rows_mod
    from dask_fp.index import code_candidates, code_search, open_index, rerank
    from dask_fp.index.search import DEFAULT_PROBES
    from dask_fp.store import open_store

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--candidates", type=int, required=True, help="rows re-ranked exactly")
    p.add_argument("--probes", type=int, default=DEFAULT_PROBES, help="lists probed per query (at least)")
    p.add_argument("--threads", default="8,32")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--sigma", type=float, default=0.3)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/dask-fp-bench-codes"))
    a = p.parse_args()
    real512 = cd.reduce_dim(np.load(a.workdir / "ucm_lite0_rot1.npy"), 512)
    gen = cd.Synthetic(real512, sigma=a.sigma, seed=a.rows)
    out: dict[str, object] = {"command": " ".join(sys.argv), "load_avg_start": os.getloadavg()}
    with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="4GiB", dashboard_address=":0") as cl, \
            Client(cl):
        st = open_store(a.workdir / f"syn-{a.rows}.zarr")
        idx = open_index(st).persist()
        seed = 5000
        for t in (int(v) for v in a.threads.split(",")):
            rows_mod.READ_THREADS = t
            scan, rr, whole = [], [], []
            for _ in range(a.repeats + 1):
                seed += 1
                q = gen.queries(1, seed=seed)
                t0 = time.perf_counter()
                cand = code_candidates(idx, q, a.candidates, probes=a.probes)
                t1 = time.perf_counter()
                rerank(st, q, cand, 10)
                t2 = time.perf_counter()
                seed += 1
                q2 = gen.queries(1, seed=seed)
                t3 = time.perf_counter()
                code_search(st, q2, 10, index=idx, candidates=a.candidates, probes=a.probes)
                whole.append(time.perf_counter() - t3)
                scan.append(t1 - t0)
                rr.append(t2 - t1)
            out[f"threads_{t}"] = {"scan_s": statistics.median(scan[1:]), "rerank_s": statistics.median(rr[1:]),
                                   "code_search_s": statistics.median(whole[1:])}
            print(f"{t} reader threads: {out[f'threads_{t}']}", file=sys.stderr, flush=True)
    out["load_avg_end"] = os.getloadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
