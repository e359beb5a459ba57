"""The per-block kernel and the Dask graph that applies it.

One task per raster block: cut the windows the block owns (using its
``T - S`` halo from the neighbours below and to the right), drop the empty
ones *before* the model runs, and fingerprint the rest. A window's
fingerprint does not depend on the chunking: its pixels are the same
whichever block cuts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed

from .models import ModelOptions, ResolvedWeights, get_spec, load_model
from .raster import RasterSpec, limit_gdal_cache, to_rgb_and_empty
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


def block_kernel(
    block: np.ndarray,
    plan: BlockPlan,
    spec: RasterSpec,
    tiling: Tiling,
    model: ModelOptions,
    weights: ResolvedWeights,
) -> BlockResult:
    """Windows → validity → model → features for one block (with its halo)."""
    limit_gdal_cache()
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

    The raster (``DataArray(band, y, x)`` from :func:`dask_fp.raster.open_raster`)
    gets a halo of ``T - S`` pixels below and to the right of each block with
    :func:`dask.array.overlap.overlap`; the model tasks carry the Dask
    resources of ``model.resources`` so they land on GPU workers when asked.
    """
    arr: da.Array = raster.data
    n_wy, n_wx = grid_shape(spec.height, spec.width, tile=tiling.tile, stride=tiling.stride)
    plans = plan_blocks((arr.chunks[1], arr.chunks[2]), n_wy, n_wx, tiling.stride)
    if not any(p.n_windows for p in plans):
        return []
    halo = tiling.halo
    if halo and (len(arr.chunks[1]) > 1 or len(arr.chunks[2]) > 1):
        depth = {0: 0, 1: (0, halo), 2: (0, halo)}
        arr = da.overlap.overlap(arr, depth=depth, boundary="none", allow_rechunk=False)
    blocks = arr.to_delayed()
    annotations = {"resources": dict(model.resources)} if model.resources else {}
    out = []
    with dask.annotate(**annotations):
        for plan in plans:
            if not plan.n_windows:
                continue
            i, j = plan.index
            task = dask.delayed(block_kernel, pure=True)(
                blocks[0, i, j], plan, spec, tiling, model, weights,
                dask_key_name=f"fingerprint-{dask.base.tokenize(spec.sha256, tiling, model, weights, arr.name, i, j)}",
            )
            out.append((plan, task))
    return out
