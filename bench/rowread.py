"""Reading scattered candidate rows: the uncompressed store layout against the former blosc-lz4 one.

The exact re-rank of compact-code search reads the full fingerprints of ~1,000
candidate rows spread over the store. This bench writes the same rows twice
through Zarr with the store's chunking (``rows_per_chunk``: 8,192 rows of
512-d float32, 16 MiB): once uncompressed (what the store writer makes now)
once with blosc-lz4 + byte shuffle (what it made before), and twice as Zarr v3
shards of those chunks with small inner chunks (the alternative considered), then times, with
fresh random rows every repeat:

- ``Store.read``-style reads of ``--candidates`` scattered rows
  (:func:`dask_fp.store.rows.read_rows`: ``pread`` per row when uncompressed,
  Zarr's orthogonal selection otherwise), and
- a whole-array read chunk by chunk (the exact scan's I/O; median of 3).

Run::

    .venv/bin/python bench/rowread.py --rows 524288 --workdir /tmp/rowread

Vectors are Gaussian: blosc compresses them less than real fingerprints (~10 %
saved on real ones, bench/ingest.py), so the sizes on disk printed here are a
lower bound on what compression saves; the read times are what matters.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import zarr
    from zarr.codecs import BloscCodec

    from dask_fp.store.chunks import ChunkFiles
    from dask_fp.store.rows import read_rows
    from dask_fp.store.schema import rows_per_chunk

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=524_288)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--candidates", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/dask-fp-rowread"))
    a = p.parse_args(argv)
    c = rows_per_chunk(a.dim, 4)
    out: dict[str, Any] = {"command": " ".join(sys.argv), "rows": a.rows, "dim": a.dim, "chunk_rows": c,
                           "candidates": a.candidates}
    blosc = [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]
    # (compressors, inner chunk rows when sharded: shards = today's chunks)
    layouts = {"uncompressed": (None, 0), "blosc-lz4": (blosc, 0),
               "blosc-lz4 sharded, 64-row inner chunks": (blosc, 64),
               "blosc-lz4 sharded, 256-row inner chunks": (blosc, 256)}
    for name, (comp, inner) in layouts.items():
        root = a.workdir / name.replace(" ", "_").replace(",", "")
        shutil.rmtree(root, ignore_errors=True)
        g = zarr.open_group(str(root), mode="w", zarr_format=3)
        arr = g.create_array("fingerprint", shape=(a.rows, a.dim), chunks=(inner or c, a.dim), dtype="float32",
                             shards=(c, a.dim) if inner else None, compressors=comp, fill_value=0)
        def block(s: int) -> np.ndarray:
            return np.random.default_rng(s).standard_normal((min(c, a.rows - s), a.dim), dtype=np.float32)

        for s in range(0, a.rows, c):
            arr[s : s + c] = block(s)
        files = ChunkFiles.of(root, "fingerprint", arr)
        disk = sum(f.stat().st_size for f in (root / "fingerprint").rglob("*") if f.is_file())
        check = np.arange(0, a.rows, max(1, a.rows // 997))
        expect = np.concatenate([block(s)[check[(check >= s) & (check < s + c)] - s] for s in range(0, a.rows, c)])
        assert np.array_equal(read_rows(arr, files, check), expect), name
        times = []
        for i in range(a.repeats):
            rows = np.random.default_rng(1000 + i).choice(a.rows, a.candidates, replace=False)
            t0 = time.perf_counter()
            read_rows(arr, files, rows)
            times.append(time.perf_counter() - t0)
        reads = []
        for _ in range(3):  # the first read can still meet the write's dirty pages
            t0 = time.perf_counter()
            for s in range(0, a.rows, c):
                arr[s : s + c]
            reads.append(time.perf_counter() - t0)
        whole = statistics.median(reads)
        out[name] = {"bytes_on_disk": disk, "candidate_rows_median_s": statistics.median(times),
                     "whole_read_s": whole, "whole_read_GB_s": a.rows * a.dim * 4 / whole / 1e9}
        print(f"{name}: {a.candidates} scattered rows {statistics.median(times) * 1e3:.1f} ms (median of"
              f" {a.repeats}); whole array {whole:.2f} s ({out[name]['whole_read_GB_s']:.2f} GB/s);"
              f" {disk / 2**20:.0f} MiB on disk", file=sys.stderr)
    shutil.rmtree(a.workdir, ignore_errors=True)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
