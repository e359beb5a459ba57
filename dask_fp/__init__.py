"""dask-fp: rapid visual search over aerial orthomosaics with CNN fingerprints and Dask.

Importing the package has no side effects: no cluster starts, no model loads.
"""

from __future__ import annotations

from ._version import __version__
from .classify import classify  # noqa: E402
from .embedder import embed  # noqa: E402
from .errors import (  # noqa: E402
    ClusterError,
    DaskFpError,
    QueryError,
    RasterError,
    StoreError,
    StoreLockedError,
    StoreMismatchError,
    WeightsError,
)
from .index import IndexOptions, build_index, code_search, extend_index, open_index  # noqa: E402
from .ingest import IngestReport, ingest  # noqa: E402
from .inspection import RasterOptions  # noqa: E402
from .models import ModelOptions  # noqa: E402
from .search import Hits, Query, search  # noqa: E402
from .session import SearchSession, read_labels  # noqa: E402
from .store import Store, open_store  # noqa: E402
from .tiling import Tiling, make_uid, split_uid  # noqa: E402

__all__ = [
    "ClusterError", "DaskFpError", "Hits", "IndexOptions", "IngestReport", "Query", "ModelOptions", "QueryError",
    "RasterError", "RasterOptions", "SearchSession", "Store", "StoreError", "StoreLockedError", "StoreMismatchError",
    "Tiling", "WeightsError", "__version__", "build_index", "classify", "code_search", "embed", "extend_index",
    "ingest", "make_uid", "open_index", "open_store", "read_labels", "search", "split_uid",
]
