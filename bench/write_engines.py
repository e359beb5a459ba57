"""Zarr region writes (dask-fp's store) against Icechunk, for the worker-side write of issue 11.

Both engines get the same job: fingerprint rows (D = 512 float32) plus the store's
nine coordinate columns, ``--rows`` rows in chunks of 8,192, written by Dask tasks
on a LocalCluster (one task per chunk, every array of the chunk), then made visible
by one commit on the client. Fresh data per repeat (seeded by repeat and chunk).

* **region**: ``dask_fp.store.open_writer`` creates a real store, workers run
  ``zarr.open_array(...)[lo:hi] = rows`` into it (what ``dask_fp.store.region``
  does), and the writer's ``commit`` publishes the row count.
* **icechunk**: a local-filesystem Icechunk repository with the same arrays,
  codecs and chunks; a writable session is forked to the tasks, each writes its
  region through ``fork.store``, and the client merges the forks and commits.

Then, for each: a cold open and a full single-process read of ``fingerprint``
(chunk by chunk, summing), and the bytes on disk. Every store is checked to hold
exactly the rows written before any time is reported.

    .venv/bin/python bench/write_engines.py                 # 262,144 rows, 3 repeats
    .venv/bin/python bench/write_engines.py --rows 65536 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DIM, CHUNK = 512, 8192
COLS = {"uid": "int64", "source": "int32", "wy": "int32", "wx": "int32", "x": "float64", "y": "float64",
        "lon": "float64", "lat": "float64", "norm2": "float32"}


def rows_for(seed: int, chunk: int, lo: int, hi: int) -> dict[str, np.ndarray]:
    """The rows ``lo:hi`` of a repeat: reproducible from (seed, chunk) alone."""
    g = np.random.default_rng([seed, chunk])
    n = hi - lo
    fp = g.random((n, DIM), dtype=np.float32)
    r = np.arange(lo, hi)
    out = {"fingerprint": fp, "uid": r.astype(np.int64), "source": np.zeros(n, np.int32),
           "wy": (r // 1024).astype(np.int32), "wx": (r % 1024).astype(np.int32)}
    for k in ("x", "y", "lon", "lat"):
        out[k] = g.random(n)
    out["norm2"] = np.einsum("ij,ij->i", fp, fp)
    return out


def region_task(path: str, seed: int, chunk: int, lo: int, hi: int) -> int:
    import zarr

    rows = rows_for(seed, chunk, lo, hi)
    for name, v in rows.items():
        zarr.open_array(f"{path}/{name}", mode="r+", zarr_format=3)[lo:hi] = v
    return hi - lo


def icechunk_task(fork: Any, seed: int, chunk: int, lo: int, hi: int) -> Any:
    import zarr

    rows = rows_for(seed, chunk, lo, hi)
    root = zarr.open_group(fork.store, mode="r+")
    for name, v in rows.items():
        root[name][lo:hi] = v
    return fork


def write_region(client: Any, path: Path, n: int, seed: int) -> float:
    from dask_fp.store import StoreSettings, open_writer

    t0 = time.perf_counter()
    settings = StoreSettings(model="bench", weights="random", weights_sha256="", feature_dim=DIM, tile=256,
                             stride=256, max_empty=0.5, dtype="float32", normalisation="imagenet")
    with open_writer(path, settings) as w:
        w.grow_to(n)
        futs = [client.submit(region_task, str(path), seed, c, lo, min(lo + CHUNK, n), pure=False)
                for c, lo in enumerate(range(0, n, CHUNK))]
        assert sum(client.gather(futs)) == n
        w.commit([], n)
    return time.perf_counter() - t0


def write_icechunk(client: Any, path: Path, n: int, seed: int) -> float:
    import icechunk
    import zarr
    from zarr.codecs import BloscCodec

    t0 = time.perf_counter()
    repo = icechunk.Repository.create(icechunk.local_filesystem_storage(str(path)))
    session = repo.writable_session("main")
    root = zarr.group(store=session.store, zarr_format=3)
    comp = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    root.create_array("fingerprint", shape=(n, DIM), chunks=(CHUNK, DIM), dtype="float32", compressors=comp)
    for name, dt in COLS.items():
        root.create_array(name, shape=(n,), chunks=(CHUNK,), dtype=dt)  # default codecs, as the store
    session.commit("arrays")  # a fork needs a session with no uncommitted changes
    session = repo.writable_session("main")
    fork = session.fork()
    futs = [client.submit(icechunk_task, fork, seed, c, lo, min(lo + CHUNK, n), pure=False)
            for c, lo in enumerate(range(0, n, CHUNK))]
    session.merge(*client.gather(futs))
    session.commit(f"{n} rows")
    return time.perf_counter() - t0


def open_and_scan(engine: str, path: Path) -> tuple[float, float, Any]:
    import zarr

    t0 = time.perf_counter()
    if engine == "icechunk":
        import icechunk

        repo = icechunk.Repository.open(icechunk.local_filesystem_storage(str(path)))
        arr = zarr.open_group(repo.readonly_session("main").store, mode="r")["fingerprint"]
    else:
        from dask_fp.store import open_store

        st = open_store(path)
        arr = zarr.open_array(str(path / "fingerprint"), mode="r", zarr_format=3)
        assert st.committed == arr.shape[0]
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    total = 0.0
    for lo in range(0, arr.shape[0], CHUNK):
        total += float(arr[lo : lo + CHUNK].sum(dtype=np.float64))
    return t_open, time.perf_counter() - t0, arr


def check(arr: Any, n: int, seed: int) -> None:
    for c, lo in enumerate(range(0, n, CHUNK)):
        want = rows_for(seed, c, lo, min(lo + CHUNK, n))["fingerprint"]
        np.testing.assert_array_equal(arr[lo : lo + len(want)], want)


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=262_144)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--workdir", default="bench-output/write-engines")
    a = p.parse_args(argv)
    import icechunk
    import zarr
    from distributed import Client, LocalCluster

    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    res: dict[str, dict[str, list[float]]] = {e: {"write": [], "open": [], "scan": [], "disk": []}
                                              for e in ("region", "icechunk")}
    with LocalCluster(n_workers=a.workers, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as lc, Client(lc) as client:
        client.run(rows_for, 0, 0, 0, 1)  # warm the workers' imports
        for rep in range(a.repeats):
            for engine in (("region", "icechunk") if rep % 2 == 0 else ("icechunk", "region")):
                path = work / f"{engine}-{rep}"
                write = write_region if engine == "region" else write_icechunk
                res[engine]["write"].append(write(client, path, a.rows, seed=rep))
                t_open, t_scan, arr = open_and_scan(engine, path)
                check(arr, a.rows, rep)
                res[engine]["open"].append(t_open)
                res[engine]["scan"].append(t_scan)
                res[engine]["disk"].append(disk_bytes(path))
                shutil.rmtree(path)
    fp_mb = a.rows * DIM * 4 / 2**20
    print(f"{a.rows:,} rows x {DIM} float32 ({fp_mb:,.0f} MiB of fingerprints) + 9 coordinate columns, "
          f"chunks of {CHUNK:,} rows; LocalCluster {a.workers} x 1 thread; medians of {a.repeats}; "
          f"zarr {zarr.__version__}, icechunk {icechunk.__version__}; load average {os.getloadavg()[0]:.1f}")
    print("\n| engine | write + commit, s | MiB/s | cold open, ms | 1-process scan, MiB/s | on disk, MiB |")
    print("|---|---|---|---|---|---|")
    med = {e: {k: statistics.median(v) for k, v in r.items()} for e, r in res.items()}
    for e, m in med.items():
        print(f"| {e} | {m['write']:.2f} | {fp_mb / m['write']:,.0f} | {m['open'] * 1e3:.1f} | "
              f"{fp_mb / m['scan']:,.0f} | {m['disk'] / 2**20:,.0f} |")
    r, i = med["region"], med["icechunk"]
    print(f"\nicechunk / region: write {i['write'] / r['write']:.2f}x the time, scan "
          f"{i['scan'] / r['scan']:.2f}x the time, open {i['open'] / r['open']:.2f}x the time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
