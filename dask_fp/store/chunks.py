"""Which chunk files hold which rows, and whether they are on disk.

Zarr reads a missing chunk file as fill values (zeros, NaN), which would turn
a deleted file into wrong answers. Writers store every chunk, even one equal
to the fill value, so a missing chunk file of committed rows means damage.
Readers check exactly the chunk files a read touches (one ``stat`` each, in
the task that reads them), so the cost grows with the question, not with the
store; :func:`check_all` walks every file (on request, ``Store.verify``). The
writer checks only the chunk its first append rewrites.

A :class:`ChunkFiles` holds only strings and numbers: it is cheap to send to
workers and tokenizes deterministically.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError

#: One missing file: (key relative to the store, first row, stop row) of the rows it holds.
Missing = tuple[str, int, int]


@dataclass(frozen=True)
class ChunkFiles:
    """The chunk files (shards, if the array is sharded) of one row-chunked array."""

    root: str
    name: str
    rows: int  # rows per stored file
    prefix: str  # "c/" for Zarr v3's default key encoding, "" for "v2"
    separator: str
    tails: tuple[tuple[int, ...], ...]  # the file grid along the other axes

    @classmethod
    def of(cls, root: str | os.PathLike[str], name: str, arr: Any) -> ChunkFiles:
        grid = getattr(arr, "shards", None) or arr.chunks
        enc = arr.metadata.chunk_key_encoding
        sep = str(getattr(enc, "separator", "/"))
        prefix = "c" + sep if getattr(enc, "name", "default") == "default" else ""
        tails = tuple(itertools.product(*[range(-(-s // c)) for s, c in zip(arr.shape[1:], grid[1:], strict=True)]))
        return cls(str(root), name, int(grid[0]), prefix, sep, tails)

    def key(self, i: int, tail: Sequence[int]) -> str:
        return self.name + "/" + self.prefix + self.separator.join(str(v) for v in (i, *tail))

    def count(self, committed: int) -> int:
        """Files holding rows ``[0, committed)``."""
        return -(-committed // self.rows) * len(self.tails)

    def row_files(self, indices: Iterable[int], committed: int) -> list[tuple[str, int, int]]:
        """``(key, first row, stop row)`` of every file of the row-chunk ``indices``."""
        return [(self.key(i, t), i * self.rows, min((i + 1) * self.rows, committed))
                for i in indices for t in self.tails]

    def missing(self, indices: Iterable[int], committed: int) -> list[Missing]:
        """Files of the row-chunk ``indices`` that are not on disk (one ``stat`` each)."""
        root = Path(self.root)
        return [f for f in self.row_files(indices, committed) if not (root / f[0]).is_file()]

    def indices(self, lo: int, hi: int) -> range:
        """Row-chunk indices that hold rows ``[lo, hi)``."""
        return range(lo // self.rows, -(-hi // self.rows)) if hi > lo else range(0)

    def indices_of_rows(self, rows: np.ndarray) -> list[int]:
        return [int(i) for i in np.unique(np.asarray(rows, dtype=np.int64) // self.rows)]


def damage_error(
    path: str | os.PathLike[str], missing: list[Missing], committed: int,
    sources: Callable[[], list[dict[str, Any]]] | None = None,
) -> StoreError:
    """The "store is damaged" error for ``missing`` files (sources named when known)."""
    lo, hi = min(m[1] for m in missing), max(m[2] for m in missing)
    hit: list[str] = []
    if sources is not None:
        hit = sorted({s.get("path", "?") for s in sources()
                      if "rows" in s and s["rows"][0] < hi and s["rows"][1] > lo})
    files = ", ".join(m[0] for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    where = f", from {', '.join(hit)}" if hit else ""
    return StoreError(
        f"{path}: chunk file(s) {files} missing (rows {lo}..{hi - 1} of {committed} committed{where});"
        " the store is damaged. Restore it from a backup, or ingest the sources again into a new store."
    )


def require(
    path: str | os.PathLike[str], files: Iterable[ChunkFiles], chunk_indices: Callable[[ChunkFiles], Iterable[int]],
    committed: int, sources: Callable[[], list[dict[str, Any]]] | None = None,
) -> None:
    """Raise :func:`damage_error` if a file of the given row chunks is missing."""
    missing = [m for f in files for m in f.missing(chunk_indices(f), committed)]
    if missing:
        raise damage_error(path, missing, committed, sources)


def check_all(
    path: Path, arrays: dict[str, Any], committed: int, sources: Callable[[], list[dict[str, Any]]]
) -> None:
    """Every chunk file that holds committed rows must exist (one ``stat`` per file)."""
    files = [ChunkFiles.of(path, name, arr) for name, arr in arrays.items()]
    require(path, files, lambda f: range(-(-committed // f.rows)), committed, sources)


def checked_block(block: np.ndarray, files: ChunkFiles, committed: int, block_info: Any = None) -> np.ndarray:
    """``block`` as read, after checking that the files of its rows exist (runs in the read task)."""
    lo, hi = block_info[0]["array-location"][0]
    missing = files.missing(files.indices(lo, hi), committed)
    if missing:
        raise damage_error(files.root, missing, committed)
    return block


def sampled_bytes(files: ChunkFiles, committed: int, sample: int) -> tuple[int, int, int, list[Missing]]:
    """Bytes on disk of the files holding committed rows, from at most ``sample`` row chunks.

    Returns ``(bytes, files stat'ed, files in all, missing)``; exact when every
    row chunk was stat'ed, else the sampled files' mean size times the file count.
    The first and last row chunks are always in the sample.
    """
    n = -(-committed // files.rows)
    if n == 0:
        return 0, 0, 0, []
    idx = sorted({int(i) for i in np.linspace(0, n - 1, min(n, sample)).round()})
    root = Path(files.root)
    sizes, missing = [], []
    for f in files.row_files(idx, committed):
        try:
            sizes.append((root / f[0]).stat().st_size)
        except FileNotFoundError:
            missing.append(f)
    total = files.count(committed)
    if len(idx) == n:
        return int(sum(sizes)), len(sizes), total, missing
    return int(round(np.mean(sizes) * total)) if sizes else 0, len(sizes), total, missing
