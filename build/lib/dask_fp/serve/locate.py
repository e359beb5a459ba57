"""Where stored tiles are: the window under a map position, and tile outlines for the map.

:class:`TileIndex` reads the committed ``uid`` column once (8 bytes a tile)
and answers, without touching the fingerprints: which stored window holds a
lon/lat point or a source pixel (the hover grid and the click), whether a uid
is stored, and each tile's outline (WGS84 for sources with a CRS, source
pixels for the others).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import QueryError
from ..export import footprints
from ..store import Store
from ..tiling import grid_shape, make_uid, split_uid, window_at_pixel


@dataclass(frozen=True)
class Located:
    """One stored window: its uid, source, window indices and outline (GeoJSON geometry)."""

    uid: int
    source: int
    wy: int
    wx: int
    geometry: dict[str, Any]
    pixel: bool  # True: the geometry is in (column, row) source pixels, not WGS84


class TileIndex:
    """The stored tiles of a store, for locating and outlining them (see module docstring)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.tile, self.stride = int(store.attrs["tile"]), int(store.attrs["stride"])
        self.sources = {int(s["index"]): s for s in store.sources}
        self.uids = np.sort(np.asarray(store.arrays["uid"][: store.committed], dtype=np.int64))
        self._to_src: dict[int, Any] = {}

    def has(self, uid: int) -> bool:
        i = int(np.searchsorted(self.uids, uid))
        return i < self.uids.size and int(self.uids[i]) == int(uid)

    def source(self, index: int) -> dict[str, Any]:
        if index not in self.sources:
            raise QueryError(f"source {index} is not in the store (it has sources 0..{len(self.sources) - 1}).")
        return self.sources[index]

    def at_pixel(self, source: int, row: float, col: float) -> Located | None:
        """The stored window of ``source`` holding pixel (row, col) with the nearest centre, if any."""
        src = self.source(source)
        ny, nx = grid_shape(*src["shape"][:2], tile=self.tile, stride=self.stride)
        hit = window_at_pixel(row, col, n_wy=ny, n_wx=nx, tile=self.tile, stride=self.stride)
        if hit is None or not self.has(int(make_uid(source, *hit))):
            return None
        return self.locate(int(make_uid(source, *hit)))

    def at_lonlat(self, lon: float, lat: float) -> Located | None:
        """The stored window holding a WGS84 point (the first source with a CRS that has one)."""
        from affine import Affine

        for idx, src in self.sources.items():
            if not src.get("crs"):
                continue
            x, y = self._transformer(idx).transform(lon, lat)
            if not (np.isfinite(x) and np.isfinite(y)):
                continue
            col, row = ~Affine(*src["transform"][:6]) * (x, y)
            found = self.at_pixel(idx, row, col)
            if found is not None:
                return found
        return None

    def locate(self, uid: int) -> Located:
        """Outline of a stored tile; :class:`QueryError` when the uid is not stored."""
        if not self.has(uid):
            raise QueryError(f"uid {uid} is not a stored tile of {self.store.path}.")
        s, wy, wx = (int(v) for v in split_uid(uid))
        src = self.source(s)
        return Located(uid, s, wy, wx, *self.outline(src, np.array([wy]), np.array([wx]))[0])

    def outline(self, src: dict[str, Any], wy: np.ndarray, wx: np.ndarray) -> list[tuple[dict[str, Any], bool]]:
        """(geometry, is_pixel) per window: WGS84 footprints, or pixel squares for a source without a CRS."""
        if src.get("crs"):
            return [(g, False) for g in footprints(src, wy, wx, self.tile, self.stride)]
        out = []
        for y, x in zip(wy.tolist(), wx.tolist(), strict=True):
            c0, r0, t = x * self.stride, y * self.stride, self.tile
            ring = [[c0, r0], [c0, r0 + t], [c0 + t, r0 + t], [c0 + t, r0], [c0, r0]]
            out.append(({"type": "Polygon", "coordinates": [ring]}, True))
        return out

    def _transformer(self, index: int) -> Any:
        if index not in self._to_src:
            from pyproj import Transformer

            self._to_src[index] = Transformer.from_crs("EPSG:4326", self.sources[index]["crs"], always_xy=True)
        return self._to_src[index]

    def bounds(self, index: int) -> list[float] | None:
        """WGS84 ``[west, south, east, north]`` of a source with a CRS (None without one)."""
        from rasterio.warp import transform_bounds

        src = self.source(index)
        if not src.get("crs"):
            return None
        h, w = src["shape"][:2]
        a, b, c, d, e, f = src["transform"][:6]
        xs = [c, a * w + c, b * h + c, a * w + b * h + c]
        ys = [f, d * w + f, e * h + f, d * w + e * h + f]
        return [float(v) for v in transform_bounds(src["crs"], "EPSG:4326", min(xs), min(ys), max(xs), max(ys))]
