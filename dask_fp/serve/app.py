"""The map page's web app: thin FastAPI routes over the library (titiler style).

Each route validates its parameters (pydantic / FastAPI), calls one library
function and returns. Sources are addressed by their index in the store's
sources table, tiles by uid; no request ever names a file. Queries run in
their own thread (they wait on the Dask cluster), map tiles and thumbnails in
a separate pool, so panning never waits for a search. The store is only read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from ..errors import DaskFpError, QueryError, RasterError
from ..index import Index, choose_method, has_index, open_index
from ..store import Store
from . import render
from .locate import TileIndex
from .results import export_bytes, hits_features, run_query

UID = Annotated[int, Field(ge=0, le=2**63 - 1)]
MAX_BODY = 256 * 1024  # bytes; a request body is a few hundred uids and one polygon
MAX_ZOOM = 24


@dataclass(frozen=True)
class ServeOptions:
    """How the app runs.

    Parameters
    ----------
    tile_threads : int
        Threads rendering map tiles and thumbnails.
    query_threads : int
        Threads running queries against the cluster (each query is already parallel on the cluster).
    dashboard : str or None
        Link to the Dask dashboard, shown on the page.
    min_labels : int
        Positives and negatives each needed before classifier mode is offered.
    """

    tile_threads: int = 4
    query_threads: int = 1
    dashboard: str | None = None
    min_labels: int = 2


class Geometry(BaseModel):
    """A GeoJSON Polygon or MultiPolygon in WGS84 (the area to search in)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["Polygon", "MultiPolygon"]
    coordinates: list[Any] = Field(max_length=1000)


class SearchRequest(BaseModel):
    """A query: example tiles (positives), counter-examples (negatives), an area, and the mode."""

    model_config = ConfigDict(extra="forbid")
    positives: list[UID] = Field(min_length=1, max_length=500)
    negatives: list[UID] = Field(default_factory=list, max_length=500)
    k: int = Field(default=20, ge=1, le=500)
    area: Geometry | None = None
    mode: Literal["search", "classify"] = "search"
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    method: Literal["auto", "exact", "codes"] = "auto"


def create_app(store: Store, options: ServeOptions = ServeOptions(), *, code_index: Index | None = None) -> FastAPI:
    """The FastAPI app serving ``store``'s map page and its JSON/PNG API.

    Searches choose exact or compact-code search as the library does
    (:func:`dask_fp.index.choose_method`); ``code_index`` is the store's index,
    opened and usually persisted by :func:`~dask_fp.serve.serve` (opened here,
    once, when None and the store has one).
    """
    index = TileIndex(store)
    if code_index is None and has_index(store):
        code_index = open_index(store)
    tile_pool = ThreadPoolExecutor(options.tile_threads, thread_name_prefix="dask-fp-tiles")
    query_pool = ThreadPoolExecutor(options.query_threads, thread_name_prefix="dask-fp-query")
    static = resources.files("dask_fp.serve") / "static"

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        tile_pool.shutdown(wait=False, cancel_futures=True)
        query_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="dask-fp", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.index = index

    async def in_pool(pool: ThreadPoolExecutor, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, partial(fn, *args, **kwargs))

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Any:
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return JSONResponse({"detail": "a POST needs a Content-Length header"}, status_code=411)
            if int(length) > MAX_BODY:
                return JSONResponse({"detail": f"request body over {MAX_BODY} bytes"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        msgs = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()[:10]]
        return JSONResponse({"detail": "; ".join(msgs) or "invalid request"}, status_code=422)

    def source_or_404(i: int) -> dict[str, Any]:
        if i not in index.sources:
            raise HTTPException(404, f"no source {i} in this store ({len(index.sources)} sources)")
        return index.sources[i]

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(str(static / "index.html"))

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        a = store.attrs
        srcs = [{"index": i, "name": s["path"].rsplit("/", 1)[-1], "crs": s.get("crs_name") or None,
                 "bounds": index.bounds(i), "shape": list(s["shape"][:2]), "tiles": int(s["tiles"])}
                for i, s in index.sources.items()]
        codes = None if code_index is None else {"rows": code_index.indexed, "bits": int(code_index.attrs["nbits"])}
        return {"store": store.path.name, "tiles": store.committed, "tile": int(a["tile"]),
                "stride": int(a["stride"]), "model": a["model"], "sources": srcs,
                "dashboard": options.dashboard, "min_labels": options.min_labels,
                "persisted": store.persisted, "index": codes, "method": choose_method(store, "auto")}

    @app.get("/api/tiles/{source}/{z}/{x}/{y}.png")
    async def map_tile(source: Annotated[int, Path(ge=0)], z: Annotated[int, Path(ge=0, le=MAX_ZOOM)],
                       x: Annotated[int, Path(ge=0)], y: Annotated[int, Path(ge=0)]) -> Response:
        if x >= 2**z or y >= 2**z:
            raise HTTPException(422, f"tile {z}/{x}/{y}: x and y must be below 2**z = {2**z}")
        src = source_or_404(source)
        if not src.get("crs"):
            raise HTTPException(404, f"source {source} has no CRS: use /api/sources/{source}/preview.png")
        try:
            body = await in_pool(tile_pool, render.map_tile, src, z, x, y)
        except render.OutsideSource as e:
            raise HTTPException(404, str(e)) from None
        return Response(body, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/sources/{source}/preview.png")
    async def source_preview(source: Annotated[int, Path(ge=0)]) -> Response:
        body, factor = await in_pool(tile_pool, render.preview, source_or_404(source))
        return Response(body, media_type="image/png", headers={"X-Pixels-Per-Preview-Pixel": f"{factor:.6g}"})

    @app.get("/api/thumbnails/{uid}.png")
    async def thumbnail(uid: Annotated[int, Path(ge=0, le=2**63 - 1)]) -> Response:
        loc = index.locate(uid)
        body = await in_pool(tile_pool, render.thumbnail, index.sources[loc.source], loc.wy, loc.wx,
                             tile=index.tile, stride=index.stride)
        return Response(body, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/locate")
    def locate(lon: Annotated[float | None, Query(ge=-180, le=180)] = None,
               lat: Annotated[float | None, Query(ge=-90, le=90)] = None,
               source: Annotated[int | None, Query(ge=0)] = None,
               row: Annotated[float | None, Query(ge=-1e9, le=1e9)] = None,
               col: Annotated[float | None, Query(ge=-1e9, le=1e9)] = None) -> dict[str, Any]:
        if lon is not None and lat is not None and source is None:
            found = index.at_lonlat(lon, lat)
        elif source is not None and row is not None and col is not None and lon is None and lat is None:
            source_or_404(source)
            found = index.at_pixel(source, row, col)
        else:
            raise HTTPException(422, "give either lon and lat, or source, row and col")
        if found is None:
            raise HTTPException(404, "no stored tile there")
        return {"type": "Feature", "geometry": found.geometry,
                "properties": {"uid": str(found.uid), "source": found.source, "wy": found.wy, "wx": found.wx,
                               "pixel": found.pixel}}

    @app.post("/api/search")
    async def search(req: SearchRequest) -> dict[str, Any]:
        t0 = time.perf_counter()
        res = await in_pool(query_pool, run_query, store, index, req, code_index)
        fc = await in_pool(tile_pool, hits_features, index, res.hits)
        return {"mode": req.mode, "method": res.method, "method_detail": res.detail,
                "seconds": round(time.perf_counter() - t0, 3), "hits": fc}

    @app.post("/api/export/{fmt}")
    async def export(fmt: Literal["geojson", "geoparquet"], req: SearchRequest) -> Response:
        res = await in_pool(query_pool, run_query, store, index, req, code_index)
        body, media = await in_pool(tile_pool, export_bytes, index, res.hits, req, fmt)
        name = f"dask-fp-hits.{'geojson' if fmt == 'geojson' else 'parquet'}"
        return Response(body, media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @app.exception_handler(QueryError)
    async def query_error(request: Request, exc: QueryError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(RasterError)
    async def raster_error(request: Request, exc: RasterError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=502)

    @app.exception_handler(DaskFpError)
    async def library_error(request: Request, exc: DaskFpError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=500)

    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    return app
