"""Cost of area/source filters, combined (many-example) queries and the classifier, against plain k-NN.

Builds one store of random fingerprints (D = 512, float32) in two sources
placed in UTM zone 17N (so every tile has a real lon/lat), then times, on
one LocalCluster, in one run:

- ``search`` with one query vector, k = 10, no filter: the reference;
- the same with a WGS84 bbox (about 10 % of the tiles), a polygon in UTM
  (``area_crs``), a source filter (half the tiles), and a bbox that keeps
  every tile (the mask's own cost);
- ``search(positives=8 uids, negatives=4 uids)``: one combined query;
- ``classify`` (8 positives, 8 negatives) for the top 10, and for every tile
  with probability >= 0.6.

Each repeat draws a fresh query vector / fresh labels, and runs every case
once (round robin, so load from other users falls on all cases alike). The
table shows medians and the ratio to the unfiltered search measured in the
same run (absolute times on a shared machine are noisy; the ratios are the
result). The bbox and polygon lie in source 0 only, so whole blocks of
source 1 are skipped; "bbox keeping every tile" shows the mask's own cost.
The filtered results are checked against numpy brute force over the rows
the filter keeps.

Run::

    .venv/bin/python bench/filters.py                # 200,000 rows, 5 repeats
    .venv/bin/python bench/filters.py --rows 20000 --repeats 2   # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DIM = 512
K = 10
ROWS_PER_BATCH = 65_536
UTM17 = "EPSG:32617"
TILE, STRIDE, RES = 256, 128, 0.5  # px, px, m per px


def build_store(path: Path, n: int, *, seed: int) -> Any:
    """``n`` random rows in two sources side by side (UTM 17N), written through the store API."""
    from pyproj import CRS, Transformer

    from dask_fp.store import StoreSettings, open_store, open_writer
    from dask_fp.tiling import make_uid

    if path.exists():
        shutil.rmtree(path)
    settings = StoreSettings(model="resnet18", weights="random", weights_sha256="bench", feature_dim=DIM,
                             tile=TILE, stride=STRIDE, max_empty=0.5, dtype="float32", normalisation="bench")
    to_ll = Transformer.from_crs(UTM17, "EPSG:4326", always_xy=True)
    half = [n // 2, n - n // 2]
    with open_writer(path, settings) as w:
        for s, m in enumerate(half):
            nx = math.ceil(math.sqrt(m))
            ny = math.ceil(m / nx)
            x0 = 500_000.0 + s * (nx * STRIDE + TILE) * RES
            transform = [RES, 0.0, x0, 0.0, -RES, 3_500_000.0]
            entry = {"index": s, "path": f"source{s}.tif", "sha256": f"bench-{n}-{seed}-{s}",
                     "crs": CRS.from_user_input(UTM17).to_wkt(), "crs_name": UTM17, "transform": transform,
                     "shape": [(ny - 1) * STRIDE + TILE, (nx - 1) * STRIDE + TILE], "bands": [1, 2, 3],
                     "alpha": None, "nodata": None, "scale": None, "dtype": "uint8"}

            def batches(m: int = m, nx: int = nx, x0: float = x0, s: int = s) -> Iterator[dict[str, np.ndarray]]:
                for start in range(0, m, ROWS_PER_BATCH):
                    b = min(ROWS_PER_BATCH, m - start)
                    r = np.arange(start, start + b)
                    wy, wx = (r // nx).astype(np.int32), (r % nx).astype(np.int32)
                    x = x0 + (wx * STRIDE + TILE / 2) * RES
                    y = 3_500_000.0 - (wy * STRIDE + TILE / 2) * RES
                    lon, lat = to_ll.transform(x, y)
                    fp = np.random.default_rng([seed, s, start]).random((b, DIM), dtype=np.float32)
                    yield {"fingerprint": fp, "uid": make_uid(s, wy, wx), "source": np.full(b, s, np.int32),
                           "wy": wy, "wx": wx, "x": x, "y": y, "lon": np.asarray(lon), "lat": np.asarray(lat)}

            w.append(entry, batches(), upper_bound=m)
    return open_store(path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--workdir", default=str(REPO / "bench-output"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import shapely

    from dask_fp import classify, search
    from dask_fp.cluster import ClusterOptions, get_client
    from dask_fp.search import Query

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    st = build_store(work / "filters-store", args.rows, seed=args.seed)
    print(f"store: {args.rows:,} rows x {DIM} float32 in {time.perf_counter() - t0:.1f} s")
    c = st.coords()
    lon, lat, src, uid, x, y = c["lon"], c["lat"], c["source"], c["uid"], c["x"], c["y"]
    a = src == 0
    bbox = (float(np.quantile(lon[a], 0.3)), float(np.quantile(lat[a], 0.3)), float(np.quantile(lon[a], 0.6)),
            float(np.quantile(lat[a], 0.6)))
    utm = shapely.Polygon([(np.quantile(x[a], 0.5), np.quantile(y[a], 0.2)),
                           (np.quantile(x[a], 0.9), np.quantile(y[a], 0.5)),
                           (np.quantile(x[a], 0.6), np.quantile(y[a], 0.8))])
    everything = (float(lon.min()), float(lat.min()), float(lon.max()), float(lat.max()))
    cases: dict[str, dict[str, Any]] = {
        "search, no filter": {},
        "search, WGS84 bbox": {"area": bbox},
        "search, UTM polygon (area_crs)": {"area": utm, "area_crs": UTM17},
        "search, sources=[1]": {"sources": [1]},
        "search, bbox keeping every tile": {"area": everything},
    }
    kept = {"search, WGS84 bbox": shapely.intersects_xy(shapely.box(*bbox), lon, lat),
            "search, sources=[1]": src == 1}

    def qvec(i: int) -> list[Query]:
        return [Query("q", np.random.default_rng([args.seed, 99, i]).random(DIM, dtype=np.float32))]

    def labels(i: int, n_pos: int, n_neg: int) -> tuple[list[int], list[int]]:
        r = np.random.default_rng([args.seed, 55, i]).choice(len(uid), n_pos + n_neg, replace=False)
        return [int(u) for u in uid[r[:n_pos]]], [int(u) for u in uid[r[n_pos:]]]

    n_hits: list[int] = []

    def thr(i: int) -> None:
        h = classify(st, positives=labels(i, 8, 8)[0], negatives=labels(i, 8, 8)[1], threshold=0.6)
        n_hits.append(len(h))

    fns: dict[str, Callable[[int], Any]] = {
        name: (lambda i, kw=kw: search(st, qvec(i), k=K, dedup=False, **kw)) for name, kw in cases.items()}
    fns["search, 8 positives + 4 negatives"] = lambda i: search(
        st, positives=labels(i, 8, 4)[0], negatives=labels(i, 8, 4)[1], k=K, dedup=False)
    fns["classify, top 10"] = lambda i: classify(st, positives=labels(i, 8, 8)[0],
                                                 negatives=labels(i, 8, 8)[1], k=K)
    fns["classify, threshold 0.6"] = thr
    res: dict[str, list[float]] = {name: [] for name in fns}
    checks: dict[str, bool] = {}
    with get_client(ClusterOptions(workers=args.workers, threads_per_worker=1, dashboard=False)):
        for name, kw in cases.items():
            if name in kept:
                fp = np.asarray(st.arrays["fingerprint"][: st.committed])
                rows = np.flatnonzero(kept[name])
                q = qvec(0)[0].vector.astype(np.float64)
                d = ((fp[rows].astype(np.float64) - q) ** 2).sum(1)
                want = rows[np.lexsort((rows, d))][:K]
                got = search(st, qvec(0), k=K, dedup=False, **kw).table["row"].to_numpy()
                checks[name] = bool(np.array_equal(got, want))
                print(f"{name}: equals numpy brute force over the {len(rows):,} kept rows: {checks[name]}")
                del fp
        for fn in fns.values():  # warm-up (imports, first graph), not timed
            fn(args.repeats)
        # Round robin: every case runs once per repeat, so load from other users of the machine
        # falls on all cases alike; each repeat draws a fresh query vector / fresh labels.
        for i in range(args.repeats):
            for name, fn in fns.items():
                t1 = time.perf_counter()
                fn(i)
                res[name].append(time.perf_counter() - t1)
            print(f"repeat {i + 1}/{args.repeats} done")
    print(f"classify, threshold 0.6: {int(np.median(n_hits)):,} hits (median)")
    base = statistics.median(res["search, no filter"])
    lines = ["| case | median ms | ratio to no filter |", "|---|---:|---:|"]
    for name, runs in res.items():
        lines.append(f"| {name} | {statistics.median(runs) * 1e3:.0f} | {statistics.median(runs) / base:.2f} |")
    print("\n".join(lines))
    out = {"rows": args.rows, "dim": DIM, "repeats": args.repeats, "workers": args.workers,
           "median_s": {k: statistics.median(v) for k, v in res.items()}, "runs_s": res, "checks": checks,
           "threshold_hits": n_hits}
    (work / "filters-results.json").write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
