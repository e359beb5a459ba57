"""Get a Dask ``Client``: a LocalCluster (default) or an existing scheduler.

One code path for both: the caller gets a ``Client`` and never needs to
know which kind of cluster is behind it. The dashboard link is printed
whenever a cluster starts or is joined. Anything this module starts listens
on localhost only.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from distributed import Client, LocalCluster, WorkerPlugin

from .errors import ClusterError
from .models import environment_threads


@dataclass(frozen=True)
class ClusterOptions:
    """Where to run.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``); None starts a LocalCluster.
    workers : int, optional
        LocalCluster worker processes (default: one per two cores, at least one).
    threads_per_worker : int
        Dask threads per worker process.
    memory_limit : str
        Per-worker memory limit of a LocalCluster (Dask syntax, e.g. ``"2GiB"``, ``"auto"``).
    dashboard : bool
        Serve the dashboard (on localhost, a free port).
    """

    scheduler: str | None = None
    workers: int | None = None
    threads_per_worker: int = 1
    memory_limit: str = "auto"
    dashboard: bool = True


class QuietRasterWarnings(WorkerPlugin):
    """Worker plugin: silence GDAL's 'not georeferenced' warning for plain images."""

    name = "dask-fp-quiet-warnings"

    def setup(self, worker: Any) -> None:
        try:
            from rasterio.errors import NotGeoreferencedWarning
        except ImportError:  # pragma: no cover
            return
        warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)


def default_workers() -> int:
    """LocalCluster size for this machine: one worker per two cores, at least one."""
    return max(1, environment_threads() // 2)


@contextmanager
def get_client(options: ClusterOptions = ClusterOptions(), *, log: Callable[[str], None] | None = None) -> Iterator[Any]:
    """A connected ``distributed.Client``; a cluster this started is closed on exit."""
    say = log or (lambda m: print(m, file=sys.stderr))
    cluster = None
    try:
        if options.scheduler:
            try:
                client = Client(options.scheduler, timeout="20s")
            except (OSError, TimeoutError) as e:
                raise ClusterError(
                    f"cannot reach the Dask scheduler at {options.scheduler} ({e}). Is it running?"
                ) from None
        else:
            n = options.workers or default_workers()
            cluster = LocalCluster(
                n_workers=n,
                threads_per_worker=options.threads_per_worker,
                processes=True,
                memory_limit=options.memory_limit,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0" if options.dashboard else None,
            )
            client = Client(cluster)
    except ClusterError:
        raise
    except Exception as e:
        raise ClusterError(f"could not start a local Dask cluster: {type(e).__name__}: {e}") from None
    try:
        client.register_plugin(QuietRasterWarnings())
        info = client.scheduler_info()
        n_workers = len(info.get("workers", {}))
        threads = sum(w.get("nthreads", 0) for w in info.get("workers", {}).values())
        kind = "local cluster" if cluster is not None else f"scheduler {options.scheduler}"
        say(f"dask: {kind}, {n_workers} workers, {threads} threads; dashboard: {client.dashboard_link}")
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def gpu_resources(client: Any) -> tuple[tuple[str, float], ...] | None:
    """``(("GPU", 1),)`` when some worker advertises a GPU resource, else None."""
    workers = client.scheduler_info().get("workers", {}).values()
    if any(w.get("resources", {}).get("GPU") for w in workers):
        return (("GPU", 1.0),)
    return None
