"""Store schema: array names and types, the settings a store records, chunk sizes, opening.

Shared by the reader (:mod:`.reader`) and the writer (:mod:`.writer`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from ..errors import StoreError

COORDS = ("uid", "source", "wy", "wx", "x", "y", "lon", "lat", "norm2")
COORD_DTYPES = {
    "uid": "int64", "source": "int32", "wy": "int32", "wx": "int32",
    "x": "float64", "y": "float64", "lon": "float64", "lat": "float64", "norm2": "float32",
}
#: Zarr chunks read by one query task. One task per 8 chunks (65,536 rows of 512-d
#: float32, 128 MiB) cut single-query latency at 1M rows by 40 % against one task per
#: chunk (bench/query.py, docs/performance.md) while keeping task memory bounded.
QUERY_TASK_CHUNKS = 8
#: Settings that must match between a store and an ingest or query.
SETTING_KEYS = ("model", "weights_sha256", "feature_dim", "tile", "stride", "max_empty", "dtype", "input_size")


@dataclass(frozen=True)
class StoreSettings:
    """What a store was made with; every append must match it."""

    model: str
    weights: str
    weights_sha256: str
    feature_dim: int
    tile: int
    stride: int
    max_empty: float
    dtype: str
    normalisation: str
    weights_seed: int | None = None
    input_size: int | None = None

    def differences(self, attrs: dict[str, Any]) -> list[str]:
        mine = asdict(self)
        return [
            f"{k}: store has {attrs.get(k)!r}, this run uses {mine[k]!r}"
            for k in SETTING_KEYS
            if attrs.get(k) != mine[k]
        ]


def rows_per_chunk(dim: int, itemsize: int, target_bytes: int = 16 << 20) -> int:
    """Rows per chunk so one fingerprint chunk is about ``target_bytes`` (a power of two)."""
    rows = max(1, target_bytes // (dim * itemsize))
    return int(max(1024, 1 << (rows.bit_length() - 1)))


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def open_group(path: Path, mode: Literal["r", "r+"]) -> Any:
    import zarr

    if path.exists() and not path.is_dir():
        raise StoreError(f"{path} is a file, not a fingerprint store (a directory). Choose another --store path.")
    try:
        return zarr.open_group(str(path), mode=mode, zarr_format=3, use_consolidated=False)
    except FileNotFoundError:
        raise StoreError(f"{path}: no fingerprint store here. Create one with `dask-fp ingest`.") from None
    except Exception as e:  # zarr raises many types for damaged metadata
        raise StoreError(f"{path}: not a readable Zarr v3 store ({type(e).__name__}: {e}).") from None


def open_arrays(group: Any, path: Path) -> dict[str, Any]:
    out = {}
    for name in ("fingerprint", *COORDS):
        try:
            out[name] = group[name]
        except KeyError:
            raise StoreError(f"{path}: array {name!r} is missing; the store is damaged.") from None
        except Exception as e:  # damaged array metadata
            raise StoreError(
                f"{path}: the metadata of array {name!r} is unreadable ({type(e).__name__}: {e});"
                " the store is damaged."
            ) from None
    return out

