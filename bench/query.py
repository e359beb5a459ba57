"""Query latency: dask-fp's exact k-NN against numpy, FAISS flat and the paper's method.

Builds stores of random fingerprints (D = 512, float32) through the store
API, then times, in one run on one machine:

- the paper's method (section IV.2): a Python dict ``uid -> fingerprint``
  walked item by item, keeping a sorted list of the k best;
- numpy brute force over the in-memory matrix, with dask-fp's formula
  ``‖x‖² − 2x·q + ‖q‖²``;
- FAISS ``IndexFlatL2`` (faiss-cpu);
- a plain single-process loop that reads the store's Zarr chunks in turn and
  scans each with numpy (the peer of a streamed scan);
- dask-fp's exact scan (the reduction alone: ``scan.knn`` over the persisted
  arrays, ``scan.stream_knn`` for a store read from Zarr, and for reference the
  older ``scan.knn`` over ``Store.fingerprints()``) and the whole
  ``search.search`` verb on a distributed LocalCluster, with the store streamed
  from Zarr and persisted in cluster memory.

Each is timed for one query and for a batch of 100 (k = 10); the table shows
medians over ``--repeats`` runs after one warm-up. Every timed run (warm-up
included) gets query vectors never used before, so no result can come from a
cache. dask-fp's rows are checked against numpy brute force.

Run::

    .venv/bin/python bench/query.py                 # 45,000 and 1,000,000 rows (~6 min, 2 cores)
    .venv/bin/python bench/query.py --quick         # smoke run on tiny stores

Results are written to ``<workdir>/query-results.json`` too; see
docs/performance.md for a reading of them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from query_peers import check_rows, numpy_knn, paper_knn, plain_stream_knn  # noqa: E402
from query_report import CLUSTERS, Timing, describe_environment, environment, measure, report  # noqa: E402

DIM = 512
K = 10
BATCH = 100
ROWS_PER_BATCH = 65_536
PAPER_LIMIT_S = 60.0  # run the paper's method for real only when one run should take less


def settings() -> Any:
    from dask_fp.store import StoreSettings

    return StoreSettings(model="resnet18", weights="random", weights_sha256="bench", feature_dim=DIM,
                         tile=256, stride=128, max_empty=0.5, dtype="float32", normalisation="bench")


# --------------------------------------------------------------------------- data


def fingerprint_block(n_rows: int, start: int, *, seed: int) -> np.ndarray:
    """Rows ``start .. start + n_rows`` of the random fingerprints (deterministic per block)."""
    rng = np.random.default_rng([seed, start])
    return rng.random((n_rows, DIM), dtype=np.float32)


def make_queries(n: int, *, seed: int, rep: int = 0) -> np.ndarray:
    """Query vectors from the fingerprints' distribution, not taken from the store; ``rep`` > 0 for fresh ones."""
    return np.random.default_rng([seed, 10**9, rep]).random((n, DIM), dtype=np.float32)


class Fresh:
    """A new batch of ``n`` query vectors on every call (made before the clock starts)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.calls = n, seed, 0

    def __call__(self) -> np.ndarray:
        self.calls += 1
        return make_queries(self.n, seed=self.seed, rep=self.calls)


def build_store(path: Path, n: int, *, seed: int, log: Callable[[str], None],
                block: Callable[[int, int], np.ndarray] | None = None, tag: str = "random") -> tuple[Any, float]:
    """A store of ``n`` random fingerprints at ``path``; reused when it already holds them.

    ``block(rows, start)`` makes other fingerprints (512-d float32) than :func:`fingerprint_block`'s;
    ``tag`` names them in the source's sha256 field, so a store is reused only for the same data.
    """
    from dask_fp.errors import StoreError
    from dask_fp.store import open_store, open_writer
    from dask_fp.tiling import make_uid

    sha = f"bench-{tag}-{n}-seed{seed}"
    make = block or (lambda rows, start: fingerprint_block(rows, start, seed=seed))
    if path.exists():
        try:
            st = open_store(path)
            srcs = st.sources
            if (st.committed == n and not settings().differences(st.attrs) and len(srcs) == 1
                    and srcs[0]["sha256"] == sha):
                log(f"store {path}: reusing {n:,} rows")
                return st, 0.0
        except StoreError:
            pass
        log(f"store {path}: wrong contents, rebuilding")
        shutil.rmtree(path)
    t0 = time.perf_counter()
    nx = math.ceil(math.sqrt(n))
    ny = math.ceil(n / nx)
    tile, stride = 256, 128
    entry = {
        "index": 0, "path": f"{tag} fingerprints ({n} rows, seed {seed})", "sha256": sha,
        "crs": None, "crs_name": None, "transform": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        "shape": [(ny - 1) * stride + tile, (nx - 1) * stride + tile], "bands": [1, 2, 3],
        "alpha": None, "nodata": None, "scale": None, "dtype": "uint8",
    }

    def batches() -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, n, ROWS_PER_BATCH):
            m = min(ROWS_PER_BATCH, n - start)
            r = np.arange(start, start + m)
            wy, wx = (r // nx).astype(np.int32), (r % nx).astype(np.int32)
            x = wx * stride + tile / 2
            y = wy * stride + tile / 2
            yield {"fingerprint": make(m, start), "uid": make_uid(0, wy, wx),
                   "source": np.zeros(m, np.int32), "wy": wy, "wx": wx, "x": x, "y": y,
                   "lon": np.full(m, np.nan), "lat": np.full(m, np.nan)}

    with open_writer(path, settings()) as w:
        got = w.append(entry, batches(), upper_bound=n)
    assert got == n, (got, n)
    took = time.perf_counter() - t0
    log(f"store {path}: wrote {n:,} rows in {took:.1f} s")
    return open_store(path), took


# --------------------------------------------------------------------------- the run


def profile_call(client: Any, fn: Callable[[], Any]) -> dict[str, Any]:
    """One scan under the task stream: task count and compute seconds per task prefix."""
    from distributed import get_task_stream

    t0 = time.perf_counter()
    with get_task_stream(client) as ts:
        fn()
    wall = time.perf_counter() - t0
    per: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for t in ts.data:
        prefix = str(t["key"][0] if isinstance(t["key"], tuple) else t["key"]).rsplit("-", 1)[0]
        for s in t["startstops"]:
            if s["action"] == "compute":
                per[prefix] += s["stop"] - s["start"]
        count[prefix] += 1
    return {"wall_s": wall, "tasks": len(ts.data),
            "compute_s": {p: round(v, 4) for p, v in sorted(per.items(), key=lambda kv: -kv[1])},
            "count": dict(count)}


def run_daskfp(path: Path, qs: dict[str, np.ndarray], oracle: dict[str, np.ndarray], *, cluster: str,
               repeats: int, budget_s: float, check: bool, profile: bool, seed: int,
               log: Callable[[str], None]) -> tuple[dict[str, Timing], dict[str, Any]]:
    """dask-fp on a LocalCluster, streamed then persisted: the exact scan (1 and 100 queries) and search() (1).

    The scan is the reduction alone: ``stream_knn`` streamed, ``knn`` over the persisted
    arrays. Streamed, the older ``knn`` over ``Store.fingerprints()`` is timed first, before
    any ``stream_knn`` task has run in the worker (they tune the worker's allocator).
    """
    from distributed import futures_of, wait

    from dask_fp.cluster import ClusterOptions, get_client
    from dask_fp.scan import knn, stream_knn
    from dask_fp.search import Query, search
    from dask_fp.store import open_store

    workers, threads = CLUSTERS[cluster]
    res: dict[str, Timing] = {}
    extra: dict[str, Any] = {}
    sizes = {label: len(q) for label, q in qs.items()}
    with get_client(ClusterOptions(workers=workers, threads_per_worker=threads, dashboard=False),
                    log=log) as client:
        for mode in ("streamed", "persisted"):
            st = open_store(path)
            if mode == "persisted":
                t0 = time.perf_counter()
                st.persist()
                wait(futures_of(st._persisted))
                extra["persist_s"] = time.perf_counter() - t0

            def scan(q: np.ndarray, st: Any = st, mode: str = mode) -> tuple[np.ndarray, np.ndarray]:
                return knn(st.fingerprints(), st.norm2(), q, K) if mode == "persisted" else stream_knn(st, q, K)

            if mode == "streamed":
                for label, q in qs.items():
                    res[f"knn-array streamed {label}"] = measure(
                        lambda q, st=st: knn(st.fingerprints(), st.norm2(), q, K), Fresh(sizes[label], seed + 50),
                        repeats=repeats, budget_s=budget_s)
                log(f"  dask-fp [{cluster}] streamed, knn over Store.fingerprints(): "
                    f"{res['knn-array streamed single'].median * 1e3:.1f} / "
                    f"{res['knn-array streamed batch'].median * 1e3:.1f} ms")
            for label, q in qs.items():
                _, rows = scan(q)
                if check:
                    fp = st.arrays["fingerprint"]
                    extra[f"check {mode} {label}"] = check_rows(
                        f"dask-fp {mode}", rows, oracle[label], lambda r, fp=fp: fp.get_orthogonal_selection(r), q)
                res[f"knn {mode} {label}"] = measure(scan, Fresh(sizes[label], seed + 100), repeats=repeats,
                                                     budget_s=budget_s)
                msg = f"  dask-fp [{cluster}] {mode} {label}: knn {res[f'knn {mode} {label}'].median * 1e3:.1f} ms"
                if label == "single":
                    hits = search(st, [Query("q0", q[0])], k=K, dedup=False)
                    if check:
                        assert hits.table["row"].tolist() == oracle[label][0].tolist(), "search() disagrees"
                    res[f"search {mode} {label}"] = measure(
                        lambda v, st=st: search(st, [Query("q0", v[0])], k=K), Fresh(1, seed + 200),
                        repeats=repeats, budget_s=budget_s)
                    msg += f", search() {res[f'search {mode} {label}'].median * 1e3:.1f} ms"
                log(msg)
            if profile:
                for label, q in qs.items():
                    p = extra[f"profile {mode} {label}"] = profile_call(client, lambda q=q: scan(q))
                    log(f"  profile {mode} {label}: {p['tasks']} tasks, wall {p['wall_s'] * 1e3:.0f} ms,"
                        f" compute s by task prefix {p['compute_s']}")
            del st
    return res, extra


def run_size(n: int, args: argparse.Namespace, state: dict[str, Any],
             log: Callable[[str], None]) -> dict[str, Any]:

    path = Path(args.workdir) / f"query-{n}.zarr"
    st, build_s = build_store(path, n, seed=args.seed, log=log)
    fp = st.arrays["fingerprint"]
    res: dict[str, Timing] = {}
    info: dict[str, Any] = {"rows": n, "build_s": build_s, "chunk_rows": fp.chunks[0],
                            "chunks": math.ceil(n / fp.chunks[0]),
                            "bytes_per_row_on_disk": sum(f.stat().st_size for f in (path / "fingerprint").rglob("*")
                                                         if f.is_file()) / n}
    qs = {"single": make_queries(1, seed=args.seed), "batch": make_queries(BATCH, seed=args.seed)}
    budget = args.budget

    # numpy brute force: the oracle and a baseline.
    t0 = time.perf_counter()
    x = np.asarray(fp[:n])
    norm2 = np.asarray(st.arrays["norm2"][:n])
    info["load_s"] = time.perf_counter() - t0
    oracle = {label: numpy_knn(x, norm2, q, K)[1] for label, q in qs.items()}
    sizes = {label: len(q) for label, q in qs.items()}
    for label in qs:
        res[f"numpy {label}"] = measure(lambda q, x=x, n2=norm2: numpy_knn(x, n2, q, K), Fresh(sizes[label], args.seed),
                                        repeats=args.repeats, budget_s=budget)
    log(f"  numpy brute force: {res['numpy single'].median * 1e3:.1f} / {res['numpy batch'].median * 1e3:.1f} ms")

    # The plain single-process loop over the same Zarr chunks (the peer of a streamed scan).
    for label, q in qs.items():
        got = plain_stream_knn(st, q, K)[1]
        info[f"plain loop {label}"] = check_rows("plain loop", got, oracle[label], lambda r, x=x: x[r], q)
        res[f"plain {label}"] = measure(lambda q: plain_stream_knn(st, q, K), Fresh(sizes[label], args.seed + 300),
                                        repeats=args.repeats, budget_s=budget)
    log(f"  plain Zarr loop: {res['plain single'].median * 1e3:.1f} / {res['plain batch'].median * 1e3:.1f} ms")

    # FAISS flat.
    try:
        import faiss
    except ImportError:
        faiss = None
        log("  faiss-cpu is not installed: FAISS rows skipped (pip install faiss-cpu)")
    if faiss is not None:
        t0 = time.perf_counter()
        index = faiss.IndexFlatL2(DIM)
        index.add(x)
        info["faiss_add_s"] = time.perf_counter() - t0
        for label, q in qs.items():
            _, fi = index.search(q, K)
            info[f"faiss rows equal numpy ({label})"] = float((fi == oracle[label]).mean())
            res[f"faiss {label}"] = measure(lambda q, index=index: index.search(q, K),
                                            Fresh(sizes[label], args.seed + 400), repeats=args.repeats, budget_s=budget)
        log(f"  faiss flat: {res['faiss single'].median * 1e3:.1f} / {res['faiss batch'].median * 1e3:.1f} ms")
        del index

    # The paper's method: run it when one run should take under PAPER_LIMIT_S, else extrapolate.
    per_row = state.get("paper_s_per_row")
    est_single = per_row * n if per_row else 0.0
    if est_single < PAPER_LIMIT_S:
        t0 = time.perf_counter()
        uids = np.asarray(st.arrays["uid"][:n])
        fps = {int(u): x[i].copy() for i, u in enumerate(uids)}
        info["paper_dict_s"] = time.perf_counter() - t0
        row_of = {int(u): i for i, u in enumerate(uids)}
        got = paper_knn(fps, qs["single"][0], K)
        assert [row_of[u] for _, u in got] == oracle["single"][0].tolist(), "the paper's method disagrees"
        cheap = est_single * (args.repeats + 1) < budget
        t = measure(lambda q, fps=fps: paper_knn(fps, q[0], K), Fresh(1, args.seed + 500),
                    repeats=args.repeats if cheap else 1,
                    warmup=0, budget_s=budget)  # the check above was the warm-up
        if not cheap:
            t.note = "1 run"
        res["paper single"] = t
        state["paper_s_per_row"] = t.median / n
        est_batch = t.median * BATCH
        if est_batch < PAPER_LIMIT_S:
            t0 = time.perf_counter()
            for v in qs["batch"]:
                paper_knn(fps, v, K)
            res["paper batch"] = Timing([time.perf_counter() - t0], "1 run")
        else:
            res["paper batch"] = Timing([est_batch], "extrapolated: 100 x the single query")
        del fps
    else:
        res["paper single"] = Timing([est_single], "extrapolated from the smaller store, per row")
        res["paper batch"] = Timing([est_single * BATCH], "extrapolated from the smaller store, per row")
    log(f"  paper's method: {res['paper single'].median * 1e3:.1f} / {res['paper batch'].median * 1e3:.1f} ms"
        f" ({res['paper batch'].note})")
    del x, norm2

    # dask-fp, per cluster layout.
    for cluster in args.clusters:
        sub, extra = run_daskfp(path, qs, oracle, cluster=cluster, repeats=args.repeats, budget_s=budget,
                                check=args.check, profile=args.profile, seed=args.seed, log=log)
        for key, v in sub.items():
            res[f"dask-fp[{cluster}] {key}"] = v
        info[f"dask-fp[{cluster}]"] = extra
    return {"info": info, "timings": res}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="45000,1000000", help="store sizes in rows (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up (default: %(default)s)")
    p.add_argument("--workdir", default=str(REPO / "bench-output"), help="where the stores go (default: %(default)s)")
    p.add_argument("--budget", type=float, default=30.0,
                   help="seconds one measurement may take; fewer repeats past it (default: %(default)s)")
    p.add_argument("--clusters", default="1x2",
                   help="LocalCluster layouts to time, workers x threads: 2x1, 1x2 or both (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: sizes 5000,20000, 2 repeats")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the task-stream profile of one knn call")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip checking dask-fp's rows against numpy")
    a = p.parse_args(argv)
    if a.quick:
        if a.sizes == p.get_default("sizes"):
            a.sizes = "5000,20000"
        if a.repeats == p.get_default("repeats"):
            a.repeats = 2
    a.sizes = [int(s.replace("_", "")) for s in str(a.sizes).split(",") if s]
    a.clusters = [c.strip() for c in a.clusters.split(",") if c.strip()]
    bad = [c for c in a.clusters if c not in CLUSTERS]
    if bad or not a.clusters:
        p.error(f"--clusters: choose from {', '.join(CLUSTERS)}; got {a.clusters}")
    if a.repeats < 1:
        p.error("--repeats must be at least 1")
    return a


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print and return ``{"table", "ratios", "environment", "results"}``."""
    args = parse(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_all = time.perf_counter()
    env = environment()
    log("environment: " + json.dumps({k: v for k, v in env.items() if k != "blas"}))
    for b in env["blas"]:
        log(f"blas: {b}")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    all_res = {}
    state: dict[str, Any] = {}
    for n in sorted(args.sizes):
        log(f"== {n:,} rows")
        load0 = os.getloadavg()[0]
        all_res[n] = run_size(n, args, state, log)
        all_res[n]["info"]["load_average_1min"] = [load0, os.getloadavg()[0]]
    table, ratios = report(all_res, args.clusters)
    elapsed = time.perf_counter() - t_all
    print(describe_environment(env))
    loads = [v for r in all_res.values() for v in r["info"]["load_average_1min"]]
    print(f"load average (1 min) at the start and end of each size: {', '.join(f'{v:.1f}' for v in loads)}"
          f" (other work on the machine shows up here)")
    print(f"k = {K}, D = {DIM}, float32; medians over up to {args.repeats} runs after one warm-up\n")
    print(table)
    print(f"\n(total benchmark time {elapsed:.0f} s)")
    out = {
        "argv": list(argv) if argv is not None else sys.argv[1:], "environment": env,
        "table": table, "ratios": ratios, "elapsed_s": elapsed,
        "results": {str(n): {"info": r["info"],
                             "timings_ms": {k: {"median": v.median * 1e3, "runs": [x * 1e3 for x in v.runs],
                                                "note": v.note} for k, v in r["timings"].items()}}
                    for n, r in all_res.items()},
    }
    Path(args.workdir, "query-results.json").write_text(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    main()
