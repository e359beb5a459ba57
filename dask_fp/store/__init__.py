"""The fingerprint store: Zarr v3 schema, crash-safe append/commit, open, info.

Layout (one Zarr v3 group; opens with ``xarray.open_zarr``):

=============  ===============  =======  =========================================
name           dims             dtype    meaning
=============  ===============  =======  =========================================
fingerprint    (tile, feature)  f4/f2    the features
uid            (tile)           int64    ``source << 42 | wy << 21 | wx``
source         (tile)           int32    index into the ``sources`` attribute
wy, wx         (tile)           int32    window indices in the source
x, y           (tile)           float64  window centre in the source CRS (pixels if none)
lon, lat       (tile)           float64  window centre in WGS84 (NaN without a CRS)
norm2          (tile)           float32  squared L2 norm of the stored fingerprint
=============  ===============  =======  =========================================

Commit protocol: rows of a new source are written past ``committed`` (the
arrays may be longer than that while a writer works); only when every row is
on disk does one metadata update move ``committed`` and append the source to
the sources table (:mod:`.sources`), after which the metadata is consolidated so plain
``xarray.open_zarr`` readers see the new snapshot. Readers of
:func:`open_store` only ever see rows below ``committed``. One writer at a
time holds ``writer.lock``.

Modules: :mod:`.schema` (names, types, settings), :mod:`.sources` (the
sources table), :mod:`.lock` (the single-writer lock), :mod:`.reader`
(:class:`Store`), :mod:`.rows` (reading scattered rows: one ``pread`` per
fingerprint row, as ``fingerprint`` is stored uncompressed), :mod:`.writer` (append and commit), :mod:`.testhook` (the
crash tests' pause points, inert unless set).
"""

from __future__ import annotations

from .lock import LOCK_NAME, break_lock, describe_lock, lock_is_stale, read_lock, writer_lock
from .reader import Store, format_summary, open_store, store_summary
from .schema import COORD_DTYPES, COORDS, QUERY_TASK_CHUNKS, SETTING_KEYS, StoreSettings, rows_per_chunk
from .writer import StoreWriter, open_writer

__all__ = [
    "COORDS", "COORD_DTYPES", "LOCK_NAME", "QUERY_TASK_CHUNKS", "SETTING_KEYS", "Store", "StoreSettings",
    "StoreWriter", "break_lock", "describe_lock", "format_summary", "lock_is_stale", "open_store",
    "open_writer", "read_lock", "rows_per_chunk", "store_summary", "writer_lock",
]
