"""Pure numpy pieces of the quality evaluation: baselines, perturbations, metrics.

Nothing here reads files or touches Dask; each function is tested on its own
in ``tests/test_quality.py``.

Definitions (per query; the tables report means over queries)
-------------------------------------------------------------
* ``hit_labels``: the labels of a query's ranked, de-duplicated hits (0 for a
  distractor tile, -1 pads a list shorter than asked).
* P@k: the fraction of the first k hits whose label equals the query's
  (a distractor or missing hit counts as wrong).
* AP@K (``mAP@50`` in the tables, K = 50): the mean of P@i over the ranks i
  <= K that hold a same-label hit, 0 when none does (the "mAP@K" of the
  hashing/retrieval literature, normalised by the same-label hits retrieved).
* 5-NN accuracy: the majority label among the first 5 *labelled* hits
  (distractors are skipped) equals the query's; ties go to the label of the
  best-ranked tied hit; a query with no labelled hit counts as wrong.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np

# --------------------------------------------------------------------------- baselines


def colour_histogram(pixels: np.ndarray, bins: int = 8) -> np.ndarray:
    """``bins``³ joint RGB histograms of uint8 tiles ``(n, H, W, 3)``, L1-normalised, float32."""
    px = np.asarray(pixels)
    if px.ndim != 4 or px.shape[-1] != 3 or px.dtype != np.uint8:
        raise ValueError(f"expected (n, H, W, 3) uint8 tiles, got {px.shape} {px.dtype}")
    n = px.shape[0]
    q = (px.astype(np.int64) * bins) >> 8  # 0..bins-1 per channel
    code = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    code = code.reshape(n, -1) + (np.arange(n, dtype=np.int64) * bins**3)[:, None]
    hist = np.bincount(code.ravel(), minlength=n * bins**3).reshape(n, bins**3).astype(np.float32)
    hist /= np.maximum(hist.sum(axis=1, keepdims=True), 1.0)
    return hist


def raw_vectors(pixels: np.ndarray) -> np.ndarray:
    """The flattened uint8 tiles as float32 vectors ``(n, H*W*3)`` (the 'uncompressed' search)."""
    px = np.asarray(pixels)
    return px.reshape(px.shape[0], -1).astype(np.float32)


def random_vectors(n: int, dim: int = 16, seed: int = 0, keys: np.ndarray | None = None) -> np.ndarray:
    """Seeded Gaussian vectors: nearest neighbours among them are a random ranking.

    With ``keys`` (e.g. tile uids), each vector depends on its key only, so
    the ranking does not change with the order of the rows in a store.
    """
    if keys is None:
        return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return np.stack([np.random.default_rng([seed, int(k)]).standard_normal(dim) for k in keys]).astype(np.float32)


# --------------------------------------------------------------------------- perturbations

#: name -> (group, description)
PERTURBATIONS: dict[str, tuple[str, str]] = {
    "none": ("check", "the stored tile itself, as a PNG file"),
    "brightness+20%": ("photometric", "PIL ImageEnhance.Brightness(1.2)"),
    "brightness-20%": ("photometric", "PIL ImageEnhance.Brightness(0.8)"),
    "contrast+20%": ("photometric", "PIL ImageEnhance.Contrast(1.2)"),
    "contrast-20%": ("photometric", "PIL ImageEnhance.Contrast(0.8)"),
    "noise σ=10": ("photometric", "additive Gaussian noise, σ = 10 grey levels, seeded"),
    "jpeg q50": ("photometric", "saved as JPEG at quality 50"),
    "blur σ=1": ("photometric", "PIL GaussianBlur(radius=1)"),
    "blur σ=2": ("photometric", "PIL GaussianBlur(radius=2)"),
    "rotate 90°": ("geometric", "rotated 90° counter-clockwise"),
    "flip h": ("geometric", "mirrored left-right"),
    "shift 1/8": ("geometric", "the window moved by T/8 px down and right (T/8 back where it"
                               " would leave the image)"),
}


def perturb(tile: np.ndarray, kind: str, *, seed: int = 0, shifted: np.ndarray | None = None) -> tuple[bytes, str]:
    """A perturbed copy of a ``(T, T, 3)`` uint8 tile, encoded as a file: ``(bytes, suffix)``.

    ``shifted`` is the pixels of the shifted window (for ``"shift 1/8"``,
    which needs pixels from outside the tile). JPEG queries are stored as
    JPEG files; all others as PNG (lossless).
    """
    from PIL import Image, ImageEnhance, ImageFilter

    img = Image.fromarray(np.ascontiguousarray(tile))
    fmt, suffix = "PNG", ".png"
    if kind == "none":
        pass
    elif kind.startswith("brightness"):
        img = ImageEnhance.Brightness(img).enhance(1.2 if "+" in kind else 0.8)
    elif kind.startswith("contrast"):
        img = ImageEnhance.Contrast(img).enhance(1.2 if "+" in kind else 0.8)
    elif kind.startswith("noise"):
        rng = np.random.default_rng(seed)
        arr = tile.astype(np.float32) + rng.normal(0.0, 10.0, tile.shape).astype(np.float32)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    elif kind.startswith("jpeg"):
        fmt, suffix = "JPEG", ".jpg"
    elif kind.startswith("blur"):
        img = img.filter(ImageFilter.GaussianBlur(radius=float(kind.split("=")[1])))
    elif kind.startswith("rotate"):
        img = img.transpose(Image.Transpose.ROTATE_90)
    elif kind.startswith("flip"):
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    elif kind.startswith("shift"):
        if shifted is None:
            raise ValueError("shift needs the shifted window's pixels")
        img = Image.fromarray(np.ascontiguousarray(shifted))
    else:
        raise ValueError(f"unknown perturbation {kind!r}")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 50} if fmt == "JPEG" else {}))
    return buf.getvalue(), suffix


def decode(data: bytes) -> np.ndarray:
    """An encoded picture back to ``(H, W, 3)`` uint8."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def shift_origin(y0: int, x0: int, *, tile: int, height: int, width: int) -> tuple[int, int]:
    """Top-left pixel of the window moved by ``tile // 8`` down and right.

    Along an axis where that would leave the image (``height`` x ``width``
    pixels), the move goes up or left instead; where neither fits (an image
    exactly one tile long), the window stays.
    """
    d = tile // 8

    def move(p: int, n: int) -> int:
        if p + d + tile <= n:
            return p + d
        return p - d if p - d >= 0 else p

    return move(y0, height), move(x0, width)


# --------------------------------------------------------------------------- label retrieval


def precision_at(query_labels: np.ndarray, hit_labels: np.ndarray, k: int) -> np.ndarray:
    """Per-query P@k: same-label hits among the first ``k`` (missing hits count as wrong)."""
    h = np.asarray(hit_labels)[:, :k]
    rel = h == np.asarray(query_labels)[:, None]
    return rel.sum(axis=1) / float(k)


def average_precision(query_labels: np.ndarray, hit_labels: np.ndarray, k: int) -> np.ndarray:
    """Per-query AP@k, normalised by the same-label hits in the first ``k`` (0 when none)."""
    h = np.asarray(hit_labels)[:, :k]
    rel = (h == np.asarray(query_labels)[:, None]).astype(np.float64)
    ranks = np.arange(1, rel.shape[1] + 1)
    prec = np.cumsum(rel, axis=1) / ranks
    n_rel = rel.sum(axis=1)
    return np.where(n_rel > 0, (prec * rel).sum(axis=1) / np.maximum(n_rel, 1), 0.0)


def knn_vote(hit_labels: np.ndarray, k: int = 5) -> np.ndarray:
    """Per-query majority label of the first ``k`` labelled hits (0 if there are none).

    Distractors (0) and padding (-1) are skipped; ties go to the tied label
    whose first hit ranks best.
    """
    out = np.zeros(len(hit_labels), dtype=np.int64)
    for i, row in enumerate(np.asarray(hit_labels)):
        lab = row[row > 0][:k]
        if not lab.size:
            continue
        values, first, counts = np.unique(lab, return_index=True, return_counts=True)
        best = counts.max()
        cands = np.flatnonzero(counts == best)
        out[i] = values[cands[np.argmin(first[cands])]]
    return out


def label_metrics(query_labels: np.ndarray, hit_labels: np.ndarray, *, k_map: int = 50) -> dict[str, float]:
    """P@5, P@10, mAP@k_map, 5-NN accuracy and class-mean P@10 over all queries."""
    ql = np.asarray(query_labels)
    p10 = precision_at(ql, hit_labels, 10)
    classes = np.unique(ql)
    return {
        "P@5": float(precision_at(ql, hit_labels, 5).mean()),
        "P@10": float(p10.mean()),
        # Standard error of the mean over queries (an underestimate: overlapping queries correlate).
        "P@10 se": float(p10.std(ddof=1) / np.sqrt(len(p10))) if len(p10) > 1 else float("nan"),
        f"mAP@{k_map}": float(average_precision(ql, hit_labels, k_map).mean()),
        "5-NN acc": float((knn_vote(hit_labels, 5) == ql).mean()),
        "P@10 class-mean": float(np.mean([p10[ql == c].mean() for c in classes])),
        "queries": int(len(ql)),
    }


def majority_rate(query_labels: np.ndarray) -> float:
    """Accuracy of always answering the most common query label."""
    ql = np.asarray(query_labels)
    return float(np.bincount(ql).max() / len(ql)) if len(ql) else 0.0


def chance_precision(query_labels: np.ndarray, all_labels: np.ndarray) -> float:
    """Expected P@k of a random ranking: the share of other tiles with the query's label."""
    ql = np.asarray(query_labels)
    al = np.asarray(all_labels)
    n = len(al)
    counts = np.bincount(al, minlength=ql.max() + 1 if len(ql) else 1)
    return float(np.mean((counts[ql] - 1) / max(n - 1, 1))) if len(ql) else 0.0


def far_hits(hit_labels: np.ndarray, hit_xy: np.ndarray, query_xy: np.ndarray, min_dist: float,
             k: int) -> np.ndarray:
    """Hit labels with the hits closer than ``min_dist`` to the query removed (padded with -1).

    Used for the spatially buffered P@10: it shows how much of a score comes
    from the query's immediate neighbourhood (spatial autocorrelation).
    """
    out = np.full((len(hit_labels), k), -1, dtype=np.int64)
    for i in range(len(hit_labels)):
        d = np.hypot(*(hit_xy[i] - query_xy[i][None, :]).T)
        keep = np.asarray(hit_labels[i])[(d >= min_dist) & (np.asarray(hit_labels[i]) >= 0)][:k]
        out[i, : len(keep)] = keep
    return out


# --------------------------------------------------------------------------- re-localisation


def recall_at(success: np.ndarray, k: int) -> float:
    """Share of queries with a successful hit among the first ``k``; ``success`` is (q, K) bool."""
    s = np.asarray(success, dtype=bool)
    return float(s[:, :k].any(axis=1).mean()) if len(s) else 0.0


def overlap_success(hit_src: np.ndarray, hit_wy: np.ndarray, hit_wx: np.ndarray, orig: tuple[int, int, int],
                    overlap: Callable[..., np.ndarray], min_overlap: float = 0.5) -> np.ndarray:
    """Which hits overlap the original window (same source) by at least ``min_overlap``."""
    s, y, x = orig
    frac = overlap(np.asarray(hit_wy), np.asarray(hit_wx), np.full(len(hit_wy), y), np.full(len(hit_wx), x))
    return (np.asarray(hit_src) == s) & (frac >= min_overlap - 1e-12)
