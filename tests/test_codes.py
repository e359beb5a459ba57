"""Pure kernels of the compact codes (dask_fp.codes) against numpy oracles; no Dask, no I/O."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dask_fp.codes import (
    CodeBlock,
    CodeParams,
    Encoded,
    asym_scores,
    byte_tables,
    encode,
    estimates,
    nearest_list,
    train,
    train_itq,
)
from dask_fp.errors import QueryError


def clustered(n: int, d: int, centres: int, seed: int, noise: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d)) * np.linspace(3, 0.2, d)  # decaying variance, like CNN features
    return (c[rng.integers(0, centres, n)] + noise * rng.normal(size=(n, d))).astype(np.float32)


def oracle_estimates(x_enc: Encoded, params: CodeParams, q: np.ndarray) -> np.ndarray:
    """Estimated distances in float64 from unpacked bits: ‖q − c‖² + ‖r‖² − 2·scale·⟨(q − c)P, b⟩."""
    c = params.centroids[x_enc.lists].astype(np.float64)
    b = np.unpackbits(x_enc.codes, axis=1).astype(np.float64) * 2 - 1
    z = (q.astype(np.float64) - c) @ params.projection.astype(np.float64)
    return ((q - c) ** 2).sum(1) + x_enc.rnorm2 - 2 * x_enc.scale * (z * b).sum(1)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 60), lists=st.integers(1, 9), seed=st.integers(0, 2**31))
def test_nearest_list_matches_brute_force(n, lists, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-4, 5, (n, 6)).astype(np.float32)  # small integers: exact distances, real ties
    c = rng.integers(-4, 5, (lists, 6)).astype(np.float32)
    d = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(nearest_list(x, c, slice_rows=7), np.argmin(d, axis=1) if n else [])


def test_encode_codes_the_residual_of_the_nearest_list():
    x = clustered(600, 64, 10, seed=1)
    p = train(x, 10, 64, iterations=5)
    assert p.centroids.shape == (10, 64) and p.projection.shape == (64, 64) and p.nbytes == 8
    enc = encode(x[:50], p)
    d = ((x[:50, None, :].astype(np.float64) - p.centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(enc.lists, np.argmin(d, axis=1))
    r = x[:50] - p.centroids[enc.lists]
    y = r.astype(np.float64) @ p.projection
    assert enc.codes.shape == (50, 8) and enc.codes.dtype == np.uint8
    np.testing.assert_array_equal(np.unpackbits(enc.codes, axis=1).astype(bool), y >= 0)
    np.testing.assert_allclose(enc.rnorm2, (r.astype(np.float64) ** 2).sum(1), rtol=1e-5)
    np.testing.assert_allclose(enc.scale, (y * y).sum(1) / np.abs(y).sum(1), rtol=1e-4)


def test_estimate_is_exact_for_a_residual_its_code_holds_exactly():
    """A residual ``s·b`` (all coordinates ±s) is coded without loss: the estimate is the distance."""
    rng = np.random.default_rng(4)
    p = CodeParams(centroids=rng.normal(size=(3, 64)).astype(np.float32), projection=np.eye(64, dtype=np.float32))
    lst = rng.integers(0, 3, 20)
    x = (p.centroids[lst] + rng.uniform(0.5, 2, (20, 1)) * rng.choice([-1, 1], (20, 64))).astype(np.float32)
    q = rng.normal(size=64).astype(np.float32)
    enc = encode(x, p)
    np.testing.assert_array_equal(enc.lists, lst)
    qc = q - p.centroids
    tables = byte_tables(qc @ p.projection)
    est = np.empty(len(x), np.float32)
    for lst in range(3):
        sel = enc.lists == lst
        part = Encoded(*(a[sel] for a in (enc.lists, enc.codes, enc.rnorm2, enc.scale)))
        est[sel] = estimates(part.codes, part.rnorm2, part.scale, float((qc[lst] ** 2).sum()), tables[lst])
    np.testing.assert_allclose(est, ((x - q) ** 2).sum(1), rtol=1e-4)
    np.testing.assert_allclose(est, oracle_estimates(enc, p, q), rtol=1e-5)


def test_itq_projection_is_pca_axes_times_a_rotation():
    x = clustered(2000, 128, 20, seed=2)
    proj = train_itq(x, 64, iterations=10)
    # Columns orthonormal: PCA axes (orthonormal) times an orthogonal rotation.
    np.testing.assert_allclose(proj.T @ proj, np.eye(64), atol=1e-4)
    # They span the top-64 principal subspace.
    xc = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(xc.astype(np.float64), full_matrices=False)
    top = vt[:64].T
    resid = proj - top @ (top.T @ proj)
    assert np.abs(resid).max() < 1e-3


def test_itq_lowers_quantisation_loss_against_its_random_start():
    x = clustered(3000, 64, 30, seed=3)
    xc = x - x.mean(axis=0)

    def loss(proj):
        v = xc @ proj
        return float(((np.where(v >= 0, 1.0, -1.0) - v) ** 2).sum())

    assert loss(train_itq(x, 64, iterations=30)) < 0.97 * loss(train_itq(x, 64, iterations=0))


@pytest.mark.parametrize("nbits", [0, 32, 100, 128])
def test_bad_nbits_is_a_query_error(nbits):
    with pytest.raises(QueryError, match="nbits"):
        train(clustered(200, 64, 5, seed=0), 4, nbits)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 40), nbytes=st.sampled_from([1, 3, 8, 64]), seed=st.integers(0, 2**31))
def test_asym_scores_match_the_projection_times_the_code_signs(n, nbytes, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
    z = rng.normal(size=(2, nbytes * 8)).astype(np.float32)
    tables = byte_tables(z)
    assert tables.shape == (2, nbytes, 256)
    signs = np.unpackbits(codes, axis=1).astype(np.float64) * 2 - 1  # (n, nbits), packbits bit order
    for i in range(2):
        np.testing.assert_allclose(asym_scores(codes, tables[i]), signs @ z[i].astype(np.float64),
                                   rtol=1e-5, atol=1e-4)


def test_asym_kernels_reject_bad_shapes():
    with pytest.raises(QueryError, match="multiple of 8"):
        byte_tables(np.zeros((1, 12), np.float32))
    with pytest.raises(QueryError, match="codes must have shape"):
        asym_scores(np.zeros((3, 4), np.uint8), np.zeros((8, 256), np.float32))
    with pytest.raises(QueryError, match="codes must have shape"):
        asym_scores(np.zeros((3, 8), np.uint8), np.zeros((2, 8, 256), np.float32))


def test_block_candidates_are_the_best_estimates_of_the_probed_lists():
    """Oracle: float64 estimates from unpacked bits over the rows of each query's probed lists."""
    x = clustered(3000, 64, 30, seed=5)
    p = train(x, 16, 64, iterations=5)
    enc = encode(x, p)
    block = CodeBlock.sort(enc, 1000, p.lists)
    np.testing.assert_array_equal(np.sort(block.rows), np.arange(1000, 4000))
    q = x[:4] + 0.1
    qc2 = ((q[:, None, :] - p.centroids[None]) ** 2).sum(-1)
    probes = np.argsort(qc2, axis=1)[:, :3]
    probes[3] = [probes[3, 0], probes[3, 0], probes[3, 0]]  # a query probing fewer rows: padded
    z = q[:, None, :] @ p.projection - (p.centroids @ p.projection)[probes]
    d, r = block.candidates(probes, np.take_along_axis(qc2, probes, 1).astype(np.float32), z.astype(np.float32), 40)
    assert d.shape == r.shape == (4, 40) and d.dtype == np.float32
    for i in range(len(q)):
        inside = np.flatnonzero(np.isin(enc.lists, probes[i]))
        want = oracle_estimates(Encoded(*(a[inside] for a in (enc.lists, enc.codes, enc.rnorm2, enc.scale))), p, q[i])
        keep = r[i] >= 0
        assert keep.sum() == min(40, len(inside)) and np.isinf(d[i, ~keep]).all()
        got = r[i][keep] - 1000
        assert set(got) <= set(inside) and (np.diff(d[i][keep]) >= 0).all()
        by_row = dict(zip(inside.tolist(), want.tolist(), strict=True))
        np.testing.assert_allclose(d[i][keep], [by_row[g] for g in got], rtol=1e-4, atol=1e-3)
        cut = np.sort(want)[keep.sum() - 1] if keep.sum() else np.inf
        assert (want < cut - 1e-3).sum() <= keep.sum()  # nothing left out ranks clearly better


def test_residual_lists_rank_true_neighbours_higher_than_one_global_code():
    """The point of the lists: codes of residuals inside a cluster rank the exact 10 nearest higher
    than one code over the whole set (lists = 1) for the same number of candidates."""
    x = clustered(20000, 128, 50, seed=6, noise=0.6)
    q = clustered(40, 128, 50, seed=6, noise=0.6) + 0.01
    truth = np.argsort(((q[:, None, :] - x[None]) ** 2).sum(-1), axis=1)[:, :10]

    def recall(lists: int, probes: int) -> float:
        p = train(x[::4], lists, 128, iterations=10)
        enc = encode(x, p)
        block = CodeBlock.sort(enc, 0, lists)
        qc2 = ((q[:, None, :] - p.centroids[None]) ** 2).sum(-1)
        pr = np.argsort(qc2, axis=1)[:, :probes]
        z = (q[:, None, :] @ p.projection - (p.centroids @ p.projection)[pr]).astype(np.float32)
        _, r = block.candidates(pr, np.take_along_axis(qc2, pr, 1).astype(np.float32), z, 100)
        return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, r, strict=True)]))

    ivf, flat = recall(50, 4), recall(1, 1)
    assert ivf >= 0.9 and ivf > flat + 0.05, (ivf, flat)
