"""The ``dask-fp`` command: parse arguments, call the library, print results.

No logic lives here beyond turning arguments into option objects. Errors of
the library (:class:`~dask_fp.errors.DaskFpError`) are printed as one line
``dask-fp: error: …`` with exit status 1; usage errors exit with 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ._version import __version__
from .cluster import KINDS
from .errors import DaskFpError, QueryError
from .models import PRECISIONS, REGISTRY


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated band numbers, got {text!r}") from None


def _scale(text: str) -> Any:
    if text == "percentile":
        return "percentile"
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'percentile' or MIN,MAX, got {text!r}") from None
    return (lo, hi)


def _lonlat(text: str) -> tuple[float, float]:
    try:
        lon, lat = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LON,LAT in degrees, got {text!r}") from None
    return (lon, lat)


def _example(text: str) -> Any:
    """An example: a whole number is a uid, ``LON,LAT`` a point, anything else a file path."""
    try:
        return int(text)
    except ValueError:
        pass
    parts = text.split(",")
    if len(parts) == 2:
        try:
            return (float(parts[0]), float(parts[1]))
        except ValueError:
            pass
    return text


def _area(text: str) -> Any:
    """``MINX,MINY,MAXX,MAXY`` (a bbox) or a vector file path."""
    parts = text.split(",")
    if len(parts) == 4:
        try:
            return tuple(float(v) for v in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected MINX,MINY,MAXX,MAXY or a vector file, got {text!r}") from None
    return text


def _sources(text: str) -> list[Any]:
    return [int(v) if v.strip().isdigit() else v.strip() for v in text.split(",") if v.strip()]


def _probability(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability from 0 to 1, got {text!r}") from None


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster", "where the work runs; the dashboard link is printed either way."
                             " slurm/pbs read Dask's jobqueue config (~/.config/dask/jobqueue.yaml)")
    g.add_argument("--cluster", default="local", choices=KINDS,
                   help="kind of cluster to start (default: local)")
    g.add_argument("--scheduler", metavar="ADDR", help="address of a running Dask scheduler (tcp://host:8786)")
    g.add_argument("--workers", type=_positive, metavar="N",
                   help="local / local-cuda worker processes (default: cores/2; local-cuda: one per GPU)")
    g.add_argument("--jobs", type=_positive, metavar="N", help="slurm/pbs: batch jobs to submit (default 1)")
    g.add_argument("--cores", type=_positive, metavar="N", help="slurm/pbs: cores per job (default: jobqueue config)")
    g.add_argument("--memory", metavar="SIZE", help="slurm/pbs: memory per job, e.g. 16GiB (default: jobqueue config)")
    g.add_argument("--threads-per-worker", type=_positive, default=1, metavar="N")
    g.add_argument("--memory-limit", default="auto", metavar="SIZE", help="per local worker, e.g. 4GiB")


def _example_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("examples", "UID, LON,LAT, a picture, or a .geojson/.gpkg of points and polygons"
                             " (a polygon: every stored tile whose centre lies in it); repeat the option for more")
    g.add_argument("--positive", action="append", default=[], type=_example, metavar="X")
    g.add_argument("--negative", action="append", default=[], type=_example, metavar="X")
    g.add_argument("--labels", metavar="FILE",
                   help="labels file (GeoJSON/GPKG features with label=positive|negative and uid, or a geometry)")
    g.add_argument("--save-labels", metavar="FILE", help="write all labels used (GeoJSON) for the next round")
    f = p.add_argument_group("filters", "applied inside the pass; a tile is in the area when its centre is")
    f.add_argument("--area", type=_area, metavar="MINX,MINY,MAXX,MAXY|FILE",
                   help="bbox (in --area-crs) or a GeoJSON/GPKG polygon file (in its own CRS)")
    f.add_argument("--area-crs", metavar="CRS", help="CRS of a bbox --area (default EPSG:4326 lon/lat)")
    f.add_argument("--sources", type=_sources, metavar="I,PATH,…", help="only tiles of these sources")


def _common_query_args(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("--out", metavar="DIR", help=out_help)
    p.add_argument("--json", action="store_true")
    p.add_argument("--weights", metavar="PATH|random", help="weights for picture examples (default: the store's)")
    p.add_argument("--persist", action="store_true", help="load the store into cluster memory first")
    p.add_argument("--split-every", type=_positive, help="fan-in of the merge tree")
    _cluster_args(p)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dask-fp", description="Rapid visual search over aerial orthomosaics.")
    p.add_argument("--version", action="version", version=f"dask-fp {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    ing = sub.add_parser("ingest", help="fingerprint orthomosaics into a store")
    ing.add_argument("rasters", nargs="+", metavar="RASTER", help="GeoTIFF / COG files")
    ing.add_argument("--store", required=True, help="store directory (created if missing)")
    ing.add_argument("--model", choices=list(REGISTRY),
                     help="default: the store's model when it exists, else resnet18 (likewise the options below)")
    ing.add_argument("--weights", metavar="PATH|random", help="weights file, or 'random' (tests only)")
    ing.add_argument("--seed", type=int, help="seed for --weights random (default 0)")
    ing.add_argument("--tile", type=_positive, help="default 256")
    ing.add_argument("--stride", type=_positive, help="default 128")
    ing.add_argument("--max-empty", type=float, metavar="FRACTION", help="default 0.5")
    ing.add_argument("--chunk", type=_positive, default=2048, metavar="PX", help="raster chunk side")
    ing.add_argument("--dtype", choices=["float32", "float16"], help="default float32")
    ing.add_argument("--bands", type=_int_list, metavar="R,G,B", help="1-based bands to use as RGB")
    ing.add_argument("--replicate", action="store_true", help="repeat a single band as R, G and B")
    ing.add_argument("--scale", type=_scale, metavar="percentile|MIN,MAX", help="scaling of non-uint8 data")
    ing.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ing.add_argument("--batch-size", type=int, default=0, help="windows per forward pass (0: 32 CPU, 256 GPU)")
    ing.add_argument("--precision", default="auto", choices=PRECISIONS,
                     help="forward pass: auto (bfloat16 autocast on CUDA, float32 on CPU), float32 or bfloat16")
    ing.add_argument("--input-size", type=_positive, metavar="PX",
                     help="resize windows to PX square before the model (default: as cut)")
    ing.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="wait for another writer")
    ing.add_argument("--quiet", action="store_true", help="no progress bar")
    ing.add_argument("--json", action="store_true", help="print the summary as JSON")
    _cluster_args(ing)

    inf = sub.add_parser("info", help="describe a store")
    inf.add_argument("store")
    inf.add_argument("--json", action="store_true")
    inf.add_argument("--verify", action="store_true",
                     help="also check that every chunk file of committed rows exists (one stat per file)")

    q = sub.add_parser("query", help="find the tiles most like a picture, a uid or a place")
    q.add_argument("store")
    q.add_argument("--image", action="append", default=[], metavar="FILE")
    q.add_argument("--uid", action="append", default=[], type=int)
    q.add_argument("--lonlat", action="append", default=[], type=_lonlat, metavar="LON,LAT")
    _example_args(q)
    q.add_argument("--beta", type=float, default=0.5,
                   help="weight of the negatives: query = mean(P) + beta * (mean(P) - mean(N)) (default 0.5)")
    q.add_argument("-k", type=int, default=10, help="hits per query")
    q.add_argument("--no-dedup", action="store_true", help="keep overlapping hits")
    q.add_argument("--include-self", action="store_true", help="keep the query's own (and labelled) tiles")
    q.add_argument("--method", choices=("auto", "exact", "codes"), default="auto",
                   help="exact scan, or compact codes + exact re-rank (auto: codes for large indexed stores)")
    q.add_argument("--candidates", type=_positive,
                   help="rows re-ranked exactly per query (--method codes; default max(10 x the rows fetched, 500);"
                        " at least the rows fetched: k, or k x (2r+1)^2 with de-duplication)")
    q.add_argument("--probes", type=_positive,
                   help="index lists probed per query, at least (--method codes; default 8; more: higher recall)")
    _common_query_args(q, "write hits, mosaics, places (GeoJSON, GeoParquet) and score COGs here")

    c = sub.add_parser("classify", help="train a linear classifier on labelled tiles and score every tile")
    c.add_argument("store")
    _example_args(c)
    c.add_argument("-k", type=int, help="the k tiles of highest probability")
    c.add_argument("--threshold", type=_probability, metavar="P",
                   help="every tile with probability >= P (0..1); with -k, the best k of those")
    c.add_argument("--C", type=float, default=1.0, dest="C", help="inverse regularisation strength (default 1)")
    c.add_argument("--dedup", action="store_true", help="drop hits overlapping a better hit")
    c.add_argument("--include-self", action="store_true", help="keep the labelled tiles among the hits")
    _common_query_args(c, "write hits.csv and hits.geojson (every hit) and mosaic.png (the best 35) here")

    sv = sub.add_parser("serve", help="the map page: click a place, see similar places, label, refine, export")
    sv.add_argument("store")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    sv.add_argument("--no-persist", action="store_true",
                    help="stream the store from disk per query instead of keeping it in cluster memory")
    _cluster_args(sv)

    ix = sub.add_parser("index", help="build (or rebuild) the store's compact-code index")
    ix.add_argument("store")
    ix.add_argument("--nbits", type=_positive, help="bits per tile (multiple of 64, <= dimension; default 512)")
    ix.add_argument("--lists", type=_positive, default=None,
                    help="coarse lists (k-means centroids; default: sqrt(rows), at most 1024)")
    ix.add_argument("--train-rows", type=_positive,
                    help="rows that train the code (default 20000; at least 40 per list are used)")
    ix.add_argument("--extend", action="store_true", help="only encode rows added since the last build")
    ix.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the writer lock")
    _cluster_args(ix)

    un = sub.add_parser("unlock", help="remove a stale writer lock")
    un.add_argument("store")
    un.add_argument("--force", action="store_true", help="remove even if the holder may be alive")
    return p


def _cluster(args: argparse.Namespace) -> Any:
    from .cluster import ClusterOptions, get_client

    return get_client(ClusterOptions(cluster=args.cluster, scheduler=args.scheduler, workers=args.workers,
                                     threads_per_worker=args.threads_per_worker,
                                     memory_limit=args.memory_limit, jobs=args.jobs, cores=args.cores,
                                     memory=args.memory))


def _appended_store(path: str) -> Any:
    """The store at ``path`` when there is one (an ingest appends to it and must match its settings), else None."""
    from .errors import StoreError
    from .store import open_store

    try:
        return open_store(path)
    except StoreError:  # a new store (or not a store: ingest says so)
        return None


def cmd_ingest(args: argparse.Namespace) -> int:
    from .cluster import gpu_resources
    from .index import index_summary
    from .ingest import ingest
    from .inspection import RasterOptions
    from .models import ModelOptions
    from .query import store_model_options, store_tiling
    from .store import format_summary, open_store
    from .tiling import Tiling

    # Options not given: the store's own when appending (store_model_options, store_tiling), else the defaults.
    st = _appended_store(args.store)
    t = store_tiling(st) if st is not None else Tiling(256, 128, 0.5)
    try:
        tiling = Tiling(args.tile or t.tile, args.stride or t.stride,
                        t.max_empty if args.max_empty is None else args.max_empty)
    except ValueError as e:
        raise DaskFpError(str(e)) from None
    raster = RasterOptions(bands=args.bands, replicate=args.replicate, scale=args.scale, chunk=args.chunk)
    if st is not None and args.model in (None, st.attrs["model"]):
        base = store_model_options(st, weights=args.weights)
    else:
        base = ModelOptions(name=args.model or "resnet18", weights=args.weights)
    with _cluster(args) as client:
        model = replace(base, seed=base.seed if args.seed is None else args.seed, device=args.device,
                        batch_size=args.batch_size, resources=gpu_resources(client),
                        input_size=args.input_size or base.input_size, precision=args.precision)
        report = ingest(args.rasters, args.store, model=model, tiling=tiling, raster=raster,
                        dtype=args.dtype or (st.attrs["dtype"] if st is not None else "float32"),
                        client=client, wait=args.wait, progress=not args.quiet)
    info = open_store(args.store).info()
    info["this_run"] = {"tiles_added": report.tiles, "seconds": round(report.seconds, 2),
                        "tiles_per_second": round(report.tiles / report.seconds, 2) if report.seconds else None,
                        "skipped": [s.path for s in report.sources if s.skipped], "indexed": report.indexed}
    info["index"] = index_summary(open_store(args.store))
    print(json.dumps(info, indent=2) if args.json else format_summary(info))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .index import index_summary
    from .store import format_summary, open_store

    store = open_store(args.store)
    info = store.info()
    info["index"] = index_summary(store)
    if args.verify:
        store.verify()  # a StoreError naming the missing files, or nothing
        info["verified"] = True
    print(json.dumps(info, indent=2) if args.json else format_summary(info))
    return 0


def _session(args: argparse.Namespace) -> Any:
    """The labels of ``--labels``, ``--positive`` and ``--negative`` as a SearchSession."""
    from .query import store_model_options
    from .session import SearchSession
    from .store import open_store

    store = open_store(args.store)
    model = store_model_options(store, weights=args.weights) if args.weights else None
    s = SearchSession.load(store, args.labels, model=model) if args.labels else SearchSession(store, model=model)
    return s.add(positives=args.positive, negatives=args.negative)


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {"area": args.area, "area_crs": args.area_crs, "sources": args.sources, "split_every": args.split_every}


def cmd_query(args: argparse.Namespace) -> int:
    from .export import write_outputs
    from .index import choose_method, old_index
    from .search import search

    with _cluster(args):
        session = _session(args)
        method = choose_method(session.store, args.method, filtered=args.area is not None or bool(args.sources))
        print(f"method {method} ({session.store.committed} rows; --method {args.method})" + (
            f"; the store's index is of an earlier format and not used: rebuild it with `dask-fp index {args.store}`"
            if old_index(session.store) else ""), file=sys.stderr)
        if args.persist:
            session.store.persist()
        hits = search(session.store, images=args.image, uids=args.uid, lonlats=args.lonlat,
                      positives=session.positives, negatives=session.negatives, beta=args.beta, k=args.k,
                      dedup=not args.no_dedup, include_self=args.include_self, model=session.model,
                      method=method, candidates=args.candidates,
                      **({"probes": args.probes} if args.probes else {}), **_filters(args))
        if args.save_labels:
            session.save(args.save_labels)
    files = write_outputs(hits, args.out) if args.out else None
    return _print_hits(args, hits, files)


def cmd_classify(args: argparse.Namespace) -> int:
    from .classify import write_classified

    with _cluster(args):
        session = _session(args)
        if args.persist:
            session.store.persist()
        hits = session.classify(k=args.k, threshold=args.threshold, C=args.C, dedup=args.dedup,
                                include_self=args.include_self, **_filters(args))
        if args.save_labels:
            session.save(args.save_labels)
    files = write_classified(hits, args.out) if args.out else None
    return _print_hits(args, hits, files)


def _print_hits(args: argparse.Namespace, hits: Any, files: dict[str, Any] | None) -> int:
    if args.json:
        out: dict[str, Any] = {"queries": [{"index": i, "label": q.label, "hits": json.loads(
            hits.for_query(i).drop(columns=["query", "label"]).to_json(orient="records"))}
            for i, q in enumerate(hits.queries)]}
        if files:
            out["files"] = files
        print(json.dumps(out, indent=2))
        return 0
    for i, q in enumerate(hits.queries):
        t = hits.for_query(i)
        print(f"query {i}: {q.label} ({len(t)} hits)")
        print(t[["rank", "uid", hits.rank_by, "path", "wy", "wx", "lon", "lat"]].to_string(index=False))
    if files:  # every file written; "places" holds a note instead when the places extra is missing
        paths = [str(p) for k, v in files.items() if k != "places" for p in (v if isinstance(v, list) else [v])]
        print("wrote " + ", ".join(paths) + (f"; places {files['places']}" if "places" in files else ""))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve
    from .store import open_store

    if not 0 <= args.port <= 65535:
        raise DaskFpError(f"--port must be 0..65535, got {args.port}")
    store = open_store(args.store)  # a bad store fails before any cluster starts
    with _cluster(args) as client:
        serve(store, client=client, host=args.host, port=args.port, persist=not args.no_persist)
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from .index import IndexOptions, build_index, extend_index

    given = [f"--{n.replace('_', '-')}" for n in ("nbits", "lists", "train_rows") if getattr(args, n) is not None]
    if args.extend and given:
        raise QueryError(f"{args.store}: --extend encodes new rows with the trained code; {', '.join(given)}"
                         " would change it. Drop them, or rebuild the index without --extend.")
    set_opts = {n: getattr(args, n) for n in ("nbits", "lists", "train_rows") if getattr(args, n) is not None}
    with _cluster(args) as client:
        if args.extend:
            n = extend_index(args.store, client=client, wait=args.wait)
            print(f"index of {args.store}: encoded {n} new rows")
            return 0
        info = build_index(args.store, IndexOptions(**set_opts), client=client, wait=args.wait)
    print(f"index of {args.store}: {info['indexed']} rows, {info['nbits']} bits ({info['nbits'] // 8 + 12} B/tile"
          f" with list and norms), {info['lists']} lists, trained on {info['trained_on']} rows, {info['seconds']} s")
    return 0


def cmd_unlock(args: argparse.Namespace) -> int:
    from .store import break_lock, describe_lock

    old = break_lock(args.store, force=args.force)
    print("no lock to remove" if old is None else f"removed lock of {describe_lock(old)}")
    return 0


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--lonlat -86.5,34.7`` → ``--lonlat=-86.5,34.7`` (argparse reads ``-86…`` as a flag)."""
    out: list[str] = []
    it = iter(argv)
    for a in it:
        if a in ("--lonlat", "--scale", "--positive", "--negative", "--area"):
            nxt = next(it, None)
            out.append(a if nxt is None else f"{a}={nxt}")
        else:
            out.append(a)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(_join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    handler = {"ingest": cmd_ingest, "info": cmd_info, "query": cmd_query, "classify": cmd_classify,
               "serve": cmd_serve, "index": cmd_index, "unlock": cmd_unlock}[args.command]
    try:
        return handler(args)
    except DaskFpError as e:
        print(f"dask-fp: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dask-fp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
