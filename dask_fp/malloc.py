"""Per-process allocator settings for the worker tasks that handle large buffers.

Dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536``, which
also fixes glibc's mmap threshold at 128 KiB: each large buffer (a Zarr chunk
read, a CNN layer's activations) becomes a fresh ``mmap`` whose pages fault and
are zeroed on first touch. Measured here (docs/performance.md): EfficientNet-Lite0
on the CPU ran at 10 tiles/s in a process started with that variable against 16
without it and 18 after :func:`keep_buffers`; a streamed 16 MiB chunk read took
3x the time.
"""

from __future__ import annotations

#: glibc ``mallopt`` parameters and the values :func:`keep_buffers` sets: mmap threshold 32 MiB
#: (the largest glibc allows), 64 MiB of padding kept at the top of each heap.
MALLOC_SETTINGS = ((-3, 32 << 20), (-2, 64 << 20))  # M_MMAP_THRESHOLD, M_TOP_PAD
_malloc_tuned: list[bool] = []  # per process: whether keep_buffers ran here


def keep_buffers() -> None:
    """Let this process reuse freed read buffers instead of mapping fresh zeroed pages for each.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also
    pins glibc's mmap threshold at 128 KiB: every 16 MiB buffer of a Zarr read
    (file bytes, decompressed chunk) is then a new ``mmap`` whose 4,096 pages
    fault and are zeroed on first touch, and is unmapped when freed. Raising
    the mmap threshold and the heap's top padding (:data:`MALLOC_SETTINGS`)
    keeps those buffers in the heap for the next read; the trim threshold stays,
    so memory beyond the padding still goes back to the OS. Runs once per
    process, in its first streamed scan or block task; a no-op where glibc is not
    the allocator.
    """
    if _malloc_tuned:
        return
    _malloc_tuned.append(True)
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        for param, value in MALLOC_SETTINGS:
            libc.mallopt(param, value)
    except (OSError, AttributeError):  # not glibc
        pass
