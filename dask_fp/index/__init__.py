"""A compact-code index kept inside the store, and code search with exact re-rank.

Layout: one Zarr group ``index`` in the store directory, beside the
fingerprints; the rest of the store neither reads nor writes it.

====================  ==================  =======  ======================================
name                  shape               dtype    meaning
====================  ==================  =======  ======================================
index/list            (tile,)             int32    the row's list (nearest centroid)
index/codes           (tile, nbytes)      uint8    sign bits of the row's residual
                                                   ``(x − centroid) @ projection``
index/rnorm2          (tile,)             float32  ``‖x − centroid‖²``
index/scale           (tile,)             float32  ``‖y‖² / Σ|y|`` of the projected residual
                                                   ``y`` (the estimator's factor)
index/centroids       (lists, feature)    float32  k-means centroids
index/projection      (feature, nbits)    float32  residual PCA axes × ITQ rotation
====================  ==================  =======  ======================================

The per-row arrays are chunked by rows like ``fingerprint`` (one Zarr chunk
holds the same rows in each), so an ingest appends to them chunk by chunk:
``nbits / 8 + 12`` bytes per tile (76 B at 512 bits). Attributes of ``index``:
``method`` ("ivf-itq"), ``version`` (2), ``nbits``, ``lists``, ``indexed``
(rows 0..indexed−1 have codes), ``list_rows`` (indexed rows per list, written
in the same update as ``indexed``), ``trained_on``, ``feature_dim``,
``built``. :func:`build_index` trains (k-means on a sample, then PCA + ITQ on
the sample's residuals) and encodes every committed row (under the store's
writer lock); :func:`extend_index` encodes the rows added since
(``indexed..committed``) with the trained parameters. An index of the
earlier format (version 1: one global binary code) is refused with the
command that rebuilds it; searches (``method="auto"``), ``serve`` and ingest
ignore it (ingest warns).

Query (:func:`code_search`): the query's distances to the centroids pick its
lists (the nearest ``probes``, more until they hold ``candidates`` rows); one
task per block of :data:`CODE_TASK_ROWS` rows (kept in cluster memory sorted
by list after :meth:`Index.persist`) scores only the rows of those lists with
the estimated distance of :mod:`dask_fp.codes` and keeps the best
``candidates``; one task merges them. The candidates' full fingerprints are
then read row by row (:mod:`dask_fp.store.rows`) and re-ranked with the exact
distance of :mod:`.kernels`, so every returned distance is exact, and rows
added after the index was built (``indexed..committed``) are scanned exactly
and merged in. The answer can only differ from the exact scan by missing a
neighbour in an unprobed list or whose estimate ranked below the candidate
cut (recall, measured in ``bench/codes.py``).
"""

from .build import IndexOptions, build_index, default_lists, extend_index
from .layout import (
    CODE_TASK_ROWS,
    INDEX_GROUP,
    INDEX_VERSION,
    Index,
    has_index,
    index_summary,
    old_index,
    open_index,
)
from .search import (
    AUTO_CODES_ROWS,
    DEFAULT_PROBES,
    choose_method,
    code_candidates,
    code_search,
    default_candidates,
    rerank,
)

__all__ = [
    "AUTO_CODES_ROWS", "CODE_TASK_ROWS", "DEFAULT_PROBES", "INDEX_GROUP", "INDEX_VERSION", "Index", "IndexOptions",
    "build_index", "choose_method", "code_candidates", "code_search", "default_candidates", "default_lists",
    "extend_index", "has_index", "index_summary", "old_index", "open_index", "rerank",
]
