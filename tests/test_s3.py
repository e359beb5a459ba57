"""S3 inputs (``/vsis3/``, ``s3://``) against a real S3 server on 127.0.0.1 (moto's server mode).

GDAL reads the pixels through ``/vsis3/`` and boto3 streams the bytes for the
content hash, both configured by the same AWS_* environment variables; the
cluster's workers are started after those are set, so they inherit them.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import textured
from test_remote import RANDOM, TILING, write_cog

import dask_fp
from dask_fp.errors import RasterError
from dask_fp.inputs import file_sha256
from dask_fp.inspection import inspect_raster
from dask_fp.s3 import S3Settings, s3_client, s3_settings, s3_sha256, split_vsis3

pytest.importorskip("boto3", reason="pip install 'dask-fp[s3]'")
moto_server = pytest.importorskip("moto.server", reason="pip install 'moto[server]'")

BUCKET = "ortho-bucket"


def free_port() -> int:
    """A port on 127.0.0.1 that nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """A real S3 server (moto) on 127.0.0.1 with GDAL's /vsis3/ variables pointing at it; yields the endpoint."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_S3_ENDPOINT": f"{host}:{port}", "AWS_HTTPS": "NO", "AWS_VIRTUAL_HOSTING": "FALSE",
                     "AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret",
                     "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
            mp.setenv(k, v)
        for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_NO_SIGN_REQUEST", "AWS_DEFAULT_REGION"):
            mp.delenv(k, raising=False)
        s3_client(s3_settings()).create_bucket(Bucket=BUCKET)
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture(scope="module")
def s3_cluster(s3):
    """A multi-process LocalCluster started after the AWS_* variables are set (its workers inherit them)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", memory_limit="3GiB") as cluster, Client(cluster) as c:
        yield c


def upload(path: Path, key: str, acl: str | None = None) -> str:
    extra = {"ACL": acl} if acl else None
    s3_client(s3_settings()).upload_file(str(path), BUCKET, key, ExtraArgs=extra)
    return f"/vsis3/{BUCKET}/{key}"


def test_settings_follow_gdal_variables():
    assert s3_settings({}) == S3Settings(None, "us-east-1", False, False)
    assert s3_settings({"AWS_S3_ENDPOINT": "minio.local:9000", "AWS_DEFAULT_REGION": "eu-west-1"}) == S3Settings(
        "https://minio.local:9000", "eu-west-1", False, False)
    env = {"AWS_S3_ENDPOINT": "127.0.0.1:9000", "AWS_HTTPS": "NO", "AWS_VIRTUAL_HOSTING": "FALSE",
           "AWS_REGION": "ca-central-1", "AWS_DEFAULT_REGION": "eu-west-1", "AWS_NO_SIGN_REQUEST": "YES"}
    assert s3_settings(env) == S3Settings("http://127.0.0.1:9000", "ca-central-1", True, True)
    assert s3_settings({"AWS_S3_ENDPOINT": "http://h:1/", "AWS_HTTPS": "YES", "AWS_VIRTUAL_HOSTING": "true",
                        "AWS_NO_SIGN_REQUEST": "no"}) == S3Settings("http://h:1", "us-east-1", False, False)
    assert split_vsis3("/vsis3/b/dir/k.tif") == ("b", "dir/k.tif")
    for bad in ("/vsis3/b", "/vsis3/b/", "/vsis3//k.tif", "/vsis3/b/dir/"):
        with pytest.raises(RasterError, match="expected /vsis3/BUCKET/KEY"):
            split_vsis3(bad)
    # Other object stores are still refused, by name, before any request.
    with pytest.raises(RasterError, match=r"^/vsigs/b/k\.tif: hashing inputs on this virtual file system is not"):
        file_sha256("gs://b/k.tif")


def test_hash_and_pixels_from_s3_equal_the_local_file(s3, tmp_path):
    cog = write_cog(tmp_path / "a.tif", 700, 600, seed=3)
    p = upload(cog, "dir/a.tif")
    assert s3_sha256(p) == hashlib.sha256(cog.read_bytes()).hexdigest()
    assert s3_sha256(p, block=1000) == s3_sha256(p)  # chunking does not change the digest
    for spelling in (p, f"s3://{BUCKET}/dir/a.tif"):
        spec, local = inspect_raster(spelling), inspect_raster(cog)
        assert spec.path == p and spec.sha256 == local.sha256
        assert (spec.height, spec.width, spec.crs_wkt, spec.transform) == (
            local.height, local.width, local.crs_wkt, local.transform)
    import rasterio

    with rasterio.open(p) as ds:  # GDAL's /vsis3/ with the same variables
        np.testing.assert_array_equal(ds.read(), textured(700, 600, seed=3))


def test_s3_errors_name_the_object_and_what_to_check(s3, monkeypatch, tmp_path):
    with pytest.raises(RasterError, match=rf"^/vsis3/{BUCKET}/nothing\.tif: no object 'nothing\.tif' in bucket"):
        s3_sha256(f"/vsis3/{BUCKET}/nothing.tif")
    with pytest.raises(RasterError, match=r"^/vsis3/no-such-bucket/a\.tif: no bucket 'no-such-bucket' at http://"):
        s3_sha256("/vsis3/no-such-bucket/a.tif")
    port = free_port()
    unreachable = S3Settings(f"http://127.0.0.1:{port}", "us-east-1", True, False)
    with pytest.raises(RasterError, match=rf"cannot reach the S3 endpoint http://127\.0\.0\.1:{port}.*AWS_S3_ENDPOINT"):
        s3_sha256(f"/vsis3/{BUCKET}/a.tif", settings=unreachable)
    # Through GDAL (what ingest's checks meet first): GDAL's "does not exist" made specific by S3's answer.
    with pytest.raises(RasterError, match=rf"^/vsis3/{BUCKET}/nothing\.tif: no object 'nothing\.tif' in bucket"
                                          r".*\(GDAL: .*does not exist"):
        inspect_raster(f"s3://{BUCKET}/nothing.tif")
    with pytest.raises(RasterError, match=r"^/vsis3/no-such-bucket/a\.tif: no bucket 'no-such-bucket' at .*\(GDAL:"):
        inspect_raster("/vsis3/no-such-bucket/a.tif")
    # No credentials anywhere (no variables, no ~/.aws files, no instance metadata).
    private = upload(write_cog(tmp_path / "c.tif", 64, 64), "c.tif")
    public = upload(tmp_path / "c.tif", "public/c.tif", acl="public-read")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(RasterError, match=r"^/vsis3/.*/c\.tif: no AWS credentials found .*AWS_ACCESS_KEY_ID"):
        s3_sha256(private)
    # Anonymous requests (AWS_NO_SIGN_REQUEST=YES, as for GDAL): a private object is refused by the
    # server, a public-read one is read.
    monkeypatch.setenv("AWS_NO_SIGN_REQUEST", "YES")
    with pytest.raises(RasterError, match=r"^/vsis3/.*/c\.tif: access denied by http://.*AWS_NO_SIGN_REQUEST"):
        s3_sha256(private)
    assert s3_sha256(public) == hashlib.sha256((tmp_path / "c.tif").read_bytes()).hexdigest()


def test_ingest_from_s3_equals_ingest_of_the_local_file(s3, s3_cluster, tmp_path):
    cog = write_cog(tmp_path / "ortho.tif", 320, 384, seed=8)
    p = upload(cog, "surveys/ortho.tif")
    kw = {"model": RANDOM, "tiling": TILING, "client": s3_cluster, "progress": False}
    dask_fp.ingest([str(cog)], str(tmp_path / "local.zarr"), **kw)
    dask_fp.ingest([p], str(tmp_path / "s3.zarr"), **kw)
    a, b = dask_fp.open_store(tmp_path / "local.zarr"), dask_fp.open_store(tmp_path / "s3.zarr")
    assert a.committed == b.committed > 0
    np.testing.assert_array_equal(np.asarray(a.fingerprints()), np.asarray(b.fingerprints()))
    ca, cb = a.coords(), b.coords()
    for k in ("uid", "wy", "wx", "x", "y", "lon", "lat"):
        np.testing.assert_array_equal(ca[k], cb[k])
    assert b.sources[0]["sha256"] == a.sources[0]["sha256"] == hashlib.sha256(cog.read_bytes()).hexdigest()
    assert b.sources[0]["path"] == p
    # Re-ingesting it, in either spelling, is a no-op: the same content hash is already committed.
    for again in (p, f"s3://{BUCKET}/surveys/ortho.tif"):
        report = dask_fp.ingest([again], str(tmp_path / "s3.zarr"), **kw)
        assert [s.skipped for s in report.sources] == [True]
        assert dask_fp.open_store(tmp_path / "s3.zarr").committed == a.committed


def test_cli_missing_s3_object_is_one_line_and_no_store(s3, s3_cluster, tmp_path, capfd):
    from test_reliability import MODEL, run_main

    store = tmp_path / "fp.zarr"
    rc, out, err = run_main(["ingest", f"s3://{BUCKET}/missing.tif", "--store", store, *MODEL,
                             "--scheduler", s3_cluster.scheduler.address], capfd)
    errors = [ln for ln in err.splitlines() if ln.startswith("dask-fp: error:")]
    assert rc == 1, err
    assert len(errors) == 1 and errors[0].startswith(
        f"dask-fp: error: /vsis3/{BUCKET}/missing.tif: no object 'missing.tif' in bucket '{BUCKET}'"), err
    assert "Traceback" not in err and not store.exists()
