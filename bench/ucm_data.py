"""UC Merced Land Use scenes as a real orthomosaic for the dask-fp pipeline.

The labelled scenes (``shared/data/ucmerced-a``: 21 class folders x 50 JPEGs
of 256 px at 0.3 m, no georeference) are written side by side into one RGB
GeoTIFF on a grid of ``columns`` images per row, in (class, file name)
order. Ingested with ``tile = stride = 256`` every window is exactly one
scene: window ``(wy, wx)`` holds scene ``wy * columns + wx``. Slots past the
last scene are black and are dropped at ingest (``max_empty``). The few
scenes that are not 256 px square (242-257 px in the original set) are
resized to 256 px (bilinear). The mosaic has no CRS: tiles get pixel
coordinates, as for any non-georeferenced orthomosaic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCENE = 256
REPO = Path(__file__).resolve().parents[1]
#: The shared data, beside the clone (CI) or beside the worktree.
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "ucmerced-a"


@dataclass(frozen=True)
class Scene:
    label: int  # 1-based class index (0 is reserved for "no label")
    cls: str
    path: Path


@dataclass(frozen=True)
class Mosaic:
    path: Path
    columns: int
    scenes: tuple[Scene, ...]
    classes: tuple[str, ...]

    def label_at(self, wy: np.ndarray, wx: np.ndarray) -> np.ndarray:
        """Class label (1-based) of windows ``(wy, wx)``; 0 for an empty slot."""
        i = np.asarray(wy, dtype=np.int64) * self.columns + np.asarray(wx, dtype=np.int64)
        labels = np.array([0] + [s.label for s in self.scenes], dtype=np.int64)
        ok = (i >= 0) & (i < len(self.scenes))
        return np.where(ok, labels[np.where(ok, i, -1) + 1], 0)


def find_root(root: str | Path | None = None) -> Path:
    """The UC Merced folder: ``root``, else ``../shared/data/ucmerced-a`` beside the repository."""
    p = Path(root) if root is not None else DEFAULT_ROOT
    if not p.is_dir():
        raise FileNotFoundError(
            f"{p}: the UC Merced scenes are not there. Put the 21 class folders there (see the data's "
            "README) or pass --data PATH.")
    return p


def list_scenes(root: str | Path, *, classes: int | Sequence[str] | None = None,
                per_class: int | None = None) -> list[Scene]:
    """The scenes, sorted by (class, file name); the first ``classes`` classes (or the
    named ones) and the first ``per_class`` files of each when given (deterministic subsets)."""
    r = find_root(root)
    names = sorted(d.name for d in r.iterdir() if d.is_dir())
    if isinstance(classes, int):
        names = names[:classes]
    elif classes is not None:
        missing = sorted(set(classes) - set(names))
        if missing:
            raise FileNotFoundError(f"{r}: no class folder {missing}; it has {names}")
        names = sorted(classes)
    out = []
    for lab, name in enumerate(names, start=1):
        files = sorted(f for f in (r / name).iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".tif", ".png"))
        out += [Scene(lab, name, f) for f in (files if per_class is None else files[:per_class])]
    if not out:
        raise FileNotFoundError(f"{r}: no scene images found in its class folders.")
    return out


def read_scene(path: Path) -> np.ndarray:
    """``(256, 256, 3)`` uint8 RGB, resized (bilinear) when the file has another size."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (SCENE, SCENE):
            im = im.resize((SCENE, SCENE), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def mosaic_columns(n: int) -> int:
    """Scenes per mosaic row by default: a near-square grid."""
    return int(np.ceil(np.sqrt(n)))


def write_mosaic(scenes: list[Scene], path: str | Path, *, columns: int | None = None) -> Mosaic:
    """Write ``scenes`` into one tiled, deflate-compressed RGB GeoTIFF (no CRS)."""
    import warnings

    import rasterio
    from rasterio.windows import Window

    cols = columns or mosaic_columns(len(scenes))
    rows = -(-len(scenes) // cols)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "width": cols * SCENE, "height": rows * SCENE, "count": 3, "dtype": "uint8",
               "tiled": True, "blockxsize": SCENE, "blockysize": SCENE, "compress": "deflate"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NotGeoreferencedWarning: the scenes have no georeference
        with rasterio.open(p, "w", **profile) as dst:
            for i, s in enumerate(scenes):
                wy, wx = divmod(i, cols)
                dst.write(read_scene(s.path).transpose(2, 0, 1), window=Window(wx * SCENE, wy * SCENE, SCENE, SCENE))
    classes = tuple(dict.fromkeys(s.cls for s in scenes))
    return Mosaic(p, cols, tuple(scenes), classes)
