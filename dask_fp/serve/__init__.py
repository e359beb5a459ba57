"""``dask-fp serve``: the map page over a store (click a place, see similar places, label, refine, export).

:func:`create_app` builds the FastAPI app (routes in :mod:`.app`, pixels in
:mod:`.render`, tile lookup in :mod:`.locate`, queries in :mod:`.results`);
:func:`serve` runs it with uvicorn on a Dask client. The page's JavaScript and
CSS (Leaflet, Leaflet.draw, with their licences) ship in ``static/``: nothing
is fetched from the network at run time.
"""

from __future__ import annotations

from .app import ServeOptions, create_app
from .run import serve

__all__ = ["ServeOptions", "create_app", "serve"]
