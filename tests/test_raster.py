"""Reading pixels: the lazy, stride-aligned DataArray and the per-block RGB / empty-pixel kernel."""

from __future__ import annotations

import numpy as np
from conftest import textured, write_tif

from dask_fp.inspection import inspect_raster
from dask_fp.raster import open_raster, to_rgb_and_empty
from dask_fp.tiling import Tiling


def test_open_is_lazy_cropped_and_stride_aligned(tif):
    spec = inspect_raster(tif)
    da = open_raster(spec, Tiling(64, 32), chunk=100)
    assert da.shape == (3, 320, 384)  # 416 cropped to 6 whole 64 px tiles
    assert all(c % 32 == 0 for c in da.chunks[1][:-1] + da.chunks[2][:-1])
    assert len(da.chunks[1]) > 1  # really chunked
    assert hasattr(da.data, "dask")  # nothing read yet
    np.testing.assert_array_equal(da[:, 100:110, 130:140].values, textured(320, 416, seed=1)[:, 100:110, 130:140])


def test_rgba_alpha_band_is_detected(tmp_path):
    data = np.concatenate([textured(128, 128), np.full((1, 128, 128), 255, np.uint8)])
    data[3, :64] = 0
    spec = inspect_raster(write_tif(tmp_path / "rgba.tif", data, alpha=True))
    assert spec.bands == (1, 2, 3) and spec.alpha == 4
    rgb, empty = to_rgb_and_empty(data, n_colour=3, has_alpha=True, nodata=None, scale=None)
    assert empty[:64].all() and not empty[64:].any() and rgb.shape == (3, 128, 128)


def test_empty_pixels_black_nodata_nonfinite():
    block = np.full((3, 4, 4), 50.0)
    block[:, 0, 0] = 0  # black in all bands
    block[0, 0, 1] = 0  # black in one band only: not empty
    block[1, 0, 2] = 7  # nodata in one band
    block[2, 0, 3] = np.nan
    _, empty = to_rgb_and_empty(block, n_colour=3, has_alpha=False, nodata=7, scale=((0, 100),) * 3)
    assert empty[0].tolist() == [True, False, True, True] and not empty[1:].any()
