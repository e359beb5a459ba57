"""Search results: a table with one row per (query, rank), and ways to look at them."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import pandas as pd

from .export import hits_geojson, mosaic

if TYPE_CHECKING:
    from .query import Query
    from .store import Store

TABLE_COLUMNS = ["query", "label", "rank", "uid", "distance", "score", "source", "path", "wy", "wx",
                 "x", "y", "lon", "lat", "row"]


class Hits:
    """Search results: a table with one row per (query, rank), and helpers to look at them.

    ``rank_by`` names the column that ranks the hits: ``"distance"`` (k-NN
    search, squared Euclidean, lower is better; ``score`` is NaN) or
    ``"score"`` (classifier probability, higher is better; ``distance`` is NaN).
    """

    def __init__(self, table: pd.DataFrame, queries: list[Query], store: Store, *,
                 rank_by: str = "distance") -> None:
        if rank_by not in ("distance", "score"):
            raise ValueError(f"rank_by must be 'distance' or 'score', got {rank_by!r}")
        self.table = table
        self.queries = queries
        self.store = store
        self.rank_by = rank_by
        #: The fitted estimator behind classifier hits (None for k-NN hits).
        self.classifier: Any = None

    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        return f"Hits({len(self.queries)} queries, {len(self.table)} hits)\n{self.table.head(20)!r}"

    def head(self, n: int) -> Hits:
        """The best ``n`` hits of each query, as Hits."""
        h = Hits(self.table[self.table["rank"] <= n], self.queries, self.store, rank_by=self.rank_by)
        h.classifier = self.classifier
        return h

    def for_query(self, i: int) -> pd.DataFrame:
        return self.table[self.table["query"] == i]

    def to_geojson(self, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        return hits_geojson(self, path)

    def to_polygons(self) -> Any:
        """Dissolved hit footprints (places) in WGS84 as a GeoDataFrame; see :mod:`dask_fp.places`."""
        from .places import places

        return places(self)[0]

    def to_geoparquet(self, path: str | os.PathLike[str]) -> str:
        """Write the places (:meth:`to_polygons`) as GeoParquet; returns the path."""
        self.to_polygons().to_parquet(path)
        return str(path)

    def score_raster(self, out_dir: str | os.PathLike[str]) -> list[str]:
        """One COG per (query, source): distance or probability per window; see :mod:`dask_fp.places`."""
        from .places import score_rasters

        return score_rasters(self, out_dir)

    def mosaic(self, path: str | os.PathLike[str], query: int = 0) -> str:
        return mosaic(self, query, path)

