#!/usr/bin/env bash
# Run the GPU benchmark on a bare CUDA machine that already has python3 + torch
# (as the H200 image here has) but none of dask-fp's other dependencies.
#
# Versions are those of the project's .venv here (so both machines run the same code).
# Here, with network access to PyPI, fetch the wheels once (into .whl/, which
# is git-ignored and travels with the working tree to the GPU machine):
#     bash bench/gpu.sh download
# There:
#     bash bench/gpu.sh run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
PKGS="dask==2026.8.0 distributed==2026.8.0 rioxarray==0.19.0 rasterio==1.4.4 zarr==3.1.6 numcodecs==0.16.6
      donfig==0.8.1.post1 pyproj==3.7.2 affine==3.0.1 partd==1.4.2 locket==1.0.0 tblib==3.2.2 zict==3.0.0
      tornado==6.6.1 cligj==0.7.2 click-plugins==1.1.1.2 google-crc32c==1.9.0"
# already in the H200 image (device KINDS.md): numpy pandas xarray pillow psutil cloudpickle toolz fsspec
# msgpack sortedcontainers click tqdm scikit-learn typing-extensions
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
    if [ -d .whl ]; then $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; fi
    export PYTHONPATH=$PWD:${PYTHONPATH:-}
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    $PY bench/gpu.py "${@:2}" ;;
  *) echo "usage: bench/gpu.sh download|run [bench/gpu.py options]" >&2; exit 2 ;;
esac
