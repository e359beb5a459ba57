"""The colour-layout fingerprint: a pure numpy baseline model with no weights.

Per band, the window is average-pooled to a ``grid`` x ``grid`` layout of
cells, the ``3 * grid * grid`` cell means (on [0, 1]) are flattened band by
band, and the vector is L2-normalised (an all-zero vector stays zero). Cell
``k`` of an axis of ``n`` pixels covers ``[k*n // grid, (k+1)*n // grid)``.

It is a legitimate, if simple, fingerprint (the colour-layout descriptor of
image retrieval), and so cheap that an ingest with it measures the pipeline
around the model: reading, windowing, the empty-window rule and writing.

Two ways to compute it give bit-identical results, because both sum the
pixels of each cell exactly (in int64) and finish with the same float ops:
:func:`layout_fingerprints` on cut windows (picture queries, any size), and
:func:`layout_of_block` on a whole block, which sums the block's cells once
and reads every window's cells from that table when the cells tile the
stride (``tile % grid == 0`` and ``stride % (tile // grid) == 0``), so
overlapping windows are never copied or summed twice.
"""

from __future__ import annotations

import numpy as np

#: Cells per axis of the colour-layout fingerprint (3 * 8 * 8 = 192 features).
GRID = 8


def cell_edges(n: int, grid: int) -> np.ndarray:
    """Pixel edges ``[k * n // grid for k in 0..grid]`` of the cells along an axis of ``n`` pixels."""
    if n < grid:
        raise ValueError(f"a {n} px axis cannot be pooled to {grid} cells; windows need at least {grid} px")
    return np.arange(grid + 1, dtype=np.int64) * n // grid


def finish(sums: np.ndarray, area: np.ndarray) -> np.ndarray:
    """Cell sums ``(n, bands, grid, grid)`` int64 and cell areas ``(grid, grid)`` to L2-normalised float32."""
    means = np.ascontiguousarray(sums, dtype=np.int64) / (area.astype(np.float64) * 255.0)
    flat = means.reshape(means.shape[0], -1)
    norm = np.sqrt(np.einsum("ij,ij->i", flat, flat))[:, None]
    out = np.zeros_like(flat)
    np.divide(flat, norm, out=out, where=norm > 0)
    return out.astype(np.float32)


def layout_fingerprints(windows: np.ndarray, *, grid: int = GRID) -> np.ndarray:
    """Colour-layout fingerprints of windows ``(n, bands, H, W)`` uint8, as ``(n, bands*grid*grid)`` float32."""
    w = np.asarray(windows)
    if w.ndim != 4:
        raise ValueError(f"expected (n, bands, H, W) windows, got shape {w.shape}")
    ey, ex = cell_edges(w.shape[2], grid), cell_edges(w.shape[3], grid)
    if w.shape[0] == 0:
        return np.zeros((0, w.shape[1] * grid * grid), dtype=np.float32)
    sums = np.add.reduceat(w, ey[:-1], axis=2, dtype=np.int64)
    sums = np.add.reduceat(sums, ex[:-1], axis=3)
    return finish(sums, np.outer(np.diff(ey), np.diff(ex)))


def gather_windows(rgb: np.ndarray, iy: np.ndarray, ix: np.ndarray, *, tile: int, stride: int,
                   out: np.ndarray | None = None) -> np.ndarray:
    """Copy windows ``(iy[k], ix[k])`` of a block ``(bands, h, w)`` into ``(n, bands, T, T)``.

    Window ``(i, j)`` covers ``rgb[:, i*S : i*S+T, j*S : j*S+T]``. ``out``, if
    given, is filled (its first ``n`` entries) instead of a new array.
    """
    n = len(iy)
    if out is None:
        out = np.empty((n, rgb.shape[0], tile, tile), dtype=rgb.dtype)
    for k, (i, j) in enumerate(zip(np.asarray(iy) * stride, np.asarray(ix) * stride, strict=True)):
        out[k] = rgb[:, i : i + tile, j : j + tile]
    return out[:n]


def layout_of_block(rgb: np.ndarray, iy: np.ndarray, ix: np.ndarray, *, tile: int, stride: int,
                    grid: int = GRID) -> np.ndarray:
    """Colour-layout fingerprints of the windows ``(iy, ix)`` of a block ``(bands, h, w)`` uint8.

    Equal, bit for bit, to ``layout_fingerprints(gather_windows(rgb, iy, ix, ...))``.
    """
    iy, ix = np.asarray(iy, dtype=np.int64), np.asarray(ix, dtype=np.int64)
    bands = rgb.shape[0]
    if iy.size == 0:
        return np.zeros((0, bands * grid * grid), dtype=np.float32)
    cell = tile // grid
    if tile % grid or stride % cell:  # cells do not line up across windows: pool each window
        return layout_fingerprints(gather_windows(rgb, iy, ix, tile=tile, stride=stride), grid=grid)
    step = stride // cell
    h = (int(iy.max()) * stride + tile) // cell  # cells needed along each axis
    w = (int(ix.max()) * stride + tile) // cell
    acc = np.uint16 if cell * 255 <= np.iinfo(np.uint16).max else np.int64  # exact either way
    rows = rgb[:, : h * cell].reshape(bands, h, cell, rgb.shape[2]).sum(axis=2, dtype=acc)
    sums = rows[:, :, : w * cell].reshape(bands, h, w, cell).sum(axis=3, dtype=np.int64)  # (bands, h, w) cell sums
    view = np.lib.stride_tricks.sliding_window_view(sums, (grid, grid), axis=(1, 2))[:, ::step, ::step]
    picked = view[:, iy, ix]  # (bands, n, grid, grid)
    return finish(picked.transpose(1, 0, 2, 3), np.full((grid, grid), cell * cell))


class LayoutModel:
    """The colour-layout fingerprint behind the same interface as a torch model
    (:class:`dask_fp.embedder.LoadedModel`): ``embed`` and ``embed_windows``."""

    precision = "float32"

    def __init__(self, dim: int, grid: int = GRID) -> None:
        if dim != 3 * grid * grid:
            raise ValueError(f"a {grid}x{grid} colour layout of RGB has {3 * grid * grid} features, not {dim}")
        self.grid = grid

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """Fingerprints of uint8 windows ``(n, 3, H, W)``."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected (n, 3, H, W) uint8 windows, got shape {pixels.shape}")
        return layout_fingerprints(pixels, grid=self.grid)

    def embed_windows(self, rgb: np.ndarray, iy: np.ndarray, ix: np.ndarray, *, tile: int,
                      stride: int) -> np.ndarray:
        """Fingerprints of the windows ``(iy, ix)`` of a block ``(3, h, w)`` (see :func:`layout_of_block`)."""
        return layout_of_block(rgb, iy, ix, tile=tile, stride=stride, grid=self.grid)
