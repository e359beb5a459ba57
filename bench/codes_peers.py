"""The peers and kernels bench/codes.py times beside dask-fp's code search.

FAISS flat, IVF-PQ (64 B codes) + exact refine and HNSW over the in-memory
matrix, each tuned to its cheapest setting with recall@10 >= 0.95; and the
timing and recall helpers the bench shares. numpy brute force and the plain Zarr loop come from
bench/query_peers.py, as in bench/query.py.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

K = 10


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def median_s(fn: Callable[[int], Any], repeats: int, budget_s: float = 60.0) -> tuple[float, int]:
    """Median seconds of ``fn(i)`` over fresh inputs ``i = 1..repeats`` after a warm-up ``fn(0)``."""
    fn(0)
    runs: list[float] = []
    t_start = time.perf_counter()
    for i in range(1, repeats + 1):
        t0 = time.perf_counter()
        fn(i)
        runs.append(time.perf_counter() - t0)
        if time.perf_counter() - t_start > budget_s:
            break
    return statistics.median(runs), len(runs)


def recall(truth: np.ndarray, got: np.ndarray) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / len(a) for a, b in zip(truth, got, strict=True)]))


def faiss_rows(x: np.ndarray, qs: np.ndarray, truth: np.ndarray, timing_q: Callable[[int], np.ndarray],
               repeats: int, hnsw_max: int, hnsw_budget_s: float = 1200.0) -> dict[str, Any]:
    """FAISS flat, IVF-PQ (64 B codes) + exact refine and HNSW, each at its cheapest setting with recall >= 0.95."""
    import faiss

    # Builds on one OpenMP thread (two spin against each other on this shared 2-core
    # machine: a 20,000-row IVF-PQ build took 535 s), searches on two (the cluster's cores).
    faiss.omp_set_num_threads(2)
    n, d = x.shape
    res: dict[str, Any] = {}
    flat = faiss.IndexFlatL2(d)
    flat.add(x)
    res["faiss_flat"] = {"s": median_s(lambda i: flat.search(timing_q(i), K), repeats)[0], "recall": 1.0}
    flat.reset()  # free its copy of the vectors

    def tune(index: Any, name: str, knobs: list[tuple[str, Callable[[], None]]], build_s: float, mem: float) -> None:
        for label, setk in knobs:
            setk()
            r = recall(truth, index.search(qs, K)[1])
            if r >= 0.95 or label == knobs[-1][0]:
                res[name] = {"setting": label, "recall": r, "build_s": build_s, "bytes_per_tile": mem,
                             "s": median_s(lambda i: index.search(timing_q(i), K), repeats)[0]}
                say(f"  {name}: {label}, recall {r:.3f}, {res[name]['s'] * 1e3:.1f} ms, build {build_s:.0f} s")
                return

    nlist = int(np.sqrt(n))
    t0 = time.perf_counter()
    faiss.omp_set_num_threads(1)
    ivf = faiss.index_factory(d, f"IVF{nlist},PQ64")
    refine = faiss.IndexRefineFlat(ivf)  # exact re-rank of k_factor * k PQ candidates
    refine.train(x[np.random.default_rng(0).choice(n, min(n, max(40 * nlist, 10_000)), replace=False)])
    refine.add(x)
    b = time.perf_counter() - t0
    faiss.omp_set_num_threads(2)
    ivfp = faiss.extract_index_ivf(ivf)

    def knob(nprobe: int, kf: int) -> Callable[[], None]:
        def f() -> None:
            ivfp.nprobe = nprobe
            refine.k_factor = kf
        return f

    tune(refine, "faiss_ivfpq_refine", [(f"nprobe {p}, k_factor {f}", knob(p, f))
                                        for p in (1, 2, 4, 8, 16, 32, 64) for f in (4, 16)], b, 64 + 8)
    refine.reset()
    if n <= hnsw_max:
        t0 = time.perf_counter()
        faiss.omp_set_num_threads(1)
        h = faiss.IndexHNSWFlat(d, 32)
        for s0 in range(0, n, 100_000):
            h.add(x[s0 : s0 + 100_000])
            if time.perf_counter() - t0 > hnsw_budget_s and s0 + 100_000 < n:
                res["faiss_hnsw"] = {"not_built": f"{s0 + 100_000:,} of {n:,} rows added in"
                                                  f" {time.perf_counter() - t0:.0f} s (--hnsw-budget-s)"}
                say(f"  faiss_hnsw: {res['faiss_hnsw']['not_built']}")
                return res
        b = time.perf_counter() - t0
        faiss.omp_set_num_threads(2)

        def ef(e: int) -> Callable[[], None]:
            def f() -> None:
                h.hnsw.efSearch = e
            return f

        tune(h, "faiss_hnsw", [(f"M 32, efSearch {e}", ef(e)) for e in (16, 32, 64, 128, 256)], b, 32 * 2 * 4)
        del h
    return res
