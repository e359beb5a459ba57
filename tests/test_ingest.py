"""End to end through the command line, on a real multi-process LocalCluster."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from conftest import textured, write_tif

import dask_fp


def cli(*args, check=True):
    res = subprocess.run([sys.executable, "-m", "dask_fp.cli", *map(str, args)], capture_output=True,
                         text=True, timeout=300)
    if check and res.returncode != 0:
        raise AssertionError(f"exit {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def test_cli_ingest_and_info_end_to_end(tif, tmp_path):
    out = tmp_path / "e2e.zarr"
    second = write_tif(tmp_path / "second.tif", textured(200, 200, seed=5))
    res = cli("ingest", tif, second, "--store", out, "--weights", "random", "--tile", 64, "--stride", 32,
              "--chunk", 96, "--workers", 2, "--json")
    assert "dashboard: http://127.0.0.1:" in res.stderr and "tiles/s" in res.stderr
    info = json.loads(res.stdout)
    assert info["sources"] == 2 and info["tiles"] == dask_fp.open_store(out).committed > 0
    assert info["this_run"]["tiles_added"] == info["tiles"]
    assert info["compression_uint8_pixels"] == 64 * 64 * 3 / (512 * 4)
    res = cli("info", out)
    assert "kept of" in res.stdout and "second.tif" in res.stdout
    assert json.loads(cli("info", out, "--json").stdout)["tiles"] == info["tiles"]
    # A second run adds nothing.
    again = json.loads(cli("ingest", tif, "--store", out, "--weights", "random", "--tile", 64, "--stride", 32,
                           "--workers", 1, "--json", "--quiet").stdout)
    assert again["this_run"]["tiles_added"] == 0 and again["tiles"] == info["tiles"]
    # Appending without the model and tiling options takes the store's (random weights, 64/32 px).
    third = write_tif(tmp_path / "third.tif", textured(160, 160, seed=6))
    more = json.loads(cli("ingest", third, "--store", out, "--workers", 1, "--json", "--quiet").stdout)
    assert more["this_run"]["tiles_added"] == 3 * 3 and more["tile"] == 64 and more["stride"] == 32  # 160 px
    st = dask_fp.open_store(out)
    assert len(np.unique(st.coords()["uid"])) == st.committed


def test_cli_errors_are_one_line_and_nonzero(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_text("not an image")
    res = cli("ingest", bad, "--store", tmp_path / "s.zarr", "--weights", "random", "--workers", 1, check=False)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith("dask-fp: error: ")
    assert "bad.tif" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "s.zarr" / "zarr.json").exists()
    res = cli("info", tmp_path / "none.zarr", check=False)
    assert res.returncode == 1 and "no fingerprint store" in res.stderr
