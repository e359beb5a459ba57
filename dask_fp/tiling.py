"""Pure window geometry: counts, positions, chunking, emptiness, uids, footprints.

Everything here takes and returns numbers or numpy arrays; nothing reads files
or touches Dask, so each function is tested on its own against an independent
count.

The window formula (the paper's tiling, made exact)
---------------------------------------------------
For an image of ``n`` pixels along an axis, tile size ``T`` and stride ``S``:

* the image is cropped to ``floor(n / T) * T`` pixels (no padding);
* window ``w`` starts at pixel ``w * S`` and covers ``[w*S, w*S + T)``;
* every window lies inside the cropped image, so there are
  ``(crop - T) // S + 1`` windows when ``crop >= T`` and none otherwise.

A block of the raster that holds pixels ``[start, stop)`` *owns* the windows
whose first pixel lies in that range; it needs ``T - S`` extra pixels after
``stop`` (its halo) to cut them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Bits given to each part of a uid: source index | wy | wx.
UID_BITS_WINDOW = 21
UID_BITS_SOURCE = 63 - 2 * UID_BITS_WINDOW
_WINDOW_MASK = (1 << UID_BITS_WINDOW) - 1


@dataclass(frozen=True)
class Tiling:
    """Window size, stride and the emptiness threshold, in pixels.

    Parameters
    ----------
    tile : int
        Window side ``T`` in pixels (default 256).
    stride : int
        Step ``S`` between window origins (default 128). ``0 < S <= T``.
    max_empty : float
        A window is dropped when more than this fraction of its pixels are
        empty (black in all bands, nodata, or alpha = 0). In ``[0, 1]``.
    """

    tile: int = 256
    stride: int = 128
    max_empty: float = 0.5

    def __post_init__(self) -> None:
        if int(self.tile) != self.tile or self.tile < 1:
            raise ValueError(f"tile must be a positive whole number of pixels, got {self.tile!r}")
        if int(self.stride) != self.stride or not 0 < self.stride <= self.tile:
            raise ValueError(
                f"stride must be a whole number with 0 < stride <= tile; got stride={self.stride!r}"
                f" for tile={self.tile!r}"
            )
        if not 0.0 <= float(self.max_empty) <= 1.0:
            raise ValueError(f"max_empty must lie in [0, 1], got {self.max_empty!r}")

    @property
    def halo(self) -> int:
        """Pixels a block needs past its end to cut the windows it owns (``T - S``)."""
        return self.tile - self.stride

    @property
    def reach(self) -> int:
        """How many window steps apart two windows can be and still overlap."""
        return -(-self.tile // self.stride) - 1


def crop_size(n: int, *, tile: int) -> int:
    """Pixels kept along an axis of ``n`` pixels: the largest multiple of ``tile``."""
    if n < 0:
        raise ValueError(f"an image axis cannot have {n} pixels")
    return (n // tile) * tile


def window_count(n: int, *, tile: int, stride: int) -> int:
    """Number of windows along an axis of ``n`` pixels (before cropping)."""
    crop = crop_size(n, tile=tile)
    return 0 if crop < tile else (crop - tile) // stride + 1


def grid_shape(height: int, width: int, *, tile: int, stride: int) -> tuple[int, int]:
    """``(ny, nx)``: the window grid of a ``height`` x ``width`` image."""
    return (
        window_count(height, tile=tile, stride=stride),
        window_count(width, tile=tile, stride=stride),
    )


def chunk_sizes(n: int, *, chunk: int, tile: int, stride: int) -> tuple[int, ...]:
    """Split ``n`` cropped pixels into chunks that are multiples of ``stride``.

    ``chunk`` is rounded down to a multiple of ``stride`` (at least one
    ``tile``'s worth). A last piece shorter than ``tile`` owns no window of its
    own, so it is merged into the chunk before it; every chunk then has at
    least ``T - S`` pixels, the halo its left neighbour borrows.
    """
    if n <= 0:
        return (0,)
    size = max(chunk // stride * stride, -(-tile // stride) * stride)
    sizes = [size] * (n // size)
    rest = n - size * len(sizes)
    if rest:
        if rest < tile and sizes:
            sizes[-1] += rest
        else:
            sizes.append(rest)
    return tuple(sizes)


def owned_windows(start: int, stop: int, *, n_windows: int, stride: int) -> tuple[int, int]:
    """Half-open range ``[w0, w1)`` of windows whose origin lies in ``[start, stop)``."""
    w0 = min(-(-start // stride), n_windows)
    w1 = min(-(-stop // stride), n_windows)
    return w0, max(w0, w1)


def window_empty_fraction(
    empty: np.ndarray, *, tile: int, stride: int, n_wy: int, n_wx: int
) -> np.ndarray:
    """Fraction of empty pixels in each window of a block.

    Parameters
    ----------
    empty : ndarray of bool, shape (h, w)
        Empty-pixel mask of the block including its halo; window ``(i, j)``
        of the block covers ``empty[i*S : i*S+T, j*S : j*S+T]``.
    tile, stride : int
        Window size and stride.
    n_wy, n_wx : int
        Number of windows the block owns along each axis.

    Returns
    -------
    ndarray of float64, shape (n_wy, n_wx)
    """
    if n_wy == 0 or n_wx == 0:
        return np.zeros((n_wy, n_wx))
    need_y, need_x = (n_wy - 1) * stride + tile, (n_wx - 1) * stride + tile
    if empty.shape[0] < need_y or empty.shape[1] < need_x:
        raise ValueError(
            f"block of shape {empty.shape} is too small for {n_wy}x{n_wx} windows of "
            f"{tile} px at stride {stride} (needs {need_y}x{need_x})"
        )
    # Empty pixels per cell of g = gcd(T, S) pixels (every window is a whole number of cells),
    # then a summed-area table over the cells, with a zero row/column in front.
    g = math.gcd(tile, stride)
    cy, cx = need_y // g, need_x // g
    acc = np.uint16 if g <= np.iinfo(np.uint16).max else np.int64
    rows = empty[:need_y, :need_x].reshape(cy, g, need_x).sum(axis=1, dtype=acc)
    cells = rows.reshape(cy, cx, g).sum(axis=2, dtype=np.int64)
    sat = np.zeros((cy + 1, cx + 1), dtype=np.int64)
    np.cumsum(np.cumsum(cells, axis=0), axis=1, out=sat[1:, 1:])
    y0 = np.arange(n_wy) * (stride // g)
    x0 = np.arange(n_wx) * (stride // g)
    y1, x1 = y0 + tile // g, x0 + tile // g
    total = (
        sat[np.ix_(y1, x1)] - sat[np.ix_(y0, x1)] - sat[np.ix_(y1, x0)] + sat[np.ix_(y0, x0)]
    )
    return total / float(tile * tile)


def make_uid(source: np.ndarray | int, wy: np.ndarray | int, wx: np.ndarray | int) -> np.ndarray:
    """Deterministic int64 tile id: ``source << 42 | wy << 21 | wx``.

    Window indices up to 2**21 - 1 (over 268 million pixels along an axis at
    stride 128) and 2**21 sources fit; larger values raise ``ValueError``.
    """
    s = np.asarray(source, dtype=np.int64)
    y = np.asarray(wy, dtype=np.int64)
    x = np.asarray(wx, dtype=np.int64)
    if (s < 0).any() or (s >> UID_BITS_SOURCE).any():
        raise ValueError(f"source index out of range for a uid: {s.min()}..{s.max()}")
    for name, v in (("wy", y), ("wx", x)):
        if v.size and ((v < 0).any() or (v > _WINDOW_MASK).any()):
            raise ValueError(f"{name} out of range for a uid: {v.min()}..{v.max()}")
    return (s << (2 * UID_BITS_WINDOW)) | (y << UID_BITS_WINDOW) | x


def split_uid(uid: np.ndarray | int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`make_uid`: ``(source, wy, wx)``."""
    u = np.asarray(uid, dtype=np.int64)
    return (
        u >> (2 * UID_BITS_WINDOW),
        (u >> UID_BITS_WINDOW) & _WINDOW_MASK,
        u & _WINDOW_MASK,
    )


Affine6 = tuple[float, float, float, float, float, float]


def pixel_to_xy(transform: Affine6, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map pixel (row, col) positions to CRS (x, y) with a GDAL-style affine.

    ``transform`` is ``(a, b, c, d, e, f)`` as in :class:`affine.Affine`:
    ``x = a*col + b*row + c`` and ``y = d*col + e*row + f``. Positions are in
    pixel-edge units, so ``(0, 0)`` is the outer corner of the first pixel.
    """
    a, b, c, d, e, f = (float(v) for v in transform)
    r = np.asarray(rows, dtype=np.float64)
    q = np.asarray(cols, dtype=np.float64)
    return a * q + b * r + c, d * q + e * r + f


def window_centres(
    transform: Affine6, wy: np.ndarray, wx: np.ndarray, *, tile: int, stride: int
) -> tuple[np.ndarray, np.ndarray]:
    """Centre of each window in the source CRS."""
    half = tile / 2.0
    return pixel_to_xy(
        transform, np.asarray(wy) * stride + half, np.asarray(wx) * stride + half
    )


def window_rings(
    transform: Affine6, wy: np.ndarray, wx: np.ndarray, *, tile: int, stride: int
) -> np.ndarray:
    """Closed footprint ring of each window in the source CRS, shape (n, 5, 2).

    Corners go top-left, bottom-left, bottom-right, top-right, top-left, which
    is counter-clockwise on a north-up map (RFC 7946 exterior ring order).
    """
    r0 = np.asarray(wy, dtype=np.float64) * stride
    c0 = np.asarray(wx, dtype=np.float64) * stride
    rows = np.stack([r0, r0 + tile, r0 + tile, r0, r0], axis=-1)
    cols = np.stack([c0, c0, c0 + tile, c0 + tile, c0], axis=-1)
    x, y = pixel_to_xy(transform, rows, cols)
    return np.stack([x, y], axis=-1)


def windows_overlap(
    wy1: np.ndarray, wx1: np.ndarray, wy2: np.ndarray, wx2: np.ndarray, *, tile: int, stride: int
) -> np.ndarray:
    """Whether window pairs (of one source) share at least one pixel."""
    dy = np.abs(np.asarray(wy1, dtype=np.int64) - np.asarray(wy2, dtype=np.int64)) * stride
    dx = np.abs(np.asarray(wx1, dtype=np.int64) - np.asarray(wx2, dtype=np.int64)) * stride
    return (dy < tile) & (dx < tile)


def overlap_fraction(
    wy1: np.ndarray, wx1: np.ndarray, wy2: np.ndarray, wx2: np.ndarray, *, tile: int, stride: int
) -> np.ndarray:
    """Shared area of window pairs as a fraction of one window's area."""
    dy = np.abs(np.asarray(wy1, dtype=np.int64) - np.asarray(wy2, dtype=np.int64)) * stride
    dx = np.abs(np.asarray(wx1, dtype=np.int64) - np.asarray(wx2, dtype=np.int64)) * stride
    return np.clip(tile - dy, 0, None) * np.clip(tile - dx, 0, None) / float(tile * tile)


def windows_at_pixel(
    row: float, col: float, *, n_wy: int, n_wx: int, tile: int, stride: int
) -> list[tuple[int, int]]:
    """Windows ``(wy, wx)`` holding pixel position (row, col), nearest centre first.

    Ties are broken by ``(wy, wx)``. Empty when no window holds the position.
    A caller that knows which windows were kept takes the first kept one.
    """
    half = tile / 2.0
    found = [((wy * stride + half - row) ** 2 + (wx * stride + half - col) ** 2, wy, wx)
             for wy in windows_covering(row, n_wy, tile, stride)
             for wx in windows_covering(col, n_wx, tile, stride)]
    return [(wy, wx) for _, wy, wx in sorted(found)]


def windows_covering(p: float, n: int, tile: int, stride: int) -> range:
    """Windows along one axis (of ``n``) whose span ``[w*S, w*S+T)`` contains position ``p``."""
    if n == 0 or p < 0:
        return range(0)
    lo = max(0, int(np.floor((p - tile) / stride)) + 1)
    hi = min(n - 1, int(np.floor(p / stride)))
    return range(lo, hi + 1)
