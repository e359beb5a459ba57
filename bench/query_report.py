"""Measuring and reporting for bench/query.py: timings over fresh queries, the machine, the tables and ratios."""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CLUSTERS = {"2x1": (2, 1), "1x2": (1, 2)}  # LocalCluster layouts: workers x threads per worker


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    runs: list[float] = field(default_factory=list)
    note: str = ""  # "extrapolated", "1 run", ...

    @property
    def median(self) -> float:
        return statistics.median(self.runs)


def measure(fn: Callable[[np.ndarray], Any], queries: Callable[[], np.ndarray], *, repeats: int, warmup: int = 1,
            budget_s: float = 45.0) -> Timing:
    """Median wall time of ``fn(queries())`` over ``repeats`` runs after ``warmup``; fewer if over budget.

    ``queries()`` runs before each clock starts and gives every run its own query vectors.
    """
    t_start = time.perf_counter()
    for _ in range(warmup):
        fn(queries())
    runs = []
    for _ in range(repeats):
        q = queries()
        t0 = time.perf_counter()
        fn(q)
        runs.append(time.perf_counter() - t0)
        if time.perf_counter() - t_start > budget_s:
            break
    note = f"{len(runs)} run{'s' if len(runs) > 1 else ''}" if len(runs) < repeats else ""
    return Timing(runs, note)


# --------------------------------------------------------------------------- environment


def blas_info() -> list[dict[str, Any]]:
    """BLAS libraries in this process: threadpoolctl's view, or the same read through ctypes."""
    try:
        from threadpoolctl import threadpool_info

        return [{k: v for k, v in d.items() if k in ("internal_api", "version", "architecture",
                                                     "num_threads", "threading_layer", "filepath")}
                for d in threadpool_info()]
    except ImportError:
        pass
    out = []
    with open("/proc/self/maps") as f:
        libs = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line})
    for path in libs:
        lib = ctypes.CDLL(path)
        info: dict[str, Any] = {"internal_api": "openblas", "filepath": path}
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                try:
                    corename = getattr(lib, f"{prefix}_get_corename{suffix}")
                    config = getattr(lib, f"{prefix}_get_config{suffix}")
                    threads = getattr(lib, f"{prefix}_get_num_threads{suffix}")
                except AttributeError:
                    continue
                corename.restype = config.restype = ctypes.c_char_p
                info.update(architecture=corename().decode(), config=config().decode(),
                            num_threads=threads())
                break
            if "architecture" in info:
                break
        out.append(info)
    return out


def environment() -> dict[str, Any]:
    import dask
    import distributed
    import zarr

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env = {
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
        "numpy": np.__version__, "dask": dask.__version__, "distributed": distributed.__version__,
        "zarr": zarr.__version__,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset)"),
        "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE", "(unset)"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)"),
    }
    try:
        import faiss

        env["faiss"] = faiss.__version__
        env["faiss_omp_threads"] = faiss.omp_get_max_threads()
    except ImportError:
        env["faiss"] = "(not installed)"
    env["blas"] = blas_info()
    return env


# --------------------------------------------------------------------------- report


def fmt_ms(t: Timing | None) -> str:
    if t is None:
        return "-"
    ms = t.median * 1e3
    s = f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"
    return ("~" if t.note.startswith("extrapolated") else "") + s


def best_cluster(all_res: dict[int, dict[str, Any]], clusters: Sequence[str]) -> str:
    """The layout with the smaller sum of dask-fp knn medians (relative to its size's best)."""
    score = {}
    for c in clusters:
        s = 0.0
        for r in all_res.values():
            for mode in ("streamed", "persisted"):
                for label in ("single", "batch"):
                    best = min(r["timings"][f"dask-fp[{cc}] knn {mode} {label}"].median for cc in clusters)
                    s += r["timings"][f"dask-fp[{c}] knn {mode} {label}"].median / best
        score[c] = s
    return min(score, key=score.__getitem__)


def report(all_res: dict[int, dict[str, Any]], clusters: Sequence[str]) -> tuple[str, dict[str, Any]]:
    sizes = sorted(all_res)
    rows: list[tuple[str, str]] = [
        ("paper's method (dict walk, sorted top-k)", "paper"),
        ("numpy brute force (in memory)", "numpy"),
        ("FAISS IndexFlatL2", "faiss"),
        ("plain 1-process loop over the Zarr chunks (numpy)", "plain"),
    ]
    for c in clusters:
        w, t = CLUSTERS[c]
        lay = f"{w} worker{'s' if w > 1 else ''} x {t} thread{'s' if t > 1 else ''}"
        rows.append((f"dask-fp knn over Store.fingerprints(), streamed [{lay}]", f"dask-fp[{c}] knn-array streamed"))
        for mode in ("streamed", "persisted"):
            rows.append((f"dask-fp {'stream_knn' if mode == 'streamed' else 'knn'}, {mode} [{lay}]",
                         f"dask-fp[{c}] knn {mode}"))
            rows.append((f"dask-fp search(), {mode} [{lay}]", f"dask-fp[{c}] search {mode}"))
    w0 = max(len(r[0]) for r in rows)
    head1 = " " * w0 + "".join(f" | {f'{n:,} rows':^21}" for n in sizes)
    head2 = f"{'median wall time, ms (k = 10)':<{w0}}" + "".join(f" | {'1 query':>9} {'100 q.':>11}" for _ in sizes)
    lines = [head1, head2, "-" * len(head2)]
    for label, key in rows:
        cells = ""
        for n in sizes:
            t = all_res[n]["timings"]
            cells += f" | {fmt_ms(t.get(f'{key} single')):>9} {fmt_ms(t.get(f'{key} batch')):>11}"
        lines.append(f"{label:<{w0}}{cells}")
    notes = sorted({f"{k} @ {n:,}: {v.note}" for n in sizes for k, v in all_res[n]["timings"].items() if v.note})
    if notes:
        lines.append("")
        lines.append("notes: ~ = extrapolated; " + "; ".join(notes))
    best = best_cluster(all_res, clusters)
    ratios: dict[str, Any] = {"best_cluster": best}
    lines.append("")
    lines.append(f"ratios (dask-fp on the better layout, {best}):")
    for n in sizes:
        t = all_res[n]["timings"]
        for mode in ("persisted", "streamed"):
            r = t[f"dask-fp[{best}] search {mode} single"].median / t[f"dask-fp[{best}] knn {mode} single"].median
            ratios[f"search/knn {mode} @{n}"] = r
            goal = f" (goal <= 1.2x: {'met' if r <= 1.2 else 'MISSED'})" if mode == "persisted" else ""
            lines.append(f"  {n:>9,} rows, single: search() / knn {mode:9}            = {r:6.2f}x{goal}")
        for label in ("single", "batch"):
            for key, what in (("knn", "stream_knn"), ("knn-array", "knn(Store.fingerprints())")):
                r = t[f"plain {label}"].median / t[f"dask-fp[{best}] {key} streamed {label}"].median
                ratios[f"plain/{key} streamed {label} @{n}"] = r
                goal = f" (goal >= 0.8x: {'met' if r >= 0.8 else 'MISSED'})" if key == "knn" else ""
                lines.append(f"  {n:>9,} rows, {label:6}: speed of {what:25} / plain Zarr loop = {r:5.2f}x{goal}")
    small, large = sizes[0], sizes[-1]
    for mode in ("streamed", "persisted"):
        for label in ("single", "batch"):
            t = all_res[small]["timings"]
            r = t[f"paper {label}"].median / t[f"dask-fp[{best}] knn {mode} {label}"].median
            ratios[f"paper/dask-fp {mode} {label} @{small}"] = r
            lines.append(f"  {small:>9,} rows, {label:6}: paper's method / dask-fp {mode:9} = {r:7.1f}x"
                         f" (goal >= 100x: {'met' if r >= 100 else 'MISSED'})")
    if "faiss single" in all_res[large]["timings"]:
        for mode in ("persisted", "streamed"):
            for label in ("single", "batch"):
                t = all_res[large]["timings"]
                r = t[f"dask-fp[{best}] knn {mode} {label}"].median / t[f"faiss {label}"].median
                ratios[f"dask-fp {mode}/faiss {label} @{large}"] = r
                goal = f" (goal <= 1.0x: {'met' if r <= 1.0 else 'MISSED'})" if mode == "persisted" else ""
                lines.append(f"  {large:>9,} rows, {label:6}: dask-fp {mode:9} / FAISS flat = {r:6.2f}x{goal}")
        for label in ("single", "batch"):
            t = all_res[large]["timings"]
            r = t[f"dask-fp[{best}] knn persisted {label}"].median / t[f"numpy {label}"].median
            ratios[f"dask-fp persisted/numpy {label} @{large}"] = r
            lines.append(f"  {large:>9,} rows, {label:6}: dask-fp persisted / numpy    = {r:6.2f}x")
    prof = [(n, c, key, v) for n in sizes for c in clusters
            for key, v in all_res[n]["info"].get(f"dask-fp[{c}]", {}).items() if key.startswith("profile")]
    if prof:
        lines.append("")
        lines.append("dask-fp profile (one scan under the task stream; compute = seconds summed over tasks):")
        for n, c, key, v in prof:
            top = ", ".join(f"{p} {s * 1e3:.0f} ms" for p, s in list(v["compute_s"].items())[:3])
            lines.append(f"  {n:>9,} rows [{c}] {key[8:]:17}: {v['tasks']:4} tasks, wall {v['wall_s'] * 1e3:7.0f} ms;"
                         f" compute: {top}")
    return "\n".join(lines), ratios


def describe_environment(env: dict[str, Any]) -> str:
    lines = [f"machine: {env['cpu']}, {env['cores']} cores; python {env['python']}, numpy {env['numpy']},"
             f" dask {env['dask']}, zarr {env['zarr']}, faiss {env['faiss']}"
             f" (OpenMP threads {env.get('faiss_omp_threads', '-')})",
             f"OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE']} OPENBLAS_L2_SIZE={env['OPENBLAS_L2_SIZE']}"
             f" OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"]
    for b in env["blas"]:
        where = Path(str(b.get("filepath", "?"))).parent.name
        lines.append(f"BLAS ({where}): {b.get('internal_api')} {b.get('version') or b.get('config', '')},"
                     f" kernel {b.get('architecture')}, {b.get('num_threads')} threads")
    return "\n".join(lines)
