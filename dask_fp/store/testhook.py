"""Crash-test hook for ``tests/test_reliability.py`` (inert unless set).

``DASK_FP_TEST_PAUSE=POINT[:N]`` makes the writer print
``dask-fp-test-pause: POINT`` to stderr and sleep
``DASK_FP_TEST_PAUSE_SECONDS`` (default 300; less if the file named by
``DASK_FP_TEST_RELEASE`` is removed) the N-th time (default the first) it
reaches ``POINT``, so a test can kill it exactly there. Points: ``rows``,
``before-commit`` (all rows of the sources about to be committed on disk, not yet committed)
and ``committed`` (right after a commit). All points are on the client (the ingest
process): ``rows`` is reached when the first worker write task of the run has finished
(rows on disk past ``committed``).
"""

from __future__ import annotations

import os
import sys
import time

_PAUSES: dict[str, int] = {}


def test_pause(point: str) -> None:
    """The crash-test hook described in the module docstring (a no-op unless set)."""
    spec = os.environ.get("DASK_FP_TEST_PAUSE")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _PAUSES[point] = _PAUSES.get(point, 0) + 1
    if _PAUSES[point] != int(nth or 1):
        return
    print(f"dask-fp-test-pause: {point}", file=sys.stderr, flush=True)
    end = time.monotonic() + float(os.environ.get("DASK_FP_TEST_PAUSE_SECONDS", "300"))
    release = os.environ.get("DASK_FP_TEST_RELEASE")
    while time.monotonic() < end and (release is None or os.path.exists(release)):
        time.sleep(0.05)
