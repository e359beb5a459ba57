"""S3 inputs (``/vsis3/bucket/key``): the content hash, streamed with boto3 from where GDAL reads.

GDAL reads an input's pixels through ``/vsis3/``; the "same file is a no-op"
rule needs the sha256 of the object's bytes, which :func:`s3_sha256` streams
once with boto3 (imported lazily: ``pip install 'dask-fp[s3]'``). It talks to
the same endpoint with the same credentials, read from the environment
variables GDAL reads (:func:`s3_settings`):

``AWS_S3_ENDPOINT``
    host[:port] of the S3 service (default AWS), without a scheme: GDAL 3.10
    takes the scheme from ``AWS_HTTPS`` and fails to resolve a host written
    ``http://…`` (the hash here would use such a prefix as given).
``AWS_HTTPS``
    ``NO`` for plain HTTP to that endpoint (default ``YES``).
``AWS_VIRTUAL_HOSTING``
    ``FALSE`` for path-style requests (``endpoint/bucket/key``), as most
    self-hosted S3 servers need (default ``TRUE``: virtual hosting where the
    bucket name allows it).
``AWS_REGION`` / ``AWS_DEFAULT_REGION``
    the region (default ``us-east-1``).
``AWS_NO_SIGN_REQUEST``
    ``YES`` for anonymous requests to a public bucket.
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``
    the credentials (boto3 also falls back to ``~/.aws`` files and instance
    metadata, as GDAL does).

The hash runs on the Dask workers (:func:`dask_fp.ingest.hash_on_workers`),
and so do the pixel reads: every worker needs these variables in its
environment (a ``LocalCluster``'s workers inherit its parent's).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import RasterError

#: What the credential and endpoint variables are, for error messages.
_CHECK = ("Check AWS_S3_ENDPOINT (with AWS_HTTPS=NO for plain http and AWS_VIRTUAL_HOSTING=FALSE for path-style"
          " servers), AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and AWS_REGION on this machine and"
          " on every Dask worker, or AWS_NO_SIGN_REQUEST=YES for a public bucket.")


def _yes(value: str | None, default: bool) -> bool:
    """GDAL's reading of a boolean option: YES/TRUE/ON/1 (any case) is true."""
    if value is None or value == "":
        return default
    return value.strip().upper() in ("YES", "TRUE", "ON", "1")


@dataclass(frozen=True)
class S3Settings:
    """Where and how to reach S3, as GDAL's ``/vsis3/`` would (see the module docs).

    Attributes
    ----------
    endpoint_url : str or None
        ``scheme://host[:port]``, or None for AWS's own endpoint.
    region : str
        Signing region.
    path_style : bool
        Path-style addressing (``AWS_VIRTUAL_HOSTING=FALSE``).
    unsigned : bool
        Anonymous requests (``AWS_NO_SIGN_REQUEST=YES``).
    """

    endpoint_url: str | None
    region: str
    path_style: bool
    unsigned: bool


def s3_settings(environ: Mapping[str, str] | None = None) -> S3Settings:
    """The S3 endpoint, region, addressing and signing GDAL's ``/vsis3/`` uses, from ``environ``.

    ``environ`` defaults to this process's environment (on a worker: the
    worker's, which is where GDAL reads it too).
    """
    env = os.environ if environ is None else environ
    endpoint = env.get("AWS_S3_ENDPOINT", "").strip()
    url: str | None = None
    if endpoint:
        if endpoint.lower().startswith(("http://", "https://")):
            url = endpoint.rstrip("/")
        else:
            url = ("https://" if _yes(env.get("AWS_HTTPS"), True) else "http://") + endpoint.rstrip("/")
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    return S3Settings(url, region, not _yes(env.get("AWS_VIRTUAL_HOSTING"), True),
                      _yes(env.get("AWS_NO_SIGN_REQUEST"), False))


def split_vsis3(p: str) -> tuple[str, str]:
    """``/vsis3/bucket/dir/key.tif`` -> ``("bucket", "dir/key.tif")``."""
    rest = p[len("/vsis3/"):] if p.startswith("/vsis3/") else ""
    bucket, _, key = rest.partition("/")
    if not bucket or not key or key.endswith("/"):
        raise RasterError(f"{p}: not an S3 object path; expected /vsis3/BUCKET/KEY (or s3://BUCKET/KEY).")
    return bucket, key


def s3_client(settings: S3Settings, *, attempts: int = 3) -> Any:
    """A boto3 S3 client for ``settings`` (credentials from boto3's usual chain: the AWS_* variables first).

    ``attempts``: tries per request (connection errors, throttling, 5xx).
    """
    try:
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config
    except ImportError:
        raise RasterError("reading /vsis3/ (s3://) inputs needs boto3 to hash them:"
                          " pip install 'dask-fp[s3]' (or boto3) on this machine and on every Dask worker.") from None
    config = Config(
        region_name=settings.region,
        s3={"addressing_style": "path" if settings.path_style else "auto"},
        signature_version=UNSIGNED if settings.unsigned else None,
        retries={"max_attempts": attempts, "mode": "standard"},
        connect_timeout=20,
        read_timeout=60,
    )
    return boto3.session.Session().client("s3", endpoint_url=settings.endpoint_url, config=config)


def s3_error(p: str, settings: S3Settings, e: Exception) -> RasterError:
    """A :class:`RasterError` naming the object, what S3 answered and what to check."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    where = settings.endpoint_url or f"AWS S3 ({settings.region})"
    bucket, key = split_vsis3(p)
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return RasterError(f"{p}: no bucket {bucket!r} at {where}. Check the bucket name and AWS_S3_ENDPOINT.")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return RasterError(f"{p}: no object {key!r} in bucket {bucket!r} at {where}. Check the path"
                               " (keys are case-sensitive).")
        if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                    "ExpiredToken", "InvalidToken") or status == 403:
            return RasterError(f"{p}: access denied by {where} ({code}: {err.get('Message', '')}). " + _CHECK)
        return RasterError(f"{p}: S3 at {where} answered {code or status} ({err.get('Message', '')}). " + _CHECK)
    if isinstance(e, NoCredentialsError):
        return RasterError(f"{p}: no AWS credentials found to read it from {where}. " + _CHECK)
    if isinstance(e, EndpointConnectionError):
        return RasterError(f"{p}: cannot reach the S3 endpoint {where} ({e}). " + _CHECK)
    return RasterError(f"{p}: reading it from {where} failed ({type(e).__name__}: {e}). " + _CHECK)


def s3_diagnosis(p: str) -> str | None:
    """Why S3 refuses ``p``, as :func:`s3_error` words it, or None when it can be read (or boto3 is missing).

    GDAL says only "does not exist in the file system" for a missing bucket, a
    missing key, a refused signature or an unreachable endpoint alike; one
    ``HEAD`` request tells them apart. Used on the error path of an input GDAL
    could not open.
    """
    try:
        bucket, key = split_vsis3(p)
    except RasterError as e:
        return str(e)
    settings = s3_settings()
    try:
        client = s3_client(settings, attempts=1)  # an error path already: do not wait on retries
    except RasterError:
        return None
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            try:  # HEAD carries no error code: is it the bucket or the key?
                client.head_bucket(Bucket=bucket)
            except ClientError as eb:
                if eb.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    eb.response.setdefault("Error", {})["Code"] = "NoSuchBucket"
                    return str(s3_error(p, settings, eb))
            except (BotoCoreError, OSError):
                pass
        return str(s3_error(p, settings, e))
    except (BotoCoreError, OSError) as e:
        return str(s3_error(p, settings, e))
    return None


def s3_sha256(p: str, *, block: int = 1 << 22, settings: S3Settings | None = None) -> str:
    """sha256 of the bytes of the S3 object at ``p`` (``/vsis3/bucket/key``), streamed once.

    The same hash as of a local copy of the object. ``settings`` defaults to
    :func:`s3_settings` of this process's environment.

    Raises
    ------
    RasterError
        No such bucket or object, access denied, endpoint unreachable, boto3
        missing: naming the path and what to check.
    """
    bucket, key = split_vsis3(p)
    settings = s3_settings() if settings is None else settings
    client = s3_client(settings)
    from botocore.exceptions import BotoCoreError, ClientError

    h = hashlib.sha256()
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            for chunk in body.iter_chunks(block):
                h.update(chunk)
        finally:
            body.close()
    except (BotoCoreError, ClientError, OSError) as e:
        raise s3_error(p, settings, e) from None
    return h.hexdigest()


__all__ = ["S3Settings", "s3_client", "s3_diagnosis", "s3_error", "s3_settings", "s3_sha256", "split_vsis3"]
