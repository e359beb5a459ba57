"""Where input bytes come from: local files, or remote ones by GDAL path, and their content hash.

``http(s)://`` URLs become ``/vsicurl/`` paths (GDAL reads a Cloud-Optimized
GeoTIFF with range requests), ``s3://`` ``/vsis3/`` and ``gs://`` ``/vsigs/``;
``/vsi…`` paths are used as they are. :func:`file_sha256` is the content hash
the "same file is a no-op" rule relies on; ingest runs it on the workers
(S3 objects are hashed with boto3: :mod:`dask_fp.s3`).
"""

from __future__ import annotations

import hashlib
import os

from .errors import RasterError

#: URL schemes and the GDAL virtual file systems they become.
_SCHEMES = {"http://": "/vsicurl/", "https://": "/vsicurl/", "s3://": "/vsis3/", "gs://": "/vsigs/"}


def gdal_path(path: str | os.PathLike[str]) -> str | None:
    """The GDAL path of a remote input, or None for a local file.

    ``http(s)://…`` becomes ``/vsicurl/http(s)://…`` (GDAL reads it with HTTP
    range requests, so a Cloud-Optimized GeoTIFF is read block by block),
    ``s3://bucket/key`` becomes ``/vsis3/bucket/key`` and ``gs://`` ``/vsigs/``;
    a path that already starts with ``/vsi`` is used as is.
    """
    s = os.fspath(path)
    if isinstance(s, bytes):
        s = os.fsdecode(s)
    if s.startswith("/vsi"):
        return s
    for scheme, vsi in _SCHEMES.items():
        if s.lower().startswith(scheme):
            return vsi + (s if vsi == "/vsicurl/" else s[len(scheme):])
    return None


def _http_url(p: str) -> str | None:
    """The URL behind a ``/vsicurl/`` path (None for other GDAL paths)."""
    return p[len("/vsicurl/"):] if p.startswith("/vsicurl/") else None


def remote_error(p: str, reason: str) -> str:
    """An error message for a remote input that GDAL could not read: the URL, why, what to check."""
    url = _http_url(p)
    if url is not None:
        return (f"{url}: cannot read it over HTTP ({reason}). Check that the URL is right, that the"
                " server answers from this machine and from every Dask worker, and that it supports"
                " range requests (a Cloud-Optimized GeoTIFF is read in pieces).")
    if p.startswith("/vsis3/"):
        from .s3 import s3_diagnosis

        why = s3_diagnosis(p)  # GDAL's "does not exist" covers a missing bucket, key, or credentials alike
        if why is not None:
            return f"{why} (GDAL: {reason})"
    return (f"{p}: GDAL cannot read it ({reason}). Check the path, that it is reachable from this"
            " machine and from every Dask worker, and the settings GDAL uses for it (for /vsis3/:"
            " AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, AWS_REGION, AWS_S3_ENDPOINT with"
            " AWS_HTTPS=NO and AWS_VIRTUAL_HOSTING=FALSE for a self-hosted http server; AWS_NO_SIGN_REQUEST=YES"
            " for a public bucket).")


def gdal_reason(e: BaseException) -> str:
    """The first line of an error's message, with GDAL's own reason when rasterio hides it."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    cause = e.__cause__ or e.__context__
    if cause is not None and "previous exception" in line and str(cause).strip():
        line = str(cause).strip().splitlines()[0]
    return line


def remote_sha256(p: str, *, block: int = 1 << 22) -> str:
    """sha256 of a remote input's bytes, streamed once (the same hash as of a local copy).

    HTTP(S) inputs (``/vsicurl/``) are read with urllib; S3 objects
    (``/vsis3/``) with boto3, from the endpoint and with the credentials GDAL
    uses (:func:`dask_fp.s3.s3_sha256`). Other GDAL virtual file systems
    (``/vsigs/``, ...) are refused with a clear error for now.
    """
    if p.startswith("/vsis3/"):
        from .s3 import s3_sha256

        return s3_sha256(p, block=block)
    url = _http_url(p)
    if url is None or "/vsi" in url:
        raise RasterError(
            f"{p}: hashing inputs on this virtual file system is not supported yet (only http(s) URLs,"
            " /vsis3/ (s3://) objects and local files); copy the file locally or serve it over HTTP(S)."
        )
    import urllib.error
    import urllib.request

    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as r:  # noqa: S310 (the user's own input URL)
            while chunk := r.read(block):
                h.update(chunk)
    except (urllib.error.URLError, OSError) as e:
        raise RasterError(remote_error(p, f"reading it to hash its content: {e}")) from None
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str], *, block: int = 1 << 22) -> str:
    """Streaming sha256 of an input's bytes: a local file, or a remote one (:func:`remote_sha256`)."""
    remote = gdal_path(path)
    if remote is not None:
        return remote_sha256(remote, block=block)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
