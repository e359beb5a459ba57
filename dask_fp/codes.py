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
coarse ranking.

Two stages refine it before the exact re-rank (:func:`dask_fp.index.code_search`):
the Hamming shortlist (:func:`hamming_top_m`) is re-scored *asymmetrically*
(:func:`asym_top_m`): the query is not binarised, and a code ``b`` scores the
inner product ``<(q − μ) W R, 2b − 1>`` of the query's projection with the
code's signs (Gordo et al., "Asymmetric distances for binary embeddings",
TPAMI 2014). The score is a sum over the code's bytes of one value from a
256-entry table per byte (:func:`byte_tables`), built once per query, so
re-scoring costs one table look-up per code byte. It ranks the true
neighbours higher than the Hamming distance does, so fewer full fingerprints
need to be read for the same recall (bench/codes.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import QueryError
from .kernels import top_m, top_m_index


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


def project(x: np.ndarray, params: CodeParams) -> np.ndarray:
    """The projections ``(n, nbits)`` float32 ``(x − μ) W R`` of vectors ``(n, d)``, whose signs are the codes."""
    x = np.asarray(x, dtype=np.float32)
    return np.asarray((x - params.mean) @ params.projection, dtype=np.float32)


def encode(x: np.ndarray, params: CodeParams) -> np.ndarray:
    """Binary codes ``(n, nbytes)`` uint8 of vectors ``(n, d)`` (bit set where the projection >= 0)."""
    return np.packbits(project(x, params) >= 0, axis=1)


#: The signs (±1) of the 8 bits of every byte value, most significant bit first
#: (the bit order of ``np.packbits``): shape (256, 8).
_BYTE_SIGNS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(np.float32) * 2 - 1


def byte_tables(z: np.ndarray) -> np.ndarray:
    """Look-up tables ``(q, nbytes, 256)`` float32 of the asymmetric score, from projections ``z`` ``(q, nbits)``.

    ``tables[i, j, v]`` is the inner product of query ``i``'s projected bits
    ``8j .. 8j+7`` with the signs (±1) of byte value ``v``, so the score of a code
    ``c`` is ``sum_j tables[i, j, c[j]]`` = ``<z_i, 2·bits(c) − 1>``.
    """
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 2 or z.shape[1] % 8:
        raise QueryError(f"projections must have shape (q, nbits) with nbits a multiple of 8, got {z.shape}")
    return np.ascontiguousarray(z.reshape(len(z), -1, 8) @ _BYTE_SIGNS.T)


def asym_scores(codes: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Asymmetric scores ``(n,)`` float32 of codes ``(n, nbytes)`` for one query's ``table`` ``(nbytes, 256)``.

    Higher is more similar: the inner product of the query's projection with the codes' signs.
    """
    codes = np.asarray(codes, dtype=np.uint8)
    nbytes = table.shape[0]
    if codes.ndim != 2 or codes.shape[1] != nbytes:
        raise QueryError(f"codes must have shape (n, {nbytes}), got {codes.shape}")
    flat = codes.astype(np.intp) + np.arange(0, 256 * nbytes, 256, dtype=np.intp)
    return table.ravel()[flat].sum(axis=1, dtype=np.float32)


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
    dist, pos = _hamming_top(codes, qcodes, m, use_faiss=use_faiss)
    return top_m(dist, np.asarray(rows, dtype=np.int64)[pos], m)


def _hamming_top(codes: np.ndarray, qcodes: np.ndarray, m: int, *, use_faiss: bool = True
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``m`` nearest codes as ``(hamming int32, positions in codes int64)``, in no set
    order (the callers sort what they keep)."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    qcodes = np.ascontiguousarray(qcodes, dtype=np.uint8)
    faiss = _faiss() if use_faiss else None
    if faiss is None or m >= len(codes) or codes.shape[1] != qcodes.shape[1]:
        d = hamming(codes, qcodes)
        idx = top_m_index(d, np.arange(len(codes)), m)
        return np.take_along_axis(d, idx, axis=1), idx.astype(np.int64)
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
    return np.asarray(dist, dtype=np.int32), np.asarray(pos, dtype=np.int64)


def asym_top_m(
    codes: np.ndarray, qcodes: np.ndarray, tables: np.ndarray, rows: np.ndarray, m: int, pool: int,
    *, use_faiss: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``m`` best codes by asymmetric score among its ``pool`` nearest by Hamming distance.

    Parameters
    ----------
    codes : ndarray of uint8, shape (n, nbytes)
    qcodes : ndarray of uint8, shape (q, nbytes)
        The queries' codes (:func:`encode`), for the Hamming shortlist.
    tables : ndarray of float32, shape (q, nbytes, 256)
        The queries' :func:`byte_tables`.
    rows : ndarray of int64, shape (n,)
    m, pool : int
        Kept per query, out of a Hamming shortlist of ``max(pool, m)``.

    Returns
    -------
    (-score float32 (q, m'), rows int64 (q, m')), sorted by (−score, row): a
    "distance" that merges with :func:`dask_fp.kernels.knn_merge`.
    """
    rows = np.asarray(rows, dtype=np.int64)
    _, pos = _hamming_top(codes, qcodes, max(pool, m), use_faiss=use_faiss)
    neg = np.empty(pos.shape, dtype=np.float32)
    for i in range(len(pos)):
        neg[i] = -asym_scores(codes[pos[i]], tables[i])
    return top_m(neg, rows[pos], m)


# --------------------------------------------------------------------------- per scan task


def hamming_chunk(
    block: tuple[np.ndarray, np.ndarray], *, qcodes: np.ndarray, m: int, axis: Any = None, keepdims: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Chunk step: a block ``(codes, rows)`` → each query's ``m`` nearest codes (Hamming, then row)."""
    codes, rows = block
    return hamming_top_m(codes, qcodes, rows, m)


def asym_chunk(
    block: tuple[np.ndarray, np.ndarray], *, qcodes: np.ndarray, tables: np.ndarray, m: int, pool: int,
    axis: Any = None, keepdims: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Chunk step: a block ``(codes, rows)`` → each query's ``m`` best of its ``pool`` nearest codes
    by asymmetric score (:func:`dask_fp.codes.asym_top_m`)."""
    codes, rows = block
    return asym_top_m(codes, qcodes, tables, rows, m, pool)


def block_candidates(codes: np.ndarray, start: int, *, qcodes: np.ndarray, tables: np.ndarray | None, m: int,
                     pool: int) -> tuple[np.ndarray, np.ndarray]:
    """One persisted block of codes (first row ``start``) → each query's ``m`` best (a task of
    :func:`dask_fp.index.code_candidates`): by asymmetric score with ``tables``, else by Hamming distance."""
    rows = np.arange(start, start + len(codes), dtype=np.int64)
    if tables is None:
        return hamming_top_m(codes, qcodes, rows, m)
    return asym_top_m(codes, qcodes, tables, rows, m, pool)
