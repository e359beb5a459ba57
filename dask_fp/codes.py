"""Compact binary codes for fingerprints: PCA + ITQ training, encoding, Hamming distances.

Pure numpy kernels, tested without Dask or I/O; :mod:`.index` stores the codes
beside the fingerprints and scans them in one ``dask.array.reduction``.

Method (Gong & Lazebnik, "Iterative quantization", CVPR 2011): centre the
training vectors, project them on their top ``nbits`` principal axes, then
learn an orthogonal rotation ``R`` that minimises the quantisation loss
``‖sign(VR) − VR‖²`` by alternating ``B = sign(VR)`` and an orthogonal
Procrustes step. A vector's code is the sign pattern of ``(x − μ) W R``,
packed 8 bits to a byte (``nbits / 8`` bytes per tile). Two codes are
compared by Hamming distance (XOR + popcount on 64-bit words), which is a
coarse ranking: the candidates are re-ranked exactly from the full
fingerprints (:func:`dask_fp.index.code_search`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import QueryError
from .kernels import top_m


@dataclass(frozen=True)
class CodeParams:
    """Trained parameters of a binary code.

    Attributes
    ----------
    mean : ndarray, shape (d,)
        Training mean (subtracted before projection).
    projection : ndarray, shape (d, nbits)
        PCA axes times the learned ITQ rotation: ``code = sign((x - mean) @ projection)``.
    """

    mean: np.ndarray
    projection: np.ndarray

    @property
    def nbits(self) -> int:
        return int(self.projection.shape[1])

    @property
    def nbytes(self) -> int:
        return self.nbits // 8


def train_itq(x: np.ndarray, nbits: int, *, iterations: int = 20, seed: int = 0) -> CodeParams:
    """Learn PCA + ITQ parameters from training vectors.

    Parameters
    ----------
    x : ndarray, shape (n, d)
        Training vectors (a sample of the store's fingerprints).
    nbits : int
        Code length in bits: a multiple of 64, at most ``d`` (PCA axes).
    iterations : int
        ITQ alternations (the loss levels off after a few tens).
    seed : int
        Seed of the random initial rotation.
    """
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    if nbits < 64 or nbits % 64 or nbits > d:
        raise QueryError(f"nbits must be a multiple of 64 between 64 and the dimension {d}, got {nbits}")
    if n < 2:
        raise QueryError(f"training a code needs at least 2 vectors, got {n}")
    mean = x.mean(axis=0)
    xc = x - mean
    if n <= d:  # principal axes from the thin SVD of the data (n x d): cheaper than the d x d covariance
        _u, sv, vt = np.linalg.svd(xc, full_matrices=False)
        if nbits > len(sv):
            raise QueryError(f"training {nbits} bits needs more than {n} vectors")
        w = vt[:nbits].T
    else:  # from the covariance (d x d), largest variance first
        evals, evecs = np.linalg.eigh(xc.T @ xc / (n - 1))
        w = evecs[:, np.argsort(evals)[::-1][:nbits]]
    v = (xc @ w).astype(np.float32)  # the iterations in float32: half the cost, same rotation to ~1e-6
    rng = np.random.default_rng(seed)
    r = np.linalg.qr(rng.standard_normal((nbits, nbits)))[0].astype(np.float32)
    for _ in range(iterations):
        b = np.where(v @ r >= 0, np.float32(1), np.float32(-1))
        # Orthogonal Procrustes: R = argmin ‖B − VR‖ over orthogonal R.
        u, _s, vt = np.linalg.svd(v.T @ b)
        r = u @ vt
    return CodeParams(mean=mean.astype(np.float32), projection=(w @ r.astype(np.float64)).astype(np.float32))


def encode(x: np.ndarray, params: CodeParams) -> np.ndarray:
    """Binary codes ``(n, nbytes)`` uint8 of vectors ``(n, d)`` (bit set where the projection >= 0)."""
    x = np.asarray(x, dtype=np.float32)
    z = (x - params.mean) @ params.projection
    return np.packbits(z >= 0, axis=1)


def hamming(codes: np.ndarray, qcodes: np.ndarray) -> np.ndarray:
    """Hamming distances ``(q, n)`` int32 between query codes ``(q, B)`` and codes ``(n, B)``.

    XOR and popcount on 64-bit words when ``B`` is a multiple of 8 (bytes otherwise).
    """
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    qcodes = np.ascontiguousarray(qcodes, dtype=np.uint8)
    if codes.shape[1] != qcodes.shape[1]:
        raise QueryError(f"code lengths differ: {codes.shape[1]} and {qcodes.shape[1]} bytes")
    word = np.uint64 if codes.shape[1] % 8 == 0 else np.uint8
    cw, qw = codes.view(word), qcodes.view(word)
    out = np.empty((len(qw), len(cw)), dtype=np.int32)
    for i in range(len(qw)):  # one query at a time: (n, words) temporaries, not (q, n, words)
        out[i] = np.bitwise_count(cw ^ qw[i]).sum(axis=1, dtype=np.int32)
    return out


@functools.lru_cache(maxsize=1)
def _faiss() -> Any:
    try:
        import faiss
    except ImportError:  # the numpy kernel answers the same (ties at the cut aside)
        return None
    return faiss


def hamming_top_m(
    codes: np.ndarray, qcodes: np.ndarray, rows: np.ndarray, m: int, *, use_faiss: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``m`` nearest codes: ``(hamming int32 (q, m'), rows int64 (q, m'))``, sorted by (distance, row).

    With FAISS installed (extra ``codes``, also in ``bench``) and ``use_faiss``, the scan is
    ``faiss.knn_hamming`` (SIMD popcount; 11-18x faster than the numpy kernel over
    ~1M codes of 64 B in bench/codes.py, docs/performance.md); otherwise :func:`hamming` and
    :func:`dask_fp.kernels.top_m`. Both return the same distances; rows can
    differ only among codes tied at the ``m``-th distance.
    """
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    qcodes = np.ascontiguousarray(qcodes, dtype=np.uint8)
    rows = np.asarray(rows, dtype=np.int64)
    faiss = _faiss() if use_faiss else None
    if faiss is None or m >= len(codes) or codes.shape[1] != qcodes.shape[1]:
        return top_m(hamming(codes, qcodes), rows, m)
    # One OpenMP thread: a scan task is one thread of a Dask worker, and more OpenMP
    # threads spin against the other workers' tasks (30x slower on a loaded machine).
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        # "mc" (counting codes by distance) instead of a heap of m: cheaper for the large
        # m (10,000 at 10M rows) that dense stores need; same distances.
        dist, pos = faiss.knn_hamming(qcodes, codes, m, variant="mc")
    finally:
        faiss.omp_set_num_threads(threads)
    return top_m(np.asarray(dist, dtype=np.int32), rows[pos], m)
