"""Shared fixtures: small real GeoTIFFs written with rasterio, and a real LocalCluster."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("DASK_DISTRIBUTED__WORKER__DAEMON", "True")


def textured(height: int, width: int, *, seed: int = 0, bands: int = 3, dtype: str = "uint8") -> np.ndarray:
    """Smooth random texture with structure at several scales (not flat noise)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((bands, height, width), dtype=np.float64)
    for scale in (4, 16, 64):
        small = rng.random((bands, height // scale + 2, width // scale + 2))
        big = np.repeat(np.repeat(small, scale, axis=1), scale, axis=2)[:, :height, :width]
        out += big
    out = out / out.max()
    if dtype == "uint8":
        return (30 + out * 220).astype(np.uint8)
    if dtype == "uint16":
        return (100 + out * 3000).astype(np.uint16)
    return out.astype(dtype)


def write_tif(
    path: Path,
    data: np.ndarray,
    *,
    crs: str | None = "EPSG:32617",
    origin: tuple[float, float] = (400000.0, 3300000.0),
    res: float = 0.1,
    nodata: float | None = None,
    alpha: bool = False,
    tiled: bool = True,
    block: int = 256,
) -> Path:
    """Write ``data`` (bands, h, w) as a GeoTIFF; the last band is alpha if ``alpha``.

    ``block`` caps the internal tile side (the reader keeps whole tiles in a chunk, so a
    small ``block`` with a small ``--chunk`` gives many block tasks).
    """
    import rasterio
    from rasterio.enums import ColorInterp
    from rasterio.transform import from_origin

    b, h, w = data.shape
    profile = {"driver": "GTiff", "height": h, "width": w, "count": b, "dtype": data.dtype,
               "compress": "deflate"}
    if tiled and h >= 16 and w >= 16:
        profile.update(tiled=True, blockxsize=min(block, w // 16 * 16),
                       blockysize=min(block, h // 16 * 16))
    if crs:
        profile.update(crs=crs, transform=from_origin(origin[0], origin[1], res, res))
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
        if alpha:
            ds.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha][:b]
    return path


@pytest.fixture
def tif(tmp_path: Path) -> Path:
    """A 320 x 416 textured RGB GeoTIFF (EPSG:32617, 10 cm) with a black corner."""
    data = textured(320, 416, seed=1)
    data[:, :96, :128] = 0
    return write_tif(tmp_path / "ortho.tif", data)


@pytest.fixture(scope="session")
def client():
    """A real multi-process LocalCluster (2 workers), shared by the tests of a session."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", memory_limit="3GiB") as cluster, Client(cluster) as c:
        yield c
