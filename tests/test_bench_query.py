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


def test_every_timed_run_gets_new_queries():
    bq = load_bench()
    seen = []
    t = bq.measure(lambda q: seen.append(q.copy()), bq.Fresh(3, 7), repeats=4, warmup=1)
    assert len(t.runs) == 4 and len(seen) == 5
    assert len({q.tobytes() for q in seen}) == 5 and all(q.shape == (3, bq.DIM) for q in seen)
    assert not any(np.array_equal(q, bq.make_queries(3, seed=7)) for q in seen)  # nor the checked ones


def test_plain_stream_loop_equals_numpy(tmp_path):
    bq = load_bench()
    st, _ = bq.build_store(tmp_path / "s.zarr", 2500, seed=1, log=print)
    x = np.asarray(st.arrays["fingerprint"][:2500])
    q = bq.make_queries(5, seed=1)
    want = bq.numpy_knn(x, np.asarray(st.arrays["norm2"][:2500]), q, 10)[1]
    assert bq.check_rows("plain", bq.plain_stream_knn(st, q, 10)[1], want, lambda r: x[r], q).startswith("equal")


def test_quick_run_prints_a_table(tmp_path, capsys):
    pytest.importorskip("faiss")
    bq = load_bench()
    out = bq.main(["--quick", "--sizes", "3000", "--repeats", "1", "--workdir", str(tmp_path), "--no-profile"])
    printed = capsys.readouterr().out
    for label in ("paper's method", "numpy brute force", "FAISS IndexFlatL2", "plain 1-process loop",
                  "dask-fp stream_knn, streamed", "dask-fp knn over Store.fingerprints()", "dask-fp knn, persisted",
                  "dask-fp search(), persisted", "search() / knn persisted", "plain Zarr loop", "ratios"):
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
