"""Why a streamed scan was slow, in two measurements (docs/performance.md, "Streamed scan").

1. Page faults: the Zarr chunks of a store read one after the other in a
   worker-like thread, in fresh processes started with Dask's nanny environment
   (``MALLOC_TRIM_THRESHOLD_=65536``), without and with
   :func:`dask_fp.malloc.keep_buffers`, and with glibc's defaults.
2. Threads: a store scanned as row blocks of 8 Zarr chunks by 1 and 2 threads,
   each block read whole (one multi-chunk Zarr read, as ``Store.fingerprints()``
   did) or a chunk at a time (as :func:`dask_fp.scan.stream_knn` does).

Run::

    .venv/bin/python bench/stream_read.py --store bench-output/query-1000000.zarr

(the store written by ``bench/query.py``). Prints median milliseconds and
minor page faults; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def read_in_thread(path: str, rows: int, tune: bool, repeats: int) -> dict[str, float]:
    """Read the first ``rows`` rows chunk by chunk in a new thread, ``repeats`` times: median ms, faults."""
    from dask_fp.malloc import keep_buffers
    from dask_fp.store import open_store

    st = open_store(path)
    fp = st.arrays["fingerprint"]
    c = int(fp.chunks[0])
    out: list[tuple[float, int]] = []

    def work() -> None:
        if tune:
            keep_buffers()
        for _ in range(repeats + 1):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            for s in range(0, min(rows, st.committed), c):
                fp[s : s + c]
            out.append((time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0))

    t = threading.Thread(target=work)
    t.start()
    t.join()
    runs = out[1:]  # the first read warms the page cache and the heap
    return {"ms": statistics.median(r[0] for r in runs) * 1e3, "faults": statistics.median(r[1] for r in runs)}


def section_faults(args: argparse.Namespace) -> None:
    print(f"1. {args.rows:,} rows read chunk by chunk in one thread, median of {args.repeats}")
    nanny = {"MALLOC_TRIM_THRESHOLD_": "65536"}
    for label, env, tune in (("Dask nanny env (MALLOC_TRIM_THRESHOLD_=65536)", nanny, False),
                             ("Dask nanny env + keep_buffers()", nanny, True), ("glibc defaults", {}, False)):
        e = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"} | env
        e["PYTHONPATH"] = str(REPO)
        code = (f"import json, sys; sys.path.insert(0, {str(REPO / 'bench')!r});"
                " from stream_read import read_in_thread;"
                f" print(json.dumps(read_in_thread({args.store!r}, {args.rows}, {tune}, {args.repeats})))")
        r = json.loads(subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,
                                      check=True).stdout)
        print(f"   {label:48}: {r['ms']:7.0f} ms, {r['faults']:8.0f} minor page faults")


def section_threads(args: argparse.Namespace) -> None:
    import numpy as np

    from dask_fp.kernels import knn_chunk, knn_merge
    from dask_fp.malloc import keep_buffers
    from dask_fp.store import open_store

    keep_buffers()
    st = open_store(args.store)
    fp, nrm = st.arrays["fingerprint"], st.arrays["norm2"]
    c = int(fp.chunks[0])
    b = 8 * c
    n = min(st.committed, args.rows)
    q = np.random.default_rng(0).random((1, fp.shape[1]), dtype=np.float32)
    qn = np.einsum("ij,ij->i", q, q)

    def block(i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = i * b, min(i * b + b, n)
        return knn_chunk((fp[lo:hi], nrm[lo:hi], np.arange(lo, hi)), q=q, qnorm2=qn, m=10)

    def chunkwise(i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = i * b, min(i * b + b, n)
        parts = [knn_chunk((fp[s : min(s + c, hi)], nrm[s : min(s + c, hi)], np.arange(s, min(s + c, hi))),
                           q=q, qnorm2=qn, m=10) for s in range(lo, hi, c)]
        return knn_merge(parts, m=10)

    print(f"2. {n:,} rows in blocks of {b:,} rows (8 chunks), one query, median of {args.repeats}")
    for name, fn in (("each block read whole", block), ("each block read a chunk at a time", chunkwise)):
        for threads in (1, 2):
            ts = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                with ThreadPoolExecutor(threads) as ex:
                    knn_merge(list(ex.map(fn, range(-(-n // b)))), m=10)
                ts.append(time.perf_counter() - t0)
            print(f"   {name:36} {threads} thread{'s' if threads > 1 else ' '}: {statistics.median(ts) * 1e3:7.0f} ms")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="a store written by bench/query.py")
    p.add_argument("--rows", type=int, default=1_000_000, help="rows to read (default: %(default)s)")
    p.add_argument("--fault-rows", type=int, default=65_536, help="rows read in section 1 (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    print(f"load average {os.getloadavg()}")
    section_faults(argparse.Namespace(store=a.store, rows=a.fault_rows, repeats=a.repeats))
    section_threads(a)
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
