"""Where stored tiles are: the window under a map position, and tile outlines for the map.

:class:`TileIndex` answers, without touching the fingerprints: which stored
window holds a lon/lat point or a source pixel (the hover grid and the
click), whether a uid is stored, and each tile's outline (WGS84 for sources
with a CRS, source pixels for the others). Lookups go through
:func:`dask_fp.query.uid_rows`: only the uid rows of the sources asked about
are read (once each, then cached), never the whole column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import QueryError
from ..export import footprints
from ..query import in_bbox, source_bbox, uid_rows
from ..store import Store
from ..tiling import grid_shape, make_uid, split_uid, windows_at_pixel


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
        self._to_src: dict[int, Any] = {}

    def has(self, uid: int) -> bool:
        return bool(uid_rows(self.store, [int(uid)])[0] >= 0)  # the store's uid_cache: read once per source

    def source(self, index: int) -> dict[str, Any]:
        if index not in self.sources:
            raise QueryError(f"source {index} is not in the store (it has sources 0..{len(self.sources) - 1}).")
        return self.sources[index]

    def at_pixel(self, source: int, row: float, col: float) -> Located | None:
        """The stored window of ``source`` holding pixel (row, col) with the nearest centre, if any."""
        src = self.source(source)
        ny, nx = grid_shape(*src["shape"][:2], tile=self.tile, stride=self.stride)
        wins = windows_at_pixel(row, col, n_wy=ny, n_wx=nx, tile=self.tile, stride=self.stride)
        uids = [int(make_uid(source, wy, wx)) for wy, wx in wins]
        for uid, r in zip(uids, uid_rows(self.store, uids), strict=True):
            if r >= 0:  # the nearest stored window (a nearer one may have been dropped as empty)
                return self.locate(uid)
        return None

    def at_lonlat(self, lon: float, lat: float) -> Located | None:
        """The stored window holding a WGS84 point (the first source with a CRS that has one)."""
        from affine import Affine

        for idx, src in self.sources.items():
            box = source_bbox(src) if src.get("crs") else None
            if not src.get("crs") or (box is not None and not in_bbox(box, lon, lat)):
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
        box = source_bbox(self.source(index))
        return None if box is None else list(box)
