"""The colour-layout model: a numpy oracle, block vs window paths, and the full ingest/query/CLI path."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import textured, write_tif

import dask_fp
from dask_fp.embedder import embed, load_model
from dask_fp.errors import WeightsError
from dask_fp.inspection import RasterOptions
from dask_fp.layout import gather_windows, layout_fingerprints, layout_of_block
from dask_fp.models import ModelOptions, get_spec, resolve_weights

LAYOUT = ModelOptions("colour-layout")


def oracle(window: np.ndarray, grid: int = 8) -> np.ndarray:
    """Cell means by explicit slicing in float64, flattened band by band, L2-normalised."""
    c, h, w = window.shape
    v = []
    for b in range(c):
        for gy in range(grid):
            for gx in range(grid):
                cell = window[b, gy * h // grid:(gy + 1) * h // grid, gx * w // grid:(gx + 1) * w // grid]
                v.append(cell.astype(np.float64).mean() / 255.0)
    v = np.array(v)
    n = np.linalg.norm(v)
    return v / n if n else v


@pytest.mark.parametrize("shape", [(3, 64, 64), (3, 50, 37), (3, 8, 8)])
def test_layout_matches_the_numpy_oracle(shape):
    rng = np.random.default_rng(sum(shape))
    wins = rng.integers(0, 256, (4, *shape), dtype=np.uint8)
    wins[1] = 0  # an all-black window: a zero vector, not NaN
    got = layout_fingerprints(wins)
    assert got.shape == (4, 192) and got.dtype == np.float32
    for k in range(4):
        np.testing.assert_allclose(got[k], oracle(wins[k]), rtol=1e-6, atol=1e-7)
    assert not got[1].any()
    with pytest.raises(ValueError, match="at least 8 px"):
        layout_fingerprints(np.zeros((1, 3, 7, 64), np.uint8))


@pytest.mark.parametrize(("tile", "stride"), [(64, 32), (64, 16), (64, 64), (48, 20), (40, 24)])
def test_block_path_is_bit_identical_to_cut_windows(tile, stride):
    """The cell-table shortcut (cells line up: 64/32, 64/16, 64/64) and the per-window fallback
    (48/20, 40/24) give exactly the fingerprints of the cut windows."""
    rng = np.random.default_rng(tile + stride)
    n_wy, n_wx = 5, 4
    rgb = rng.integers(0, 256, (3, (n_wy - 1) * stride + tile + 7, (n_wx - 1) * stride + tile + 3), dtype=np.uint8)
    iy, ix = np.nonzero(rng.random((n_wy, n_wx)) < 0.7)
    got = layout_of_block(rgb, iy, ix, tile=tile, stride=stride)
    want = layout_fingerprints(gather_windows(rgb, iy, ix, tile=tile, stride=stride))
    np.testing.assert_array_equal(got, want)
    assert layout_of_block(rgb, iy[:0], ix[:0], tile=tile, stride=stride).shape == (0, 192)


def test_registry_entry_weights_and_embed():
    spec = get_spec("colour-layout")
    w = resolve_weights(LAYOUT)
    assert spec.dim == 192 and w.kind == "none" and w.path is None and len(w.sha256) == 64
    assert resolve_weights(LAYOUT) == w
    with pytest.raises(WeightsError, match="without weights"):
        resolve_weights(ModelOptions("colour-layout", weights="random"))
    pix = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    np.testing.assert_array_equal(embed(pix, LAYOUT), layout_fingerprints(pix))
    assert load_model(LAYOUT, w).precision == "float32"
    with pytest.raises(ValueError, match=r"\(n, 3, H, W\)"):
        embed(np.zeros((2, 32, 32, 3), np.uint8), LAYOUT)


def test_ingest_stores_the_model_and_is_byte_identical_across_chunkings(tif, tmp_path, client):
    """Through the normal ingest path: the store records colour-layout, every fingerprint equals the
    oracle on the window read straight from the file, and two chunkings give identical bytes."""
    import rasterio

    tiling = dask_fp.Tiling(64, 32, 0.5)
    runs = {}
    for chunk in (64, 1024):
        out = tmp_path / f"c{chunk}.zarr"
        dask_fp.ingest([str(tif)], str(out), model=LAYOUT, tiling=tiling, raster=RasterOptions(chunk=chunk),
                       client=client, progress=False)
        st = dask_fp.open_store(out)
        c = st.coords()
        order = np.argsort(c["uid"])
        runs[chunk] = (st, c["uid"][order], np.asarray(st.fingerprints())[order], c["wy"][order], c["wx"][order])
    st, uids, fps, wy, wx = runs[64]
    assert st.attrs["model"] == "colour-layout" and st.attrs["feature_dim"] == 192
    assert st.attrs["weights"] == "none"
    np.testing.assert_array_equal(uids, runs[1024][1])
    assert fps.tobytes() == runs[1024][2].tobytes()
    with rasterio.open(tif) as ds:
        img = ds.read()
    for k in np.linspace(0, len(uids) - 1, 6).astype(int):
        win = img[:, wy[k] * 32:wy[k] * 32 + 64, wx[k] * 32:wx[k] * 32 + 64]
        np.testing.assert_allclose(fps[k], oracle(win), rtol=1e-6, atol=1e-7)


def test_picture_query_embeds_with_the_store_model(tmp_path, client):
    """A picture of a stored tile finds that tile at distance 0: queries embed with colour-layout."""
    from PIL import Image

    data = textured(128, 192, seed=4)
    tif = write_tif(tmp_path / "a.tif", data)
    dask_fp.ingest([str(tif)], str(tmp_path / "s.zarr"), model=LAYOUT, tiling=dask_fp.Tiling(64, 64),
                   client=client, progress=False)
    st = dask_fp.open_store(tmp_path / "s.zarr")
    Image.fromarray(np.ascontiguousarray(data[:, 64:, 128:].transpose(1, 2, 0))).save(tmp_path / "q.png")
    hits = dask_fp.search(st, images=[str(tmp_path / "q.png")], k=1, dedup=False)
    assert (hits.table["wy"][0], hits.table["wx"][0]) == (1, 2)
    assert hits.table["distance"][0] < 1e-10
    with pytest.raises(dask_fp.errors.DaskFpError, match="colour-layout"):
        dask_fp.search(st, images=[str(tmp_path / "q.png")], k=1, model=ModelOptions("resnet18", weights="random"))


def test_cli_ingest_with_colour_layout(tmp_path, client, capsys):
    from dask_fp.cli import main

    tif = write_tif(tmp_path / "a.tif", textured(128, 128, seed=5))
    rc = main(["ingest", str(tif), "--store", str(tmp_path / "s.zarr"), "--model", "colour-layout", "--tile", "64",
               "--stride", "32", "--quiet", "--json", "--scheduler", client.scheduler.address])
    out = capsys.readouterr()
    assert rc == 0, out.err
    st = dask_fp.open_store(tmp_path / "s.zarr")
    assert st.attrs["model"] == "colour-layout" and st.committed == 9
    rc = main(["ingest", str(tif), "--store", str(tmp_path / "t.zarr"), "--model", "colour-layout",
               "--weights", "random", "--quiet", "--scheduler", client.scheduler.address])
    assert rc != 0 and "without weights" in capsys.readouterr().err


def test_device_windows_gathers_the_same_pixels_as_numpy():
    """The GPU path's gather (block moved once, windows indexed on the device), run on the CPU,
    gives exactly the windows numpy cuts, batch by batch."""
    from dask_fp.embedder import device_windows

    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (3, 4 * 32 + 64 + 5, 3 * 32 + 64), dtype=np.uint8)
    iy, ix = np.nonzero(rng.random((5, 4)) < 0.6)
    batch = device_windows(rgb, iy, ix, tile=64, stride=32, batch_size=4, device="cpu")
    for i in range(0, len(iy), 4):
        got = batch(i).numpy()
        np.testing.assert_array_equal(got, gather_windows(rgb, iy[i:i + 4], ix[i:i + 4], tile=64, stride=32))
