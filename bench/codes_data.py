"""Vectors for bench/codes.py: real fingerprints of UC Merced, and synthetic ones that follow them.

Real: every image of ``shared/data/ucmerced-a`` (1,050 aerial scenes, 256 px;
``rotations`` > 1 adds its 90° rotations, real images with real statistics),
fingerprinted with the real model (EfficientNet-Lite0, ImageNet weights,
1280-d), cached in a ``.npy`` file.

Synthetic (at sizes the real set cannot reach): ``d``-d vectors whose
statistics follow the real ones. The real fingerprints are projected on
their top ``d`` principal axes (512: the issue's width); a synthetic vector
is a random real vector (the "place") plus Gaussian noise drawn with the
real covariance scaled by ``sigma²`` — so the global spectrum (mean,
covariance) is the real one, and the data is a union of clusters around real
fingerprints, as tiles of one landscape cluster around a few kinds of cover.
:func:`stats` prints the spectra and nearest-neighbour distances of both for
comparison.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

UCM = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ucmerced-a"


def real_fingerprints(cache: Path, data: Path = UCM, *, rotations: int = 1, threads: int = 2) -> np.ndarray:
    """EfficientNet-Lite0 fingerprints ``(n, 1280)`` of UC Merced (cached in ``cache``)."""
    if cache.exists():
        return np.load(cache)
    from PIL import Image

    from dask_fp.embedder import embed
    from dask_fp.models import ModelOptions

    files = sorted(data.glob("*/*.jpg"))
    if not files:
        raise SystemExit(f"no images under {data}: UC Merced subset A is needed for real fingerprints")
    opts = ModelOptions("efficientnet-lite0", seed=0, threads=threads, device="cpu")
    out = []
    t0 = time.perf_counter()
    for i in range(0, len(files), 50):
        px = np.stack([np.asarray(Image.open(f).convert("RGB").resize((256, 256))) for f in files[i : i + 50]])
        for r in range(rotations):
            out.append(embed(np.ascontiguousarray(np.rot90(px, r, axes=(1, 2)).transpose(0, 3, 1, 2)), opts))
        print(f"  embedded {min(i + 50, len(files))}/{len(files)} images x {rotations} rotations"
              f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    x = np.concatenate(out).astype(np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, x)
    return x


def reduce_dim(real: np.ndarray, d: int) -> np.ndarray:
    """Real fingerprints projected on their top ``d`` principal axes (mean kept)."""
    mu = real.mean(axis=0)
    _, _, vt = np.linalg.svd((real - mu).astype(np.float64), full_matrices=False)
    return ((real - mu) @ vt[:d].T + 0).astype(np.float32)


class Synthetic:
    """Generator of synthetic vectors following ``real`` (rows, d): real centre + σ·N(0, Σ_real)."""

    def __init__(self, real: np.ndarray, sigma: float, seed: int = 0) -> None:
        self.real = np.asarray(real, np.float32)
        cov = np.cov(self.real.astype(np.float64), rowvar=False)
        w, v = np.linalg.eigh(cov)
        self.factor = (v * np.sqrt(np.clip(w, 0, None))).T.astype(np.float32)  # z @ factor ~ N(0, cov)
        self.sigma = sigma
        self.seed = seed

    def block(self, i: int, rows: int) -> np.ndarray:
        """Block ``i`` of ``rows`` vectors (deterministic per block: blocks can be made in any order)."""
        rng = np.random.default_rng([self.seed, i])
        base = self.real[rng.integers(0, len(self.real), rows)]
        z = rng.standard_normal((rows, self.real.shape[1]), dtype=np.float32)
        return base + np.float32(self.sigma) * (z @ self.factor)

    def queries(self, n: int, seed: int) -> np.ndarray:
        """Fresh queries drawn like the data (not rows of it)."""
        return self.block(10**9 + seed, n)


def nn_distance(x: np.ndarray, n: int = 200, seed: int = 0) -> float:
    """Median distance from ``n`` sampled rows to their nearest other row."""
    rng = np.random.default_rng(seed)
    i = rng.choice(len(x), min(n, len(x)), replace=False)
    d = ((x[i, None, :] - x[None]) ** 2).sum(-1)
    d[np.arange(len(i)), i] = np.inf
    return float(np.median(np.sqrt(d.min(axis=1))))
