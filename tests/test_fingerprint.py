"""The block kernel and graph: chunk invariance, faithfulness to torchvision, empty windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from conftest import textured, write_tif

import dask_fp
from dask_fp.fingerprint import plan_blocks
from dask_fp.inspection import RasterOptions
from dask_fp.layout import gather_windows
from dask_fp.models import IMAGENET_MEAN, IMAGENET_STD, ModelOptions
from dask_fp.tiling import Tiling, make_uid

RANDOM = ModelOptions("resnet18", weights="random", seed=7, threads=1)
TILING = Tiling(64, 32, 0.5)


def stored(path):
    st = dask_fp.open_store(path)
    c = st.coords()
    order = np.argsort(c["uid"])
    return c["uid"][order], np.asarray(st.fingerprints())[order], {k: v[order] for k, v in c.items()}


def test_chunk_invariance(tif, tmp_path, client):
    """Two chunkings (one splits windows across blocks) give the same uids and fingerprints."""
    runs = {}
    for chunk in (64, 1024):
        out = tmp_path / f"c{chunk}.zarr"
        dask_fp.ingest([str(tif)], str(out), model=RANDOM, tiling=TILING,
                       raster=RasterOptions(chunk=chunk), client=client, progress=False)
        runs[chunk] = stored(out)
    (u1, f1, _), (u2, f2, _) = runs[64], runs[1024]
    np.testing.assert_array_equal(u1, u2)
    assert np.abs(f1 - f2).max() <= 1e-5


def test_tile_count_equals_independent_count(tif, tmp_path, client):
    """Stored tiles are exactly the windows with <= max_empty empty pixels (counted directly)."""
    import rasterio

    with rasterio.open(tif) as ds:
        img = ds.read()
    empty = (img == 0).all(axis=0)
    want = set()
    for wy in range((320 - 64) // 32 + 1):
        for wx in range((384 - 64) // 32 + 1):
            if empty[wy * 32:wy * 32 + 64, wx * 32:wx * 32 + 64].mean() <= 0.5:
                want.add(int(make_uid(0, wy, wx)))
    out = tmp_path / "count.zarr"
    rep = dask_fp.ingest([str(tif)], str(out), model=RANDOM, tiling=TILING, raster=RasterOptions(chunk=96),
                         client=client, progress=False)
    uids, _, _ = stored(out)
    assert set(uids.tolist()) == want
    assert rep.sources[0].tiles == len(want) and rep.sources[0].dropped == 9 * 11 - len(want)


def test_faithful_to_direct_torchvision_forward(tif, tmp_path, client):
    """Stored fingerprints equal a plain torchvision ResNet-18 (same seeded weights) on the same pixels."""
    import rasterio

    out = tmp_path / "f.zarr"
    dask_fp.ingest([str(tif)], str(out), model=RANDOM, tiling=TILING, client=client, progress=False)
    uids, fps, c = stored(out)
    torch.manual_seed(RANDOM.seed)
    ref = torchvision.models.resnet18(weights=None)
    ref.fc = torch.nn.Identity()
    ref.eval()
    with rasterio.open(tif) as ds:
        img = ds.read()
    pick = np.linspace(0, len(uids) - 1, 5).astype(int)
    wins = np.stack([img[:, c["wy"][i] * 32:c["wy"][i] * 32 + 64, c["wx"][i] * 32:c["wx"][i] * 32 + 64]
                     for i in pick])
    x = (torch.from_numpy(wins).float() - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = ref(x).numpy()
    np.testing.assert_allclose(fps[pick], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(c["norm2"][pick], (fps[pick] ** 2).sum(1), rtol=1e-5)


def test_all_black_image_gives_zero_tiles_without_running_the_model(tmp_path, client):
    p = write_tif(tmp_path / "black.tif", np.zeros((3, 128, 128), np.uint8))
    out = tmp_path / "b.zarr"
    msgs = []
    rep = dask_fp.ingest([str(p)], str(out), model=RANDOM, tiling=TILING, client=client, progress=False,
                         log=msgs.append)
    assert rep.tiles == 0 and rep.sources[0].dropped == 9
    assert any("all 9 windows are empty" in m for m in msgs)
    assert dask_fp.open_store(out).committed == 0


def test_smaller_than_one_tile(tmp_path, client):
    p = write_tif(tmp_path / "small.tif", textured(40, 50))
    msgs = []
    rep = dask_fp.ingest([str(p)], str(tmp_path / "s.zarr"), model=RANDOM, tiling=TILING, client=client,
                         progress=False, log=msgs.append)
    assert rep.tiles == 0 and any("smaller than one" in m for m in msgs)


def test_gather_windows_and_plans():
    rgb = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8)
    iy, ix = np.nonzero(np.array([[True, False], [False, True]]))
    w = gather_windows(rgb, iy, ix, tile=4, stride=4)
    np.testing.assert_array_equal(w[1], rgb[:, 4:8, 4:8])
    buf = np.zeros((5, 3, 4, 4), np.uint8)
    assert gather_windows(rgb, iy[1:], ix[1:], tile=4, stride=4, out=buf).shape == (1, 3, 4, 4)
    np.testing.assert_array_equal(buf[0], rgb[:, 4:8, 4:8])
    plans = plan_blocks(((64, 64, 80), (128,)), 6, 4, 32)
    assert [(p.wy0, p.wy1) for p in plans] == [(0, 2), (2, 4), (4, 6)]
    assert sum(p.n_windows for p in plans) == 24


@pytest.mark.parametrize("dtype", ["float16"])
def test_float16_store(tif, tmp_path, client, dtype):
    out = tmp_path / "h.zarr"
    dask_fp.ingest([str(tif)], str(out), model=RANDOM, tiling=TILING, dtype=dtype, client=client, progress=False)
    st = dask_fp.open_store(out)
    assert st.arrays["fingerprint"].dtype == np.float16
    fp = np.asarray(st.fingerprints()).astype(np.float32)
    np.testing.assert_allclose(np.asarray(st.norm2()), (fp**2).sum(1), rtol=1e-5)


def test_open_dataset_is_kept_per_thread_and_reopened_when_the_file_changes(tmp_path):
    """Block tasks keep a dataset open per thread; a file replaced under the same path is reopened,
    never read through a stale handle."""
    import threading

    from dask_fp.fingerprint import open_dataset

    p = write_tif(tmp_path / "a.tif", textured(64, 64, seed=1))
    first = open_dataset(str(p), "h1")
    assert open_dataset(str(p), "h1") is first
    other: list = []
    t = threading.Thread(target=lambda: other.append(open_dataset(str(p), "h1")))
    t.start()
    t.join()
    assert other[0] is not first  # each thread its own handle
    new = textured(64, 64, seed=2)
    write_tif(tmp_path / "b.tif", new).replace(p)  # same path, new file
    again = open_dataset(str(p), "h1")
    assert again is not first
    np.testing.assert_array_equal(again.read(), new)
