"""Tests of the ``dask-fp query`` command (``dask_fp.cli.main``)."""

from __future__ import annotations

import json

import dask
import numpy as np
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


# --------------------------------------------------------------------------- examples, filters, classifier


def test_cli_positives_negatives_area_and_labels_round_trip(query_store, tmp_path, capsys):
    from dask_fp import classify

    b = query_store
    uid = b.cols["uid"]
    lon, lat = b.cols["lon"], b.cols["lat"]
    pos = [int(uid[b.row_of(0, 2, 2)]), (float(lon[30]), float(lat[30]))]
    neg = [int(uid[b.row_of(0, 5, 7)])]
    bbox = (float(lon.min()), float(lat.min()), float(lon.mean()), float(lat.max()))
    labels = tmp_path / "labels.geojson"
    area = ",".join(repr(v) for v in bbox)
    rc = main(["query", str(b.path), "--positive", str(pos[0]), "--positive", f"{pos[1][0]},{pos[1][1]}",
               "--negative", str(neg[0]), "--area", area, "-k", "4", "--no-dedup", "--json", "--workers", "1",
               "--save-labels", str(labels)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    doc = json.loads(captured.out)
    with dask.config.set(scheduler="sync"):
        exp = search(b.path, positives=pos, negatives=neg, area=bbox, k=4, dedup=False)
    assert [q["label"] for q in doc["queries"]] == ["2 positives, 1 negative"]
    assert [h["uid"] for h in doc["queries"][0]["hits"]] == list(exp.table["uid"])
    assert all(h["lon"] <= bbox[2] for h in doc["queries"][0]["hits"])
    # the saved labels drive the next round, from the CLI and the classifier
    rc = main(["query", str(b.path), "--labels", str(labels), "--area", area, "-k", "4", "--no-dedup", "--json",
               "--workers", "1"])
    again = json.loads(capsys.readouterr().out)
    assert rc == 0 and again["queries"][0]["hits"] == doc["queries"][0]["hits"]
    out_dir = tmp_path / "cls"
    rc = main(["classify", str(b.path), "--labels", str(labels), "--threshold", "0.5", "--json", "--workers", "1",
               "--out", str(out_dir)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    got = json.loads(captured.out)["queries"][0]["hits"]
    with dask.config.set(scheduler="sync"):
        exp = classify(b.path, positives=pos, negatives=neg, threshold=0.5)
    assert [h["uid"] for h in got] == list(exp.table["uid"]) and len(got) > 0
    assert [h["score"] for h in got] == pytest.approx(list(exp.table["score"]))
    assert all(h["distance"] is None for h in got)
    gj = json.loads((out_dir / "hits.geojson").read_text())  # valid JSON: no NaN
    assert len(gj["features"]) == len(got) and gj["features"][0]["properties"]["distance"] is None
    # places and the score raster hold every hit, not only the ones in the mosaic
    import geopandas
    import rasterio

    assert geopandas.read_parquet(out_dir / "places.parquet")["n_tiles"].sum() == len(got)
    with rasterio.open(out_dir / "scores-q0-s0.tif") as ds:
        assert np.isfinite(ds.read(1)).sum() == len(got)
    assert json.loads(captured.out)["files"]["places_geoparquet"] == str(out_dir / "places.parquet")


def test_cli_classify_out_writes_every_hit_beyond_the_mosaic(query_store, tmp_path, capsys):
    """More hits than the mosaic shows (35): the CSV, GeoJSON, places and score raster hold them all."""
    b = query_store
    uid = b.cols["uid"]
    fp = b.fingerprint
    order = np.argsort(fp[:, 0])  # label by one feature: a linear model separates them
    argv = ["classify", str(b.path), "--threshold", "0", "--workers", "1", "--out", str(tmp_path)]
    for r in order[-3:]:
        argv += ["--positive", str(int(uid[r]))]
    for r in order[:3]:
        argv += ["--negative", str(int(uid[r]))]
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    n = len(fp) - 6  # threshold 0: every unlabelled tile
    assert n > 35
    import geopandas
    import pandas as pd
    import rasterio

    assert len(pd.read_csv(tmp_path / "hits.csv")) == n
    assert len(json.loads((tmp_path / "hits.geojson").read_text())["features"]) == n
    assert geopandas.read_parquet(tmp_path / "places.parquet")["n_tiles"].sum() == n
    with rasterio.open(tmp_path / "scores-q0-s0.tif") as ds:
        assert np.isfinite(ds.read(1)).sum() == n
    wrote = [line for line in captured.out.splitlines() if line.startswith("wrote ")][0]
    for name in ("hits.csv", "hits.geojson", "mosaic.png", "places.geojson", "places.parquet", "scores-q0-s0.tif"):
        assert str(tmp_path / name) in wrote


@pytest.mark.parametrize("argv, message", [
    (["classify", "--positive", "UID", "--negative", "UID2"], "needs k"),
    (["classify", "--positive", "UID", "--negative", "UID2", "--threshold", "2"], "from 0 to 1"),
    (["classify", "--positive", "UID", "-k", "3"], "one positive and one negative"),
    (["query", "--negative", "UID"], "positives is empty"),
    (["query", "--positive", "UID", "--area", "500000,3500000,500100,3500100"], "not longitudes/latitudes"),
    (["query", "--positive", "UID", "--area", "0,0,1,1", "--area-crs", "EPSG:999999"], "not a CRS"),
    (["query", "--positive", "UID", "--sources", "missing.tif"], "not a source"),
])
def test_cli_bad_examples_and_filters_are_errors(query_store, capsys, argv, message):
    uid, uid2 = (str(int(query_store.cols["uid"][i])) for i in (0, 9))
    argv = [{"UID": uid, "UID2": uid2}.get(a, a) for a in argv]
    rc = main([argv[0], str(query_store.path), *argv[1:], "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and any(line.startswith("dask-fp: error:") and message in line for line in err.splitlines())
