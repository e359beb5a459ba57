"""CNN inference under Dask's worker allocator setting, with and without dask_fp.malloc.keep_buffers.

Each case runs in a fresh process (glibc reads MALLOC_TRIM_THRESHOLD_ at start-up): load the
model, embed 32 windows to warm up, then time ``embed`` of ``--windows`` random 256 px windows.
Cases alternate, ``--repeats`` rounds:

* glibc defaults;
* ``MALLOC_TRIM_THRESHOLD_=65536`` (what Dask's nanny gives every worker);
* that variable plus :func:`dask_fp.malloc.keep_buffers` (what a dask-fp block task does).

    .venv/bin/python bench/allocator.py [--model efficientnet-lite0] [--windows 111] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one(model: str, windows: int, tune: bool) -> float:
    """tiles/s of one timed ``embed`` in this process."""
    import numpy as np

    if tune:
        from dask_fp.malloc import keep_buffers

        keep_buffers()
    from dask_fp.embedder import load_model
    from dask_fp.models import ModelOptions, resolve_weights

    opts = ModelOptions(model, batch_size=32, weights="random" if model == "resnet18" else None)
    m = load_model(opts, resolve_weights(opts))
    x = np.random.default_rng(0).integers(0, 255, (windows, 3, 256, 256), dtype=np.uint8)
    m.embed(x[:32])
    t0 = time.perf_counter()
    m.embed(x)
    return windows / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="efficientnet-lite0")
    p.add_argument("--windows", type=int, default=111)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", choices=["plain", "tuned"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(one(a.model, a.windows, a.child == "tuned"))
        return 0
    cases = [("glibc defaults", {}, "plain"), ("MALLOC_TRIM_THRESHOLD_=65536 (Dask worker)",
             {"MALLOC_TRIM_THRESHOLD_": "65536"}, "plain"),
             ("same + keep_buffers()", {"MALLOC_TRIM_THRESHOLD_": "65536"}, "tuned")]
    rates: dict[str, list[float]] = {c[0]: [] for c in cases}
    env0 = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env0["PYTHONPATH"] = os.pathsep.join([str(REPO), env0.get("PYTHONPATH", "")])
    for _ in range(a.repeats):
        for name, extra, mode in cases:
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--model", a.model,  # noqa: S603
                                  "--windows", str(a.windows)], env={**env0, **extra}, capture_output=True,
                                 text=True, check=True)
            rates[name].append(float(out.stdout.strip().splitlines()[-1]))
    print(f"{a.model}, {a.windows} windows of 256 px, batch 32, load average {os.getloadavg()[0]:.1f}\n")
    print("| allocator | tiles/s, each run |\n|---|---|")
    for name, r in rates.items():
        print(f"| {name} | {', '.join(f'{v:.1f}' for v in r)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
