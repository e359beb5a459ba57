"""Reading candidate rows (dask_fp.store.rows): direct reads from uncompressed stores, Zarr for older ones.

Stores are real Zarr on disk written through the store writer; the "old" store is the same
store with its ``fingerprint`` array rewritten with blosc-lz4, as stores were made before.
The oracle is the array of fingerprints the test wrote.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from dask_fp.errors import StoreError
from dask_fp.index import IndexOptions, build_index, code_search
from dask_fp.scan import knn
from dask_fp.store import open_store
from dask_fp.store.rows import raw_layout, read_span, span_layout

try:
    from ._search_helpers import SourceSpec, build_store
except ImportError:  # tests/ is not a package
    from _search_helpers import SourceSpec, build_store

DIM = 72
RPC = 40  # rows per chunk: many chunk files


def _specs() -> list[SourceSpec]:
    rng = np.random.default_rng(4)
    return [SourceSpec(shape=(256, 320), path=f"s{i}.tif", keep=rng.random((7, 9)) > 0.2) for i in range(4)]


def as_old_store(src, dst):
    """A copy of store ``src`` whose ``fingerprint`` chunks are blosc-lz4 compressed (the former layout)."""
    import zarr
    from zarr.codecs import BloscCodec

    shutil.copytree(src, dst)
    g = zarr.open_group(str(dst), mode="r+", zarr_format=3, use_consolidated=False)
    old = g["fingerprint"]
    data, attrs = old[:], dict(old.attrs)
    del g["fingerprint"]
    a = g.create_array("fingerprint", shape=data.shape, chunks=old.chunks, dtype=data.dtype, fill_value=0,
                       compressors=[BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
                       dimension_names=("tile", "feature"), attributes=attrs)
    a.with_config({"write_empty_chunks": True})[:] = data
    zarr.consolidate_metadata(str(dst), zarr_format=3)
    return dst


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("rows")
    built = build_store(d / "new", _specs(), dim=DIM, rows_per_chunk=RPC, seed=2)
    return built, as_old_store(built.path, d / "old")


def test_new_stores_keep_fingerprints_uncompressed_and_old_ones_stay_compressed(stores):
    built, old = stores
    new_fp = open_store(built.path).arrays["fingerprint"]
    lay = raw_layout(new_fp)
    assert lay is not None and lay.rows == RPC and lay.row_bytes == DIM * 4
    assert raw_layout(open_store(old).arrays["fingerprint"]) is None
    meta = json.loads((old / "fingerprint" / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]] == ["bytes", "blosc"]
    # A chunk file of the new store is exactly its rows, in C order.
    raw = np.fromfile(built.path / "fingerprint" / "c" / "1" / "0", dtype="<f4").reshape(RPC, DIM)
    np.testing.assert_array_equal(raw, built.fingerprint[RPC : 2 * RPC])


@pytest.mark.parametrize("which", ["new", "old"])
def test_read_rows_in_any_order_with_repeats_equals_the_written_rows(stores, which):
    built, old = stores
    st = open_store(built.path if which == "new" else old)
    n = st.committed
    rng = np.random.default_rng(0)
    for rows in (rng.integers(0, n, 300), np.array([n - 1, 0, 0, RPC - 1, RPC, RPC + 1, n - 1]),
                 np.arange(RPC - 3, 3 * RPC + 2), np.array([5]),
                 np.arange(0, n, 2)[::-1]):  # > 64 runs of one row: read by several threads
        np.testing.assert_array_equal(st.read("fingerprint", rows), built.fingerprint[rows])
    assert st.read("fingerprint", np.array([], np.int64)).shape == (0, DIM)


def test_code_search_answers_the_same_on_old_and_new_stores(client, stores, tmp_path):
    built, old = stores
    new, old2 = shutil.copytree(built.path, tmp_path / "n"), shutil.copytree(old, tmp_path / "o")
    for p in (new, old2):
        build_index(p, IndexOptions(nbits=64), client=client)
    q = built.fingerprint[::17] + np.float32(0.25)
    a, b = open_store(new), open_store(old2)
    ed, er = knn(a.fingerprints(), a.norm2(), q, 5)
    for c in (a.committed, 20):
        da, ra = code_search(a, q, 5, candidates=c)
        db, rb = code_search(b, q, 5, candidates=c)
        np.testing.assert_array_equal(ra, rb)
        np.testing.assert_array_equal(da, db)
    np.testing.assert_array_equal(code_search(a, q, 5, candidates=a.committed)[1], er)


def test_a_missing_or_truncated_chunk_file_is_a_damaged_store_error(stores, tmp_path):
    built, _ = stores
    p = shutil.copytree(built.path, tmp_path / "s")
    (p / "fingerprint" / "c" / "2" / "0").unlink()
    st = open_store(p)
    with pytest.raises(StoreError, match=r"fingerprint/c/2/0 missing.*damaged"):
        st.read("fingerprint", np.array([0, 2 * RPC + 3]))
    np.testing.assert_array_equal(st.read("fingerprint", np.array([3])), built.fingerprint[[3]])
    f = p / "fingerprint" / "c" / "1" / "0"
    f.write_bytes(f.read_bytes()[: 5 * DIM * 4])  # 5 rows of 40 left
    with pytest.raises(StoreError, match=r"fingerprint/c/1/0 is shorter than its rows.*damaged"):
        st.read("fingerprint", np.array([RPC + 7]))
    np.testing.assert_array_equal(st.read("fingerprint", np.array([RPC + 4])), built.fingerprint[[RPC + 4]])


@pytest.mark.parametrize("which", ["new", "old"])
def test_read_span_equals_zarr_for_every_array(stores, which):
    """Spans read from the chunk files directly (plain or zstd) equal Zarr's slices; blosc goes through Zarr."""
    built, old = stores
    st = open_store(built.path if which == "new" else old)
    n = st.committed
    for name in ("fingerprint", "norm2", "lon", "lat", "source", "uid", "wy"):
        arr, files = st.arrays[name], st.files[name]
        assert (span_layout(arr) is None) == (which == "old" and name == "fingerprint")
        for lo, hi in [(0, n), (3, 4), (RPC - 1, RPC + 1), (RPC, 3 * RPC), (n - 5, n), (7, 7)]:
            np.testing.assert_array_equal(read_span(arr, files, lo, hi), np.asarray(arr[lo:hi]))


def test_a_damaged_compressed_chunk_is_a_damaged_store_error(stores, tmp_path):
    built, _ = stores
    p = shutil.copytree(built.path, tmp_path / "s")
    st = open_store(p)
    f = p / "lon" / "c" / "1"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(StoreError, match=r"lon/c/1 cannot be read.*damaged"):
        read_span(st.arrays["lon"], st.files["lon"], RPC + 2, RPC + 5)
    np.testing.assert_array_equal(read_span(st.arrays["lon"], st.files["lon"], 0, 3), built.cols["lon"][:3])
