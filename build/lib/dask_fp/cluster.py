"""Get a Dask ``Client``: one place for every kind of cluster dask-fp runs on.

* ``local`` (default): a LocalCluster of worker processes on this machine,
  listening on localhost only;
* an existing scheduler (``scheduler="tcp://host:8786"``): joined, never closed;
* ``slurm`` / ``pbs``: a dask-jobqueue cluster whose workers are batch jobs.
  It is configured the way dask-jobqueue is everywhere, through Dask's own
  config (``jobqueue.slurm`` / ``jobqueue.pbs`` in a ``jobqueue.yaml`` under
  ``~/.config/dask/`` or ``$DASK_CONFIG``, or ``DASK_JOBQUEUE__SLURM__…``
  environment variables). Options here override only cores, memory and the
  number of jobs. GPU workers advertise a Dask resource via
  ``worker-extra-args: ["--resources", "GPU=1"]``; see ``deploy/jobqueue/``;
* ``local-cuda``: dask-cuda's LocalCUDACluster, one worker per visible GPU,
  each advertising the resource ``GPU=1``.

Whatever the kind, the caller gets a ``Client`` and never needs to know
what is behind it; the dashboard link is printed; and :func:`get_client`
closes what it started (for jobqueue clusters that cancels the jobs).
Model tasks land on GPU workers through :func:`gpu_resources`.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from distributed import Client, LocalCluster, WorkerPlugin

from .errors import ClusterError

KINDS = ("local", "slurm", "pbs", "local-cuda")
JOBQUEUE_KINDS = ("slurm", "pbs")


@dataclass(frozen=True)
class ClusterOptions:
    """Where to run.

    Parameters
    ----------
    cluster : {"local", "slurm", "pbs", "local-cuda"}
        The kind of cluster to start (ignored when ``scheduler`` is given, which
        requires ``"local"``, the default).
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``) to join instead of
        starting a cluster.
    workers : int, optional
        Worker processes of a ``local`` cluster (default: one per two cores) or a
        ``local-cuda`` cluster (default: one per visible GPU).
    threads_per_worker : int
        Dask threads per worker process (``local``, ``local-cuda``).
    memory_limit : str
        Per-worker memory limit of a ``local`` / ``local-cuda`` cluster (Dask syntax,
        e.g. ``"2GiB"``, ``"auto"``).
    dashboard : bool
        Serve the dashboard (``local``: on localhost, a free port).
    jobs : int, optional
        ``slurm`` / ``pbs``: batch jobs to submit (default 1).
    cores : int, optional
        ``slurm`` / ``pbs``: cores per job; overrides ``jobqueue.<kind>.cores``.
    memory : str, optional
        ``slurm`` / ``pbs``: memory per job (``"8GiB"``); overrides ``jobqueue.<kind>.memory``.
    start_timeout : float
        ``slurm`` / ``pbs``: seconds to wait for the first worker to connect
        (its job may sit in the queue) before giving up with an error.
    """

    cluster: str = "local"
    scheduler: str | None = None
    workers: int | None = None
    threads_per_worker: int = 1
    memory_limit: str = "auto"
    dashboard: bool = True
    jobs: int | None = None
    cores: int | None = None
    memory: str | None = None
    start_timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.cluster not in KINDS:
            raise ClusterError(f"unknown cluster kind {self.cluster!r}; choose one of {', '.join(KINDS)}.")
        jobqueue_only = [f"--{n}" for n in ("jobs", "cores", "memory") if getattr(self, n) is not None]
        if self.scheduler and self.cluster != "local":
            raise ClusterError(
                f"--scheduler joins a running scheduler; it cannot be combined with --cluster {self.cluster}."
            )
        if self.scheduler and (self.workers is not None or jobqueue_only):
            given = ["--workers"] * (self.workers is not None) + jobqueue_only
            raise ClusterError(
                f"{', '.join(given)} size a cluster that dask-fp starts; with --scheduler the cluster"
                " already exists. Drop them, or drop --scheduler."
            )
        if self.cluster in JOBQUEUE_KINDS and self.workers is not None:
            raise ClusterError(
                f"--workers sizes a local cluster; for --cluster {self.cluster} use --jobs N"
                " (and --cores / --memory per job)."
            )
        if self.cluster not in JOBQUEUE_KINDS and jobqueue_only:
            raise ClusterError(
                f"{', '.join(jobqueue_only)} apply to --cluster slurm or pbs, not to"
                f" {'--scheduler' if self.scheduler else '--cluster ' + self.cluster}"
                f"{'; use --workers N' if not self.scheduler else ''}."
            )
        for name in ("workers", "jobs", "cores", "threads_per_worker"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ClusterError(f"{name} must be at least 1, got {v}.")
        if self.start_timeout <= 0:
            raise ClusterError(f"start_timeout must be positive, got {self.start_timeout}.")


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


def _dashboard_kwargs(options: ClusterOptions) -> dict[str, Any]:
    # A free port on localhost; "off" keeps the scheduler's HTTP server (health checks) but no dashboard.
    kwargs: dict[str, Any] = {"dashboard_address": "127.0.0.1:0"}
    if not options.dashboard:
        kwargs["scheduler_kwargs"] = {"dashboard": False}
    return kwargs


def _start_local(options: ClusterOptions) -> Any:
    return LocalCluster(
        n_workers=options.workers or default_workers(),
        threads_per_worker=options.threads_per_worker,
        processes=True,
        memory_limit=options.memory_limit,
        host="127.0.0.1",
        **_dashboard_kwargs(options),
    )


def _start_local_cuda(options: ClusterOptions) -> Any:
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        raise ClusterError(
            "--cluster local-cuda needs dask-cuda, which is not installed here:"
            " pip install 'dask-fp[gpu]' (or pip install dask-cuda) on a machine with NVIDIA GPUs."
        ) from None
    kwargs: dict[str, Any] = dict(
        threads_per_worker=options.threads_per_worker,
        memory_limit=options.memory_limit,
        host="127.0.0.1",
        resources={"GPU": 1},
        **_dashboard_kwargs(options),
    )
    if options.workers:
        kwargs["n_workers"] = options.workers
    return LocalCUDACluster(**kwargs)


def jobqueue_cluster_class(kind: str) -> Any:
    """``dask_jobqueue.SLURMCluster`` or ``PBSCluster``, with a clear error if it is missing."""
    try:
        import dask_jobqueue
    except ImportError:
        raise ClusterError(
            f"--cluster {kind} needs dask-jobqueue, which is not installed here: pip install dask-jobqueue"
            " (or pip install 'dask-fp[hpc]')."
        ) from None
    return {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[kind]


def jobqueue_kwargs(options: ClusterOptions) -> dict[str, Any]:
    """Keyword overrides for the jobqueue cluster: only what the options set; the rest is Dask config."""
    import dask.config

    kwargs: dict[str, Any] = {}
    if options.cores is not None:
        kwargs["cores"] = options.cores
    if options.memory is not None:
        kwargs["memory"] = options.memory
    if not dask.config.get(f"jobqueue.{options.cluster}.python", None):
        kwargs["python"] = sys.executable  # the workers run this very interpreter (a shared venv)
    if not options.dashboard:
        kwargs["scheduler_options"] = {
            **(dask.config.get(f"jobqueue.{options.cluster}.scheduler-options", None) or {}),
            "dashboard": False, "dashboard_address": ":0",
        }
    return kwargs


def _start_jobqueue(options: ClusterOptions) -> Any:
    import dask.config

    cls = jobqueue_cluster_class(options.cluster)
    try:
        with warnings.catch_warnings():
            # The dashboard moves to a free port when 8787 is taken; the link printed says where.
            warnings.filterwarnings("ignore", message=r"Port \d+ is already in use")
            return cls(**jobqueue_kwargs(options))
    except ValueError as e:
        if "cores" in str(e) and "memory" in str(e):
            raise ClusterError(
                f"--cluster {options.cluster}: say how many cores and how much memory one job gets,"
                f" with --cores N --memory SIZE or in Dask's config (jobqueue.{options.cluster}.cores /"
                f" .memory in ~/.config/dask/jobqueue.yaml; example: deploy/jobqueue/jobqueue.yaml)."
                f" Config now: cores={dask.config.get(f'jobqueue.{options.cluster}.cores', None)},"
                f" memory={dask.config.get(f'jobqueue.{options.cluster}.memory', None)}."
            ) from None
        raise


def _wait_for_first_worker(client: Any, cluster: Any, options: ClusterOptions, say: Callable[[str], None]) -> None:
    """``Client.wait_for_workers(1)`` in 30 s steps (a note each step), up to ``options.start_timeout``."""
    t0 = time.monotonic()
    while True:
        waited = time.monotonic() - t0
        step = min(30.0, options.start_timeout - waited)
        try:
            client.wait_for_workers(1, timeout=max(step, 0.1))
            return
        except TimeoutError:
            waited = time.monotonic() - t0
        if waited >= options.start_timeout:
            ids = _job_ids(cluster)
            log_dir = _config(options.cluster, "log-directory")
            raise ClusterError(
                f"no Dask worker connected within {options.start_timeout:.0f} s of submitting"
                f" {options.jobs or 1} {options.cluster} job(s) (ids: {', '.join(ids) or 'none yet'})."
                " Are they still queued (squeue / qstat)? Did they fail? Their output is in"
                f" {log_dir or 'the job output files (set jobqueue.' + options.cluster + '.log-directory)'}."
                " Check that the workers can reach the scheduler (jobqueue interface) and run"
                f" {sys.executable}."
            )
        say(f"dask: waiting for the first {options.cluster} worker ({waited:.0f} s; jobs"
            f" {', '.join(_job_ids(cluster)) or 'being submitted'})")


def _config(kind: str, key: str) -> Any:
    import dask.config

    return dask.config.get(f"jobqueue.{kind}.{key}", None)


def _job_ids(cluster: Any) -> list[str]:
    return [str(j.job_id) for j in getattr(cluster, "workers", {}).values() if getattr(j, "job_id", None)]


@contextmanager
def get_client(
    options: ClusterOptions = ClusterOptions(), *, log: Callable[[str], None] | None = None
) -> Iterator[Any]:
    """A connected ``distributed.Client``; a cluster this started is closed on exit.

    For ``slurm`` / ``pbs`` the jobs are submitted and the context waits
    (``options.start_timeout``) for the first worker; on exit the cluster is
    closed, which cancels every job it submitted. ``client.cluster`` is the
    cluster object when this function started one.
    """
    say = log or (lambda m: print(m, file=sys.stderr))
    cluster = None
    client = None
    try:
        try:
            if options.scheduler:
                try:
                    client = Client(options.scheduler, timeout="20s")
                except (OSError, TimeoutError) as e:
                    raise ClusterError(
                        f"cannot reach the Dask scheduler at {options.scheduler} ({e}). Is it running?"
                    ) from None
            elif options.cluster == "local":
                cluster = _start_local(options)
            elif options.cluster == "local-cuda":
                cluster = _start_local_cuda(options)
            else:
                cluster = _start_jobqueue(options)
                cluster.scale(jobs=options.jobs or 1)
            if client is None:
                client = Client(cluster)
        except ClusterError:
            raise
        except Exception as e:
            raise ClusterError(
                f"could not start a {options.cluster} Dask cluster: {type(e).__name__}: {e}"
            ) from None
        client.register_plugin(QuietRasterWarnings())
        dashboard = client.dashboard_link if options.dashboard or options.scheduler else "off"
        if options.cluster in JOBQUEUE_KINDS and not options.scheduler:
            cores = options.cores or _config(options.cluster, "cores")
            memory = options.memory or _config(options.cluster, "memory")
            say(f"dask: {options.cluster} cluster, {options.jobs or 1} job(s) of {cores} cores /"
                f" {memory} submitted; dashboard: {dashboard}")
            t0 = time.monotonic()
            _wait_for_first_worker(client, cluster, options, say)
            say(f"dask: first worker connected after {time.monotonic() - t0:.1f} s"
                f" (jobs {', '.join(_job_ids(cluster))})")
        else:
            info = client.scheduler_info()
            n_workers = len(info.get("workers", {}))
            threads = sum(w.get("nthreads", 0) for w in info.get("workers", {}).values())
            kind = f"scheduler {options.scheduler}" if options.scheduler else f"{options.cluster} cluster"
            say(f"dask: {kind}, {n_workers} workers, {threads} threads; dashboard: {dashboard}")
        yield client
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()  # jobqueue: cancels the jobs (scancel / qdel)


def gpu_resources(client: Any) -> tuple[tuple[str, float], ...] | None:
    """``(("GPU", 1),)`` when some worker advertises a GPU resource, else None."""
    workers = client.scheduler_info().get("workers", {}).values()
    if any(w.get("resources", {}).get("GPU") for w in workers):
        return (("GPU", 1.0),)
    return None


def environment_threads() -> int:
    """CPU threads available to this process."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def torch_threads_per_task(client: Any) -> int:
    """Torch CPU threads per model call so the cluster's cores are used, not oversubscribed.

    Dask workers start with ``OMP_NUM_THREADS=1``, so torch would use one core
    per Dask thread. This gives each model call ``cores on the host // Dask
    threads on the host`` (the smallest over hosts, at least 1); 0 (leave
    torch alone) when no worker has joined yet.
    """
    workers = client.scheduler_info().get("workers", {})
    if not workers:
        return 0
    cores = client.run(environment_threads)
    threads_on: dict[str, int] = {}
    cores_on: dict[str, int] = {}
    for addr, w in workers.items():
        host = w.get("host", addr)
        threads_on[host] = threads_on.get(host, 0) + int(w.get("nthreads", 1))
        cores_on[host] = max(cores_on.get(host, 1), int(cores.get(addr, 1)))
    return max(1, min(cores_on[h] // threads_on[h] for h in threads_on))
