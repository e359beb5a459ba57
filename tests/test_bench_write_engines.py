"""bench/write_engines.py on a small job: both engines write, commit and read back the same rows."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "write_engines.py"


def test_write_engines_bench_runs_and_checks_both_stores(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH), "--rows", "20000", "--repeats", "1", "--workers", "1",
                          "--workdir", str(tmp_path / "w")], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "ICECHUNK_LOG": "error"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {m[0]: m for m in re.findall(r"^\| (region|icechunk) \| ([\d.]+) \|", out.stdout, re.M)}
    assert set(rows) == {"region", "icechunk"} and all(float(r[1]) > 0 for r in rows.values())
    assert "icechunk / region: write" in out.stdout
    assert not any((tmp_path / "w").iterdir())  # each store is deleted after it is checked
