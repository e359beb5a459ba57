"""dask_fp.cluster: one place that hands out a Client, for every kind of cluster.

Real SLURM runs are in test_slurm.py; the deploy/ files in test_deploy.py.
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import dask.config
import pytest
from conftest import textured, write_tif
from distributed import LocalCluster

import dask_fp
from dask_fp.cli import build_parser
from dask_fp.cluster import ClusterOptions, get_client, gpu_resources, jobqueue_kwargs
from dask_fp.errors import ClusterError


@pytest.mark.parametrize("kwargs, message", [
    (dict(cluster="kubernetes"), "unknown cluster kind 'kubernetes'"),
    (dict(cluster="slurm", scheduler="tcp://x:8786"), "cannot be combined with --cluster slurm"),
    (dict(scheduler="tcp://x:8786", workers=2), "--workers size a cluster that dask-fp starts"),
    (dict(scheduler="tcp://x:8786", jobs=2), "--jobs size a cluster"),
    (dict(cluster="slurm", workers=2), "for --cluster slurm use --jobs N"),
    (dict(jobs=2), "--jobs apply to --cluster slurm or pbs, not to --cluster local; use --workers N"),
    (dict(cluster="local-cuda", cores=4, memory="8GiB"), "--cores, --memory apply to --cluster slurm or pbs"),
    (dict(cluster="pbs", jobs=0), "jobs must be at least 1"),
    (dict(cluster="slurm", start_timeout=0), "start_timeout must be positive"),
])
def test_options_refuse_what_does_not_fit_together(kwargs: dict, message: str) -> None:
    with pytest.raises(ClusterError) as e:
        ClusterOptions(**kwargs)
    assert message in str(e.value)


@pytest.mark.parametrize("argv, expected", [
    ([], ClusterOptions()),
    (["--workers", "3", "--memory-limit", "2GiB"], ClusterOptions(workers=3, memory_limit="2GiB")),
    (["--scheduler", "tcp://h:8786"], ClusterOptions(scheduler="tcp://h:8786")),
    (["--cluster", "slurm", "--jobs", "4", "--cores", "8", "--memory", "32GiB"],
     ClusterOptions(cluster="slurm", jobs=4, cores=8, memory="32GiB")),
    (["--cluster", "pbs"], ClusterOptions(cluster="pbs")),
    (["--cluster", "local-cuda", "--workers", "2"], ClusterOptions(cluster="local-cuda", workers=2)),
])
@pytest.mark.parametrize("command", [["ingest", "a.tif", "--store", "s.zarr"], ["query", "s.zarr", "--uid", "1"]])
def test_cli_cluster_flags_become_cluster_options(command: list[str], argv: list[str], expected: ClusterOptions,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import dask_fp.cluster
    from dask_fp import cli

    seen: list[ClusterOptions] = []
    monkeypatch.setattr(dask_fp.cluster, "get_client", lambda options: seen.append(options))
    cli._cluster(build_parser().parse_args(command + argv))
    assert seen == [expected]


def test_cli_reports_bad_cluster_combinations_as_one_line(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "dask_fp.cli", "ingest", str(tmp_path / "x.tif"), "--store",
                          str(tmp_path / "s.zarr"), "--cluster", "slurm", "--workers", "2"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == (
        "dask-fp: error: --workers sizes a local cluster; for --cluster slurm use --jobs N"
        " (and --cores / --memory per job).")
    res = subprocess.run([sys.executable, "-m", "dask_fp.cli", "ingest", "x.tif", "--store", "s.zarr",
                          "--cluster", "yarn"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "invalid choice: 'yarn'" in res.stderr


def test_local_cluster_prints_the_dashboard_and_is_closed_on_exit() -> None:
    said: list[str] = []
    with get_client(ClusterOptions(workers=1), log=said.append) as client:
        assert client.submit(sum, [1, 2]).result() == 3
        cluster = client.cluster
        assert len(client.scheduler_info()["workers"]) == 1
    assert said[0].startswith("dask: local cluster, 1 workers, 1 threads; dashboard: http://127.0.0.1:")
    assert client.status == "closed" and cluster.status.name == "closed"


def test_local_cluster_without_dashboard_says_so() -> None:
    said: list[str] = []
    with get_client(ClusterOptions(workers=1, dashboard=False), log=said.append):
        pass
    assert said[0].endswith("dashboard: off")


def test_an_existing_scheduler_is_joined_and_left_running(client) -> None:
    address = client.scheduler.address
    said: list[str] = []
    with get_client(ClusterOptions(scheduler=address), log=said.append) as c:
        assert c.submit(len, "abc").result() == 3
    assert said[0].startswith(f"dask: scheduler {address}, 2 workers, 2 threads; dashboard: ")
    assert client.submit(len, "ab").result() == 2  # still there


def test_local_cuda_needs_dask_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # as if not installed
    with pytest.raises(ClusterError, match=r"needs dask-cuda.*pip install 'dask-fp\[gpu\]'"), \
            get_client(ClusterOptions(cluster="local-cuda")):
        pass


def test_local_cuda_workers_advertise_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a stand-in for dask-cuda's LocalCUDACluster (a real LocalCluster; this machine has no GPU),
    the workers get_client starts advertise one GPU each on localhost, and gpu_resources finds it."""

    def local_cluster_as_dask_cuda_would(**kwargs):
        # dask-cuda passes its keyword arguments on to LocalCluster; in-process workers for speed.
        kwargs.pop("host", None)
        return LocalCluster(processes=False, **kwargs)

    monkeypatch.setitem(sys.modules, "dask_cuda",
                        types.SimpleNamespace(LocalCUDACluster=local_cluster_as_dask_cuda_would))
    said: list[str] = []
    with get_client(ClusterOptions(cluster="local-cuda", workers=2), log=said.append) as client:
        workers = client.scheduler_info()["workers"].values()
        assert len(workers) == 2 and all(w["resources"] == {"GPU": 1} for w in workers)
        assert gpu_resources(client) == (("GPU", 1.0),)
    assert said[0].startswith("dask: local-cuda cluster, 2 workers")


def test_no_gpu_resource_on_a_plain_cluster(client) -> None:
    assert gpu_resources(client) is None


def test_jobqueue_needs_cores_and_memory_and_says_where_to_put_them() -> None:
    pytest.importorskip("dask_jobqueue")
    with dask.config.set({"jobqueue.slurm.cores": None, "jobqueue.slurm.memory": None}), \
            pytest.raises(ClusterError) as e, get_client(ClusterOptions(cluster="slurm", jobs=1)):
        pass
    assert "--cores N --memory SIZE" in str(e.value) and "deploy/jobqueue/jobqueue.yaml" in str(e.value)


def test_jobqueue_options_override_only_cores_memory_and_default_python() -> None:
    with dask.config.set({"jobqueue.slurm.python": None}):
        assert jobqueue_kwargs(ClusterOptions(cluster="slurm", jobs=3)) == {"python": sys.executable}
        assert jobqueue_kwargs(ClusterOptions(cluster="slurm", cores=4, memory="8GiB")) == {
            "cores": 4, "memory": "8GiB", "python": sys.executable}
    with dask.config.set({"jobqueue.pbs.python": "/opt/env/bin/python"}):
        assert jobqueue_kwargs(ClusterOptions(cluster="pbs", cores=2)) == {"cores": 2}


def test_model_tasks_land_only_on_gpu_workers(tmp_path: Path) -> None:
    """A cluster with one plain and one GPU-labelled worker: the CLI puts every model task on the GPU one."""
    from distributed import Client, Nanny, Scheduler, SpecCluster, get_task_stream

    worker = {"cls": Nanny, "options": {"nthreads": 1, "memory_limit": "2GiB", "host": "127.0.0.1"}}
    gpu_worker = {"cls": Nanny, "options": {**worker["options"], "resources": {"GPU": 1}}}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}}
    tif = write_tif(tmp_path / "a.tif", textured(256, 256, seed=4), tiled=False)  # strips: 64 px chunks
    with SpecCluster(workers={"cpu": worker, "gpu": gpu_worker}, scheduler=scheduler) as cluster, \
            Client(cluster) as c:
        c.wait_for_workers(2, timeout=120)
        assert gpu_resources(c) == (("GPU", 1.0),)
        gpu_address = next(a for a, w in c.scheduler_info()["workers"].items() if w["resources"].get("GPU"))
        with get_task_stream(client=c) as ts:
            res = subprocess.run(
                [sys.executable, "-m", "dask_fp.cli", "ingest", str(tif), "--store", str(tmp_path / "s.zarr"),
                 "--weights", "random", "--tile", "64", "--stride", "32", "--chunk", "64", "--device", "cpu",
                 "--scheduler", cluster.scheduler_address, "--quiet"],
                capture_output=True, text=True, timeout=300)
            assert res.returncode == 0, res.stderr
    model_tasks = [t for t in ts.data if str(t["key"]).startswith("fingerprint-")]
    assert len(model_tasks) >= 4  # 4 x 4 blocks of 64 px, 49 windows
    assert {t["worker"] for t in model_tasks} == {gpu_address}
    assert dask_fp.open_store(tmp_path / "s.zarr").committed == 7 * 7
