"""dask-fp on a real SLURM: a single-node cluster on this machine, workers as batch jobs.

The module stands SLURM up itself (``deploy/slurm/local-cluster.sh up``: Debian
packages munge, slurmctld, slurmd, slurm-client; installed with apt-get if
missing) and takes it down at the end, so ``make test`` on a fresh machine runs
it. It is skipped only where SLURM cannot be installed (no apt-get, or no root).

What runs for real: ``dask-fp ingest --cluster slurm --jobs 2`` and ``dask-fp
query --cluster slurm`` through dask-jobqueue's SLURMCluster (sbatch, workers in
jobs, scancel on exit), and an ingest during which one worker's job is
cancelled with ``scancel``; every store is checked against a LocalCluster run
of the same file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import textured, write_tif

import dask_fp
from dask_fp.cluster import ClusterOptions, get_client
from dask_fp.inspection import RasterOptions

pytestmark = [pytest.mark.slurm, pytest.mark.network]  # SLURM comes from Debian's packages when missing

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "slurm" / "local-cluster.sh"
TILE, STRIDE, CHUNK = 64, 32, 128
COMMON = ["--weights", "random", "--tile", str(TILE), "--stride", str(STRIDE)]


def jobqueue_config(log_dir: Path) -> dict:
    """``jobqueue.slurm`` for this machine: one small worker per job, everything on loopback."""
    return {
        "cores": 1,
        "memory": "2GiB",
        "processes": 1,
        "interface": "lo",  # otherwise Dask advertises a non-loopback address the job may not reach
        "walltime": "00:15:00",
        "death-timeout": 30,
        "log-directory": str(log_dir),  # outside the checkout
    }


def _why_not() -> str | None:
    tools = ("slurmctld", "slurmd", "sbatch", "scancel", "munged")
    if not all(shutil.which(t) for t in tools) and shutil.which("apt-get") is None:
        return "SLURM is not installed and apt-get is not available to install it (Debian/Ubuntu only)"
    if os.geteuid() != 0 and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode != 0:
        return "starting SLURM daemons needs root or passwordless sudo"
    return None


@dataclass
class Slurm:
    conf: str
    config_dir: Path

    def env(self, log_dir: Path) -> dict[str, str]:
        """Environment for a ``dask-fp`` subprocess: this SLURM, the jobqueue.yaml, a log directory."""
        return {**os.environ, "SLURM_CONF": self.conf, "DASK_CONFIG": str(self.config_dir),
                "DASK_JOBQUEUE__SLURM__LOG_DIRECTORY": str(log_dir)}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "DASK_FP_SLURM_LEASE": str(os.getpid())}
    up = subprocess.run([str(SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=600)
    if up.returncode != 0:
        pytest.fail(f"{SCRIPT.name} up failed:\n{up.stdout}\n{up.stderr}")
    conf = next(line.split("=", 1)[1] for line in up.stdout.splitlines() if line.startswith("export SLURM_CONF="))
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf  # for sbatch/scancel called from this process (dask-jobqueue, the tests)
    config_dir = tmp_path_factory.mktemp("dask-config")
    import yaml

    (config_dir / "jobqueue.yaml").write_text(yaml.safe_dump(
        {"jobqueue": {"slurm": jobqueue_config(tmp_path_factory.mktemp("slurm-logs"))}}))
    try:
        yield Slurm(conf, config_dir)
    finally:
        down = subprocess.run([str(SCRIPT), "down"], env=env, capture_output=True, text=True, timeout=300)
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        assert down.returncode == 0, down.stderr


@pytest.fixture(scope="module")
def raster(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """480 x 480 px: 14 x 14 windows of 64 px at stride 32, in 16 blocks of 128 px."""
    # In strips, so that --chunk 128 is used as is (a tiled file aligns chunks to its 256 px blocks).
    return write_tif(tmp_path_factory.mktemp("slurm-raster") / "ortho.tif", textured(480, 480, seed=11),
                     tiled=False)


@pytest.fixture(scope="module")
def reference(raster: Path, client, tmp_path_factory: pytest.TempPathFactory) -> dask_fp.Store:
    """The same file ingested on a LocalCluster."""
    path = tmp_path_factory.mktemp("slurm-ref") / "ref.zarr"
    dask_fp.ingest([str(raster)], str(path), model=dask_fp.ModelOptions("resnet18", weights="random"),
                   tiling=dask_fp.Tiling(TILE, STRIDE), raster=RasterOptions(chunk=CHUNK), client=client,
                   progress=False, log=lambda m: None)
    return dask_fp.open_store(path)


def cli(*args: object, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "dask_fp.cli", *map(str, args)], capture_output=True, text=True,
                         env=env, cwd=cwd, timeout=240)
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


def assert_same_store(store: dask_fp.Store, ref: dask_fp.Store) -> None:
    assert store.committed == ref.committed > 0
    a, b = store.coords(), ref.coords()
    oa, ob = np.argsort(a["uid"]), np.argsort(b["uid"])
    np.testing.assert_array_equal(a["uid"][oa], b["uid"][ob])
    for name in ("wy", "wx", "x", "y"):
        np.testing.assert_array_equal(a[name][oa], b[name][ob])
    fa, fb = store.fingerprints().compute()[oa], ref.fingerprints().compute()[ob]
    np.testing.assert_allclose(fa, fb, rtol=1e-5, atol=1e-5)


def queued(ids: set[str]) -> set[str]:
    """Which of these job ids SLURM still lists (pending, running, completing)."""
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    return ids & set(out.split())


def assert_jobs_gone(ids: set[str], within: float = 20.0) -> None:
    t0 = time.monotonic()
    while queued(ids) and time.monotonic() - t0 < within:
        time.sleep(0.5)
    assert not queued(ids), f"jobs {sorted(queued(ids))} still in the queue after the cluster closed"


def job_ids_in(log_dir: Path) -> set[str]:
    return {p.stem.rsplit("-", 1)[1] for p in log_dir.glob("dask-worker-*.err")}


def test_cli_ingest_and_query_on_slurm(slurm: Slurm, raster: Path, reference: dask_fp.Store, client,
                                       tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    store = tmp_path / "slurm.zarr"
    res = cli("ingest", raster, "--store", store, *COMMON, "--chunk", CHUNK, "--cluster", "slurm", "--jobs", 2,
              "--json", "--quiet", env=slurm.env(logs), cwd=tmp_path)
    assert "slurm cluster, 2 job(s) of 1 cores / 2GiB submitted; dashboard: http://" in res.stderr
    assert "first worker connected" in res.stderr
    info = json.loads(res.stdout)
    assert info["this_run"]["tiles_added"] == reference.committed
    # Two jobs ran a worker each, and none is left in the queue.
    ids = job_ids_in(logs)
    assert len(ids) == 2, res.stderr
    for i in ids:
        assert "Registered to" in (logs / f"dask-worker-{i}.err").read_text()
    assert_jobs_gone(ids)
    assert_same_store(dask_fp.open_store(store), reference)

    uid = int(reference.coords()["uid"][40])
    res = cli("query", store, "--uid", uid, "-k", 5, "--cluster", "slurm", "--json", env=slurm.env(logs),
              cwd=tmp_path)
    assert "dashboard: http://" in res.stderr
    hits = json.loads(res.stdout)["queries"][0]["hits"]
    expected = dask_fp.search(reference, uids=[uid], k=5).for_query(0)
    assert [h["uid"] for h in hits] == expected["uid"].tolist()
    np.testing.assert_allclose([h["distance"] for h in hits], expected["distance"], rtol=1e-4, atol=1e-3)
    assert_jobs_gone(job_ids_in(logs))


def test_scancel_one_worker_mid_ingest_still_gives_a_complete_store(
        slurm: Slurm, raster: Path, reference: dask_fp.Store, tmp_path: Path) -> None:
    import dask.config

    logs = tmp_path / "logs"
    config = {f"jobqueue.slurm.{k}": v for k, v in jobqueue_config(logs).items()}
    store = tmp_path / "cancelled.zarr"
    said: list[str] = []
    cancelled: dict[str, object] = {}

    with dask.config.set(config), get_client(ClusterOptions(cluster="slurm", jobs=2), log=said.append) as c:
        c.wait_for_workers(2, timeout=120)
        jobs = {str(j.job_id) for j in c.cluster.workers.values()}
        assert len(jobs) == 2

        def progress(done: int, total: int, rate: float) -> None:
            if not cancelled and done < total:
                victim = sorted(jobs)[0]
                subprocess.run(["scancel", victim], check=True, timeout=30)
                cancelled.update(job=victim, done=done, total=total)

        # This process also holds the session's LocalCluster client, which pytest entered (and so made
        # "current"); make the SLURM client current too, so that everything that asks Dask for the
        # default client (distributed.as_completed does) uses this client's event loop.
        with c.as_current():
            report = dask_fp.ingest([str(raster)], str(store),
                                    model=dask_fp.ModelOptions("resnet18", weights="random"),
                                    tiling=dask_fp.Tiling(TILE, STRIDE), raster=RasterOptions(chunk=CHUNK),
                                    client=c, progress=progress, log=said.append)
        workers_left = len(c.scheduler_info()["workers"])

    assert cancelled, "the ingest finished before a job could be cancelled"
    assert cancelled["done"] < cancelled["total"]
    assert workers_left == 1, "the cancelled job's worker should be gone"
    assert report.tiles == reference.committed
    assert_same_store(dask_fp.open_store(store), reference)
    assert_jobs_gone(jobs)
    assert any("dashboard: http://" in m for m in said)
