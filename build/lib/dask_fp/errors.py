"""Exception classes users can catch.

Every error dask-fp raises on purpose derives from :class:`DaskFpError`, so a
caller can catch everything the library means to say with one ``except``,
or a narrower class for one kind of problem. Messages name the offending
value (which file, which band, which setting) and what to do about it.
"""

from __future__ import annotations


class DaskFpError(Exception):
    """Base class of every error raised by dask-fp."""


class RasterError(DaskFpError):
    """An input raster cannot be used as it is (missing, unreadable, wrong bands or type)."""


class WeightsError(DaskFpError):
    """Model weights could not be found, or the file found is not the expected one."""


class StoreError(DaskFpError):
    """A fingerprint store is missing, damaged, or incompatible with the request."""


class StoreLockedError(StoreError):
    """Another writer holds the store's lock."""


class StoreMismatchError(StoreError):
    """The store was made with another model or tiling than the one requested."""


class QueryError(DaskFpError):
    """A query cannot be answered (bad image, unknown uid, point outside every tile, bad k)."""


class ClusterError(DaskFpError):
    """A Dask cluster could not be started or reached."""
