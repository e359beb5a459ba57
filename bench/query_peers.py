"""The peers of bench/query.py: numpy brute force, a plain loop over the Zarr chunks, the paper's dict walk.

Each returns rows sorted by (distance, row), like dask-fp's exact scan;
:func:`check_rows` holds dask-fp's rows against numpy brute force.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any

import numpy as np


def numpy_knn(x: np.ndarray, norm2: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force with dask-fp's formula; sorted by (distance, row)."""
    qn = np.einsum("ij,ij->i", q, q)
    d = q @ x.T
    d *= -2.0
    d += norm2[None, :]
    d += qn[:, None]
    np.maximum(d, 0.0, out=d)
    idx = np.argpartition(d, k - 1, axis=1)[:, :k]
    dd = np.take_along_axis(d, idx, axis=1)
    order = np.lexsort((idx, dd), axis=1)
    return np.take_along_axis(dd, order, axis=1), np.take_along_axis(idx, order, axis=1).astype(np.int64)


def plain_stream_knn(store: Any, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The peer of a streamed scan: one process reads each Zarr chunk in turn and scans it with numpy."""
    fp, nrm = store.arrays["fingerprint"], store.arrays["norm2"]
    c = int(fp.chunks[0])
    qn = np.einsum("ij,ij->i", q, q)
    best_d = np.empty((len(q), 0), np.float32)
    best_r = np.empty((len(q), 0), np.int64)
    for start in range(0, store.committed, c):
        stop = min(start + c, store.committed)
        d = q @ np.asarray(fp[start:stop]).T
        d *= -2.0
        d += np.asarray(nrm[start:stop])[None, :]
        d += qn[:, None]
        np.maximum(d, 0.0, out=d)
        d = np.concatenate([best_d, d], axis=1)
        r = np.concatenate([best_r, np.broadcast_to(np.arange(start, stop), (len(q), stop - start))], axis=1)
        idx = np.argpartition(d, min(k, d.shape[1]) - 1, axis=1)[:, :k]
        best_d, best_r = np.take_along_axis(d, idx, 1), np.take_along_axis(r, idx, 1)
    order = np.lexsort((best_r, best_d), axis=1)
    return np.take_along_axis(best_d, order, 1), np.take_along_axis(best_r, order, 1)


def paper_knn(fingerprints: dict[int, np.ndarray], q: np.ndarray, k: int) -> list[tuple[float, int]]:
    """The paper's section IV.2: walk every item, keep a sorted list of the k best.

    Written generously: the list is only touched when an item beats its worst.
    """
    best: list[tuple[float, int]] = []
    for uid, v in fingerprints.items():
        d = float(np.linalg.norm(v - q))
        if len(best) < k:
            bisect.insort(best, (d, uid))
        elif d < best[-1][0]:
            bisect.insort(best, (d, uid))
            best.pop()
    return best


def check_rows(name: str, got: np.ndarray, want: np.ndarray, vectors: Callable[[np.ndarray], np.ndarray],
               q: np.ndarray) -> str:
    """Assert that ``got`` rows equal brute force; allow only float32 near-ties, verified in float64."""
    if np.array_equal(got, want):
        return "equal"
    bad = np.flatnonzero((got != want).any(axis=1))
    for i in bad:
        dg = np.sort(((vectors(got[i]).astype(np.float64) - q[i]) ** 2).sum(1))
        dw = np.sort(((vectors(want[i]).astype(np.float64) - q[i]) ** 2).sum(1))
        assert np.allclose(dg, dw, rtol=1e-5, atol=1e-4), (
            f"{name}: query {i} differs from numpy brute force beyond float32 ties:\n{got[i]}\n{want[i]}")
    return f"equal up to float32 near-ties in {len(bad)} of {len(got)} queries"
