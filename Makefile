# Two entry points, both self-contained on a fresh machine:
#   make demo   -> set up, fetch real aerial imagery, ingest it, run queries, write pictures
#   make test   -> set up and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision are pinned to the releases that install from local wheels here;
# override TORCH_SPEC for another platform (e.g. a CPU-only index).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup test demo lint bench clean chromium

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test,bench,dev,eval]'
	touch $@

setup: $(VENV)/.installed

# The map page's browser test drives Debian's chromium (Playwright cannot download browsers here);
# install it when apt-get is available and it is missing (CI runs as root on a fresh machine).
chromium:
	@if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; \
	fi

test: $(VENV)/.installed chromium
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(VENV)/.installed
	$(PY) -m dask_fp.demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check dask_fp tests bench
	$(VENV)/bin/mypy dask_fp

clean:
	rm -rf $(VENV) demo-output
