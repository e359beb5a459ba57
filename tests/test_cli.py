"""Tests of the ``dask-fp query`` command (``dask_fp.cli.main``)."""

from __future__ import annotations

import json

import dask
import pytest

from dask_fp.cli import main
from dask_fp.search import TABLE_COLUMNS, search

try:
    from ._search_helpers import raster_store
except ImportError:  # tests/ is not a package
    from _search_helpers import raster_store


@pytest.fixture(scope="module")
def query_store(tmp_path_factory):
    """A store over one real GeoTIFF (EPSG:32617), 7 x 9 tiles of random fingerprints."""
    return raster_store(tmp_path_factory.mktemp("cli"), crs=("EPSG:32617",), seed=2)


def test_cli_query_json_round_trips(query_store, tmp_path, capsys):
    b = query_store
    row = b.row_of(0, 3, 4)
    uid = int(b.cols["uid"][row])
    lon, lat = float(b.cols["lon"][10]), float(b.cols["lat"][10])  # negative longitude
    out_dir = tmp_path / "out"
    rc = main(["query", str(b.path), "--uid", str(uid), "--lonlat", f"{lon},{lat}", "-k", "3",
               "--json", "--workers", "1", "--out", str(out_dir)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    doc = json.loads(captured.out)
    with dask.config.set(scheduler="sync"):
        expected = search(b.path, uids=[uid], lonlats=[(lon, lat)], k=3)
    assert [q["label"] for q in doc["queries"]] == [f"uid {uid}", f"lonlat {lon},{lat}"]
    for i, q in enumerate(doc["queries"]):
        assert q["index"] == i
        hits = q["hits"]
        assert [h["rank"] for h in hits] == [1, 2, 3]
        assert all(set(h) == set(TABLE_COLUMNS) - {"query", "label"} for h in hits)
        exp = expected.for_query(i)
        assert [h["uid"] for h in hits] == list(exp["uid"])
        assert [h["row"] for h in hits] == list(exp["row"])
        assert [h["distance"] for h in hits] == pytest.approx(list(exp["distance"]))
        assert [(h["wy"], h["wx"]) for h in hits] == list(zip(exp["wy"], exp["wx"], strict=True))
        assert all(-180 <= h["lon"] <= 180 and -90 <= h["lat"] <= 90 for h in hits)
    assert uid not in [h["uid"] for h in doc["queries"][0]["hits"]]  # its own tile is left out
    files = doc["files"]
    assert files["csv"] == str(out_dir / "hits.csv") and (out_dir / "hits.geojson").is_file()
    assert files["mosaics"] == [str(out_dir / "mosaic-0.png"), str(out_dir / "mosaic-1.png")]


def test_cli_query_bad_k_is_an_error(query_store, capsys):
    uid = int(query_store.cols["uid"][0])
    rc = main(["query", str(query_store.path), "--uid", str(uid), "-k", "0", "--json",
               "--workers", "1"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "dask-fp: error" in captured.err and "k must be" in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_cli_query_unknown_uid_is_an_error(query_store, capsys):
    rc = main(["query", str(query_store.path), "--uid", "12345", "-k", "3", "--workers", "1"])
    captured = capsys.readouterr()
    assert rc == 1 and "dask-fp: error: uid 12345" in captured.err


def test_cli_query_k_not_a_number_is_a_usage_error(query_store, capsys):
    with pytest.raises(SystemExit) as e:
        main(["query", str(query_store.path), "--uid", "1", "-k", "three"])
    assert e.value.code == 2
    assert "invalid int value" in capsys.readouterr().err
