"""Exact k-nearest-neighbour search over a store, as one ``dask.array.reduction``.

The shape follows dask's own ``argtopk``: a chunk kernel computes squared
Euclidean distances ``‖x‖² − 2x·q + ‖q‖²`` for a batch of queries with one
matrix product and keeps each query's ``m`` best (distance, row) pairs;
combine and aggregate kernels merge candidate lists in a tree
(``split_every``). All three are pure numpy functions. Ties are broken by
row, so results equal a brute-force sort on (distance, row).

De-duplication (on by default) drops a hit that overlaps a better hit of the
same source, and the query's own tiles. Each kept hit can suppress at most
``(2r+1)² − 1`` others (``r`` = :attr:`Tiling.reach`), so fetching
``k·(2r+1)²`` candidates, plus ``(2r+1)²`` for the query's own tiles, always
leaves ``k`` distinct hits when the store has them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np
import pandas as pd

from .errors import DaskFpError, QueryError, StoreError
from .models import ModelOptions, resolve_weights
from .store import Store, open_store
from .tiling import Tiling, grid_shape, split_uid, windows_covering, windows_overlap

# --------------------------------------------------------------------------- kernels


def top_m(dist: np.ndarray, rows: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``m`` smallest (distance, row) pairs, sorted by (distance, row).

    Parameters
    ----------
    dist : ndarray, shape (q, n)
    rows : ndarray of int64, shape (n,) or (q, n)
    m : int

    Returns
    -------
    (dist, rows), each of shape (q, min(m, n))
    """
    q, n = dist.shape
    rows = np.broadcast_to(rows, (q, n))
    if n > m:
        # Candidates: everything up to the m-th smallest distance (ties included).
        kth = np.partition(dist, m - 1, axis=1)[:, m - 1 : m]
        sel = dist <= kth
        if not (sel.sum(axis=1) == m).all():
            # Ties at the m-th distance: settle them by row, query by query.
            out_d = np.empty((q, m), dtype=dist.dtype)
            out_r = np.empty((q, m), dtype=np.int64)
            for i in range(q):
                cand = np.flatnonzero(sel[i])
                o = np.lexsort((rows[i, cand], dist[i, cand]))[:m]
                out_d[i], out_r[i] = dist[i, cand[o]], rows[i, cand[o]]
            return out_d, out_r
        idx = np.nonzero(sel)[1].reshape(q, m)
        dist = np.take_along_axis(dist, idx, axis=1)
        rows = np.take_along_axis(rows, idx, axis=1)
    order = np.lexsort((rows, dist), axis=1) if dist.size else np.zeros(dist.shape, dtype=np.intp)
    return np.take_along_axis(dist, order, axis=1), np.take_along_axis(rows, order, axis=1).astype(np.int64)


def chunk_distances(x: np.ndarray, norm2: np.ndarray, q: np.ndarray, qnorm2: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``(n_queries, n_rows)`` with one matrix product."""
    x = x.astype(np.float32, copy=False)
    d = q @ x.T
    d *= -2.0
    d += norm2[None, :].astype(np.float32)
    d += qnorm2[:, None]
    np.maximum(d, 0.0, out=d)
    return d


def knn_chunk(
    block: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    q: np.ndarray,
    qnorm2: np.ndarray,
    m: int,
    axis: Any = None,
    keepdims: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Chunk step: a block ``(x, norm2, rows)`` → each query's ``m`` best pairs."""
    x, norm2, rows = block
    return top_m(chunk_distances(x, norm2.ravel(), q, qnorm2), rows.ravel().astype(np.int64), m)


def knn_merge(
    parts: list[tuple[np.ndarray, np.ndarray]] | tuple[np.ndarray, np.ndarray],
    *,
    m: int,
    axis: Any = None,
    keepdims: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Combine/aggregate step: merge candidate lists, keep ``m`` per query."""
    if isinstance(parts, tuple):
        parts = [parts]
    parts = _flatten(parts)
    dist = np.concatenate([p[0] for p in parts], axis=1)
    rows = np.concatenate([p[1] for p in parts], axis=1)
    return top_m(dist, rows, m)


def _flatten(parts: list) -> list[tuple[np.ndarray, np.ndarray]]:
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for p in parts:
        if isinstance(p, list):
            out.extend(_flatten(p))
        else:
            out.append(p)
    return out


def _column(a: np.ndarray) -> np.ndarray:
    return a[:, None]


def _pack(x: np.ndarray, norm2: np.ndarray, block_info: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A block and its norms → ``(x, norm2, global rows)``; the rows come from the block's location."""
    start, stop = block_info[0]["array-location"][0]
    return (x, norm2, np.arange(start, stop, dtype=np.int64))


def knn(
    x: Any, norm2: Any, queries: np.ndarray, m: int, *, split_every: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``m`` nearest rows of the dask array ``x`` for each query.

    Parameters
    ----------
    x : dask.array, shape (n, d), chunked along rows only
    norm2 : dask.array, shape (n,), chunked like ``x``
    queries : ndarray, shape (q, d)
    m : int
        Neighbours per query (all rows, sorted, when ``m >= n``).
    split_every : int, optional
        Fan-in of the merge tree.

    Returns
    -------
    dist, rows : ndarrays of shape (q, min(m, n)), sorted by (distance, row)
    """
    import dask.array as da

    if m < 1:
        raise QueryError(f"k must be at least 1, got {m}")
    n = x.shape[0]
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != x.shape[1]:
        raise QueryError(f"queries must have shape (q, {x.shape[1]}), got {q.shape}")
    if n == 0:
        return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
    if len(x.chunks[1]) != 1:
        x = x.rechunk({1: -1})
    qn = np.einsum("ij,ij->i", q, q)
    # Only blockwise layers here, so reading a block, its norms and the chunk step fuse
    # into one task per block (slicing or da.arange would add three more per block).
    n2 = norm2.rechunk((x.chunks[0],)).map_blocks(
        _column, new_axis=1, chunks=(x.chunks[0], (1,)), dtype=norm2.dtype
    )
    packed = da.map_blocks(_pack, x, n2, dtype=x.dtype, meta=np.empty((0, 0), dtype=x.dtype))
    red = da.reduction(
        packed,
        chunk=partial(knn_chunk, q=q, qnorm2=qn, m=m),
        combine=partial(knn_merge, m=m),
        aggregate=partial(knn_merge, m=m),
        axis=0,
        keepdims=True,
        concatenate=False,
        split_every=split_every,
        dtype=np.float32,
        meta=np.empty((0, 0), dtype=np.float32),
        name="knn",
    )
    # The reduction's single block is a (dist, rows) pair, not an array: take it as is.
    (block,) = red.to_delayed().ravel()
    dist, idx = block.compute()
    return dist, idx


# --------------------------------------------------------------------------- de-duplication


def dedup_mask(
    source: np.ndarray,
    wy: np.ndarray,
    wx: np.ndarray,
    *,
    tiling: Tiling,
    exclude: Sequence[tuple[int, int, int]] = (),
) -> np.ndarray:
    """Greedy de-duplication of a ranked hit list (best first).

    A hit is kept unless it overlaps an already-kept hit of the same source,
    or one of the ``exclude`` windows ``(source, wy, wx)`` (the query's own).
    """
    keep = np.zeros(len(source), dtype=bool)
    kept: dict[int, list[tuple[int, int]]] = {}
    for s, y, x in exclude:
        kept.setdefault(int(s), []).append((int(y), int(x)))
    for i, (s, y, x) in enumerate(zip(source.tolist(), wy.tolist(), wx.tolist(), strict=True)):
        prev = kept.get(s)
        if prev:
            py, px = np.array(prev).T
            if windows_overlap(py, px, y, x, tile=tiling.tile, stride=tiling.stride).any():
                continue
        keep[i] = True
        kept.setdefault(s, []).append((y, x))
    return keep


def candidates_needed(k: int, tiling: Tiling, *, dedup: bool, from_store: bool) -> int:
    """How many raw neighbours to fetch so ``k`` survive de-duplication."""
    if not dedup:
        return k + (1 if from_store else 0)
    block = (2 * tiling.reach + 1) ** 2
    return k * block + (block if from_store else 0)


# --------------------------------------------------------------------------- queries


@dataclass(frozen=True)
class Query:
    """One query: a fingerprint, and the store tile it came from (if any)."""

    label: str
    vector: np.ndarray
    own: tuple[int, int, int] | None = None  # (source, wy, wx) when taken from the store
    pixels: np.ndarray | None = None  # (T, T, 3) uint8 for image queries


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


def model_for_store(store: Store, model: ModelOptions | None = None) -> ModelOptions:
    """Model options that reproduce the store's fingerprints; refuse any other model."""
    a = store.attrs
    if model is None:
        random = a.get("weights") == "random"
        model = ModelOptions(name=a["model"], weights="random" if random else None,
                             seed=int(a.get("weights_seed") or 0), input_size=a.get("input_size"))
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


# --------------------------------------------------------------------------- the verb


class Hits:
    """Search results: a table with one row per (query, rank), and helpers to look at them."""

    def __init__(self, table: pd.DataFrame, queries: list[Query], store: Store) -> None:
        self.table = table
        self.queries = queries
        self.store = store

    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        return f"Hits({len(self.queries)} queries, {len(self.table)} hits)\n{self.table.head(20)!r}"

    def for_query(self, i: int) -> pd.DataFrame:
        return self.table[self.table["query"] == i]

    def to_geojson(self, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        from .export import hits_geojson

        return hits_geojson(self, path)

    def mosaic(self, path: str | os.PathLike[str], query: int = 0) -> str:
        from .export import mosaic

        return mosaic(self, query, path)


TABLE_COLUMNS = ["query", "label", "rank", "uid", "distance", "source", "path", "wy", "wx",
                 "x", "y", "lon", "lat", "row"]


def search(
    store: Store | str | os.PathLike[str],
    queries: Sequence[Query] | None = None,
    *,
    images: Sequence[str] = (),
    uids: Sequence[int] = (),
    lonlats: Sequence[tuple[float, float]] = (),
    k: int = 10,
    dedup: bool = True,
    include_self: bool = False,
    model: ModelOptions | None = None,
    split_every: int | None = None,
) -> Hits:
    """k nearest tiles for a batch of queries, in one pass over the store.

    Parameters
    ----------
    store : Store or path
    queries : list of Query, optional
        Ready-made queries; ``images``, ``uids`` and ``lonlats`` add more.
    k : int
        Hits per query (all tiles, sorted, when the store has fewer).
    dedup : bool
        Drop hits that overlap a better hit of the same source.
    include_self : bool
        Keep the query's own tile (and, with ``dedup``, its overlapping tiles).
    """
    if not isinstance(k, int | np.integer) or k < 1:
        raise QueryError(f"k must be a whole number >= 1, got {k!r}")
    st = store if isinstance(store, Store) else open_store(store)
    qs = list(queries or [])
    qs += image_queries(st, list(images), model)
    qs += uid_queries(st, list(uids))
    qs += lonlat_queries(st, list(lonlats))
    if not qs:
        raise QueryError("no query given: pass an image, a uid or a lon/lat point.")
    tiling = store_tiling(st)
    from_store = any(q.own is not None for q in qs) and not include_self
    m = candidates_needed(int(k), tiling, dedup=dedup, from_store=from_store)
    vecs = np.stack([q.vector for q in qs]).astype(np.float32)
    try:
        dist, rows = knn(st.fingerprints(), st.norm2(), vecs, m, split_every=split_every)
        flat = np.unique(rows)
        meta = st.coords(flat)
    except DaskFpError:
        raise
    except Exception as e:  # a damaged chunk (bad bytes) fails inside the codec, on a worker
        raise StoreError(
            f"{st.path}: reading the stored fingerprints failed ({type(e).__name__}: {e}). The store"
            " may be damaged (run `dask-fp info` on it), or the cluster lost its workers."
        ) from None
    pos = {int(r): i for i, r in enumerate(flat)}
    paths = {s["index"]: s["path"] for s in st.sources}
    records = []
    for qi, q in enumerate(qs):
        idx = np.array([pos[int(r)] for r in rows[qi]], dtype=np.int64)
        src, wy, wx = meta["source"][idx], meta["wy"][idx], meta["wx"][idx]
        keep = np.ones(len(idx), dtype=bool)
        own = [q.own] if (q.own is not None and not include_self) else []
        if dedup:
            keep = dedup_mask(src, wy, wx, tiling=tiling, exclude=own)
        elif own:
            keep = ~((src == own[0][0]) & (wy == own[0][1]) & (wx == own[0][2]))
        sel = np.flatnonzero(keep)[: int(k)]
        for rank, j in enumerate(sel, start=1):
            i = idx[j]
            records.append((qi, q.label, rank, int(meta["uid"][i]), float(dist[qi, j]), int(src[j]),
                            paths.get(int(src[j]), ""), int(wy[j]), int(wx[j]), float(meta["x"][i]),
                            float(meta["y"][i]), float(meta["lon"][i]), float(meta["lat"][i]), int(rows[qi, j])))
    table = pd.DataFrame.from_records(records, columns=TABLE_COLUMNS)
    return Hits(table, qs, st)
