"""The sources table: one JSON record per source in a Zarr string array, row ranges beside it.

=============  ===================  ======  ==============================================
name           dims                 dtype   meaning
=============  ===================  ======  ==============================================
source_table   (source_entry,)      string  JSON record of source i (path, sha256, CRS, ...)
source_rows    (source_entry, 2)    int64   ``[row_start, row_stop)`` of source i's tiles
=============  ===================  ======  ==============================================

The root attribute ``committed_sources`` says how many entries readers may
see; it moves with ``committed`` (rows) in the same single metadata update.
Entries past it are a crashed writer's leftovers, overwritten by the next
one. Reading the table costs one chunk read per :data:`CHUNK` sources,
whatever the number of rows. Stores of format version 1 kept the table in a
``sources`` attribute; :func:`read_sources` still reads it and
:func:`migrate_v1` moves it into the arrays.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

TABLE = "source_table"
ROWS = "source_rows"
NAMES = (TABLE, ROWS)
#: Sources per chunk of the table arrays.
CHUNK = 1024
FORMAT_VERSION = 2


def create_arrays(group: Any) -> None:
    """Create the (empty) table arrays that are missing."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the lock file is not a Zarr node
        have = set(group.array_keys())
    if TABLE not in have:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # variable-length strings: zarr's "unstable spec" note
            group.create_array(TABLE, shape=(0,), chunks=(CHUNK,), dtype=str, dimension_names=("source_entry",))
    if ROWS not in have:
        group.create_array(ROWS, shape=(0, 2), chunks=(CHUNK, 2), dtype="int64", fill_value=-1,
                           dimension_names=("source_entry", "bound"))


def committed_count(attrs: dict[str, Any]) -> int:
    """Sources visible to readers."""
    if int(attrs.get("format_version", 1)) < FORMAT_VERSION:
        return len(attrs.get("sources", []))
    return int(attrs.get("committed_sources", 0))


def read_sources(group: Any, attrs: dict[str, Any], start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
    """Committed source records ``start:stop`` (all of them by default)."""
    n = committed_count(attrs)
    stop = n if stop is None else min(stop, n)
    if int(attrs.get("format_version", 1)) < FORMAT_VERSION:
        return [dict(s) for s in attrs.get("sources", [])[start:stop]]
    if stop <= start:
        return []
    return [json.loads(str(s)) for s in group[TABLE][start:stop]]


def read_rows(group: Any, attrs: dict[str, Any]) -> np.ndarray:
    """``(n_sources, 2)`` row ranges of the committed sources."""
    n = committed_count(attrs)
    if int(attrs.get("format_version", 1)) < FORMAT_VERSION:
        return np.array([s["rows"] for s in attrs.get("sources", [])], dtype=np.int64).reshape(-1, 2)
    return np.asarray(group[ROWS][:n], dtype=np.int64).reshape(-1, 2)


def write_entries(group: Any, start: int, entries: list[dict[str, Any]]) -> None:
    """Write ``entries`` at table positions ``start…`` (past ``committed_sources``: not yet visible)."""
    if not entries:
        return
    table, rows = group[TABLE], group[ROWS]
    stop = start + len(entries)
    for arr in (table, rows):
        if arr.shape[0] != stop:
            arr.resize((stop, *arr.shape[1:]))
    table[start:stop] = np.array([json.dumps(e, sort_keys=True) for e in entries], dtype=object)
    rows[start:stop] = np.array([e["rows"] for e in entries], dtype=np.int64).reshape(-1, 2)


def truncate(group: Any, n: int) -> bool:
    """Drop table entries past ``n`` (a crashed writer's); True if anything changed."""
    changed = False
    for name in NAMES:
        arr = group[name]
        if arr.shape[0] != n:
            arr.resize((n, *arr.shape[1:]))
            changed = True
    return changed


def migrate_v1(group: Any, attrs: dict[str, Any]) -> dict[str, Any]:
    """Move a format-1 store's ``sources`` attribute into the table arrays (under the writer lock).

    The entries are written first; one attributes update then switches the
    format version, sets ``committed_sources`` and drops the attribute. Returns
    the new attributes.
    """
    entries = [dict(s) for s in attrs.get("sources", [])]
    create_arrays(group)
    write_entries(group, 0, entries)
    new = {k: v for k, v in attrs.items() if k != "sources"}
    new.update({"format_version": FORMAT_VERSION, "committed_sources": len(entries)})
    group.attrs.put(new)
    return dict(group.attrs)
