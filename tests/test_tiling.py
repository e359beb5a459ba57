"""Window geometry against independent counts (no Dask, no I/O)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dask_fp import tiling as tl


def brute_windows(n: int, tile: int, stride: int) -> list[int]:
    """Origins of every window that fits inside the image cropped to whole tiles."""
    crop = n - n % tile
    return [o for o in range(0, n, stride) if o + tile <= crop]


@given(n=st.integers(0, 3000), tile=st.integers(1, 300), stride_frac=st.floats(0.01, 1.0))
def test_window_count_matches_enumeration(n, tile, stride_frac):
    stride = max(1, int(tile * stride_frac))
    assert tl.window_count(n, tile=tile, stride=stride) == len(brute_windows(n, tile, stride))


@pytest.mark.parametrize(
    ("h", "w", "tile", "stride", "expected"),
    [
        (1606, 2780, 256, 128, (11, 19)),  # the ecomapper drone orthomosaic
        (400, 400, 256, 128, (1, 1)),  # NEON OSBS_029: cropped to 256
        (255, 4000, 256, 128, (0, 29)),  # smaller than one tile along y
        (256, 256, 256, 256, (1, 1)),
        (513, 769, 256, 100, (3, 6)),  # stride that does not divide the tile
    ],
)
def test_grid_shape_examples(h, w, tile, stride, expected):
    assert tl.grid_shape(h, w, tile=tile, stride=stride) == expected


@given(n_tiles=st.integers(1, 40), tile=st.sampled_from([32, 64, 256]), div=st.sampled_from([1, 2, 4]),
       chunk=st.integers(1, 5000))
def test_chunks_partition_the_windows(n_tiles, tile, div, chunk):
    stride = tile // div
    n = n_tiles * tile
    sizes = tl.chunk_sizes(n, chunk=chunk, tile=tile, stride=stride)
    assert sum(sizes) == n
    assert all(s % stride == 0 for s in sizes[:-1])
    assert all(s >= tile - stride for s in sizes)
    # Every window is owned by exactly one block, and each block holds its windows + halo.
    nw = tl.window_count(n, tile=tile, stride=stride)
    owned = []
    start = 0
    for i, s in enumerate(sizes):
        w0, w1 = tl.owned_windows(start, start + s, n_windows=nw, stride=stride)
        owned += list(range(w0, w1))
        halo_end = start + s + (tile - stride if i < len(sizes) - 1 else 0)
        assert all(w * stride >= start and w * stride + tile <= min(halo_end, n) for w in range(w0, w1))
        start += s
    assert owned == list(range(nw))


def test_invalid_tiling_is_rejected():
    with pytest.raises(ValueError, match="stride"):
        tl.Tiling(tile=64, stride=128)
    with pytest.raises(ValueError, match="max_empty"):
        tl.Tiling(max_empty=1.5)
    with pytest.raises(ValueError, match="tile"):
        tl.Tiling(tile=0)


@given(h=st.integers(1, 70), w=st.integers(1, 70), tile=st.integers(1, 20), stride=st.integers(1, 20),
       seed=st.integers(0, 10))
@settings(max_examples=60)
def test_empty_fraction_matches_slicing(h, w, tile, stride, seed):
    stride = min(stride, tile)
    empty = np.random.default_rng(seed).random((h, w)) < 0.4
    ny = max(0, (h - tile) // stride + 1) if h >= tile else 0
    nx = max(0, (w - tile) // stride + 1) if w >= tile else 0
    got = tl.window_empty_fraction(empty, tile=tile, stride=stride, n_wy=ny, n_wx=nx)
    want = np.array([[empty[i * stride:i * stride + tile, j * stride:j * stride + tile].mean()
                      for j in range(nx)] for i in range(ny)]).reshape(ny, nx)
    np.testing.assert_allclose(got, want)


def test_empty_fraction_all_empty_and_too_small_block():
    e = np.ones((64, 64), dtype=bool)
    assert (tl.window_empty_fraction(e, tile=32, stride=16, n_wy=3, n_wx=3) == 1.0).all()
    with pytest.raises(ValueError, match="too small"):
        tl.window_empty_fraction(e, tile=32, stride=16, n_wy=4, n_wx=3)


@given(s=st.integers(0, 2**21 - 1), y=st.integers(0, 2**21 - 1), x=st.integers(0, 2**21 - 1))
def test_uid_round_trip(s, y, x):
    uid = tl.make_uid(s, y, x)
    assert uid.dtype == np.int64 and uid >= 0
    assert tuple(int(v) for v in tl.split_uid(uid)) == (s, y, x)


def test_uid_is_unique_and_bounded():
    s, y, x = np.meshgrid(np.arange(3), np.arange(50), np.arange(50), indexing="ij")
    u = tl.make_uid(s.ravel(), y.ravel(), x.ravel())
    assert len(np.unique(u)) == u.size
    with pytest.raises(ValueError, match="wy"):
        tl.make_uid(0, 2**21, 0)
    with pytest.raises(ValueError, match="source"):
        tl.make_uid(-1, 0, 0)


def test_footprints_and_centres_follow_the_affine():
    # 10 cm pixels, north-up, origin at (400000, 3300000).
    t = (0.1, 0.0, 400000.0, 0.0, -0.1, 3300000.0)
    rings = tl.window_rings(t, np.array([0, 2]), np.array([1, 0]), tile=256, stride=128)
    assert rings.shape == (2, 5, 2)
    np.testing.assert_allclose(rings[0, 0], [400000.0 + 12.8, 3300000.0])
    np.testing.assert_allclose(rings[0, 2], [400000.0 + 12.8 + 25.6, 3300000.0 - 25.6])
    np.testing.assert_allclose(rings[:, 0], rings[:, -1])  # closed
    x, y = tl.window_centres(t, np.array([2]), np.array([0]), tile=256, stride=128)
    np.testing.assert_allclose([x[0], y[0]], [400000.0 + 12.8, 3300000.0 - 25.6 - 12.8])


@given(r=st.floats(-5, 700), c=st.floats(-5, 700), tile=st.sampled_from([64, 100, 256]),
       div=st.sampled_from([1, 2, 3]))
def test_windows_at_pixel_are_the_covering_windows_nearest_first(r, c, tile, div):
    stride = max(1, tile // div)
    ny = nx = tl.window_count(600, tile=tile, stride=stride)
    got = tl.windows_at_pixel(r, c, n_wy=ny, n_wx=nx, tile=tile, stride=stride)
    cover = [(i, j) for i in range(ny) for j in range(nx)
             if i * stride <= r < i * stride + tile and j * stride <= c < j * stride + tile]
    assert sorted(got) == sorted(cover)
    dist = [((i * stride + tile / 2 - r) ** 2 + (j * stride + tile / 2 - c) ** 2) for i, j in got]
    assert dist == sorted(dist)


def test_overlap_geometry():
    assert tl.windows_overlap(0, 0, 1, 1, tile=256, stride=128)
    assert not tl.windows_overlap(0, 0, 2, 0, tile=256, stride=128)
    assert tl.overlap_fraction(0, 0, 1, 0, tile=256, stride=128) == 0.5
    assert tl.overlap_fraction(0, 0, 1, 1, tile=256, stride=128) == 0.25
    assert tl.Tiling(256, 128).reach == 1 and tl.Tiling(256, 64).reach == 3 and tl.Tiling(256, 256).reach == 0
