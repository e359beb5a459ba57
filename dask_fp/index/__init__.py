"""A compact-code index kept inside the store, and code search with exact re-rank.

Layout: one Zarr group ``index`` in the store directory, beside the
fingerprints; the rest of the store neither reads nor writes it.

====================  ==================  =======  ======================================
name                  shape               dtype    meaning
====================  ==================  =======  ======================================
index/codes           (tile, nbytes)      uint8    binary code of each indexed row;
                                                   chunked by rows like ``fingerprint``
index/mean            (feature,)          float32  training mean
index/projection      (feature, nbits)    float32  PCA axes × ITQ rotation
====================  ==================  =======  ======================================

Attributes of ``index``: ``method`` ("itq"), ``nbits``, ``indexed`` (rows
0..indexed−1 have codes), ``trained_on`` (training rows), ``feature_dim``,
``version``, ``built``. :func:`build_index` trains and encodes every
committed row (under the store's writer lock); :func:`extend_index` encodes
the rows added since (``indexed..committed``) with the trained parameters.

Query (:func:`code_search`): one ``dask.array.reduction`` over the codes; each
task keeps each query's ``pool`` nearest codes by Hamming distance (FAISS's
popcount kernel when installed) and re-scores them with the asymmetric score
of :mod:`.codes` (the query's projection, not its code, against the codes'
signs), keeping the best ``candidates``; the tasks' lists are merged in a
tree like the exact scan. The candidates' full
fingerprints are then read row by row (:mod:`dask_fp.store.rows`: one
``pread`` per row from an uncompressed store) and re-ranked with the exact distance of :mod:`.kernels`, so
every returned distance is exact, and rows added after the index was built
(``indexed..committed``) are scanned exactly and merged in. The answer can
only differ from the exact scan by missing a neighbour whose code ranked
below the candidate cut (recall, measured in ``bench/codes.py``).
"""

from .build import IndexOptions, build_index, extend_index
from .layout import CODE_TASK_ROWS, INDEX_GROUP, INDEX_VERSION, Index, has_index, open_index
from .search import AUTO_CODES_ROWS, choose_method, code_candidates, code_search, default_candidates, rerank

__all__ = [
    "AUTO_CODES_ROWS", "CODE_TASK_ROWS", "INDEX_GROUP", "INDEX_VERSION", "Index", "IndexOptions", "build_index",
    "choose_method", "code_candidates", "code_search", "default_candidates", "extend_index", "has_index",
    "open_index", "rerank",
]
