"""Reliability: worker loss, client crashes, concurrent writers and readers, bad inputs, fuzzing.

Everything runs on real processes: a multi-process LocalCluster, ``python -m
dask_fp.cli`` subprocesses killed with SIGKILL, real files damaged on disk.
The crash points inside the writer are reached with the store's test hook
(``DASK_FP_TEST_PAUSE``, see :mod:`dask_fp.store`). docs/operations.md lists
what each test shows.

Sizes are small (64 px tiles, stride 32, rasters of a few hundred pixels,
seeded random weights) so the file runs in a few minutes on two busy cores.
``DASK_FP_FUZZ_EXAMPLES=N`` runs the fuzz tests with N examples each.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from conftest import textured, write_tif

import dask_fp
from dask_fp.cli import main
from dask_fp.errors import StoreLockedError
from dask_fp.store import COORDS, LOCK_NAME, writer_lock

REPO = Path(__file__).resolve().parents[1]
MODEL = ["--weights", "random", "--seed", "7", "--tile", "64", "--stride", "32", "--chunk", "64"]
FUZZ_EXAMPLES = int(os.environ.get("DASK_FP_FUZZ_EXAMPLES", "25"))


# --------------------------------------------------------------------------- helpers


def sched(client) -> str:
    return client.scheduler.address


def ingest_args(rasters, store, client, *extra) -> list[str]:
    return ["ingest", *map(str, rasters), "--store", str(store), *MODEL, "--scheduler", sched(client), *extra]


def run_main(args: list[str], capfd) -> tuple[int, str, str]:
    """``dask_fp.cli.main(args)`` in this process; (exit code, stdout, stderr at the fd level)."""
    capfd.readouterr()
    with time_limit(120):
        rc = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return rc, out, err


class Timeout(BaseException):
    """A bounded step ran too long (a BaseException so no ``except Exception`` swallows it)."""


@contextmanager
def time_limit(seconds: float):
    def fire(signum, frame):
        raise Timeout(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def tree(root: Path) -> dict[str, str]:
    """Every file and directory under ``root`` with the sha256 of its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def rows_bytes(store: Path, n: int | None = None) -> dict[str, bytes]:
    """The bytes of the first ``n`` committed rows of every array."""
    st = dask_fp.open_store(store)
    n = st.committed if n is None else n
    return {k: np.asarray(st.arrays[k][:n]).tobytes() for k in ("fingerprint", *COORDS)}


def assert_same_store(got: Path, want: Path) -> None:
    """Same sources, same uids (no duplicates, none missing), same rows, fingerprints within 1e-5."""
    a, b = dask_fp.open_store(got), dask_fp.open_store(want)
    assert [s["sha256"] for s in a.sources] == [s["sha256"] for s in b.sources]
    assert [s["rows"] for s in a.sources] == [s["rows"] for s in b.sources]
    assert a.committed == b.committed > 0
    ca, cb = a.coords(), b.coords()
    assert len(np.unique(ca["uid"])) == a.committed
    np.testing.assert_array_equal(ca["uid"], cb["uid"])
    for k in ("source", "wy", "wx"):
        np.testing.assert_array_equal(ca[k], cb[k])
    for k in ("x", "y", "lon", "lat"):
        np.testing.assert_allclose(ca[k], cb[k], rtol=0, atol=1e-9)
    fa = np.asarray(a.arrays["fingerprint"][: a.committed])
    fb = np.asarray(b.arrays["fingerprint"][: b.committed])
    assert np.abs(fa - fb).max() <= 1e-5
    np.testing.assert_allclose(ca["norm2"], cb["norm2"], rtol=1e-5)


def assert_reader_sees(store: Path, sources: list[Path]) -> None:
    """Both readers (open_store, plain xarray) see exactly the committed ``sources``."""
    st = dask_fp.open_store(store)
    assert [Path(s["path"]).name for s in st.sources] == [p.name for p in sources]
    assert st.committed == sum(s["tiles"] for s in st.sources)
    assert len(np.unique(st.coords()["uid"])) == st.committed
    ds = xr.open_zarr(store)
    assert ds.sizes["tile"] == ds.attrs["committed"] == st.committed
    assert ds.attrs["committed_sources"] == ds.sizes.get("source_entry", 0) == len(sources)


class Cli:
    """``python -m dask_fp.cli ARGS`` as a subprocess whose stderr is watched as it runs."""

    def __init__(self, args: list, env: dict[str, str] | None = None) -> None:
        self.out = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dask_fp.cli", *map(str, args)], cwd=REPO, stdout=self.out,
            stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
        )
        self.err = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        fd = self.proc.stderr.fileno()
        while chunk := os.read(fd, 4096):
            self.err += chunk.decode(errors="replace")

    def wait_for(self, pattern: str | Callable[[str], bool], timeout: float = 180) -> None:
        test = pattern if callable(pattern) else (lambda e: re.search(pattern, e) is not None)
        deadline = time.monotonic() + timeout
        while not test(self.err):
            if self.proc.poll() is not None:
                self._reader.join(5)
                if test(self.err):
                    return
                raise AssertionError(f"exited {self.proc.returncode} before {pattern!r}:\n{self.err}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"no {pattern!r} after {timeout} s:\n{self.err}")
            time.sleep(0.02)

    def children(self) -> list[int]:
        import psutil

        return [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._reader.join(10)

    def finish(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        return rc

    @property
    def stdout(self) -> str:
        self.out.seek(0)
        return self.out.read().decode()


def progress_between() -> Callable[[str], bool]:
    """True once the progress bar (all sources of the run) shows some, but not all, windows done."""

    def test(err: str) -> bool:
        for done, total in re.findall(r"\] (\d+)/(\d+) windows", err):
            if 0 < int(done) < int(total):
                return True
        return False

    return test


def _fingerprint_tasks(dask_scheduler=None) -> dict[str, str]:
    """Each fingerprint task the scheduler holds: key -> state, who wants it, where it runs."""
    return {
        str(k): f"{ts.state} wants={[c.client_key for c in ts.who_wants]}"
        f" on={getattr(ts.processing_on, 'address', None)} dependents={len(ts.dependents)}"
        for k, ts in dask_scheduler.tasks.items() if "fingerprint-" in str(k)
    }


def wait_until(test: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not test():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def tif64(path: Path, data: np.ndarray, *, origin: tuple[float, float] = (400000.0, 3300000.0)) -> Path:
    """A tiled GeoTIFF with 64 px blocks, so ``--chunk 64`` gives one task per 64 px block
    (conftest's files have blocks of up to 256 px, which the reader keeps as chunks)."""
    import rasterio
    from rasterio.transform import from_origin

    b, h, w = data.shape
    with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=b, dtype=data.dtype,
                       compress="deflate", tiled=True, blockxsize=64, blockysize=64, crs="EPSG:32617",
                       transform=from_origin(*origin, 0.1, 0.1)) as ds:
        ds.write(data)
    return path


def nrows(snapshot: dict[str, bytes]) -> int:
    return len(snapshot["uid"]) // 8


@pytest.fixture(scope="module")
def rasters(tmp_path_factory):
    """Two 192 px GeoTIFFs: 25 windows each, in 9 blocks of 64 px."""
    d = tmp_path_factory.mktemp("rasters")
    return {
        "a": tif64(d / "a.tif", textured(192, 192, seed=21)),
        "b": tif64(d / "b.tif", textured(192, 192, seed=22), origin=(400100.0, 3300000.0)),
    }


# --------------------------------------------------------------------------- 1. worker loss


def test_worker_killed_mid_ingest_is_retried_and_store_equals_clean_run(tmp_path, client):
    """SIGKILL one worker of the (process) LocalCluster while fingerprint tasks run: the nanny
    restarts it, Dask reruns the lost tasks, and the store equals a clean run's."""
    tif = tif64(tmp_path / "big.tif", textured(256, 256, seed=11))  # 49 windows in 16 blocks
    opts = dict(model=dask_fp.ModelOptions("resnet18", weights="random", seed=7, threads=1),
                tiling=dask_fp.Tiling(64, 32), raster=dask_fp.RasterOptions(chunk=64))
    dask_fp.ingest([str(tif)], str(tmp_path / "clean.zarr"), client=client, progress=False, **opts)
    before = client.run(os.getpid)
    killed: list[tuple[str, int, list]] = []

    def kill_a_busy_worker(done: int, total: int, rate: float) -> None:
        if killed or done < total // 4:
            return
        busy = {a: ks for a, ks in client.processing().items() if any("fingerprint-" in str(k) for k in ks)}
        if busy:
            addr = next(iter(busy))
            os.kill(before[addr], signal.SIGKILL)
            killed.append((addr, before[addr], busy[addr]))

    try:
        rep = dask_fp.ingest([str(tif)], str(tmp_path / "lost.zarr"), client=client,
                             progress=kill_a_busy_worker, **opts)
    finally:
        client.wait_for_workers(2, timeout=120)
    assert killed, "no worker was busy with a fingerprint task?"
    assert rep.tiles == dask_fp.open_store(tmp_path / "clean.zarr").committed == 7 * 7
    assert killed[0][1] not in client.run(os.getpid).values()  # the nanny started a new process
    assert_same_store(tmp_path / "lost.zarr", tmp_path / "clean.zarr")


# --------------------------------------------------------------------------- 2. client crash


@pytest.mark.slow
def test_client_killed_at_each_point_then_rerun_finishes(rasters, tmp_path, client, capfd):
    """SIGKILL ``dask-fp ingest`` while fingerprinting, while writing rows and between rows
    and commit, first into a new store, then appending to a store that holds data.
    Readers in between see only committed sources; the old rows never change; the
    killed run's lock is cleared automatically (or by ``dask-fp unlock``); the local
    cluster of a killed client goes away; re-running finishes with a clean run's store."""
    a, b = rasters["a"], rasters["b"]
    clean, out = tmp_path / "clean.zarr", tmp_path / "s.zarr"
    rc, _, err = run_main(ingest_args([a, b], clean, client, "--quiet"), capfd)
    assert rc == 0, err
    pause = {"DASK_FP_TEST_PAUSE_SECONDS": "120"}
    own_cluster = ["ingest", a, b, "--store", out, *MODEL, "--workers", "1"]
    shared = ingest_args([a, b], out, client)

    # New store. 1) Killed while fingerprinting, on its own LocalCluster.
    run = Cli(own_cluster)
    run.wait_for(progress_between())
    workers = run.children()
    assert workers, "the LocalCluster has no worker processes?"
    run.kill()
    assert not wait_gone(workers, 30), "worker processes of the killed client linger"
    assert read_lock_pid(out) == run.proc.pid  # a stale lock is left behind
    assert_reader_sees(out, [])
    rc, stdout, err = run_main(["unlock", out], capfd)
    assert rc == 0 and f"removed lock of pid {run.proc.pid}" in stdout
    # 2) Killed while writing rows (fingerprints written, coordinates not yet).
    run = Cli(shared, {**pause, "DASK_FP_TEST_PAUSE": "rows"})
    run.wait_for("dask-fp-test-pause: rows")
    run.kill()
    assert_reader_sees(out, [])
    # 3) Killed after every row was written, before the commit.
    run = Cli(shared, {**pause, "DASK_FP_TEST_PAUSE": "before-commit"})
    run.wait_for("dask-fp-test-pause: before-commit")
    assert "removed the stale lock" in run.err  # of run 2, automatically
    run.kill()
    assert_reader_sees(out, [])

    # Append. 4) a is committed, the run is killed right after that commit (a and b are in
    # flight together, so b's blocks or rows are under way; b is not committed).
    gc.collect()
    others = set(client.run_on_scheduler(_fingerprint_tasks))  # held by this session's other tests, if any
    run = Cli(shared, {**pause, "DASK_FP_TEST_PAUSE": "committed"})
    run.wait_for("dask-fp-test-pause: committed")
    assert set(client.run_on_scheduler(_fingerprint_tasks)) - others, "the killed run had no block tasks?"
    run.kill()
    assert_reader_sees(out, [a])
    # The shared scheduler notices the dead client and drops its tasks.

    def dead_client_tasks() -> dict[str, str]:
        return {k: v for k, v in client.run_on_scheduler(_fingerprint_tasks).items() if k not in others}

    assert wait_until(lambda: not dead_client_tasks(), 60), f"tasks of a dead client linger: {dead_client_tasks()}"
    old = rows_bytes(out)
    # 5) Killed while writing b's rows, 6) between b's rows and its commit.
    for point in ("rows", "before-commit"):
        run = Cli(shared, {**pause, "DASK_FP_TEST_PAUSE": point})
        run.wait_for(f"dask-fp-test-pause: {point}")
        run.kill()
        assert_reader_sees(out, [a])
        assert rows_bytes(out) == old
    # 7) The same command finishes the job.
    run = Cli([*shared, "--json", "--quiet"])
    assert run.finish() == 0, run.err
    assert "skip:" in run.err and json.loads(run.stdout)["sources"] == 2
    assert not (out / LOCK_NAME).exists() and not list(out.rglob("*.partial"))
    assert rows_bytes(out, nrows(old)) == old
    assert_reader_sees(out, [a, b])
    assert_same_store(out, clean)


def read_lock_pid(store: Path) -> int | None:
    try:
        return json.loads((store / LOCK_NAME).read_text())["pid"]
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------- 3. concurrency


def test_second_writer_is_refused_naming_the_holder_or_waits(rasters, tmp_path, client, capfd):
    a, b = rasters["a"], rasters["b"]
    out = tmp_path / "w.zarr"
    release = tmp_path / "release"
    release.touch()
    holder = Cli([*ingest_args([a], out, client), "--quiet"],
                 {"DASK_FP_TEST_PAUSE": "before-commit", "DASK_FP_TEST_RELEASE": str(release)})
    holder.wait_for("dask-fp-test-pause: before-commit")
    # Asked to wait, a second writer waits until the first one has committed.
    waiter = Cli([*ingest_args([b], out, client), "--quiet", "--wait", "300"])
    # Not asked to wait, it is refused at once, with the holder named.
    rc, _, err = run_main(ingest_args([b], out, client, "--quiet"), capfd)
    assert rc == 1
    assert re.search(rf"dask-fp: error: .* is being written by another ingest: pid {holder.proc.pid} on"
                     rf" {re.escape(socket.gethostname())} since .*\(.*dask_fp/cli\.py ingest .*a\.tif", err), err
    assert "--wait" in err and "Traceback" not in err
    rc, _, err = run_main(["unlock", out], capfd)  # a live holder is not removed without --force
    assert rc == 1 and f"locked by a live process (pid {holder.proc.pid}" in err
    assert_reader_sees(out, [])
    waiter.wait_for(rf"is being written by pid {holder.proc.pid} .*; waiting up to 300 s")
    release.unlink()
    assert holder.finish() == 0, holder.err
    assert waiter.finish() == 0, waiter.err
    assert_reader_sees(out, [a, b])


def test_stale_lock_removal_is_race_free(tmp_path):
    """Eight writers find the same stale lock at once: each takes the lock in turn, never two
    together (the stale lock is removed under a local flock, then taken with an atomic link)."""
    out = tmp_path / "race.zarr"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (out / LOCK_NAME).write_text(json.dumps({"pid": int(dead), "host": socket.gethostname(),
                                             "started": "then", "argv": "killed"}))
    held, spans, errors = [0], [], []
    guard = threading.Lock()

    def writer() -> None:
        try:
            with writer_lock(out, wait=60, poll=0.01):
                with guard:
                    held[0] += 1
                    overlap = held[0] > 1
                time.sleep(0.05)
                with guard:
                    held[0] -= 1
                spans.append(overlap)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors and len(spans) == 8 and not any(spans)
    assert not (out / LOCK_NAME).exists() and [p.name for p in out.iterdir()] == []


def test_reused_pid_and_unreadable_lock(tmp_path, capfd):
    out = tmp_path / "reuse.zarr"
    out.mkdir()
    # The pid is alive (it is ours), but it started long after the lock was taken: reused.
    (out / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                             "started": "1970", "argv": "x", "pid_started": 1.0}))
    with writer_lock(out):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    (out / LOCK_NAME).write_text("")  # a lock we cannot read is never assumed stale
    with pytest.raises(StoreLockedError, match="unreadable lock file"):
        with writer_lock(out):
            pass
    rc, _, err = run_main(["unlock", out, "--force"], capfd)
    assert rc == 0 and not (out / LOCK_NAME).exists()


def test_queries_during_an_append_see_committed_snapshots(rasters, tmp_path, client, capfd):
    """Query in a loop while an ingest subprocess appends four sources: the store opens every
    time, xarray and open_store agree, and every hit is a committed row."""
    import dask

    out = tmp_path / "q.zarr"
    rc, _, err = run_main(ingest_args([rasters["a"]], out, client, "--quiet"), capfd)
    assert rc == 0, err
    extra = [write_tif(tmp_path / f"c{i}.tif", textured(128, 160, seed=40 + i)) for i in range(4)]
    uid0 = int(dask_fp.open_store(out).coords()["uid"][0])
    run = Cli([*ingest_args(extra, out, client), "--quiet"])
    seen, queries = set(), 0
    with dask.config.set(scheduler="threads"):
        while True:
            done = run.proc.poll() is not None
            st = dask_fp.open_store(out)
            n = st.committed
            ds = xr.open_zarr(out)
            assert ds.sizes["tile"] == ds.attrs["committed"] >= n  # xarray's own, maybe newer, snapshot
            assert n == sum(s["tiles"] for s in st.sources)
            assert [s["rows"][0] for s in st.sources] == [0, *[s["rows"][1] for s in st.sources[:-1]]]
            hits = dask_fp.search(st, uids=[uid0], k=8, dedup=False, include_self=True)
            assert len(hits.table) == min(8, n) and (hits.table["row"] < n).all()
            assert hits.table["uid"].isin(st.coords()["uid"]).all()
            seen.add(n)
            queries += 1
            if done:
                break
    assert run.finish() == 0, run.err
    assert len(dask_fp.open_store(out).sources) == 5
    assert queries >= 3 and len(seen) >= 2, (queries, seen)


# --------------------------------------------------------------------------- 4. bad inputs


def _raster(name: str, data: np.ndarray, **kw) -> Callable[[Path, Path], dict]:
    def setup(tmp: Path, store: Path) -> dict:
        return {"in": write_tif(tmp / name, data, **kw)}

    return setup


def _file(name: str, content: bytes | Callable[[Path], bytes]) -> Callable[[Path, Path], dict]:
    def setup(tmp: Path, store: Path) -> dict:
        p = tmp / name
        p.write_bytes(content(tmp) if callable(content) else content)
        return {"in": p}

    return setup


def _good_tif_bytes(tmp: Path, *, blocks: bool = False) -> bytes:
    import rasterio

    p = tmp / "_good.tif"
    profile = {"driver": "GTiff", "height": 256, "width": 256, "count": 3, "dtype": "uint8",
               "compress": "deflate", "tiled": True, "blockxsize": 64, "blockysize": 64}
    with rasterio.open(p, "w", **profile) as ds:
        ds.write(textured(256, 256, seed=9))
    return p.read_bytes()


def _png_bytes(tmp: Path) -> bytes:
    from PIL import Image

    Image.fromarray(textured(96, 96, seed=3).transpose(1, 2, 0)).save(tmp / "_x.png")
    return (tmp / "_x.png").read_bytes()


def _damaged_middle_tile(tmp: Path) -> bytes:
    """Header and last tile intact (so inspection passes); one tile in the middle garbled."""
    import rasterio

    raw = bytearray(_good_tif_bytes(tmp))
    with rasterio.open(tmp / "_good.tif") as ds:
        off = int(ds.get_tag_item("BLOCK_OFFSET_1_1", "TIFF", bidx=1))
    raw[off : off + 200] = bytes(200)
    return bytes(raw)


def _directory(tmp: Path, store: Path) -> dict:
    (tmp / "folder").mkdir()
    return {"in": tmp / "folder"}


def _nothing(tmp: Path, store: Path) -> dict:
    return {"in": tmp / "missing.tif"}


def _delete(rel: str) -> Callable[[Path, Path], dict]:
    def setup(tmp: Path, store: Path) -> dict:
        (store / rel).unlink()
        return {"in": write_tif(tmp / "c.tif", textured(128, 128, seed=5))}

    return setup


def _garble(rel: str) -> Callable[[Path, Path], dict]:
    def setup(tmp: Path, store: Path) -> dict:
        (store / rel).write_text('{"zarr_format": 3, "node_type": ')
        return {"in": write_tif(tmp / "c.tif", textured(128, 128, seed=5))}

    return setup


def _store_is_file(tmp: Path, store: Path) -> dict:
    f = tmp / "file.zarr"
    f.write_text("not a store")
    return {"in": write_tif(tmp / "c.tif", textured(128, 128, seed=5)), "store": f}


def _new_raster(tmp: Path, store: Path) -> dict:
    return {"in": write_tif(tmp / "c.tif", textured(128, 128, seed=5))}


def _not_an_image(tmp: Path, store: Path) -> dict:
    (tmp / "chip.png").write_text("this is not a picture")
    return {"in": tmp / "chip.png"}


def _black(h: int, w: int) -> np.ndarray:
    return np.zeros((3, h, w), np.uint8)


ING = ["ingest", "{in}", "--store", "{store}", *MODEL, "--quiet"]
Q = ["query", "{store}"]

# name, setup(tmp, store) -> placeholders, CLI args, expected exit code, regex on stderr.
# Exit 1: one `dask-fp: error:` line and a byte-identical store. Exit 0: the regex (a
# warning) matches exactly once, and the rows already in the store are byte-identical.
BAD_INPUTS = [
    ("empty file", _file("empty.tif", b""), ING, 1, r"empty\.tif: the file is empty \(0 bytes\)"),
    ("truncated GeoTIFF", _file("cut.tif", lambda t: _good_tif_bytes(t)[:3000]), ING, 1,
     r"cut\.tif: not a readable raster \(.*\)\. Is it a GeoTIFF/COG, and is it complete\?"),
    ("garbled tile inside", _file("inner.tif", _damaged_middle_tile), ING, 1,
     r"inner\.tif: block \(\d+, \d+\) .* failed: .* Nothing of it was committed"),
    ("PNG named .tif", _file("photo.tif", _png_bytes), ING, 1,
     r"photo\.tif: named like a GeoTIFF, but its content is a PNG file"),
    ("text named .tif", _file("notes.tif", b"hello, I am text\n" * 10), ING, 1,
     r"notes\.tif: not a readable raster .*not recognized"),
    ("directory", _directory, ING, 1, r"folder: is a directory, not a raster file"),
    ("missing path", _nothing, ING, 1, r"missing\.tif: no such file"),
    ("1 band", _raster("gray.tif", textured(128, 128, bands=1)), ING, 1,
     r"gray\.tif: single-band raster .*--replicate"),
    ("2 bands", _raster("two.tif", textured(128, 128, bands=2)), ING, 1, r"two\.tif: 2-band raster .*--bands"),
    ("16-bit, no --scale", _raster("u16.tif", textured(128, 128, dtype="uint16")), ING, 1,
     r"u16\.tif: data type uint16 needs a scaling to 8 bits\. Pass --scale"),
    ("float, no --scale", _raster("f32.tif", textured(128, 128, dtype="float32")), ING, 1,
     r"f32\.tif: data type float32 needs a scaling"),
    ("smaller than a tile", _raster("tiny.tif", textured(48, 60)), ING, 0,
     r"warning: .*tiny\.tif \(48x60 px\) is smaller than one 64 px tile; it adds no tiles"),
    ("all black", _raster("black.tif", _black(128, 128)), ING, 0,
     r"warning: .*black\.tif: all 9 windows are empty"),
    ("no CRS", _raster("plain.tif", textured(128, 128, seed=6), crs=None), ING, 0,
     r"note: .*plain\.tif has no CRS; tiles get pixel coordinates and NaN lon/lat"),
    ("store of another tiling", _new_raster, [*ING, "--tile", "128", "--stride", "64"], 1,
     r"other settings.*tile: store has 64, this run uses 128"),
    ("store of other weights", _new_raster, [*ING, "--seed", "8"], 1, r"other settings.*weights_sha256"),
    ("store of another model", _new_raster, [*ING, "--model", "efficientnet-lite0"], 1,
     r"model: store has 'resnet18', this run uses 'efficientnet-lite0'"),
    ("store path is a file", _store_is_file, ING, 1, r"file\.zarr is a file, not a fingerprint store"),
    ("deleted chunk: ingest", _delete("fingerprint/c/0/0"), ING, 1,
     r"chunk file\(s\) fingerprint/c/0/0 missing \(rows 0\.\.24 .*a\.tif\); the store is damaged"),
    ("deleted chunk: info", _delete("fingerprint/c/0/0"), ["info", "{store}"], 1,
     r"chunk file\(s\) fingerprint/c/0/0 missing"),
    ("deleted chunk: query", _delete("fingerprint/c/0/0"), [*Q, "--uid", "1", "-k", "3"], 1,
     r"chunk file\(s\) fingerprint/c/0/0 missing"),
    ("deleted coordinate chunk", _delete("uid/c/0"), ["info", "{store}"], 1, r"chunk file\(s\) uid/c/0 missing"),
    ("damaged zarr.json: ingest", _garble("zarr.json"), ING, 1, r"not a readable Zarr v3 store"),
    ("damaged zarr.json: info", _garble("zarr.json"), ["info", "{store}"], 1, r"not a readable Zarr v3 store"),
    ("damaged zarr.json: query", _garble("zarr.json"), [*Q, "--uid", "1"], 1, r"not a readable Zarr v3 store"),
    ("damaged array metadata", _garble("norm2/zarr.json"), ["info", "{store}"], 1,
     r"metadata of array 'norm2' is unreadable"),
    ("no store at all", _new_raster, ["info", "{in}.zarr"], 1, r"no fingerprint store here"),
    ("query image not an image", _not_an_image, [*Q, "--image", "{in}"], 1,
     r"query image .*chip\.png: not an image Pillow can read"),
    ("query image missing", _nothing, [*Q, "--image", "{in}"], 1, r"query image .*missing\.tif: no such file"),
    ("uid not in the store", _new_raster, [*Q, "--uid", "123456789"], 1,
     r"uid 123456789 \(source 0, window 58,\d+\) is not in"),
    ("lon/lat outside every tile", _new_raster, [*Q, "--lonlat", "10,10"], 1,
     r"no stored tile contains lon/lat 10\.0,10\.0"),
    ("lon/lat not degrees", _new_raster, [*Q, "--lonlat", "200,95"], 1, r"is not a longitude,latitude pair"),
    ("k = 0", _new_raster, [*Q, "--uid", "{uid}", "-k", "0"], 1, r"k must be a whole number >= 1, got 0"),
    ("k < 0", _new_raster, [*Q, "--uid", "{uid}", "-k", "-3"], 1, r"k must be a whole number >= 1, got -3"),
    ("no query", _new_raster, Q, 1, r"no query given"),
]


@pytest.fixture(scope="module")
def base_store(rasters, tmp_path_factory, client):
    """A store holding a.tif (25 tiles), made by the CLI; each case gets a copy."""
    out = tmp_path_factory.mktemp("base") / "store.zarr"
    assert main(ingest_args([rasters["a"]], out, client, "--quiet")) == 0
    return out


@pytest.mark.parametrize("name,setup,args,code,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(name, setup, args, code, message, base_store, tmp_path, client, capfd):
    store = tmp_path / "store.zarr"
    shutil.copytree(base_store, store)
    old = rows_bytes(store)
    ph = {"store": store, "uid": int(dask_fp.open_store(store).coords()["uid"][0])}
    ph.update(setup(tmp_path, store))
    target = Path(ph["store"])
    before = tree(target) if target.is_dir() else target.read_bytes()
    argv = [a.format(**ph) for a in args]
    if argv[0] in ("ingest", "query"):
        argv += ["--scheduler", sched(client)]
    rc, out, err = run_main(argv, capfd)
    assert rc == code, f"exit {rc}\n{out}\n{err}"
    assert "Traceback" not in err and "Traceback" not in out
    if code == 1:
        lines = [ln for ln in err.splitlines() if ln.startswith("dask-fp: error: ")]
        assert len(lines) == 1, err
        assert re.search(message, lines[0]), lines[0]
        assert (tree(target) if target.is_dir() else target.read_bytes()) == before, "the store changed"
    else:
        assert len(re.findall(message, err)) == 1, err
        assert rows_bytes(store, nrows(old)) == old
        if name == "no CRS":
            st = dask_fp.open_store(store)
            assert np.isnan(st.coords()["lon"][25:]).all() and st.committed > 25


# --------------------------------------------------------------------------- 5. fuzzing


def _fuzz_settings():
    from hypothesis import HealthCheck, settings

    return settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=False,
                    suppress_health_check=list(HealthCheck))


FUZZ_LOG = os.environ.get("DASK_FP_FUZZ_LOG")


def _fuzz_record(kind: str, rc: int, err: str) -> None:
    if FUZZ_LOG:
        last = (err.strip().splitlines() or [""])[-1][:160]
        with open(FUZZ_LOG, "a") as f:
            f.write(json.dumps({"kind": kind, "rc": rc, "last": last}) + "\n")


def _check_outcome(rc: int, out: str, err: str) -> None:
    assert rc in (0, 1), f"exit {rc}\n{err}"
    assert "Traceback" not in err and "Traceback" not in out, err
    if rc == 1:
        assert err.strip().splitlines()[-1].startswith("dask-fp: error: "), err


def test_fuzz_ingest(base_store, tmp_path_factory, client, capfd):
    """Random bytes and randomly damaged GeoTIFFs into ``dask-fp ingest``: exit 0 or 1, never a
    traceback or a hang; a refused input leaves the store byte-identical, an accepted one
    leaves the rows already there byte-identical."""
    from hypothesis import given
    from hypothesis import strategies as st

    work = tmp_path_factory.mktemp("fuzz-ingest")
    seeds = {"deflate": _good_tif_bytes(work)}
    import rasterio

    with rasterio.open(work / "_plain.tif", "w", driver="GTiff", height=128, width=160, count=3,
                       dtype="uint8") as ds:  # uncompressed, striped: most edits hit pixels
        ds.write(textured(128, 160, seed=8))
    seeds["plain"] = (work / "_plain.tif").read_bytes()
    old = rows_bytes(base_store)
    base_tree = tree(base_store)
    ops = st.sampled_from(["flip"] * 4 + ["set"] * 3 + ["zero"] * 2 + ["cut"])
    edits = st.lists(st.tuples(ops, st.integers(0, 2**31), st.integers(0, 255)), min_size=1, max_size=6)
    data = st.tuples(st.integers(0, 3), st.binary(max_size=2048), st.sampled_from(sorted(seeds)), edits).map(
        lambda t: ("edit", (t[2], t[3])) if t[0] < 3 else ("bytes", t[1]))
    n = [0]

    @_fuzz_settings()
    @given(data)
    def check(item):
        kind, payload = item
        if kind == "bytes":
            raw = payload
        else:
            which, ops = payload
            buf = bytearray(seeds[which])
            for op, where, value in ops:
                if not buf:
                    break
                i = where % len(buf)
                if op == "flip":
                    buf[i] ^= 1 << (value % 8)
                elif op == "set":
                    buf[i] = value
                elif op == "zero":
                    buf[i : i + value] = bytes(len(buf[i : i + value]))
                else:
                    del buf[i:]
            raw = bytes(buf)
        n[0] += 1
        d = work / f"case{n[0]}"
        d.mkdir()
        (d / "in.tif").write_bytes(raw)
        store = d / "store.zarr"
        shutil.copytree(base_store, store)
        rc, out, err = run_main(["ingest", d / "in.tif", "--store", store, *MODEL, "--quiet",
                                 "--scheduler", sched(client)], capfd)
        _fuzz_record(f"ingest-{kind}", rc, err)
        _check_outcome(rc, out, err)
        if rc == 1:
            assert tree(store) == base_tree, err
        else:
            assert rows_bytes(store, nrows(old)) == old
            assert len(dask_fp.open_store(store).sources) == 2
        shutil.rmtree(d)

    check()


def test_fuzz_query(base_store, tmp_path_factory, client, capfd):
    """Random arguments to ``dask-fp query``: exit 0 or 1, never a traceback or a hang, and
    the store is never changed."""
    from hypothesis import given
    from hypothesis import strategies as st

    work = tmp_path_factory.mktemp("fuzz-query")
    before = tree(base_store)
    coords = dask_fp.open_store(base_store).coords()
    png = _png_bytes(work)
    # Mostly valid values (so the search itself runs), one in four anything-goes.
    def mostly(good, bad):
        return st.tuples(st.integers(0, 3), good, bad).map(lambda t: t[1] if t[0] < 3 else t[2])

    uids = mostly(st.sampled_from([int(u) for u in coords["uid"]]), st.integers(-2**63, 2**64))
    inside = st.sampled_from([(float(x), float(y)) for x, y in zip(coords["lon"], coords["lat"], strict=True)])
    lonlats = mostly(inside, st.tuples(st.floats(), st.floats()) | st.tuples(st.floats(-180, 180), st.floats(-90, 90)))
    images = mostly(st.just(png), st.binary(max_size=512) | st.tuples(st.integers(0, len(png) - 1), st.integers(
        0, 255)).map(lambda t: png[: t[0]] + bytes([t[1]]) + png[t[0] + 1 :]))
    ks = mostly(st.integers(1, 30), st.integers(-3, 0) | st.integers(-2**70, 2**70))
    query = st.fixed_dictionaries({
        "uid": st.lists(uids, max_size=2), "lonlat": st.lists(lonlats, max_size=2),
        "image": st.lists(images, max_size=2), "k": ks,
        "flags": st.lists(st.sampled_from(["--no-dedup", "--include-self", "--json", "--persist"]),
                          unique=True),
        "split": st.none() | st.integers(2, 6), "out": st.booleans(),
    })
    n = [0]

    @_fuzz_settings()
    @given(query)
    def check(q):
        n[0] += 1
        d = work / f"q{n[0]}"
        d.mkdir()
        args = ["query", base_store, "-k", str(q["k"]), *q["flags"], "--scheduler", sched(client)]
        for u in q["uid"]:
            args += ["--uid", str(u)]
        for lon, lat in q["lonlat"]:
            args += ["--lonlat", f"{lon!r},{lat!r}"]
        for i, img in enumerate(q["image"]):
            (d / f"img{i}.png").write_bytes(img)
            args += ["--image", d / f"img{i}.png"]
        if q["split"]:
            args += ["--split-every", str(q["split"])]
        if q["out"]:
            args += ["--out", d / "out"]
        rc, out, err = run_main(args, capfd)
        _fuzz_record("query", rc, err)
        _check_outcome(rc, out, err)
        assert tree(base_store) == before
        shutil.rmtree(d)

    check()
