"""Re-localisation for bench/quality_remote.py: perturbed copies of stored tiles searched by picture."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import quality_metrics as qm  # noqa: E402
from quality_stores import (  # noqa: E402
    Config,
    Method,
    baseline_vectors,
    build_stores,
    hits_matrix,
    knn_seconds,
    overlap_at,
    say,
    source_rgb,
)

K_RELOC = 10


# --------------------------------------------------------------------------- re-localisation


def pick_reloc_tiles(store: Any, n: int, seed: int) -> np.ndarray:
    """A fixed random subset of rows: half from the 2 cm drone image, half from the 10 cm NEON ones."""
    rng = np.random.default_rng(seed)
    c = store.coords()
    srcs = {s["index"]: s for s in store.sources}
    drone = np.flatnonzero([("drone" in srcs[int(s)]["path"]) for s in c["source"]])
    other = np.setdiff1d(np.arange(store.committed), drone)
    parts = [p for p in (drone, other) if len(p)]
    take = [rng.choice(p, size=min(len(p), n // len(parts) + (i < n % len(parts))), replace=False)
            for i, p in enumerate(parts)]
    return np.sort(np.concatenate(take))


def make_reloc_queries(store: Any, rows: np.ndarray, pixels: np.ndarray, qdir: Path,
                       seed: int) -> list[dict[str, Any]]:
    """Write one picture file per (perturbation, tile); returns their descriptions."""
    if qdir.exists():
        shutil.rmtree(qdir)
    qdir.mkdir(parents=True)
    t, s = int(store.attrs["tile"]), int(store.attrs["stride"])
    c = store.coords()
    srcs = {x["index"]: x for x in store.sources}
    rgb_cache: dict[int, np.ndarray] = {}
    out = []
    for pi, kind in enumerate(qm.PERTURBATIONS):
        for r in rows:
            src, wy, wx = int(c["source"][r]), int(c["wy"][r]), int(c["wx"][r])
            shifted = None
            if kind.startswith("shift"):
                if src not in rgb_cache:
                    rgb_cache[src] = source_rgb(srcs[src])
                img = rgb_cache[src]
                h, w = (int(v) for v in srcs[src]["shape"])
                y, x = qm.shift_origin(wy * s, wx * s, tile=t, height=h, width=w)
                shifted = img[y : y + t, x : x + t]
            data, suffix = qm.perturb(pixels[r], kind, seed=seed * 1_000_003 + pi * 10_007 + int(r),
                                      shifted=shifted)
            p = qdir / f"{pi:02d}-{int(r):05d}{suffix}"
            p.write_bytes(data)
            out.append({"kind": kind, "row": int(r), "orig": (src, wy, wx), "path": str(p),
                        "gsd": "2 cm" if "drone" in srcs[src]["path"] else "10 cm"})
    return out


def reloc_success(hits: Any, queries: list[dict[str, Any]], tiling: Any) -> np.ndarray:
    from dask_fp.tiling import overlap_fraction

    def ov(a: Any, b: Any, c: Any, d: Any) -> np.ndarray:
        return overlap_fraction(a, b, c, d, tile=tiling.tile, stride=tiling.stride)

    n = len(queries)
    src = hits_matrix(hits, n, K_RELOC, "source", -1)
    wy = hits_matrix(hits, n, K_RELOC, "wy", -10**6)
    wx = hits_matrix(hits, n, K_RELOC, "wx", -10**6)
    return np.stack([qm.overlap_success(src[i], wy[i], wx[i], q["orig"], ov) for i, q in enumerate(queries)])


def run_reloc(files: dict[str, Path], ms: list[Method], out: Path, cfg: Config, ctx: dict[str, Any],
              results: dict[str, Any], seed: int) -> dict[str, Any]:
    from dask_fp import Query, search
    from dask_fp.search import candidates_needed
    from dask_fp.tiling import Tiling

    tiling = Tiling(cfg.tile_highres, cfg.stride_highres, 0.5)
    paths = [files[n] for n in cfg.reloc_sources]
    stores, pixels = build_stores("reloc", paths, ms, out / "reloc", tiling=tiling, input_size=None,
                                  scale=None, client=ctx["client"], threads=ctx["threads"], chunk=cfg.chunk_highres,
                                  timings=results["timings"])
    template = stores[ms[0].key]
    rows = pick_reloc_tiles(template, cfg.reloc_tiles, seed)
    queries = make_reloc_queries(template, rows, pixels, out / "reloc" / "queries", seed)
    kinds = list(qm.PERTURBATIONS)
    say(f"[reloc] {template.committed} tiles in the store; {len(rows)} tiles x {len(kinds)} perturbations"
        f" = {len(queries)} picture queries")
    res: dict[str, Any] = {}
    succ_all: dict[str, np.ndarray] = {}
    timing: dict[str, Any] = {}
    for key, st in stores.items():
        say(f"[reloc] search: {key}")
        t0 = time.perf_counter()
        m = next((x for x in ms if x.key == key.removesuffix("-f16")), None)
        if m is not None and m.kind == "model":
            hits = search(st, images=[q["path"] for q in queries], k=K_RELOC)
        else:
            kind = m.kind if m is not None else "raw"
            per = {}
            for kd in kinds:  # one search per perturbation keeps the raw-pixel query batch small (30 MiB)
                sub = [q for q in queries if q["kind"] == kd]
                dec = np.stack([qm.decode(Path(q["path"]).read_bytes()) for q in sub])
                vec = (baseline_vectors(kind, dec) if kind != "random"
                       else qm.random_vectors(len(sub), seed=seed + 1 + kinds.index(kd)))
                per[kd] = search(st, [Query(q["path"], v) for q, v in zip(sub, vec, strict=True)], k=K_RELOC)
            hits = _concat_hits(per, queries, kinds)
        took = time.perf_counter() - t0
        succ = reloc_success(hits, queries, tiling)
        succ_all[key] = succ
        kinds_arr = np.array([q["kind"] for q in queries])
        gsd_arr = np.array([q["gsd"] for q in queries])
        res[key] = {
            kd: {"R@1": qm.recall_at(succ[kinds_arr == kd], 1), "R@10": qm.recall_at(succ[kinds_arr == kd], 10),
                 **{f"R@10 {g}": qm.recall_at(succ[(kinds_arr == kd) & (gsd_arr == g)], 10)
                    for g in ("2 cm", "10 cm")}}
            for kd in kinds
        }
        photometric = [kd for kd in kinds if qm.PERTURBATIONS[kd][0] == "photometric"]
        geometric = [kd for kd in kinds if qm.PERTURBATIONS[kd][0] == "geometric"]
        for group, kds in (("photometric", photometric), ("geometric", geometric)):
            mask = np.isin(kinds_arr, kds)
            res[key][f"all {group}"] = {"R@1": qm.recall_at(succ[mask], 1), "R@10": qm.recall_at(succ[mask], 10)}
        timing[key] = {"search_s": took, "queries": len(queries)}
    # Query cost of each representation for one batch of 40 picture queries (k-NN alone, persisted).
    m_cand = candidates_needed(K_RELOC, tiling, dedup=True, from_store=False)
    comp = {}
    for key, st in stores.items():
        fp = np.asarray(st.arrays["fingerprint"][: st.committed], dtype=np.float32)
        st.persist()
        comp[key] = {"dim": int(st.dim), "dtype": st.attrs["dtype"],
                     "bytes_per_tile": int(st.dim * np.dtype(st.attrs["dtype"]).itemsize),
                     "knn_s": knn_seconds(st, fp[rows], m_cand)}
        if key.endswith("-f16"):
            comp[key]["recall@10_vs_f32"] = _reloc_overlap(st, stores[key[:-4]], fp[rows], tiling)
    ctx["reloc"] = (stores, queries, succ_all, tiling)
    srcs = [{"path": Path(s["path"]).name, "tiles": s["tiles"], "crs": s.get("crs_name")}
            for s in template.sources]
    return {"info": {"tiles": int(template.committed), "sources": srcs, "query_tiles": len(rows),
                     "perturbations": {k: v[1] for k, v in qm.PERTURBATIONS.items()},
                     "tile": tiling.tile, "stride": tiling.stride, "pixel_bytes_per_tile": tiling.tile**2 * 3},
            "rows": res, "timing": timing, "compression": comp}


def _reloc_overlap(st16: Any, st32: Any, q: np.ndarray, tiling: Any) -> float:
    """recall@10 of float16 search against float32 for the re-localisation tiles as queries."""
    from dask_fp import Query, search

    qs = [Query(str(i), v) for i, v in enumerate(q)]
    a = search(st32, qs, k=10)
    b = search(st16, qs, k=10)
    ua = hits_matrix(a, len(qs), 10, "uid", -1)
    ub = hits_matrix(b, len(qs), 10, "uid", -1)
    return overlap_at(ua, ub, 10)


def _concat_hits(per: dict[str, Any], queries: list[dict[str, Any]], kinds: list[str]) -> Any:
    """Hits of several searches, renumbered to the order of ``queries``."""
    import pandas as pd

    from dask_fp.search import Hits

    index = {q["path"]: i for i, q in enumerate(queries)}
    tables, qs = [], []
    store = None
    for kd in kinds:
        h = per[kd]
        store = h.store
        t = h.table.copy()
        t["query"] = [index[h.queries[i].label] for i in t["query"]]
        tables.append(t)
        qs += h.queries
    qs_sorted = sorted(qs, key=lambda q: index[q.label])
    return Hits(pd.concat(tables, ignore_index=True), qs_sorted, store)


