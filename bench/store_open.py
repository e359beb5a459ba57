"""Store costs against store size: ``open_store``, ``info``, a uid lookup, at 1M and 10M rows.

Builds two synthetic stores with 1,000 sources each (1M and 10M rows, 512-d
float32, the default chunking: 8,192 rows per chunk, so 123 and 1,221 chunk
files per array). The schema and the sources table are made by the real
writer (``open_writer``); the rows are then written straight into the arrays
in chunk-aligned slabs and committed with one attributes update, which is
much faster than appending 10M rows through ``StoreWriter.append``. The
fingerprints are a constant (they compress to almost nothing, so the 10M-row
store takes ~1 GB on disk instead of 20 GB); coordinates and uids are real
(``source << 42 | wy << 21 | wx``, 100 x 100 windows per source for 10M rows).

For each store, medians over ``--repeats`` of: a fresh ``open_store``; its
``info()``; a uid lookup of a uid drawn fresh per repeat (``uid_rows``);
and, as the peer measured in the same run, the per-chunk walk that opening
used to do (``Store.verify``: one ``stat`` per chunk file) and the old
``info`` disk walk (``rglob`` + ``stat`` of every file). The ratios
10M / 1M show what grows with the store. The OS page cache is warm after the
first repeat for all of them alike.

Run::

    .venv/bin/python bench/store_open.py --workdir /tmp/dask-fp-bench-open   # ~3 min, ~1.2 GB, deleted after

"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DIM = 512
SOURCES = 1000


def settings() -> Any:
    from dask_fp.store import StoreSettings

    return StoreSettings(model="resnet18", weights="random", weights_sha256="bench", feature_dim=DIM,
                         tile=256, stride=128, max_empty=0.5, dtype="float32", normalisation="bench")


def entry(i: int, rows: tuple[int, int], side: int) -> dict[str, Any]:
    t = [0.5, 0.0, 500_000.0 + 2000.0 * (i % 40), 0.0, -0.5, 3_500_000.0 - 2000.0 * (i // 40)]
    ny, n = (rows[1] - rows[0]) // side, rows[1] - rows[0]
    return {"index": i, "path": f"synthetic-{i}.tif", "sha256": f"bench-{i}", "crs": "EPSG:32617",
            "crs_name": "EPSG:32617", "transform": t, "shape": [(ny + 1) * 128, (side + 1) * 128],
            "bands": [1, 2, 3], "alpha": None, "nodata": None, "scale": None, "dtype": "uint8",
            "rows": list(rows), "windows": n, "dropped": 0, "tiles": n}


def build(path: Path, n: int, log: Callable[[str], None]) -> float:
    """A committed store of ``n`` rows in :data:`SOURCES` sources; returns seconds taken."""
    from dask_fp.store import open_writer
    from dask_fp.store import sources as table
    from dask_fp.tiling import make_uid

    t0 = time.perf_counter()
    per = n // SOURCES
    side = 100  # windows per grid row; per // side grid rows
    assert per % side == 0, "rows per source must be a multiple of 100"
    with open_writer(path, settings()) as w:
        # every chunk is stored, even one equal to the fill value (as the writer does)
        arrs = w.arrays
        rows = int(arrs["fingerprint"].chunks[0])
        for a in w.arrays.values():
            a.resize((n, *a.shape[1:]))
        arrs = {k: w.group[k].with_config({"write_empty_chunks": True}) for k in w.arrays}
        slab = rows * 8
        fp = np.full((slab, DIM), 0.5, dtype=np.float32)
        for lo in range(0, n, slab):
            hi = min(n, lo + slab)
            r = np.arange(lo, hi, dtype=np.int64)
            src, k = np.divmod(r, per)
            wy, wx = np.divmod(k, side)
            arrs["fingerprint"][lo:hi] = fp[: hi - lo]
            cols = {"uid": make_uid(src, wy, wx), "source": src.astype(np.int32), "wy": wy.astype(np.int32),
                    "wx": wx.astype(np.int32), "x": wx * 64.0 + 64, "y": wy * -64.0 - 64,
                    "lon": -81.0 + src * 1e-3 + wx * 1e-6, "lat": 31.0 + wy * 1e-6,
                    "norm2": np.full(hi - lo, 0.25 * DIM, np.float32)}
            for name, v in cols.items():
                arrs[name][lo:hi] = v
        entries = [entry(i, (i * per, (i + 1) * per), side) for i in range(SOURCES)]
        table.write_entries(w.group, 0, entries)
        w.group.attrs.update({"committed_sources": SOURCES, "committed": n})
    took = time.perf_counter() - t0
    log(f"built {path.name}: {n:,} rows, {SOURCES} sources, {-(-n // rows)} chunks per array, {took:.1f} s")
    return took


def median_time(fn: Callable[[int], Any], repeats: int) -> float:
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(path: Path, n: int, repeats: int) -> dict[str, float]:
    from dask_fp.query import uid_rows
    from dask_fp.store import open_store
    from dask_fp.tiling import make_uid

    rng = np.random.default_rng(n)
    per = n // SOURCES
    side = 100
    out = {
        "open_store": median_time(lambda i: open_store(path), repeats),
        "info": median_time(lambda i: open_store(path).info(), repeats),
    }

    def lookup(i: int) -> None:
        st = open_store(path)
        s, k = int(rng.integers(SOURCES)), int(rng.integers(per))
        u = int(make_uid(s, k // side, k % side))
        (row,) = uid_rows(st, [u])
        assert row == s * per + k, (row, s, k)

    out["open + uid lookup"] = median_time(lookup, repeats)
    st = open_store(path)
    out["peer: per-chunk stat walk (old open)"] = median_time(lambda i: st.verify(), repeats)
    out["peer: rglob disk walk (old info)"] = median_time(
        lambda i: sum(f.stat().st_size for f in path.rglob("*") if f.is_file()), repeats)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dask-fp-bench-open"))
    ap.add_argument("--rows", type=int, nargs=2, default=[1_000_000, 10_000_000])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the stores (deleted by default)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))

    def log(m: str) -> None:
        print(m, file=sys.stderr, flush=True)

    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    try:
        for n in args.rows:
            path = args.workdir / f"store-{n}"
            shutil.rmtree(path, ignore_errors=True)
            build(path, n, log)
            results[n] = measure(path, n, args.repeats)
            if not args.keep:
                shutil.rmtree(path, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    small, big = args.rows
    print(f"| step (median of {args.repeats}) | {small:,} rows | {big:,} rows | ratio |")
    print("|---|---:|---:|---:|")
    for k in results[small]:
        a, b = results[small][k], results[big][k]
        print(f"| {k} | {a * 1e3:.1f} ms | {b * 1e3:.1f} ms | {b / a:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
