"""Query inputs: pictures, stored tiles by uid, lon/lat points, each turned into a vector.

Query pictures are embedded with the store's own model, weights and input
size; uid and lon/lat queries reuse the stored fingerprint of a tile.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .errors import QueryError
from .models import ModelOptions, resolve_weights
from .store import Store
from .tiling import Tiling, grid_shape, make_uid, pixel_to_xy, split_uid, windows_at_pixel

# --------------------------------------------------------------------------- queries


@dataclass(frozen=True)
class Query:
    """One query: a fingerprint, and the store tile it came from (if any).

    ``exclude`` lists further stored tiles ``(source, wy, wx)`` left out of
    its hits like its own tile (the labelled tiles of a combined query).
    """

    label: str
    vector: np.ndarray
    own: tuple[int, int, int] | None = None  # (source, wy, wx) when taken from the store
    pixels: np.ndarray | None = None  # (T, T, 3) uint8 for image queries
    exclude: tuple[tuple[int, int, int], ...] = ()
    #: A stored tile that stands for the query in pictures when it has no ``own`` tile or ``pixels``
    #: (a combined query's or a classifier's positive tile that comes first in the store).
    shown: tuple[int, int, int] | None = None

    def excluded(self) -> list[tuple[int, int, int]]:
        """Every stored tile this query leaves out of its hits (its own, then ``exclude``)."""
        return ([self.own] if self.own is not None else []) + list(self.exclude)


def load_query_image(path: str | os.PathLike[str], tile: int) -> np.ndarray:
    """Read a query picture as ``(tile, tile, 3)`` uint8.

    A ``tile`` x ``tile`` picture is used as is. Any other size is scaled so
    its shorter side is ``tile`` pixels (bilinear) and centre-cropped to a
    square; gray and RGBA pictures become RGB.
    """
    from PIL import Image, UnidentifiedImageError

    p = str(path)
    if not os.path.isfile(p):
        raise QueryError(f"query image {p}: no such file.")
    try:
        with Image.open(p) as im:
            im.load()
            img = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise QueryError(f"query image {p}: not an image Pillow can read ({e}). Use PNG, JPEG or TIFF.") from None
    except Exception as e:  # damaged files make Pillow's decoders raise many other types
        raise QueryError(
            f"query image {p}: not an image Pillow can read ({type(e).__name__}: {e}). Use PNG, JPEG or TIFF."
        ) from None
    w, h = img.size
    if (w, h) != (tile, tile):
        s = tile / min(w, h)
        nw, nh = max(tile, round(w * s)), max(tile, round(h * s))
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - tile) // 2, (nh - tile) // 2
        img = img.crop((left, top, left + tile, top + tile))
    return np.asarray(img, dtype=np.uint8)


def store_model_options(store: Store, weights: str | None = None) -> ModelOptions:
    """The model options a store records (its model, seed and input size), with ``weights`` if given.

    ``weights`` (a file path or ``"random"``) replaces the store's own weights
    choice; :func:`model_for_store` then checks that its hash matches.
    """
    a = store.attrs
    if weights is None and a.get("weights") == "random":
        weights = "random"
    return ModelOptions(name=a["model"], weights=weights, seed=int(a.get("weights_seed") or 0),
                        input_size=a.get("input_size"), precision=store_precision(store))


def store_precision(store: Store) -> str:
    """The forward-pass precision that reproduces most of the store's tiles.

    ``"bfloat16"`` when most tiles were computed with bfloat16 autocast (GPU
    workers; the sources' ``compute_precision``), else ``"float32"``. Query
    pictures are embedded the same way, on whatever device the client has.
    """
    tiles: dict[str, int] = {}
    for s in store.sources:
        p = str(s.get("compute_precision", "float32"))
        tiles[p] = tiles.get(p, 0) + int(s.get("tiles", 0))
    bf16 = tiles.get("bfloat16-autocast", 0)
    return "bfloat16" if bf16 > sum(tiles.values()) - bf16 else "float32"


def model_for_store(store: Store, model: ModelOptions | None = None) -> ModelOptions:
    """Model options that reproduce the store's fingerprints (model, input size, precision);
    refuse any other model or weights."""
    a = store.attrs
    if model is None:
        model = store_model_options(store)
    else:
        if model.input_size != a.get("input_size"):
            model = replace(model, input_size=a.get("input_size"))
        if model.precision == "auto":
            model = replace(model, precision=store_precision(store))
    if model.name != a["model"]:
        raise QueryError(f"{store.path} holds {a['model']} fingerprints; cannot query it with {model.name}.")
    w = resolve_weights(model)
    if w.sha256 != a["weights_sha256"]:
        raise QueryError(
            f"{store.path} was made with {a['model']} weights sha256 {a['weights_sha256']} ({a['weights']});"
            f" this query would use {w.sha256} ({w.label}). Use the store's weights."
        )
    return model


def image_queries(store: Store, paths: Sequence[str], model: ModelOptions | None = None) -> list[Query]:
    """Embed query pictures with the store's own model and preprocessing."""
    from .embedder import embed

    if not paths:
        return []
    opts = model_for_store(store, model)
    tile = int(store.attrs["tile"])
    pix = np.stack([load_query_image(p, tile) for p in paths])
    vecs = embed(pix.transpose(0, 3, 1, 2), opts, resolve_weights(opts))
    return [Query(str(p), v, None, px) for p, v, px in zip(paths, vecs, pix, strict=True)]


def uid_queries(store: Store, uids: Sequence[int]) -> list[Query]:
    """Queries from tiles already in the store (their stored fingerprints).

    Reads only the uid rows of each query's source (``source = uid >> 42``,
    its row range from the sources table), never the whole uid column.
    """
    if not uids:
        return []
    for u in uids:
        if not 0 <= int(u) < 2**63:
            raise QueryError(f"uid {u} is not a tile uid (uids are whole numbers from 0 to 2**63 - 1).")
    rows = uid_rows(store, [int(u) for u in uids])
    out = []
    for u, row in zip(uids, rows, strict=True):
        if row < 0:
            s, y, x = (int(v) for v in split_uid(int(u)))
            raise QueryError(
                f"uid {u} (source {s}, window {y},{x}) is not in {store.path}; list uids with"
                " xarray.open_zarr(store).uid or query by --lonlat."
            )
        out.append(_row_query(store, int(row), f"uid {u}"))
    return out


UidIndex = dict[int, tuple[np.ndarray, np.ndarray]]


def uid_rows(store: Store, uids: Sequence[int], cache: UidIndex | None = None) -> np.ndarray:
    """Row of each uid in ``store`` (-1 where it is not stored).

    Each distinct source's ``[start, stop)`` rows of the uid column are read
    once and kept sorted, with their order, in ``cache`` (default: the store's
    :attr:`~dask_fp.store.Store.uid_cache`, so repeated queries on one opened
    store read and sort nothing): the cost grows with the sources asked about,
    not with the store.
    """
    u = np.asarray(uids, dtype=np.int64)
    out = np.full(u.shape, -1, dtype=np.int64)
    if u.size == 0:
        return out
    ranges = store.source_rows()
    cache = store.uid_cache if cache is None else cache
    src = split_uid(u)[0]
    for s in np.unique(src):
        if not 0 <= s < len(ranges):
            continue
        lo, hi = (int(v) for v in ranges[s])
        if int(s) not in cache:
            col = store.read("uid", slice(lo, hi))
            order = np.argsort(col, kind="stable")
            cache[int(s)] = (col[order], order)
        ordered, order = cache[int(s)]
        if len(ordered) == 0:
            continue
        sel = np.flatnonzero(src == s)
        pos = np.minimum(np.searchsorted(ordered, u[sel]), len(ordered) - 1)
        found = ordered[pos] == u[sel]
        out[sel[found]] = lo + order[pos[found]]
    return out


def _row_query(store: Store, row: int, label: str) -> Query:
    vec = np.asarray(store.read("fingerprint", np.array([row]))[0], dtype=np.float32)
    c = store.coords(np.array([row]))
    return Query(label, vec, (int(c["source"][0]), int(c["wy"][0]), int(c["wx"][0])))


def lonlat_queries(store: Store, points: Sequence[tuple[float, float]]) -> list[Query]:
    """Queries from the stored tile that holds each lon/lat point (nearest centre if several).

    Only sources whose WGS84 bounding box holds the point are looked at; in
    each, the windows covering the point come from the source's grid
    (:func:`~dask_fp.tiling.windows_at_pixel`), and their uids are looked up
    in that source's rows only (:func:`uid_rows`).
    """
    if not points:
        return []
    tiling = store_tiling(store)
    for lon, lat in points:
        if not (-180 <= lon <= 180 and -90 <= lat <= 90):
            raise QueryError(f"--lonlat {lon},{lat} is not a longitude,latitude pair in degrees.")
    sources = [s for s in store.sources if s.get("crs")]
    boxes = [source_bbox(s) for s in sources]
    transformers: dict[str, Any] = {}
    out = []
    for lon, lat in points:
        best: tuple[float, int] | None = None
        for src, box in zip(sources, boxes, strict=True):
            if box is not None and not in_bbox(box, lon, lat):
                continue
            hit = _nearest_stored(store, src, lon, lat, tiling, transformers)
            if hit is not None and (best is None or hit < best):
                best = hit
        if best is None:
            raise QueryError(
                f"no stored tile contains lon/lat {lon},{lat}; `dask-fp info {store.path}` lists"
                " the sources (sources without a CRS cannot be queried by lon/lat)."
            )
        out.append(_row_query(store, best[1], f"lonlat {lon},{lat}"))
    return out


def _nearest_stored(
    store: Store, src: dict[str, Any], lon: float, lat: float, tiling: Tiling,
    transformers: dict[str, Any],
) -> tuple[float, int] | None:
    """(normalised squared distance to the centre, row) of the source's nearest stored window at the point."""
    from pyproj import Transformer

    crs = src["crs"]
    if crs not in transformers:
        transformers[crs] = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    x, y = transformers[crs].transform(lon, lat)
    row, col = _xy_to_pixel(src["transform"], x, y)
    if not (np.isfinite(row) and np.isfinite(col)):  # outside the CRS's area of use
        return None
    ny, nx = grid_shape(*src["shape"], tile=tiling.tile, stride=tiling.stride)
    # Among the *stored* windows that hold the point, the nearest centre (a window
    # dropped as empty may be the nearest one while a stored neighbour holds the point).
    wins = windows_at_pixel(row, col, n_wy=ny, n_wx=nx, tile=tiling.tile, stride=tiling.stride)
    if not wins:
        return None
    wy, wx = (np.array(v, dtype=np.int64) for v in zip(*wins, strict=True))
    rows = uid_rows(store, make_uid(int(src["index"]), wy, wx).tolist())
    for (y0, x0), r in zip(wins, rows, strict=True):
        if r >= 0:
            d = ((y0 * tiling.stride + tiling.tile / 2 - row) ** 2
                 + (x0 * tiling.stride + tiling.tile / 2 - col) ** 2) / tiling.tile**2
            return float(d), int(r)
    return None


def source_bbox(src: dict[str, Any]) -> tuple[float, float, float, float] | None:
    """A source's ``[minlon, minlat, maxlon, maxlat]``: its ``bbox_wgs84`` record, or computed.

    None when it cannot be computed (the caller then looks at the source
    anyway). ``minlon > maxlon`` means the box crosses the antimeridian.
    """
    box = src.get("bbox_wgs84")
    if box is not None:
        return (float(box[0]), float(box[1]), float(box[2]), float(box[3]))
    if not src.get("crs"):
        return None
    try:
        from rasterio.warp import transform_bounds

        h, w = src["shape"]
        xs, ys = pixel_to_xy(tuple(src["transform"][:6]), np.array([0, 0, h, h]), np.array([0, w, 0, w]))
        b = transform_bounds(src["crs"], "EPSG:4326", xs.min(), ys.min(), xs.max(), ys.max(), densify_pts=21)
    except Exception:  # a CRS or transform pyproj/GDAL cannot handle: no prefilter for this source
        return None
    if not all(np.isfinite(b)):
        return None
    return (float(b[0]), float(b[1]), float(b[2]), float(b[3]))


def in_bbox(box: tuple[float, float, float, float], lon: float, lat: float, pad: float = 1e-6) -> bool:
    w, s, e, n = box
    if not s - pad <= lat <= n + pad:
        return False
    if w <= e:
        return w - pad <= lon <= e + pad
    return lon >= w - pad or lon <= e + pad  # crosses the antimeridian


def _xy_to_pixel(transform: Sequence[float], x: float, y: float) -> tuple[float, float]:
    from affine import Affine

    col, row = ~Affine(*transform[:6]) * (x, y)
    return row, col


def store_tiling(store: Store) -> Tiling:
    a = store.attrs
    return Tiling(int(a["tile"]), int(a["stride"]), float(a["max_empty"]))

