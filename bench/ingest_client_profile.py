"""cProfile of the client process during a many-small-sources ingest (bench/ingest.py section 6's inputs).

    python bench/ingest_client_profile.py --data DEMO_DATA_DIR --workdir WORKDIR [--sources 16]

Runs one warm-up ingest (model load), then the profiled one, on a LocalCluster of
2 worker processes x 1 thread, and prints: the wall time, how much of it the
client's main thread spent waiting for the cluster (``as_completed``), the client's
own per-source steps (header checks, graph building, commits), and the top
functions by cumulative time. This is what section 6's "client CPU ms/tile"
column sums up; the profile says where that time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from ingest import SCALE_OUT_COLUMNS, TILING, cluster, drone_pixels, write_mosaic  # noqa: E402

#: (label, (file, function name)) of the client's steps worth reporting on their own.
STEPS = [
    ("whole ingest", ("ingest.py", "ingest")),
    ("waiting for the cluster (as_completed)", ("client.py", "__next__")),
    ("header checks (inspect_rasters)", ("raster.py", "inspect_rasters")),
    ("file hashes on the workers", ("ingest.py", "hash_on_workers")),
    ("graph of each source (_job)", ("ingest.py", "_job")),
    ("commits (StoreWriter.commit)", ("writer.py", "commit")),
]


def main(argv: list[str] | None = None) -> int:
    import dask_fp
    from dask_fp.inspection import RasterOptions
    from dask_fp.models import ModelOptions

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO / "demo-data"))
    p.add_argument("--workdir", default=str(REPO / "bench-output" / "client-profile"))
    p.add_argument("--sources", type=int, default=16)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    core = drone_pixels(Path(args.data))[:, :, :SCALE_OUT_COLUMNS]
    side = int(np.sqrt(args.sources))
    step = max(1, (core.shape[2] - 512) // max(side - 1, 1))
    model = ModelOptions("resnet18", weights="random", threads=1, batch_size=32)
    lc, client = cluster(2, 1)
    try:
        for r in range(2):  # warm-up, then the profiled run (new files)
            d = work / f"r{r}"
            d.mkdir()
            crop = core[:, 8 * r:, 8 * r:]
            paths = [str(write_mosaic(crop[:, step * (i // side):, step * (i % side):], 512, d / f"s{i}.tif"))
                     for i in range(side * side)]
            prof = cProfile.Profile() if r else None
            t0 = time.perf_counter()
            if prof:
                prof.enable()
            rep = dask_fp.ingest(paths, str(d / "s.zarr"), model=model, tiling=TILING,
                                 raster=RasterOptions(chunk=2048), client=client, progress=False, log=lambda m: None)
            if prof:
                prof.disable()
            dt = time.perf_counter() - t0
    finally:
        client.close()
        lc.close()
    assert prof is not None
    st = pstats.Stats(prof)
    cum: dict[tuple[str, str], float] = {}
    for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        key = (Path(file).name, func)
        cum[key] = max(cum.get(key, 0.0), ct)
    print(f"# client profile: {len(paths)} sources of 512 px, {rep.tiles} tiles, {dt:.2f} s wall\n")
    print("| client step | seconds (cumulative) | share of the ingest |\n|---|---|---|")
    total = cum.get(("ingest.py", "ingest"), dt)
    for label, key in STEPS:
        print(f"| {label} | {cum.get(key, 0.0):.3f} | {100 * cum.get(key, 0.0) / total:.1f} % |")
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(args.top)
    print("\n```\n" + out.getvalue().strip() + "\n```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
