"""GPU benchmark: model-only and end-to-end tiles/s, and bf16 vs fp32 agreement.

Run on a machine with a CUDA GPU (see bench/gpu.sh, which installs what is
missing first):

    python bench/gpu.py [--size 16384] [--batch 256] [--workers 1 --threads 8]

Prints:

* model-only throughput of ResNet-18 at 256 px (uint8 batches already in host
  memory -> pinned -> device -> normalise on the device -> bf16 autocast,
  channels_last), for a few batch sizes;
* fp32 vs bf16 fingerprints of the same windows on the same device: the
  minimum cosine similarity (goal >= 0.999);
* end-to-end ``dask_fp.ingest`` tiles/s from a tiled GeoTIFF on local disk
  (textured synthetic imagery, written first), with one GPU worker process
  whose threads read, tile and feed the GPU (goals on one H200: >= 20,000
  tiles/s model-only, >= 5,000 tiles/s end to end).

``--e2e-only`` skips the model-only and agreement parts; ``--models`` runs
the end-to-end ingest with each named model (e.g. ``resnet18,colour-layout``:
the second is the near-zero-cost numpy baseline, so its rate is the
pipeline's ceiling); ``--profile`` prints where the worker's threads spent
their time (Dask's statistical profiler, functions by share of samples).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def model_only(batches: list[int], seconds: float = 5.0) -> list[tuple[int, float]]:
    import torch

    from dask_fp.embedder import load_model
    from dask_fp.models import ModelOptions, resolve_weights

    out = []
    for bs in batches:
        opts = ModelOptions("resnet18", weights="random", device="cuda", batch_size=bs)
        m = load_model(opts, resolve_weights(opts))
        x = np.random.default_rng(0).integers(0, 256, (bs * 8, 3, 256, 256), dtype=np.uint8)
        m.embed(x)  # warm-up (cuDNN autotune)
        torch.cuda.synchronize()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            m.embed(x)
            n += len(x)
        torch.cuda.synchronize()
        out.append((bs, n / (time.perf_counter() - t0)))
    return out


def agreement(n: int = 512) -> float:
    import torch

    from dask_fp.embedder import load_model
    from dask_fp.models import IMAGENET_MEAN, IMAGENET_STD, ModelOptions, resolve_weights

    opts = ModelOptions("resnet18", weights="random", device="cuda", batch_size=128)
    m = load_model(opts, resolve_weights(opts))
    x = np.random.default_rng(1).integers(0, 256, (n, 3, 256, 256), dtype=np.uint8)
    bf16 = m.embed(x)
    with torch.inference_mode():
        xt = torch.from_numpy(x).cuda().float()
        xt = (xt - torch.tensor(IMAGENET_MEAN, device="cuda").view(1, 3, 1, 1)) / torch.tensor(
            IMAGENET_STD, device="cuda").view(1, 3, 1, 1)
        fp32 = torch.cat([m.net(xt[i:i + 128].contiguous(memory_format=torch.channels_last)).float()
                          for i in range(0, n, 128)]).cpu().numpy()
    cos = (bf16 * fp32).sum(1) / (np.linalg.norm(bf16, axis=1) * np.linalg.norm(fp32, axis=1))
    return float(cos.min())


def end_to_end(size: int, batch: int, workers: int, threads: int, work: Path, model: str = "resnet18",
               profile: bool = False) -> tuple[int, float]:
    import rasterio
    from distributed import Client, LocalCluster
    from rasterio.transform import from_origin

    import dask_fp
    from dask_fp.models import ModelOptions

    work.mkdir(parents=True, exist_ok=True)
    tifs = {}
    for side in (2048, size):  # a small raster warms the workers up (imports, CUDA, model, cuDNN)
        tif = tifs[side] = work / f"gpu-{side}.tif"
        if tif.exists():
            continue
        rng = np.random.default_rng(side)
        with rasterio.open(tif, "w", driver="GTiff", height=side, width=side, count=3, dtype="uint8",
                           tiled=True, blockxsize=512, blockysize=512, compress="deflate", crs="EPSG:32616",
                           transform=from_origin(500000, 4000000, 0.1, 0.1)) as ds:
            for r in range(0, side, 2048):
                small = rng.integers(20, 235, (3, 2048 // 8, side // 8), dtype=np.uint8)
                ds.write(np.repeat(np.repeat(small, 8, 1), 8, 2), window=((r, r + 2048), (0, side)))
    tif, store = tifs[size], work / "gpu.zarr"
    with LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True, host="127.0.0.1",
                      resources={"GPU": 1}) as lc, Client(lc) as client:
        opts = ModelOptions(model, weights="random" if model != "colour-layout" else None, device="cuda",
                            batch_size=batch, resources=(("GPU", 1.0),) if workers > 1 else None)
        for path in (tifs[2048], tif):
            shutil.rmtree(store, ignore_errors=True)
            t0, wall0 = time.perf_counter(), time.time()
            rep = dask_fp.ingest([str(path)], str(store), model=opts, client=client, progress=False)
            if path != tif:
                print(f"warm-up ({model}, 2048 px, fresh workers): {time.perf_counter() - t0:.1f} s")
        dt = time.perf_counter() - t0  # the timed run, on warm workers
        if profile:
            from ingest_profile import profile_summary  # bench/, beside this script

            time.sleep(1.5)  # the workers' last profile cycle
            print(profile_summary(client, wall0))
    print(f"{model}: stored vs embed() of the same windows cut here, min cosine over 64 tiles:"
          f" {stored_vs_embed(store, tif, opts):.6f}")
    return rep.tiles, dt


def stored_vs_embed(store: Path, tif: Path, opts) -> float:
    """Minimum cosine between stored fingerprints and ``embed()`` of the same windows cut in this process."""
    import rasterio
    from rasterio.windows import Window

    import dask_fp
    from dask_fp.embedder import embed

    st = dask_fp.open_store(store)
    c = st.coords()
    rows = np.linspace(0, st.committed - 1, 64).astype(int)
    t, s = int(st.attrs["tile"]), int(st.attrs["stride"])
    with rasterio.open(tif) as ds:
        wins = np.stack([ds.read([1, 2, 3], window=Window(int(c["wx"][r]) * s, int(c["wy"][r]) * s, t, t))
                         for r in rows])
    ref = embed(wins, opts)
    got = np.asarray(st.fingerprints())[rows]
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1) + 1e-30)
    return float(cos.min())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=16384)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--work", default="/tmp/dask-fp-gpu")
    p.add_argument("--models", default="resnet18", help="comma-separated models for the end-to-end runs")
    p.add_argument("--e2e-only", action="store_true", help="skip the model-only and bf16 agreement parts")
    p.add_argument("--profile", action="store_true", help="print the worker profile of each end-to-end run")
    p.add_argument("--peer", action="store_true",
                   help="also time rasterio read + window + colour-layout in this process (bench/ingest_peers.py)")
    a = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device visible to torch; nothing to measure", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    if not a.e2e_only:
        print("\n| batch | model-only tiles/s (ResNet-18, 256 px, bf16, channels_last) |\n|---|---|")
        for bs, rate in model_only([128, 256, 512]):
            print(f"| {bs} | {rate:,.0f} |")
        print(f"\nbf16 vs fp32 fingerprints, min cosine over 512 windows: {agreement():.5f} (goal >= 0.999)")
    for model in a.models.split(","):
        n, dt = end_to_end(a.size, a.batch, a.workers, a.threads, Path(a.work), model, a.profile)
        print(f"\nend to end, {model}: {n} tiles in {dt:.1f} s = {n / dt:,.0f} tiles/s "
              f"({a.workers} worker x {a.threads} threads, batch {a.batch}, {a.size} px GeoTIFF on local disk)",
              flush=True)
    if a.peer:
        sys.path.insert(0, str(REPO / "bench"))
        from ingest_peers import LAYOUT, rasterio_windows

        from dask_fp.tiling import Tiling

        tif = Path(a.work) / f"gpu-{a.size}.tif"
        rasterio_windows(Path(a.work) / "gpu-2048.tif", LAYOUT, Tiling())  # warm-up
        t0 = time.perf_counter()
        n = rasterio_windows(tif, LAYOUT, Tiling())
        dt = time.perf_counter() - t0
        print(f"\nrasterio read + window + colour-layout, one process, one thread: {n} tiles in {dt:.1f} s"
              f" = {n / dt:,.0f} tiles/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
