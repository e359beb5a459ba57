"""Compact codes for fingerprints: coarse lists, binary codes of the residuals, estimated distances.

Pure numpy kernels (k-means from scikit-learn), tested without Dask or I/O;
:mod:`.index` stores the codes beside the fingerprints and scans them.

Method: an inverted file (IVF) with 1-bit residual codes, as in RaBitQ (Gao &
Long, SIGMOD 2024) and Earth Index's IVF + RaBitQ.

- **Lists.** k-means on a sample gives ``lists`` centroids; each row belongs to
  its nearest centroid ``c``. A query only looks at the rows of its ``probes``
  nearest lists.
- **Residual codes.** A row ``x`` is coded as the sign pattern of its residual's
  projection ``y = (x − c) P``, packed 8 bits to a byte (``nbits / 8`` bytes per
  tile). ``P`` (``d × nbits``) is the top principal axes of the residuals times
  a rotation learned by ITQ (Gong & Lazebnik, CVPR 2011), which lowers the
  quantisation loss ``‖sign(V R) − V R‖²``. Coding residuals, not the rows,
  spends every bit inside the row's own cluster, where neighbours differ.
- **Estimated distance.** ``‖q − x‖² = ‖q − c‖² + ‖x − c‖² − 2⟨q − c, x − c⟩``;
  the first term is exact per list, the second is stored per row
  (``rnorm2``), and the inner product is estimated from the code ``b`` (±1)
  as ``⟨z, b⟩ · ‖y‖² / Σ|y|`` with ``z = (q − c) P`` — RaBitQ's estimator
  ``⟨ō, q⟩ / ⟨ō, o⟩`` for the unit code vector ``ō = b / √nbits``; the factor
  ``‖y‖² / Σ|y|`` is stored per row (``scale``). ``⟨z, b⟩`` is a sum over the
  code's bytes of one value from a 256-entry table per byte
  (:func:`byte_tables`), built once per query and list: one table look-up per
  code byte, no bit unpacking.

The estimates rank the candidates; :func:`dask_fp.index.code_search` re-ranks the
best of them with exact distances.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import QueryError
from .kernels import top_m
from .malloc import keep_buffers


@dataclass(frozen=True)
class CodeParams:
    """Trained parameters of a code.

    Attributes
    ----------
    centroids : ndarray, shape (lists, d)
        List centres (k-means).
    projection : ndarray, shape (d, nbits)
        Residual PCA axes times the learned ITQ rotation: ``code = sign((x - centroid) @ projection)``.
    """

    centroids: np.ndarray
    projection: np.ndarray

    @property
    def nbits(self) -> int:
        return int(self.projection.shape[1])

    @property
    def nbytes(self) -> int:
        return self.nbits // 8

    @property
    def lists(self) -> int:
        return int(self.centroids.shape[0])


def check_nbits(nbits: int, d: int) -> None:
    """:class:`QueryError` unless ``nbits`` is a multiple of 64 between 64 and ``d``."""
    if nbits < 64 or nbits % 64 or nbits > d:
        raise QueryError(f"nbits must be a multiple of 64 between 64 and the dimension {d}, got {nbits}")


def train_itq(x: np.ndarray, nbits: int, *, iterations: int = 20, seed: int = 0) -> np.ndarray:
    """A projection ``(d, nbits)`` float32: the top ``nbits`` principal axes of ``x`` times an ITQ rotation.

    Parameters
    ----------
    x : ndarray, shape (n, d)
        Training vectors (centred by their mean for the principal axes).
    nbits : int
        Code length in bits: a multiple of 64, at most ``d`` (PCA axes).
    iterations : int
        ITQ alternations (the loss levels off after a few tens).
    seed : int
        Seed of the random initial rotation.
    """
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    check_nbits(nbits, d)
    if n < 2:
        raise QueryError(f"training a code needs at least 2 vectors, got {n}")
    xc = x - x.mean(axis=0)
    if n <= d:  # principal axes from the SVD of the data (n x d), completed to d orthonormal axes
        w = np.linalg.svd(xc, full_matrices=True)[2][:nbits].T
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
    return (w @ r.astype(np.float64)).astype(np.float32)


def nearest_list(x: np.ndarray, centroids: np.ndarray, *, slice_rows: int = 8192) -> np.ndarray:
    """Index ``(n,)`` int32 of each row's nearest centroid (ties: the lower index), a slice of rows at a time."""
    x = np.asarray(x, dtype=np.float32)
    c = np.asarray(centroids, dtype=np.float32)
    c2 = np.einsum("ij,ij->i", c, c)
    out = np.empty(len(x), dtype=np.int32)
    for i in range(0, len(x), slice_rows):  # ‖x − c‖² − ‖x‖² = ‖c‖² − 2 x·c: one product per slice
        d = x[i : i + slice_rows] @ c.T
        d *= -2
        d += c2
        out[i : i + slice_rows] = np.argmin(d, axis=1)
    return out


def train(x: np.ndarray, lists: int, nbits: int, *, iterations: int = 20, seed: int = 0) -> CodeParams:
    """Learn the lists (k-means, scikit-learn) and the residual code (PCA + ITQ) from training vectors."""
    from sklearn.cluster import KMeans

    x = np.asarray(x, dtype=np.float32)
    check_nbits(nbits, x.shape[1])
    if not 1 <= lists <= len(x):
        raise QueryError(f"lists must be between 1 and the {len(x)} training rows, got {lists}")
    if lists == 1:
        centroids = x.mean(axis=0, keepdims=True)
    else:
        km = KMeans(n_clusters=lists, n_init=1, max_iter=iterations, random_state=seed).fit(x)
        centroids = km.cluster_centers_.astype(np.float32)
    resid = x - centroids[nearest_list(x, centroids)]
    return CodeParams(centroids=centroids, projection=train_itq(resid, nbits, iterations=iterations, seed=seed))


@dataclass(frozen=True)
class Encoded:
    """Codes of rows: list, packed sign bits, and the two per-row terms of the distance estimate."""

    lists: np.ndarray  # (n,) int32
    codes: np.ndarray  # (n, nbytes) uint8
    rnorm2: np.ndarray  # (n,) float32: ‖x − c‖²
    scale: np.ndarray  # (n,) float32: ‖y‖² / Σ|y| (0 where y = 0)


def encode(x: np.ndarray, params: CodeParams) -> Encoded:
    """Encode rows ``(n, d)``: nearest list, residual sign bits (set where the projection >= 0), norms."""
    x = np.asarray(x, dtype=np.float32)
    lst = nearest_list(x, params.centroids)
    r = x - params.centroids[lst]
    y = r @ params.projection
    l1 = np.abs(y).sum(axis=1)
    scale = np.divide(np.einsum("ij,ij->i", y, y), l1, out=np.zeros_like(l1), where=l1 > 0)
    return Encoded(lists=lst, codes=np.packbits(y >= 0, axis=1), rnorm2=np.einsum("ij,ij->i", r, r),
                   scale=scale.astype(np.float32))


#: The signs (±1) of the 8 bits of every byte value, most significant bit first
#: (the bit order of ``np.packbits``): shape (256, 8).
_BYTE_SIGNS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(np.float32) * 2 - 1


def byte_tables(z: np.ndarray) -> np.ndarray:
    """Look-up tables ``(..., nbytes, 256)`` float32 of ``⟨z, b⟩`` from projections ``z`` ``(..., nbits)``.

    ``tables[..., j, v]`` is the inner product of ``z``'s bits ``8j .. 8j+7`` with
    the signs (±1) of byte value ``v``, so for a code ``c`` the sum
    ``sum_j tables[..., j, c[j]]`` = ``⟨z, 2·bits(c) − 1⟩``.
    """
    z = np.asarray(z, dtype=np.float32)
    if z.ndim < 1 or z.shape[-1] % 8:
        raise QueryError(f"projections must have shape (..., nbits) with nbits a multiple of 8, got {z.shape}")
    return np.ascontiguousarray(z.reshape(*z.shape[:-1], -1, 8) @ _BYTE_SIGNS.T)


def asym_scores(codes: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``⟨z, b⟩`` ``(n,)`` float32 of codes ``(n, nbytes)`` for one query's :func:`byte_tables` ``(nbytes, 256)``."""
    codes = np.asarray(codes, dtype=np.uint8)
    nbytes = table.shape[0]
    if codes.ndim != 2 or codes.shape[1] != nbytes or table.ndim != 2:
        raise QueryError(f"codes must have shape (n, {nbytes}) and the table (nbytes, 256), got {codes.shape}"
                         f" and {table.shape}")
    flat = codes.astype(np.intp)
    flat += np.arange(0, 256 * nbytes, 256, dtype=np.intp)
    return table.ravel()[flat].sum(axis=1, dtype=np.float32)


def estimates(codes: np.ndarray, rnorm2: np.ndarray, scale: np.ndarray, qc2: float,
              table: np.ndarray) -> np.ndarray:
    """Estimated squared distances ``‖q − c‖² + ‖x − c‖² − 2·scale·⟨z, b⟩`` of rows coded in one list
    (see the module doc; ``codes``, ``rnorm2``, ``scale`` as in :class:`Encoded`): ``qc2`` is
    ``‖q − c‖²``, ``table`` the :func:`byte_tables` of ``z = (q − c) P``."""
    est = asym_scores(codes, table)
    est *= -2 * scale
    est += rnorm2
    est += np.float32(qc2)
    return est


# --------------------------------------------------------------------------- per scan task


@dataclass(frozen=True)
class CodeBlock:
    """A block of coded rows sorted by list, in memory (one scan task's share of the store).

    ``codes``, ``rnorm2``, ``scale`` (as in :class:`Encoded`) and ``rows`` (their store rows)
    are sorted by list; list ``l``'s entries are ``offsets[l]:offsets[l + 1]``.
    """

    codes: np.ndarray
    rnorm2: np.ndarray
    scale: np.ndarray
    rows: np.ndarray
    offsets: np.ndarray

    @classmethod
    def sort(cls, enc: Encoded, start: int, lists: int) -> CodeBlock:
        """The block of rows ``start..start+n`` coded as ``enc`` (in row order)."""
        order = np.argsort(enc.lists, kind="stable")
        offsets = np.searchsorted(enc.lists[order], np.arange(lists + 1)).astype(np.int64)
        codes, rnorm2, scale = (np.ascontiguousarray(a[order]) for a in (enc.codes, enc.rnorm2, enc.scale))
        return cls(codes=codes, rnorm2=rnorm2, scale=scale, rows=order.astype(np.int64) + start, offsets=offsets)

    def candidates(self, probes: np.ndarray, qc2: np.ndarray, z: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Each query's ``m`` best rows of its probed lists by estimated distance.

        Parameters
        ----------
        probes : ndarray of int, shape (q, p)
            The lists each query probes.
        qc2 : ndarray of float32, shape (q, p)
            ``‖q − c‖²`` of those lists.
        z : ndarray of float32, shape (q, p, nbits)
            ``(q − c) P`` of those lists.
        m : int

        Returns
        -------
        (estimate float32 (q, w), rows int64 (q, w)), sorted by (estimate, row); ``w = min(m, the
        most rows any query probed here)``, shorter lists padded with ``inf`` and row ``-1``.
        """
        out = []
        for i in range(len(probes)):
            tables = byte_tables(z[i])
            est: list[np.ndarray] = []
            rows: list[np.ndarray] = []
            for j, lst in enumerate(np.asarray(probes[i]).tolist()):
                lo, hi = int(self.offsets[lst]), int(self.offsets[lst + 1])
                if hi > lo:  # the list's rows are one contiguous slice: views, no copies
                    est.append(estimates(self.codes[lo:hi], self.rnorm2[lo:hi], self.scale[lo:hi],
                                         float(qc2[i, j]), tables[j]))
                    rows.append(self.rows[lo:hi])
            if not est:
                est.append(np.empty(0, np.float32))
                rows.append(np.empty(0, np.int64))
            out.append(top_m(np.concatenate(est)[None], np.concatenate(rows), m))
        w = max((len(r[0]) for _, r in out), default=0)
        dist = np.full((len(out), w), np.inf, np.float32)
        ids = np.full((len(out), w), -1, np.int64)
        for i, (d, r) in enumerate(out):
            dist[i, : d.shape[1]], ids[i, : r.shape[1]] = d[0], r[0]
        return dist, ids


def block_candidates(block: CodeBlock, *, probes: np.ndarray, qc2: np.ndarray, z: np.ndarray,
                     m: int) -> tuple[np.ndarray, np.ndarray]:
    """A scan task: :meth:`CodeBlock.candidates` (a module function, for ``client.submit``).

    Its look-up buffers are megabytes per list: :func:`~dask_fp.malloc.keep_buffers` lets a
    Dask worker reuse them (4-10x faster tasks on a nanny-started worker, bench/codes_breakdown.py).
    """
    keep_buffers()
    return block.candidates(probes, qc2, z, m)
