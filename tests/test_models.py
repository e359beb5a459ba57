"""Model registry, weights resolution and hashing, preprocessing, real pretrained weights."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision

from dask_fp.embedder import embed, load_model
from dask_fp.errors import WeightsError
from dask_fp.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelOptions,
    WeightsFile,
    get_spec,
    resolve_weights,
    torch_cache_dir,
)


def seeded_resnet18_file(path, seed=3):
    """A full torchvision ResNet-18 state dict (fc included), seeded, saved like the published file."""
    torch.manual_seed(seed)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def spec_expecting(digest: str, filename: str = "resnet18-test.pth"):
    """The resnet18 registry entry, but publishing ``digest`` (as if it were the real file)."""
    spec = get_spec("resnet18")
    return dataclasses.replace(spec, weights=WeightsFile(filename=filename, sha256=digest, url=None))


def test_local_file_with_right_hash_loads(tmp_path):
    path, digest = seeded_resnet18_file(tmp_path / "w.pth")
    w = resolve_weights(ModelOptions("resnet18", weights=str(path)), spec=spec_expecting(digest))
    assert w.sha256 == digest and w.kind == "pretrained" and w.path == str(path)


def test_wrong_hash_is_refused(tmp_path):
    path, _ = seeded_resnet18_file(tmp_path / "w.pth")
    with pytest.raises(WeightsError, match="Refusing to load") as e:
        resolve_weights(ModelOptions("resnet18", weights=str(path)))
    assert "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec" in str(e.value)


def test_missing_weights_error_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(WeightsError) as e:
        resolve_weights(ModelOptions("resnet18"), download=False)
    expected = tmp_path / "torch-home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(expected) in str(e.value) and "--weights" in str(e.value)


def test_torchvision_cache_is_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    cache = torch_cache_dir()
    cache.mkdir(parents=True)
    path, digest = seeded_resnet18_file(cache / "resnet18-test.pth")
    w = resolve_weights(ModelOptions("resnet18"), spec=spec_expecting(digest), download=False)
    assert w.path == str(path)


def test_download_failure_falls_back_to_clear_error(tmp_path, monkeypatch):
    """The download path runs (no network here, or a bad URL) and ends in our error."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    spec = dataclasses.replace(get_spec("resnet18"), weights=WeightsFile(
        filename="resnet18-none.pth", sha256="0" * 64, url="file:///nonexistent/resnet18-none.pth"))
    with pytest.raises(WeightsError, match="download from file:///nonexistent"):
        resolve_weights(ModelOptions("resnet18"), spec=spec)


def test_unknown_model():
    with pytest.raises(WeightsError, match="known models: resnet18, efficientnet-lite0"):
        get_spec("vgg")


def test_random_weights_are_seeded_and_recorded():
    a = resolve_weights(ModelOptions("resnet18", weights="random", seed=1))
    b = resolve_weights(ModelOptions("resnet18", weights="random", seed=1))
    c = resolve_weights(ModelOptions("resnet18", weights="random", seed=2))
    assert a.kind == "random" and a.sha256 == b.sha256 != c.sha256
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    opts = ModelOptions("resnet18", weights="random", seed=1)
    np.testing.assert_array_equal(embed(x, opts, a), embed(x, opts, b))


def test_loaded_file_gives_the_torchvision_features(tmp_path):
    """A weights file loads into the 512-d average-pool model; same numbers as torchvision's own."""
    path, digest = seeded_resnet18_file(tmp_path / "w.pth")
    opts = ModelOptions("resnet18", weights=str(path))
    w = resolve_weights(opts, spec=spec_expecting(digest))
    pix = np.random.default_rng(1).integers(0, 256, (3, 3, 64, 64), dtype=np.uint8)
    ours = load_model(opts, w).embed(pix)
    ref = torchvision.models.resnet18(weights=None)
    ref.load_state_dict(torch.load(path, weights_only=True))
    ref.fc = torch.nn.Identity()
    ref.eval()
    x = (torch.from_numpy(pix).float() - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = ref(x).numpy()
    assert ours.shape == (3, 512)
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)


def test_efficientnet_lite0_is_really_pretrained():
    """A real photo (scikit-image's coffee) is classified as ImageNet 'espresso' (967)."""
    from PIL import Image
    from skimage import data

    opts = ModelOptions("efficientnet-lite0")
    w = resolve_weights(opts)
    assert w.kind == "pretrained" and w.sha256.startswith("57934424")
    m = load_model(opts, w)
    img = np.asarray(Image.fromarray(data.coffee()).resize((224, 224)), dtype=np.uint8)
    x = (torch.from_numpy(img.transpose(2, 0, 1)[None].copy()).float() - m.mean) / m.std
    with torch.no_grad():
        logits = m.net.net(x)
    assert int(logits.argmax()) == 967
    feats = m.embed(img.transpose(2, 0, 1)[None].copy())
    assert feats.shape == (1, 1280) and np.isfinite(feats).all()


def test_embed_rejects_wrong_shape():
    opts = ModelOptions("resnet18", weights="random")
    with pytest.raises(ValueError, match=r"\(n, 3, H, W\)"):
        embed(np.zeros((2, 64, 64, 3), np.uint8), opts)


def test_bfloat16_precision_is_autocast_on_the_cpu_too():
    """precision="bfloat16" runs the forward pass in bf16 autocast (what GPU workers do by default):
    close to float32, not equal, and labelled as such."""
    from dask_fp.embedder import load_model
    from dask_fp.models import precision_label

    pix = np.random.default_rng(3).integers(0, 255, (4, 3, 64, 64), dtype=np.uint8)
    opts = ModelOptions("resnet18", weights="random", seed=1, device="cpu", threads=1)
    bf = replace(opts, precision="bfloat16")
    f32 = embed(pix, opts, resolve_weights(opts))
    b16 = embed(pix, bf, resolve_weights(bf))
    rel = np.abs(b16 - f32).max() / np.abs(f32).max()
    assert 0 < rel < 0.05
    assert load_model(bf, resolve_weights(bf)).precision == "bfloat16-autocast"
    assert load_model(opts, resolve_weights(opts)).precision == "float32"
    assert precision_label("auto", cuda=True) == "bfloat16-autocast"
    with pytest.raises(WeightsError, match="unknown precision"):
        ModelOptions("resnet18", precision="fp8")


def test_image_queries_use_the_precision_the_store_was_computed_in(tmp_path, client):
    """A store computed in bf16 autocast records it; a picture of a stored tile, embedded the same way,
    finds that tile at distance ~0 (a float32 embedding would not)."""
    from conftest import textured, write_tif
    from PIL import Image

    import dask_fp
    from dask_fp.query import model_for_store

    data = textured(128, 128, seed=9)
    tif = write_tif(tmp_path / "a.tif", data)
    bf = ModelOptions("resnet18", weights="random", seed=2, threads=1, precision="bfloat16")
    dask_fp.ingest([str(tif)], str(tmp_path / "s.zarr"), model=bf, tiling=dask_fp.Tiling(64, 64),
                   client=client, progress=False)
    st = dask_fp.open_store(tmp_path / "s.zarr")
    assert {s["compute_precision"] for s in st.sources} == {"bfloat16-autocast"}
    assert model_for_store(st).precision == "bfloat16"
    Image.fromarray(np.ascontiguousarray(data[:, 64:, :64].transpose(1, 2, 0))).save(tmp_path / "q.png")
    hits = dask_fp.search(st, images=[str(tmp_path / "q.png")], k=1, dedup=False)
    assert (hits.table["wy"][0], hits.table["wx"][0]) == (1, 0)
    tol = 1e-6 * float(np.asarray(st.arrays["norm2"][:]).max())
    assert hits.table["distance"][0] < tol  # the same computation: the same fingerprint
    f32 = replace(model_for_store(st), precision="float32")
    far = dask_fp.search(st, images=[str(tmp_path / "q.png")], k=1, dedup=False, model=f32)
    assert far.table["distance"][0] > tol  # float32 does not reproduce a bf16 fingerprint
