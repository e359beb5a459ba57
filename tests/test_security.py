"""Security basics: what is loaded, what is unpickled, what is read or written, what listens.

* Weights: ``torch.load(..., weights_only=True)`` only, and a file is hashed before it is loaded.
* Nothing of a store is unpickled: its metadata is JSON, its chunks numeric arrays.
* Paths in a store's sources table are only ever opened for reading; never run, never written.
* Whatever dask-fp starts listens on localhost.
"""

from __future__ import annotations

import ast
import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import textured, write_tif

import dask_fp
from dask_fp.cli import main
from dask_fp.errors import RasterError, WeightsError

PACKAGE = Path(dask_fp.__file__).resolve().parent


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def test_package_passes_ruff_security_rules():
    """ruff's flake8-bandit rules (S: pickle, eval/exec, shell=True, unsafe YAML, bind-all, ...) over dask_fp.

    The same rules run in `make lint` (pyproject.toml selects them); here they gate the tests
    too. ``torch.load(weights_only=True)`` is checked by behaviour below.
    """
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        pytest.skip("ruff is not installed (it comes with the dev extra)")
    res = subprocess.run([str(ruff), "check", "--select", "S", "--no-cache", str(PACKAGE)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_read_paths_open_rasters_read_only():
    """The modules that open a store's source paths only ever open them for reading."""
    for name in ("raster.py", "export.py", "query.py", "hits.py"):
        tree = ast.parse((PACKAGE / name).read_text())
        for call, func in _calls(tree):
            if func == "rasterio.open":
                mode = call.args[1] if len(call.args) > 1 else _kw(call, "mode")
                assert mode is None or (isinstance(mode, ast.Constant) and mode.value == "r"), (name, call.lineno)
            if func == "open" and len(call.args) > 1:
                mode = call.args[1]
                assert isinstance(mode, ast.Constant) and "r" in mode.value, (name, call.lineno)


class _Evil:
    """Unpickling this creates a marker file: proof that a file was (or was not) unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_weights_are_hashed_before_loading_and_loaded_weights_only(tmp_path):
    from dask_fp.embedder import LoadedModel
    from dask_fp.models import ModelOptions, ResolvedWeights, get_spec, resolve_weights

    marker = tmp_path / "pwned"
    evil = tmp_path / "resnet18-f37072fd.pth"
    evil.write_bytes(pickle.dumps({"conv1.weight": _Evil(str(marker))}))
    with pytest.raises(WeightsError, match="Refusing to load it"):
        resolve_weights(ModelOptions("resnet18", weights=str(evil)))
    assert not marker.exists()
    # Even a file that got past the hash check is loaded with weights_only=True: no code runs.
    sha = hashlib.sha256(evil.read_bytes()).hexdigest()
    spec = get_spec("resnet18")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|unsupported"):
        LoadedModel(spec, ResolvedWeights(spec.name, str(evil), sha, "pretrained"), ModelOptions("resnet18"))
    assert not marker.exists()


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, client):
    d = tmp_path_factory.mktemp("sec")
    tif = write_tif(d / "ortho.tif", textured(128, 160, seed=31))
    store = d / "s.zarr"
    dask_fp.ingest([str(tif)], str(store), client=client, progress=False,
                   model=dask_fp.ModelOptions("resnet18", weights="random", seed=7),
                   tiling=dask_fp.Tiling(64, 32))
    return store, tif


def test_store_holds_only_json_and_numeric_chunks(small_store):
    store, _ = small_store
    numeric = {"float16", "float32", "float64", "int32", "int64"}
    codecs_ok = {"bytes", "zstd", "blosc", "gzip", "crc32c", "transpose"}
    # The sources table holds one JSON record per source as UTF-8 text (vlen-utf8 codec: text, no pickle).
    for meta in store.rglob("zarr.json"):
        doc = json.loads(meta.read_text())  # JSON, never a pickle
        nodes = [doc, *doc.get("consolidated_metadata", {}).get("metadata", {}).values()] \
            if doc.get("consolidated_metadata") else [doc]
        for node in nodes:
            if node.get("node_type") == "array" and node["data_type"] == "string":
                assert {c["name"] for c in node["codecs"]} <= {"vlen-utf8", "zstd"}, meta
                assert node.get("dimension_names") == ["source_entry"], meta
            elif node.get("node_type") == "array":
                assert node["data_type"] in numeric, meta
                assert {c["name"] for c in node["codecs"]} <= codecs_ok, meta
    for f in store.rglob("*"):
        if f.is_file() and f.name != "zarr.json":
            rel = f.relative_to(store).parts
            assert len(rel) >= 3 and rel[1] == "c", f  # only chunk files: NAME/c/...
    # Chunks are decoded only through the codecs named in the metadata (checked above),
    # none of which unpickles; they decode to plain numeric arrays.
    st = dask_fp.open_store(store)
    for name, arr in st.arrays.items():
        assert arr[: st.committed].dtype.kind in "fi", name


def _listing(d: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in d.iterdir()
            if p.is_file()}


def test_source_files_are_only_read(small_store, tmp_path, client, capfd):
    """A query that reads windows back (mosaics) leaves the source file, its mtime and its
    folder exactly as they were (no GDAL sidecar files either)."""
    store, tif = small_store
    before = _listing(tif.parent)
    uid = int(dask_fp.open_store(store).coords()["uid"][0])
    rc = main(["query", str(store), "--uid", str(uid), "-k", "3", "--out", str(tmp_path / "out"),
               "--scheduler", client.scheduler.address])
    assert rc == 0, capfd.readouterr().err
    assert list((tmp_path / "out").glob("mosaic*.png"))
    assert _listing(tif.parent) == before


@pytest.mark.parametrize("path", ["$(touch {m})", "`touch {m}`", "; touch {m}", "|touch {m}", "{m}"])
def test_store_paths_are_never_executed_or_written(small_store, tmp_path, path):
    """A store whose sources table was tampered with: read_window fails cleanly, runs nothing,
    creates nothing."""
    from dask_fp.raster import read_window

    marker = tmp_path / "marker"
    src = dict(dask_fp.open_store(small_store[0]).sources[0], path=path.format(m=marker))
    with pytest.raises(RasterError, match="cannot read back window"):
        read_window(src, 0, 0, tile=64, stride=32)
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _listening() -> set[tuple[int, str, int]]:
    import psutil

    me = psutil.Process()
    out = set()
    for p in [me, *me.children(recursive=True)]:
        try:
            conns = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out |= {(p.pid, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return out


def test_local_cluster_listens_on_localhost_only():
    from urllib.parse import urlparse

    from dask_fp.cluster import ClusterOptions, get_client

    before = _listening()
    with get_client(ClusterOptions(workers=1), log=lambda m: None) as client:
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        assert urlparse(client.dashboard_link).hostname == "127.0.0.1"
        workers = client.scheduler_info()["workers"]
        assert workers and all(a.startswith("tcp://127.0.0.1:") for a in workers)
        new = _listening() - before
    assert new, "found no listening socket at all?"
    assert all(ip in ("127.0.0.1", "::1") for _, ip, _ in new), new
