"""Query inputs: pictures, stored tiles by uid, lon/lat points, each turned into a vector.

Query pictures are embedded with the store's own model, weights and input
size; uid and lon/lat queries reuse the stored fingerprint of a tile.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from .errors import QueryError
from .models import ModelOptions, resolve_weights
from .store import Store
from .tiling import Tiling, grid_shape, split_uid, windows_covering

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
                        input_size=a.get("input_size"))


def model_for_store(store: Store, model: ModelOptions | None = None) -> ModelOptions:
    """Model options that reproduce the store's fingerprints; refuse any other model."""
    a = store.attrs
    if model is None:
        model = store_model_options(store)
    elif model.input_size != a.get("input_size"):
        model = replace(model, input_size=a.get("input_size"))
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
    from .models import embed

    if not paths:
        return []
    opts = model_for_store(store, model)
    tile = int(store.attrs["tile"])
    pix = np.stack([load_query_image(p, tile) for p in paths])
    vecs = embed(pix.transpose(0, 3, 1, 2), opts, resolve_weights(opts))
    return [Query(str(p), v, None, px) for p, v, px in zip(paths, vecs, pix, strict=True)]


def uid_queries(store: Store, uids: Sequence[int]) -> list[Query]:
    """Queries from tiles already in the store (their stored fingerprints)."""
    if not uids:
        return []
    all_uids = np.asarray(store.arrays["uid"][: store.committed])
    out = []
    for u in uids:
        if not 0 <= int(u) < 2**63:
            raise QueryError(f"uid {u} is not a tile uid (uids are whole numbers from 0 to 2**63 - 1).")
        hit = np.flatnonzero(all_uids == int(u))
        if hit.size == 0:
            s, y, x = (int(v) for v in split_uid(int(u)))
            raise QueryError(
                f"uid {u} (source {s}, window {y},{x}) is not in {store.path}; list uids with"
                " xarray.open_zarr(store).uid or query by --lonlat."
            )
        out.append(_row_query(store, int(hit[0]), f"uid {u}"))
    return out


def _row_query(store: Store, row: int, label: str) -> Query:
    vec = np.asarray(store.arrays["fingerprint"][row], dtype=np.float32)
    c = store.coords(np.array([row]))
    return Query(label, vec, (int(c["source"][0]), int(c["wy"][0]), int(c["wx"][0])))


def lonlat_queries(store: Store, points: Sequence[tuple[float, float]]) -> list[Query]:
    """Queries from the stored tile that holds each lon/lat point (nearest centre if several)."""
    if not points:
        return []
    from pyproj import Transformer

    tiling = store_tiling(store)
    coords = store.coords()
    index = {(int(s), int(y), int(x)): r for r, (s, y, x) in
             enumerate(zip(coords["source"], coords["wy"], coords["wx"], strict=True))}
    out = []
    for lon, lat in points:
        if not (-180 <= lon <= 180 and -90 <= lat <= 90):
            raise QueryError(f"--lonlat {lon},{lat} is not a longitude,latitude pair in degrees.")
        best: tuple[float, int] | None = None
        for src in store.sources:
            if not src.get("crs"):
                continue
            t = Transformer.from_crs("EPSG:4326", src["crs"], always_xy=True)
            x, y = t.transform(lon, lat)
            row, col = _xy_to_pixel(src["transform"], x, y)
            if not (np.isfinite(row) and np.isfinite(col)):  # outside the CRS's area of use
                continue
            ny, nx = grid_shape(*src["shape"], tile=tiling.tile, stride=tiling.stride)
            # Among the *stored* windows that hold the point, the nearest centre (a window
            # dropped as empty may be the nearest one while a stored neighbour holds the point).
            for wy in windows_covering(row, ny, tiling.tile, tiling.stride):
                for wx in windows_covering(col, nx, tiling.tile, tiling.stride):
                    if (src["index"], wy, wx) not in index:
                        continue
                    d = ((wy * tiling.stride + tiling.tile / 2 - row) ** 2
                         + (wx * tiling.stride + tiling.tile / 2 - col) ** 2) / tiling.tile**2
                    if best is None or d < best[0]:
                        best = (d, index[(src["index"], wy, wx)])
        if best is None:
            raise QueryError(
                f"no stored tile contains lon/lat {lon},{lat}; `dask-fp info {store.path}` lists"
                " the sources (sources without a CRS cannot be queried by lon/lat)."
            )
        out.append(_row_query(store, best[1], f"lonlat {lon},{lat}"))
    return out


def _xy_to_pixel(transform: Sequence[float], x: float, y: float) -> tuple[float, float]:
    from affine import Affine

    col, row = ~Affine(*transform[:6]) * (x, y)
    return row, col


def store_tiling(store: Store) -> Tiling:
    a = store.attrs
    return Tiling(int(a["tile"]), int(a["stride"]), float(a["max_empty"]))

