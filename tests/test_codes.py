"""Pure kernels of the compact codes (dask_fp.codes) against numpy oracles; no Dask, no I/O."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dask_fp.codes import asym_scores, asym_top_m, byte_tables, encode, hamming, project, train_itq
from dask_fp.errors import QueryError


def clustered(n: int, d: int, centres: int, seed: int, noise: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d)) * np.linspace(3, 0.2, d)  # decaying variance, like CNN features
    return (c[rng.integers(0, centres, n)] + noise * rng.normal(size=(n, d))).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 40), q=st.integers(1, 4), nbytes=st.sampled_from([1, 3, 8, 16, 64]),
       seed=st.integers(0, 2**31))
def test_hamming_matches_unpackbits_sum(n, q, nbytes, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
    qc = rng.integers(0, 256, (q, nbytes), dtype=np.uint8)
    want = np.unpackbits(codes[None] ^ qc[:, None], axis=-1).sum(axis=-1)
    got = hamming(codes, qc)
    assert got.shape == (q, n) and got.dtype == np.int32
    np.testing.assert_array_equal(got, want)


def test_hamming_rejects_different_lengths():
    with pytest.raises(QueryError, match="code lengths differ"):
        hamming(np.zeros((3, 8), np.uint8), np.zeros((1, 16), np.uint8))


def test_encode_is_the_sign_of_the_projection_packed():
    x = clustered(500, 64, 10, seed=1)
    p = train_itq(x, 64, iterations=5)
    codes = encode(x[:50], p)
    assert codes.shape == (50, 8) and codes.dtype == np.uint8
    z = (x[:50] - p.mean) @ p.projection
    np.testing.assert_array_equal(np.unpackbits(codes, axis=1).astype(bool), z >= 0)


def test_itq_projection_is_pca_axes_times_a_rotation():
    x = clustered(2000, 128, 20, seed=2)
    p = train_itq(x, 64, iterations=10)
    # Columns orthonormal: PCA axes (orthonormal) times an orthogonal rotation.
    np.testing.assert_allclose(p.projection.T @ p.projection, np.eye(64), atol=1e-4)
    # They span the top-64 principal subspace.
    xc = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(xc.astype(np.float64), full_matrices=False)
    top = vt[:64].T
    resid = p.projection - top @ (top.T @ p.projection)
    assert np.abs(resid).max() < 1e-3


def test_itq_lowers_quantisation_loss_against_its_random_start():
    x = clustered(3000, 64, 30, seed=3)
    start = train_itq(x, 64, iterations=0)
    learned = train_itq(x, 64, iterations=30)

    def loss(p):
        v = (x - p.mean) @ p.projection
        return float(((np.where(v >= 0, 1.0, -1.0) - v) ** 2).sum())

    assert loss(learned) < 0.97 * loss(start)


def test_hamming_ranking_finds_true_neighbours_on_structured_data():
    """Recall of the code ranking + exact re-rank of the top 5 % against brute force."""
    x = clustered(4000, 128, 200, seed=4, noise=0.5)
    p = train_itq(x, 128)
    q = x[:40] + 0.05
    codes, qc = encode(x, p), encode(q, p)
    cand = np.argsort(hamming(codes, qc), axis=1, kind="stable")[:, :200]
    exact = ((q[:, None, :] - x[None]) ** 2).sum(-1)
    truth = np.argsort(exact, axis=1)[:, :10]
    rer = np.take_along_axis(cand, np.argsort(np.take_along_axis(exact, cand, 1), axis=1)[:, :10], 1)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, rer, strict=True)])
    assert recall >= 0.9


@pytest.mark.parametrize("nbits", [0, 32, 100, 192])
def test_bad_nbits_is_a_query_error(nbits):
    with pytest.raises(QueryError, match="nbits"):
        train_itq(np.ones((10, 128), np.float32), nbits)


@pytest.mark.parametrize("n,m", [(5000, 100), (3000, 1), (50, 80)])
def test_faiss_and_numpy_hamming_top_m_agree(n, m):
    pytest.importorskip("faiss")
    from dask_fp.codes import hamming_top_m

    rng = np.random.default_rng(n)
    codes = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    q = rng.integers(0, 256, (3, 16), dtype=np.uint8)
    rows = np.arange(n, dtype=np.int64) * 3 + 7
    fd, fr = hamming_top_m(codes, q, rows, m)
    nd, nr = hamming_top_m(codes, q, rows, m, use_faiss=False)
    oracle = np.sort(np.unpackbits(codes[None] ^ q[:, None], axis=2).sum(axis=2), axis=1)[:, :m]
    np.testing.assert_array_equal(fd, oracle)
    np.testing.assert_array_equal(nd, oracle)
    for i in range(len(q)):  # rows can differ only among codes tied at the m-th distance
        below = fd[i] < fd[i, -1]
        assert set(fr[i, below]) == set(nr[i, below])
        assert (np.diff(fd[i]) >= 0).all() and len(set(fr[i])) == len(fr[i])


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


@pytest.mark.parametrize("use_faiss", [True, False])
def test_asym_top_m_ranks_the_hamming_shortlist_by_score(use_faiss):
    """Oracle: Hamming distances by unpackbits, the pool nearest, then the score by a float product."""
    if use_faiss:
        pytest.importorskip("faiss")
    x = clustered(3000, 64, 30, seed=5)
    p = train_itq(x, 64, iterations=5)
    codes = encode(x, p)
    q = x[:4] + 0.1
    z = project(q, p)
    rows = np.arange(len(x), dtype=np.int64) + 1000
    d, r = asym_top_m(codes, encode(q, p), byte_tables(z), rows, 20, 300, use_faiss=use_faiss)
    assert d.shape == r.shape == (4, 20) and d.dtype == np.float32
    signs = np.unpackbits(codes, axis=1).astype(np.float64) * 2 - 1
    ham = np.unpackbits(codes[None] ^ encode(q, p)[:, None], axis=2).sum(axis=2)
    for i in range(len(q)):
        h = np.sort(ham[i])[299]
        score = signs @ z[i].astype(np.float64)
        assert (ham[i][r[i] - 1000] <= h).all()  # every kept code is in the Hamming shortlist
        np.testing.assert_allclose(-d[i], score[r[i] - 1000], rtol=1e-5, atol=1e-4)
        assert (np.diff(d[i]) >= 0).all() and len(set(r[i])) == 20
        # Nothing inside the shortlist (strictly below its cut) scores better than the 20th kept.
        inside = ham[i] < h
        assert (score[inside] <= -d[i, -1] + 1e-4).sum() >= inside.sum() - 20


def test_asym_score_ranks_true_neighbours_higher_than_hamming():
    """The point of the asymmetric stage: among the same shortlist, the exact 10 nearest rank higher."""
    x = clustered(20000, 128, 50, seed=6, noise=0.6)
    p = train_itq(x, 128, iterations=10)
    q = clustered(40, 128, 50, seed=6, noise=0.6) + 0.01
    codes, qc, z = encode(x, p), encode(q, p), project(q, p)
    exact = ((q[:, None, :] - x[None]) ** 2).sum(-1)
    truth = np.argsort(exact, axis=1)[:, :10]
    rows = np.arange(len(x), dtype=np.int64)
    _, by_asym = asym_top_m(codes, qc, byte_tables(z), rows, 200, 2000, use_faiss=False)
    by_ham = np.argsort(hamming(codes, qc), axis=1, kind="stable")[:, :200]

    def recall(got):
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, got, strict=True)])

    assert recall(by_asym) > recall(by_ham) + 0.05
