"""Inspecting sources: band choice, alpha, nodata, scaling, threads, and clear errors for bad files."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import textured, write_tif

from dask_fp.errors import RasterError
from dask_fp.inspection import RasterOptions, inspect_raster
from dask_fp.raster import to_rgb_and_empty


def test_rgb_geotiff_spec(tif):
    spec = inspect_raster(tif)
    assert spec.bands == (1, 2, 3) and spec.alpha is None and spec.scale is None
    assert (spec.height, spec.width) == (320, 416)
    assert "32617" in spec.crs_wkt and spec.transform[0] == pytest.approx(0.1)
    assert len(spec.sha256) == 64


def test_scaling_uint16_needs_a_choice_then_stretches(tmp_path):
    p = write_tif(tmp_path / "u16.tif", textured(64, 64, dtype="uint16"))
    with pytest.raises(RasterError, match="--scale percentile"):
        inspect_raster(p)
    spec = inspect_raster(p, RasterOptions(scale="percentile"))
    assert len(spec.scale) == 3 and all(lo < hi for lo, hi in spec.scale)
    spec2 = inspect_raster(p, RasterOptions(scale=(0.0, 4000.0)))
    rgb, _ = to_rgb_and_empty(np.array([[[0, 2000, 4000, 9000]]] * 3, dtype=np.uint16), n_colour=3,
                              has_alpha=False, nodata=None, scale=spec2.scale)
    assert rgb[0, 0].tolist() == [0, 128, 255, 255]


def test_float_raster_needs_scaling(tmp_path):
    p = write_tif(tmp_path / "f.tif", textured(64, 64, dtype="float32"))
    with pytest.raises(RasterError, match="float32 needs a scaling"):
        inspect_raster(p)
    assert inspect_raster(p, RasterOptions(scale="percentile")).scale is not None


def test_band_selection_rules(tmp_path):
    one = write_tif(tmp_path / "one.tif", textured(64, 64, bands=1))
    two = write_tif(tmp_path / "two.tif", textured(64, 64, bands=2))
    five = write_tif(tmp_path / "five.tif", textured(64, 64, bands=5))
    with pytest.raises(RasterError, match="--replicate"):
        inspect_raster(one)
    assert inspect_raster(one, RasterOptions(replicate=True)).bands == (1, 1, 1)
    with pytest.raises(RasterError, match="2-band"):
        inspect_raster(two)
    with pytest.raises(RasterError, match="--bands R,G,B"):
        inspect_raster(five)
    assert inspect_raster(five, RasterOptions(bands=(3, 2, 1))).bands == (3, 2, 1)
    with pytest.raises(RasterError, match=r"band\(s\) \[9\] do not exist"):
        inspect_raster(five, RasterOptions(bands=(9, 2, 1)))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: d / "missing.tif", "no such file"),
        (lambda d: d, "is a directory"),
        (lambda d: _write(d / "empty.tif", b""), "empty"),
        (lambda d: _write(d / "text.tif", b"hello, not a raster"), "not a readable raster"),
        (lambda d: _write(d / "png.tif", _png_bytes()), "content is a PNG file"),
    ],
)
def test_bad_files_give_clear_errors(tmp_path, make, match):
    with pytest.raises(RasterError, match=match):
        inspect_raster(make(tmp_path))


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_truncated_geotiff(tmp_path, tif):
    raw = tif.read_bytes()
    bad = _write(tmp_path / "cut.tif", raw[: len(raw) // 2])
    with pytest.raises(RasterError, match="cut.tif"):
        inspect_raster(bad)


def test_no_crs_is_allowed(tmp_path):
    spec = inspect_raster(write_tif(tmp_path / "nocrs.tif", textured(64, 64), crs=None))
    assert spec.crs_wkt is None


def test_inspect_rasters_in_threads_equals_one_by_one_and_names_the_first_bad_file(tmp_path):
    import warnings

    from dask_fp.inspection import inspect_rasters

    good = [write_tif(tmp_path / f"g{i}.tif", textured(64 + 32 * i, 96, seed=i), crs=None if i == 2 else 32617)
            for i in range(6)]
    before = list(warnings.filters)
    got = inspect_rasters(good, threads=4)
    assert warnings.filters == before  # the threads' warning filters do not leak
    assert got == [inspect_raster(p) for p in good]  # same specs, same order (hashes included)
    bad1 = _write(tmp_path / "bad1.tif", b"hello, not a raster")
    bad2 = tmp_path / "missing.tif"
    with pytest.raises(RasterError, match="bad1.tif"):
        inspect_rasters([*good[:3], bad1, good[3], bad2], threads=4)
    with pytest.raises(RasterError, match="missing.tif"):
        inspect_rasters([bad2, *good, bad1], threads=4)
