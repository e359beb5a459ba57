"""Run the map page: open the store, optionally persist it on the cluster, start uvicorn, print the URL."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..index import AUTO_CODES_ROWS, Index, choose_method, has_index, old_index, open_index
from ..store import Store, open_store
from .app import ServeOptions, create_app


def serve(
    store: Store | str | os.PathLike[str],
    *,
    client: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    persist: bool = True,
    options: ServeOptions | None = None,
    log: Callable[[str], None] | None = None,
) -> None:
    """Serve the map page for ``store`` until interrupted.

    Parameters
    ----------
    store : Store or path
        The fingerprint store (opened read-only).
    client : distributed.Client
        Where queries run; its dashboard link is shown on the page.
    host, port : str, int
        Where to listen; 127.0.0.1 by default (only this machine). Port 0 picks a free port.
    persist : bool
        Keep the fingerprints in cluster memory (off for stores larger than the cluster's memory),
        and the compact codes too when the store has an index (:meth:`dask_fp.index.Index.persist`).
    """
    import uvicorn

    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    st = store if isinstance(store, Store) else open_store(store)
    code_index = load(st, persist=persist, log=say)
    options = options or ServeOptions()
    opts = replace(options, dashboard=options.dashboard or getattr(client, "dashboard_link", None))
    app = create_app(st, opts, code_index=code_index)
    sock = listen_socket(host, port)
    shown = f"[{host}]" if ":" in host else host
    say(f"serve: map page at http://{shown}:{sock.getsockname()[1]}/  (Ctrl-C stops it)")
    config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=5, limit_concurrency=256)
    uvicorn.Server(config).run(sockets=[sock])


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket for uvicorn, bound to ``host:port`` (port 0: a free one).

    Made with ``proto=IPPROTO_TCP``: asyncio sets TCP_NODELAY on the connections it
    accepts only then. Without it each response (headers, then body) waits for the
    browser's delayed ACK, about 40 ms per request on Linux (bench/serve.py measured
    44 ms per request before this; docs/performance.md).
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted sockets on Linux
    sock.bind((host, port))
    sock.listen(2048)  # connections made as soon as the URL is printed wait for the server, not fail
    return sock


def load(store: Store, *, persist: bool, log: Callable[[str], None]) -> Index | None:
    """Open ``store``'s compact-code index (None without one); with ``persist``, keep the
    fingerprints and the codes in cluster memory (:meth:`Store.persist`, :meth:`Index.persist`)."""
    code_index = open_index(store) if has_index(store) else None
    if persist:
        log(f"serve: loading {store.committed} fingerprints into cluster memory (--no-persist to stream them)")
        store.persist()
        if code_index is not None:  # like the fingerprints: the codes are scanned by every query
            code_index.persist()
    if choose_method(store, "auto") == "codes" and code_index is not None:
        log(f"serve: searches use the compact-code index ({code_index.indexed} rows, "
            f"{code_index.attrs['nbits']} bits, {code_index.params.lists} lists); candidates are re-ranked exactly")
    else:
        log("serve: searches scan every fingerprint exactly" + (
            "" if code_index is None else f" (the index is used from {AUTO_CODES_ROWS} rows on)"))
    if old_index(store):
        log(f"serve: the store's compact-code index is of an earlier format and is not used; rebuild it with"
            f" `dask-fp index {store.path}`")
    return code_index
