"""The notebooks: the quickstart is executed for real (nbclient, a fresh kernel); all are valid nbformat.

02-cluster.ipynb needs a SLURM or PBS cluster and is not executed here (it says so).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def test_the_promised_notebooks_exist() -> None:
    assert {"01-quickstart.ipynb", "02-cluster.ipynb"} <= {p.name for p in notebooks()}


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.name)
def test_notebook_is_valid_nbformat_and_stored_without_outputs(path: Path) -> None:
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code), "strip outputs before committing"
    for c in code:  # every code cell is valid Python
        compile(c.source, f"{path.name}:{c.id}", "exec")


def outputs_of(nb) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


@pytest.mark.network  # the demo imagery comes from PyPI (cached in demo-data/ after the first run)
def test_quickstart_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    monkeypatch.setenv("DASK_FP_DEMO_DATA", str(ROOT / "demo-data"))  # the imagery cache `make demo` uses too
    monkeypatch.setenv("DASK_FP_NOTEBOOK_OUT", str(tmp_path))
    nb = nbformat.read(NOTEBOOKS / "01-quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()

    outs = outputs_of(nb)
    text = "\n".join(o.get("text", "") for o in outs if o["output_type"] == "stream")
    html = "\n".join(o["data"].get("text/html", "") for o in outs if "data" in o)
    pngs = [o for o in outs if "data" in o and "image/png" in o["data"]]
    assert "dashboard: http://127.0.0.1:" in text
    assert "Client" in html and "LocalCluster" in html  # the client widget
    assert "<progress value='121' max='121'" in html  # the progress bar, finished
    assert "neon-10cm-OSBS_029.tif: 121 tiles of 121 windows" in text
    assert len(pngs) >= 4  # the image and three mosaics, inline
    assert "xarray.Dataset" in html and "fingerprint" in html
    assert "cluster closed" in text
    for name in ("by-uid.png", "by-image.png", "by-place.png", "hits.geojson"):
        assert (tmp_path / name).is_file(), name
    geo = json.loads((tmp_path / "hits.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == 15

    import dask_fp

    store = dask_fp.open_store(tmp_path / "fp.zarr")
    assert store.committed == 121 and store.attrs["model"] == "efficientnet-lite0"
