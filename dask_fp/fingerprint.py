"""The per-block kernel and the Dask graph that applies it.

One task per raster block: read the block with its ``T - S`` halo below and
to the right straight from the file (one windowed rasterio read), cut the
windows it owns, drop the empty ones *before* the model runs, and
fingerprint the rest. A window's fingerprint does not depend on the
chunking: its pixels are the same whichever block cuts it.

Reading the halo from the file costs decoding the neighbours' edge blocks
again: GDAL decodes a multi-band window of a pixel-interleaved GeoTIFF
straight into the output, not through its block cache (+44 % read CPU for a
2048 px chunk over 512 px internal blocks: ``bench/ingest_profile.py
--stages``; reading band by band through the cache was slower still). The previous design read each chunk once as a Dask
array and attached halo strips with ``dask.array.overlap``: a copy of every
block, xarray's indexing layers and worker-to-worker transfers, about twice
the worker CPU per tile in total (docs/performance.md, "Pipeline ceiling").
Each worker thread keeps its datasets open (:func:`open_dataset`), so a
block does not pay for opening the file (for ``/vsicurl/`` inputs: header
requests) again.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dask
import numpy as np
from dask.delayed import Delayed

from .embedder import load_model
from .inspection import RasterSpec
from .malloc import keep_buffers
from .models import ModelOptions, ResolvedWeights, get_spec
from .raster import limit_gdal_cache, to_rgb_and_empty
from .tiling import Tiling, grid_shape, owned_windows, window_empty_fraction

if TYPE_CHECKING:
    import xarray as xr


@dataclass(frozen=True)
class BlockResult:
    """What one block task returns: its kept windows and their fingerprints."""

    wy: np.ndarray  # int32 (n,)
    wx: np.ndarray  # int32 (n,)
    features: np.ndarray  # float32 (n, dim)
    n_windows: int  # windows the block owns, kept or dropped
    precision: str | None = None  # the forward pass's precision (None: the model did not run)


@dataclass(frozen=True)
class BlockPlan:
    """A block's place in the window grid."""

    index: tuple[int, int]
    wy0: int
    wy1: int
    wx0: int
    wx1: int

    @property
    def n_windows(self) -> int:
        return (self.wy1 - self.wy0) * (self.wx1 - self.wx0)


#: Rasterio datasets each worker thread keeps open (GDAL's block cache is per dataset handle).
OPEN_DATASETS_PER_THREAD = 8
_local = threading.local()


def open_dataset(path: str, sha256: str) -> Any:
    """A rasterio dataset of ``path`` kept open in this thread, reopened when the file changed.

    GDAL datasets are not safe to share between threads, so each thread keeps
    its own (at most :data:`OPEN_DATASETS_PER_THREAD`); the next block of the
    same file skips the open (and, for remote inputs, its header requests).
    Keyed by the content hash and, for local files, the file's identity
    (inode, size, mtime), so a file replaced under the same path is reopened.
    """
    import rasterio

    ident: tuple[object, ...] = (path, sha256)
    if not path.startswith("/vsi"):
        st = os.stat(path)
        ident += (st.st_ino, st.st_size, st.st_mtime_ns)
    cache: OrderedDict[tuple[object, ...], Any] | None = getattr(_local, "datasets", None)
    if cache is None:
        cache = _local.datasets = OrderedDict()
    ds = cache.get(ident)
    if ds is None or ds.closed:
        ds = cache[ident] = rasterio.open(path)
        while len(cache) > OPEN_DATASETS_PER_THREAD:
            cache.popitem(last=False)[1].close()
    cache.move_to_end(ident)
    return ds


def read_block(spec: RasterSpec, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """Pixels ``[rows) x [cols)`` of the bands a block needs (colour bands, then alpha): ``(bands, h, w)``."""
    from rasterio.windows import Window

    indexes = list(spec.bands) + ([spec.alpha] if spec.alpha is not None else [])
    ds = open_dataset(spec.path, spec.sha256)
    return ds.read(indexes, window=Window(cols[0], rows[0], cols[1] - cols[0], rows[1] - rows[0]))


def read_and_fingerprint(
    spec: RasterSpec,
    plan: BlockPlan,
    rows: tuple[int, int],
    cols: tuple[int, int],
    tiling: Tiling,
    model: ModelOptions,
    weights: ResolvedWeights,
) -> BlockResult:
    """The block task: :func:`read_block` (with its halo), then :func:`block_kernel`."""
    keep_buffers()
    limit_gdal_cache()
    return block_kernel(read_block(spec, rows, cols), plan, spec, tiling, model, weights)


def block_kernel(
    block: np.ndarray,
    plan: BlockPlan,
    spec: RasterSpec,
    tiling: Tiling,
    model: ModelOptions,
    weights: ResolvedWeights,
) -> BlockResult:
    """Windows → validity → model → features for one block (with its halo), pure numpy + model."""
    rgb, empty = to_rgb_and_empty(
        np.asarray(block),
        n_colour=len(spec.bands),
        has_alpha=spec.alpha is not None,
        nodata=spec.nodata,
        scale=spec.scale,
    )
    n_wy, n_wx = plan.wy1 - plan.wy0, plan.wx1 - plan.wx0
    frac = window_empty_fraction(empty, tile=tiling.tile, stride=tiling.stride, n_wy=n_wy, n_wx=n_wx)
    keep = frac <= tiling.max_empty
    iy, ix = np.nonzero(keep)
    precision = None
    if iy.size:  # an all-empty block never loads or runs the model
        loaded = load_model(model, weights)
        # The model takes the block and the kept windows' places: no copy of all windows at once.
        feats = loaded.embed_windows(rgb, iy, ix, tile=tiling.tile, stride=tiling.stride)
        precision = loaded.precision
    else:
        feats = np.empty((0, get_spec(model.name).dim), dtype=np.float32)
    return BlockResult(
        wy=(iy + plan.wy0).astype(np.int32),
        wx=(ix + plan.wx0).astype(np.int32),
        features=feats,
        n_windows=plan.n_windows,
        precision=precision,
    )


def plan_blocks(chunks: tuple[tuple[int, ...], tuple[int, ...]], n_wy: int, n_wx: int, stride: int) -> list[BlockPlan]:
    """Window ranges owned by each block of a raster chunked as ``chunks`` (y, x)."""
    ys = np.concatenate([[0], np.cumsum(chunks[0])])
    xs = np.concatenate([[0], np.cumsum(chunks[1])])
    plans = []
    for i in range(len(chunks[0])):
        wy0, wy1 = owned_windows(int(ys[i]), int(ys[i + 1]), n_windows=n_wy, stride=stride)
        for j in range(len(chunks[1])):
            wx0, wx1 = owned_windows(int(xs[j]), int(xs[j + 1]), n_windows=n_wx, stride=stride)
            plans.append(BlockPlan((i, j), wy0, wy1, wx0, wx1))
    return plans


def block_tasks(
    raster: xr.DataArray,
    spec: RasterSpec,
    tiling: Tiling,
    model: ModelOptions,
    weights: ResolvedWeights,
) -> list[tuple[BlockPlan, Delayed]]:
    """One delayed :class:`BlockResult` per raster block that owns windows.

    Blocks follow the chunks of ``raster`` (``DataArray(band, y, x)`` from
    :func:`dask_fp.raster.open_raster`, cropped to whole tiles); each task
    reads its block plus a halo of ``T - S`` pixels below and to the right
    (within the cropped image) straight from the file. The tasks carry the
    Dask resources of ``model.resources`` so they land on GPU workers when asked.
    """
    chunks = raster.chunks or tuple((n,) for n in raster.shape)  # a numpy-backed raster: one block
    ys = np.concatenate([[0], np.cumsum(chunks[1])]).astype(int)
    xs = np.concatenate([[0], np.cumsum(chunks[2])]).astype(int)
    n_wy, n_wx = grid_shape(spec.height, spec.width, tile=tiling.tile, stride=tiling.stride)
    plans = plan_blocks((chunks[1], chunks[2]), n_wy, n_wx, tiling.stride)
    annotations = {"resources": dict(model.resources)} if model.resources else {}
    out = []
    with dask.annotate(**annotations):
        for plan in plans:
            if not plan.n_windows:
                continue
            i, j = plan.index
            rows = (int(ys[i]), int(min(ys[i + 1] + tiling.halo, ys[-1])))
            cols = (int(xs[j]), int(min(xs[j + 1] + tiling.halo, xs[-1])))
            key = dask.base.tokenize(spec, tiling, model, weights, rows, cols)
            task = dask.delayed(read_and_fingerprint, pure=True)(
                spec, plan, rows, cols, tiling, model, weights, dask_key_name=f"fingerprint-{key}",
            )
            out.append((plan, task))
    return out
