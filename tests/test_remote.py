"""Inputs by URL / GDAL path: a real HTTP server on 127.0.0.1 with range requests serving a COG."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import textured

import dask_fp
from dask_fp.errors import RasterError
from dask_fp.inputs import gdal_path
from dask_fp.inspection import inspect_raster
from dask_fp.models import ModelOptions
from dask_fp.raster import open_raster, read_window
from dask_fp.tiling import Tiling

RANDOM = ModelOptions("resnet18", weights="random", seed=7, threads=1)
TILING = Tiling(64, 32, 0.5)


class RangeServer:
    """``tests/_range_server.py`` in its own process, serving ``root``; reads back its request log."""

    def __init__(self, root: Path, logfile: Path) -> None:
        self.logfile = logfile
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("_range_server.py")),
                                      str(root), str(logfile)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.url = f"http://127.0.0.1:{int(self.proc.stdout.readline())}"

    @property
    def log(self) -> list[dict]:
        if not self.logfile.exists():
            return []
        return [json.loads(line) for line in self.logfile.read_text().splitlines()]

    def clear(self) -> None:
        self.logfile.write_text("")

    def sent(self, name: str) -> int:
        return sum(e["sent"] for e in self.log if e["path"] == "/" + name)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def server(tmp_path) -> Iterator[RangeServer]:
    root = tmp_path / "www"
    root.mkdir()
    srv = RangeServer(root, tmp_path / "requests.jsonl")
    try:
        yield srv
    finally:
        srv.close()


def write_cog(path: Path, h: int, w: int, seed: int = 4) -> Path:
    import rasterio
    from affine import Affine

    profile = {"driver": "COG", "height": h, "width": w, "count": 3, "dtype": "uint8", "compress": "deflate",
               "blocksize": 256, "crs": "EPSG:32617", "transform": Affine(0.1, 0, 400000, 0, -0.1, 3300000)}
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(textured(h, w, seed=seed))
    return path


def test_gdal_paths():
    assert gdal_path("https://example.org/a.tif") == "/vsicurl/https://example.org/a.tif"
    assert gdal_path("HTTP://h/a.tif") == "/vsicurl/HTTP://h/a.tif"
    assert gdal_path("s3://bucket/dir/a.tif") == "/vsis3/bucket/dir/a.tif"
    assert gdal_path("/vsis3/bucket/a.tif") == "/vsis3/bucket/a.tif"
    assert gdal_path("/vsicurl/http://h/a.tif") == "/vsicurl/http://h/a.tif"
    assert gdal_path("data/a.tif") is None and gdal_path(Path("/tmp/x.tif")) is None


def test_cog_over_http_is_read_with_range_requests(server, tmp_path):
    cog = write_cog(tmp_path / "www" / "big.tif", 2048, 2048)
    size = cog.stat().st_size
    url = f"{server.url}/big.tif"
    spec = inspect_raster(url)
    local = inspect_raster(cog)
    assert spec.path == "/vsicurl/" + url
    assert spec.sha256 == local.sha256  # the same bytes, the same content hash
    assert (spec.height, spec.width, spec.crs_wkt, spec.transform) == (
        local.height, local.width, local.crs_wkt, local.transform)
    # A window read back (as for a mosaic) over HTTP: range requests, a fraction of the file.
    server.clear()
    src = {"path": spec.path, "bands": [1, 2, 3], "alpha": None, "nodata": None, "scale": None}
    got = read_window(src, 3, 5, tile=256, stride=128)
    np.testing.assert_array_equal(got, textured(2048, 2048, seed=4)[:, 384:640, 640:896].transpose(1, 2, 0))
    ranged = [e["range"] for e in server.log if e["range"]]
    assert ranged, server.log
    assert 0 < server.sent("big.tif") < size / 4, (server.sent("big.tif"), size)
    # The lazy DataArray reads the same pixels
    da = open_raster(spec, TILING, chunk=512)
    np.testing.assert_array_equal(da[:, 1000:1010, 7:19].values, textured(2048, 2048, seed=4)[:, 1000:1010, 7:19])


def test_unreachable_and_missing_urls_name_the_url(server):
    with pytest.raises(RasterError, match=r"http://127\.0\.0\.1:\d+/nothing\.tif: cannot read it over HTTP .*404"
                                          r".*Check that the URL is right"):
        inspect_raster(f"{server.url}/nothing.tif")
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RasterError, match=rf"http://127\.0\.0\.1:{port}/a\.tif: cannot read it over HTTP"):
        inspect_raster(f"http://127.0.0.1:{port}/a.tif")
    # An S3 endpoint nobody listens on (tests/test_s3.py has a real S3 server): S3's answer, and GDAL's.
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_S3_ENDPOINT": f"127.0.0.1:{port}", "AWS_HTTPS": "NO", "AWS_VIRTUAL_HOSTING": "FALSE",
                     "AWS_NO_SIGN_REQUEST": "YES", "AWS_EC2_METADATA_DISABLED": "true"}.items():
            mp.setenv(k, v)
        with pytest.raises(RasterError, match=rf"^/vsis3/no-such-bucket-dask-fp-test/a\.tif: cannot reach the S3"
                                              rf" endpoint http://127\.0\.0\.1:{port} .*\(GDAL: "):
            inspect_raster("s3://no-such-bucket-dask-fp-test/a.tif")


def test_ingest_by_url_equals_ingest_of_the_local_file(server, tmp_path, client):
    cog = write_cog(tmp_path / "www" / "ortho.tif", 320, 384, seed=8)
    kw = {"model": RANDOM, "tiling": TILING, "client": client, "progress": False}
    dask_fp.ingest([str(cog)], str(tmp_path / "local.zarr"), **kw)
    server.clear()
    dask_fp.ingest([f"{server.url}/ortho.tif"], str(tmp_path / "remote.zarr"), **kw)
    assert any(e["range"] for e in server.log)  # the workers read blocks with range requests
    a, b = dask_fp.open_store(tmp_path / "local.zarr"), dask_fp.open_store(tmp_path / "remote.zarr")
    assert a.committed == b.committed > 0
    np.testing.assert_array_equal(np.asarray(a.fingerprints()), np.asarray(b.fingerprints()))
    ca, cb = a.coords(), b.coords()
    for k in ("uid", "wy", "wx", "x", "y", "lon", "lat"):
        np.testing.assert_array_equal(ca[k], cb[k])
    assert a.sources[0]["sha256"] == b.sources[0]["sha256"]
    assert b.sources[0]["path"] == f"/vsicurl/{server.url}/ortho.tif"
