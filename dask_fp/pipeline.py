"""The client side of ingest: all sources' blocks in flight, row offsets, write tasks, commits.

Block tasks (:func:`dask_fp.fingerprint.block_kernel`) keep their results on
the workers; the client only receives each block's counts (a tiny task per
block). As counts arrive in (source, block) order the client assigns row
offsets (prefix sums) and, as soon as the rows of a write unit (a Zarr shard,
or chunk when unsharded) are all known, or a source's last block is counted,
submits one :func:`dask_fp.store.region.write_rows` task whose inputs are the
overlapping block futures (worker-to-worker transfer). Writes to the same unit
are chained, so no two running tasks touch the same file. Sources are
committed in order, several at once when they are ready together.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dask.sizeof import sizeof

from .errors import ClusterError, DaskFpError, RasterError, StoreError
from .fingerprint import BlockPlan, BlockResult
from .inspection import RasterSpec
from .store.region import Piece, SourceGeo, write_granularity, write_rows
from .store.testhook import test_pause

Progress = Callable[[int, int, float], None]


@dataclass
class SourceJob:
    """One source of an ingest run: its record, its block tasks, and where its rows went."""

    spec: RasterSpec
    index: int
    entry: dict[str, Any]
    windows: int
    tasks: list[tuple[BlockPlan, Any]]
    geo: SourceGeo
    start: int | None = None
    stop: int | None = None
    committed: bool = False
    seconds: float = 0.0
    precisions: set[str] = field(default_factory=set)  # as the workers' models report them
    t0: float = field(default_factory=time.perf_counter)


def block_summary(res: BlockResult) -> tuple[int, int, str | None]:
    """What the client learns of a block: windows owned, windows kept, the model's precision."""
    return int(res.n_windows), len(res.wy), res.precision


def in_flight(client: Any, blocks_per_row: int) -> int:
    """Blocks submitted ahead of the row cursor: a row of blocks plus two per worker thread."""
    try:
        threads = sum(client.nthreads().values())
    except Exception:  # a cluster still starting
        threads = 0
    return blocks_per_row + 2 * max(threads, 2)


def describe_failure(e: BaseException, where: str) -> DaskFpError:
    """A specific error for a failed block or write task (``where`` names the file and block).

    A worker that died under the task (:class:`distributed.scheduler.KilledWorker`), or a
    result lost on the way (a closed connection; a future the scheduler cancelled, which is
    how a lost worker can also show) is a :class:`ClusterError`; running out of memory (the
    host's, or CUDA's ``torch.OutOfMemoryError``) says which memory and what to shrink; a
    :class:`StoreError` from a write task stays one; anything else is the input's fault
    (a :class:`RasterError`). No path claims the store is damaged: uncommitted rows are
    rolled back by the caller, committed ones are untouched.
    """
    from distributed.client import FutureCancelledError
    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker

    name = type(e).__name__
    text = str(e) if type(e) is Exception else f"{name}: {e}"
    intact = "Nothing of this source was committed and the store is intact; re-run the same command to resume."
    if isinstance(e, KilledWorker):
        return ClusterError(
            f"{where}: a worker died running it; Dask ran it on {e.allowed_failures + 1} worker(s) and each one"
            f" died (the last: {e.last_worker.address}), and gives up on a task after"
            f" distributed.scheduler.allowed-failures = {e.allowed_failures} worker deaths. A worker that dies"
            f" mid-task was usually killed for memory (see its log or the nanny's). {intact}")
    if isinstance(e, CommClosedError | FutureCancelledError):
        return ClusterError(f"{where}: its result was lost before the client got it ({text}): a worker died, the"
                            f" scheduler restarted, or the connection to it closed. Check that the scheduler and"
                            f" the workers are running (and their logs). {intact}")
    cuda = "cuda" in str(e).lower() or type(e).__module__.startswith("torch")
    if isinstance(e, MemoryError) or "out of memory" in str(e).lower() or name == "OutOfMemoryError":
        if cuda:
            return DaskFpError(f"{where}: the GPU ran out of memory ({_first(text)}). Use a smaller --batch-size"
                               f" (windows per forward pass), or fewer model tasks per GPU. {intact}")
        return DaskFpError(f"{where}: ran out of memory ({_first(text)}). Use a smaller --chunk or --batch-size,"
                           f" or fewer threads per worker. {intact}")
    if isinstance(e, StoreError):
        return StoreError(f"{where}: {e}")
    return RasterError(f"{where} failed: {text}. Is the file complete and readable? Nothing of it was committed.")


def _first(text: str) -> str:
    """The first line of an exception's text (CUDA's messages run on for lines)."""
    return text.strip().splitlines()[0] if text.strip() else text


class Pipeline:
    """Run every job's blocks through one sliding window and commit sources in order."""

    def __init__(self, client: Any, writer: Any, jobs: list[SourceJob], *, progress: Progress | None,
                 say: Callable[[str], None]) -> None:
        self.client, self.w, self.jobs, self.progress, self.say = client, writer, jobs, progress, say
        self.blocks = [(j, plan, task) for j, job in enumerate(jobs) for plan, task in job.tasks]
        self.last_block = {j: max((b for b, x in enumerate(self.blocks) if x[0] == j), default=-1)
                           for j in range(len(jobs))}
        self.unit = write_granularity(writer.arrays["fingerprint"])
        self.holder = writer.holder
        self.pos = writer.committed  # next row to assign
        self.pending: list[tuple[Piece, Any]] = []  # assigned rows not yet handed to a write task
        self.pending_start = self.pos
        self.writes: dict[str, tuple[int, Any]] = {}  # outstanding write tasks: key -> (start, future)
        self.chain: dict[int, Any] = {}  # last write task of each unit
        self.counts: dict[int, tuple[int, int]] = {}
        self.futs: dict[int, Any] = {}
        self.summaries: dict[int, Any] = {}  # block -> its summary future, until counted
        self.nxt = 0
        self.cur_job = 0
        self.next_commit = 0
        self.done = self.kept = 0
        self.total = sum(j.windows for j in jobs)
        self.t0 = time.perf_counter()
        self.wrote_once = False
        self.deferred = False  # a partial write waits for the running write of its unit
        self.received = 0  # dask.sizeof of every result the client received (counts, row numbers)

    # ------------------------------------------------------------------ driving
    def run(self) -> None:
        from distributed import as_completed

        self.ac = as_completed([], loop=self.client.loop)
        self.kind: dict[str, tuple[str, int]] = {}
        ncols = max((1 + max(p.index[1] for p, _ in j.tasks) for j in self.jobs if j.tasks), default=1)
        self.limit = in_flight(self.client, ncols)
        self.submitted = 0
        try:
            self._fill()
            self._advance()  # sources without blocks
            for fut in self.ac:
                kind, i = self.kind.pop(fut.key)
                if kind == "count":
                    self._on_count(fut, i)
                else:
                    self._on_write(fut)
                self._fill()
            if self.next_commit != len(self.jobs):  # pragma: no cover - a bookkeeping bug
                raise StoreError(f"{self.w.path}: ingest ended with sources not committed.")
        except BaseException:
            self._abort()
            raise
        finally:
            self._release()

    def _release(self) -> None:
        """Drop every future this run holds, so the scheduler forgets its tasks now.

        Otherwise a finished write kept as a unit's last write would keep its block
        tasks on the scheduler for as long as this object lives, which after a
        failure is until garbage collection frees the traceback's frames.
        """
        for held in (self.futs, self.summaries, self.writes, self.chain, self.kind):
            held.clear()
        self.pending = []
        self.ac.clear()

    def _fill(self) -> None:
        while self.submitted < len(self.blocks) and self.submitted - self.nxt < self.limit:
            b = self.submitted
            fut = self.client.compute(self.blocks[b][2])
            cnt = self.client.submit(block_summary, fut, key=f"block-summary-{fut.key}")
            self.futs[b] = fut
            self.summaries[b] = cnt
            self.kind[cnt.key] = ("count", b)
            self.ac.add(cnt)
            self.submitted += 1

    def _on_count(self, fut: Any, b: int) -> None:
        try:
            got = fut.result()
            n_windows, kept, precision = got
        except DaskFpError:
            raise
        except Exception as e:
            j, plan, _ = self.blocks[b]
            where = (f"{self.jobs[j].spec.path}: block {plan.index} (windows {plan.wy0}..{plan.wy1 - 1} x"
                     f" {plan.wx0}..{plan.wx1 - 1})")
            raise describe_failure(e, where) from None
        self.received += sizeof(got)
        self.summaries.pop(b, None)
        self.counts[b] = (n_windows, kept)
        if precision is not None:
            self.jobs[self.blocks[b][0]].precisions.add(precision)
        self.done += n_windows
        self.kept += kept
        if self.progress is not None:
            self.progress(self.done, self.total, self.kept / max(time.perf_counter() - self.t0, 1e-9))
        self._advance()

    def _advance(self) -> None:
        """Assign rows to the counted blocks at the cursor; submit writes; commit what is ready."""
        while self.cur_job < len(self.jobs):
            j = self.cur_job
            job = self.jobs[j]
            if job.start is None:
                job.start = self.pos
            if self.last_block[j] < 0:  # a source without windows: rows [pos, pos)
                job.stop = self.pos
                self.cur_job += 1
                continue
            b = self.nxt
            if b not in self.counts:
                break
            _, kept = self.counts.pop(b)
            fut = self.futs.pop(b)
            if kept:
                self.pending.append((Piece(self.pos, 0, kept, job.geo), fut))
                self.pos += kept
            self.nxt += 1
            if b == self.last_block[j]:
                job.stop = self.pos
                self.cur_job += 1
                self._flush(partial=True)
            else:
                self._flush(partial=False)
        self._commit_ready()

    def _flush(self, *, partial: bool) -> None:
        """Hand the pending rows to write tasks: every complete unit, and the rest if ``partial``."""
        while self.pending:
            unit_end = (self.pending_start // self.unit + 1) * self.unit
            if self.pos >= unit_end:
                self._submit_write(self.pending_start, unit_end)
            elif partial and self.pos > self.pending_start:
                busy = self.chain.get(self.pending_start // self.unit)
                if busy is not None and busy.key in self.writes:
                    # A write to this unit is still running: send these rows with the next
                    # one (when it finishes), so many small sources share writes and commits.
                    self.deferred = True
                    break
                self.deferred = False
                self._submit_write(self.pending_start, self.pos)
            else:
                break

    def _submit_write(self, start: int, stop: int) -> None:
        pieces: list[Piece] = []
        futs: list[Any] = []
        rest: list[tuple[Piece, Any]] = []
        for p, f in self.pending:
            lo_row, hi_row = p.row, p.row + (p.hi - p.lo)
            a, b = max(lo_row, start), min(hi_row, stop)
            if a < b:
                pieces.append(Piece(a, p.lo + a - lo_row, p.lo + b - lo_row, p.geo))
                futs.append(f)
            if hi_row > stop:
                rest.append((p, f))
        self.w.grow_to(-(-stop // self.unit) * self.unit)
        unit = start // self.unit
        fut = self.client.submit(
            write_rows, str(self.w.path), self.holder, start, pieces, futs, self.w.settings.dtype,
            self.w.settings.feature_dim, after=self.chain.get(unit), pure=False, key=f"write-rows-{unit}-{start}"
            f"-{id(self)}-{time.monotonic_ns()}",
        )
        self.chain[unit] = fut
        self.writes[fut.key] = (start, fut)
        self.kind[fut.key] = ("write", start)
        self.ac.add(fut)
        self.pending = rest
        self.pending_start = stop

    def _on_write(self, fut: Any) -> None:
        try:
            got = fut.result()
        except DaskFpError:
            raise
        except Exception as e:
            raise describe_failure(e, f"{self.w.path}: writing rows from {self.writes[fut.key][0]}") from None
        self.received += sizeof(got)
        self.writes.pop(fut.key, None)
        if self.deferred:
            self._flush(partial=True)
        if not self.wrote_once:
            self.wrote_once = True
            test_pause("rows")
        self._commit_ready()

    def _commit_ready(self) -> None:
        """Commit, in one update, every source in order whose rows are all on disk."""
        durable = min([s for s, _ in self.writes.values()] + [self.pending_start if self.pending else self.pos])
        batch = []
        k = self.next_commit
        while k < len(self.jobs) and self.jobs[k].stop is not None and self.jobs[k].stop <= durable:
            batch.append(self.jobs[k])
            k += 1
        if not batch:
            return
        test_pause("before-commit")
        entries = []
        for job in batch:
            n = job.stop - job.start  # type: ignore[operator]
            entries.append({**job.entry, "rows": [job.start, job.stop], "tiles": n, "windows": job.windows,
                            "dropped": job.windows - n, "compute_precision": "+".join(sorted(job.precisions))
                            or job.entry["compute_precision"]})
        self.w.commit(entries, batch[-1].stop)
        now = time.perf_counter()
        for job in batch:
            job.committed, job.seconds = True, now - job.t0
        self.next_commit = k
        test_pause("committed")

    def _abort(self) -> None:
        """After a failure: cancel the blocks, let running writes finish, undo the uncommitted rows."""
        from distributed import wait

        # Every future of the run is cancelled, the failed ones too: the client then forgets their
        # state, so a re-run on this client (same deterministic block keys) starts afresh even while
        # the caller still holds the exception (and through its traceback, these futures).
        for f in [*self.futs.values(), *self.summaries.values(), *(f for _, f in self.pending)]:
            f.cancel()
        running = [f for _, f in self.writes.values()]
        if running:
            with contextlib.suppress(Exception):  # failed or timed-out writes: rollback undoes them
                wait(running, timeout=60)
        self.w.rollback()


def progress_printer(name: str) -> tuple[Progress, Callable[[], None]]:
    """A progress bar on stderr (tqdm) reporting windows done and tiles per second."""
    from tqdm import tqdm

    bar = tqdm(total=0, desc=name, unit=" windows", file=sys.stderr, mininterval=0.5, leave=True,
               bar_format="{desc} [{bar:30}] {n}/{total} windows, {postfix}")
    state = {"last": 0.0}

    def update(done: int, total: int, rate: float) -> None:
        bar.total = total
        bar.n = done
        bar.set_postfix_str(f"{rate:.1f} tiles/s", refresh=False)
        now = time.perf_counter()
        if now - state["last"] > 0.5 or done == total:
            state["last"] = now
            bar.refresh()

    return update, bar.close
