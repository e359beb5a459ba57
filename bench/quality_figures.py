"""Figures for bench/quality_remote.py: bar charts and example mosaics."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import quality_data as qd  # noqa: E402
import quality_metrics as qm  # noqa: E402
from quality_reloc import reloc_success  # noqa: E402
from quality_stores import Method  # noqa: E402

# --------------------------------------------------------------------------- figures


def _method_titles(ms: list[Method]) -> dict[str, str]:
    t = {m.key: m.title for m in ms}
    for m in ms:
        t[m.key + "-f16"] = m.title + ", float16"
    return t


def bar_chart(results: dict[str, Any], ms: list[Method], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = _method_titles(ms)
    datasets = [d for d in ("sentinel2", "landsat7") if d in results["label"]]
    keys = [m.key for m in ms]
    fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=100)
    width = 0.8 / len(keys)
    colours = plt.get_cmap("tab10")
    for j, k in enumerate(keys):
        vals = [results["label"][d]["rows"][k]["P@10"] for d in datasets]
        xs = np.arange(len(datasets)) + (j - (len(keys) - 1) / 2) * width
        bars = ax.bar(xs, vals, width * 0.95, label=titles[k], color=colours(j))
        for b, v in zip(bars, vals, strict=True):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    names = {"sentinel2": "Sentinel-2 10 m, OSM land use", "landsat7": "Landsat 7 28.5 m, land cover"}
    ax.set_xticks(np.arange(len(datasets)), [names[d] for d in datasets])
    ax.set_ylabel("P@10 (same-label hits)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="upper center", ncol=3, frameon=False, bbox_to_anchor=(0.5, -0.12))
    ax.set_title("Label retrieval: precision of the 10 nearest distinct tiles", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    _shrink_png(path)


def reloc_chart(results: dict[str, Any], ms: list[Method], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = _method_titles(ms)
    rows = results["reloc"]["rows"]
    kinds = [k for k in qm.PERTURBATIONS if k != "none"]
    keys = [m.key for m in ms]
    fig, ax = plt.subplots(figsize=(7.5, 4.0), dpi=100)
    width = 0.8 / len(keys)
    colours = plt.get_cmap("tab10")
    for j, k in enumerate(keys):
        vals = [rows[k][kd]["R@10"] for kd in kinds]
        xs = np.arange(len(kinds)) + (j - (len(keys) - 1) / 2) * width
        ax.bar(xs, vals, width * 0.95, label=titles[k], color=colours(j))
    ax.axhline(0.95, color="grey", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(kinds)), kinds, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("recall@10 of the original place")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="upper center", ncol=3, frameon=False, bbox_to_anchor=(0.5, -0.3))
    ax.set_title("Re-localisation of perturbed tiles (2 cm drone + 10 cm NEON, 256 px)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    _shrink_png(path)


def _shrink_png(path: Path, colours: int = 128) -> None:
    """Re-save a PNG with an adaptive palette (figures stay small in the repository)."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = im.convert("RGB")
    rgb.quantize(colors=colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        path, optimize=True)


MOSAIC_PANEL, MOSAIC_PAD, MOSAIC_CAP, MOSAIC_COLS = 112, 6, 30, 6


def _mark_panels(path: Path, marks: list[tuple[str, tuple[int, int, int]]]) -> None:
    """Draw a coloured tag on each hit panel of a ``dask_fp.export.mosaic`` picture."""
    from PIL import Image, ImageDraw

    with Image.open(path) as im:
        img = im.convert("RGB")
    d = ImageDraw.Draw(img)
    p, pad, cap, cols = MOSAIC_PANEL, MOSAIC_PAD, MOSAIC_CAP, MOSAIC_COLS
    for i, (text, colour) in enumerate(marks, start=1):
        x0 = pad + (i % cols) * (p + pad)
        y0 = pad + (i // cols) * (p + cap + pad)
        w = int(d.textlength(text)) + 6
        d.rectangle([x0, y0, x0 + w, y0 + 13], fill=colour)
        d.text((x0 + 3, y0 + 1), text, fill="white")
    img.save(path)


def _stack(paths: list[Path], out: Path, title: str) -> None:
    from PIL import Image, ImageDraw

    ims = [Image.open(p).convert("RGB") for p in paths]
    w = max(i.width for i in ims)
    h = sum(i.height for i in ims) + 22
    canvas = Image.new("RGB", (w, h), "white")
    ImageDraw.Draw(canvas).text((6, 5), title, fill="black")
    y = 22
    for i in ims:
        canvas.paste(i, (0, y))
        y += i.height
    canvas.save(out)
    _shrink_png(out, 160)


GREEN, RED, GREY = (20, 140, 60), (200, 40, 40), (110, 110, 110)


def label_examples(name: str, scene: qd.LabelledScene, ctx: dict[str, Any], key: str, tmp: Path,
                   out: Path, n: int = 4, seed: int = 0) -> Path:
    """Mosaics of ``n`` queries of different classes (one per most common class) and their 5 hits."""
    from dask_fp import Query, search
    from dask_fp.export import mosaic

    stores, runs, labels, _ = ctx["label_runs"][name]
    st = stores[key]
    c = st.coords()
    rng = np.random.default_rng(seed)
    ql = labels[labels > 0]
    common = np.argsort(-np.bincount(ql, minlength=len(scene.classes) + 1), kind="stable")[:n]
    queries = []
    for cls in common:
        if cls == 0 or not (labels == cls).any():
            continue
        r = int(rng.choice(np.flatnonzero(labels == cls)))
        vec = np.asarray(st.arrays["fingerprint"][r], dtype=np.float32)
        queries.append(Query(f"{scene.classes[cls - 1]} (query)", vec, (int(c["source"][r]), int(c["wy"][r]),
                                                                       int(c["wx"][r]))))
    hits = search(st, queries, k=5)
    parts = []
    uid_row = {int(u): i for i, u in enumerate(c["uid"])}
    for i, q in enumerate(queries):
        p = tmp / f"{name}-example-{i}.png"
        mosaic(hits, i, p, columns=MOSAIC_COLS, panel=MOSAIC_PANEL)
        qlab = scene.classes.index(q.label.split(" (")[0]) + 1
        marks = []
        for u in hits.for_query(i)["uid"]:
            lab = int(labels[uid_row[int(u)]])
            txt = scene.classes[lab - 1] if lab else "no label"
            marks.append((txt, GREEN if lab == qlab else (GREY if lab == 0 else RED)))
        _mark_panels(p, marks)
        parts.append(p)
    target = out / f"quality-examples-{name}.png"
    _stack(parts, target, f"{name}: query (blue frame) and its 5 nearest distinct tiles, {key} fingerprints;"
                          " tag = tile label (green: same as query, red: other, grey: no majority label)")
    return target


def reloc_examples(ctx: dict[str, Any], key: str, tmp: Path, out: Path) -> Path:
    from dask_fp import search
    from dask_fp.export import mosaic

    stores, queries, _, tiling = ctx["reloc"]
    st = stores[key]
    picks = []
    for i, kd in enumerate(("rotate 90°", "jpeg q50", "brightness-20%", "shift 1/8")):
        cand = [q for q in queries if q["kind"] == kd]
        if cand:  # a different tile for each example
            picks.append(cand[(i * len(cand)) // 4 + (len(cand) // 8)])
    hits = search(st, images=[q["path"] for q in picks], k=5)
    succ = reloc_success(hits, picks, tiling)
    parts = []
    for i, q in enumerate(picks):
        hits.queries[i] = replace(hits.queries[i], label=f"{q['kind']} ({q['gsd']})")
        p = tmp / f"reloc-example-{i}.png"
        mosaic(hits, i, p, columns=MOSAIC_COLS, panel=MOSAIC_PANEL)
        _mark_panels(p, [("original place" if s else "elsewhere", GREEN if s else RED)
                         for s in succ[i][: len(hits.for_query(i))]])
        parts.append(p)
    target = out / "quality-examples-reloc.png"
    _stack(parts, target, f"re-localisation: perturbed query (blue frame) and 5 hits, {key} fingerprints;"
                          " green = overlaps the original window by >= 50 %")
    return target


