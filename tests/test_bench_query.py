"""Smoke test of the query benchmark (bench/query.py) on a tiny store."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "query.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_query", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_query"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_numpy_and_paper_methods_agree():
    bq = load_bench()
    x = bq.fingerprint_block(500, 0, seed=3)
    q = bq.make_queries(4, seed=3)
    dist, rows = bq.numpy_knn(x, np.einsum("ij,ij->i", x, x), q, 10)
    fps = {1000 + i: v for i, v in enumerate(x)}
    for i in range(len(q)):
        got = bq.paper_knn(fps, q[i], 10)
        assert [u - 1000 for _, u in got] == rows[i].tolist()
        np.testing.assert_allclose([d * d for d, _ in got], dist[i], rtol=1e-4)


def test_quick_run_prints_a_table(tmp_path, capsys):
    pytest.importorskip("faiss")
    bq = load_bench()
    out = bq.main(["--quick", "--sizes", "3000", "--repeats", "1", "--workdir", str(tmp_path), "--no-profile"])
    printed = capsys.readouterr().out
    for label in ("paper's method", "numpy brute force", "FAISS IndexFlatL2", "dask-fp knn, streamed",
                  "dask-fp knn, persisted", "dask-fp search(), persisted", "ratios"):
        assert label in printed
    assert out["table"] in printed
    r = out["results"]["3000"]
    assert r["info"]["dask-fp[1x2]"]["check streamed batch"].startswith("equal")
    assert r["info"]["dask-fp[1x2]"]["check persisted single"].startswith("equal")
    saved = json.loads((tmp_path / "query-results.json").read_text())
    assert saved["table"] == out["table"]
    # A second run reuses the store instead of writing it again.
    assert r["info"]["build_s"] > 0
    st, took = bq.build_store(tmp_path / "query-3000.zarr", 3000, seed=0, log=print)
    assert took == 0.0 and st.committed == 3000
