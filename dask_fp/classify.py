"""The ``classify`` verb: a linear classifier trained on labelled tiles, scored over every stored tile.

A :class:`sklearn.linear_model.LogisticRegression` is fitted on the stored
fingerprints of the labelled tiles (and the embeddings of labelled pictures).
The fitted model is a weight vector and an intercept: those two arrays, not
the estimator, go to the chunk tasks, which score their rows with one matrix
product each (one ``dask.array.reduction`` like the k-NN search:
:func:`dask_fp.scan.stream_score`, reading the store from Zarr a few chunks
at a time per task, or :func:`dask_fp.scan.score_pass` over a persisted
store), so the store streams through the cluster once and may be larger than
its memory. The client receives only the top ``k`` rows, or
the rows whose probability reaches ``threshold``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .errors import QueryError
from .examples import Example, as_examples, check_disjoint, resolve
from .filters import Area, candidate_blocks, filter_columns, make_filter
from .hits import TABLE_COLUMNS, Hits
from .kernels import candidates_needed
from .models import ModelOptions
from .query import Query, store_tiling
from .scan import score_pass, stream_score
from .search import keep_mask, no_hits_in_area, reading
from .store import Store, open_store

#: Logit above which float64 ``expit`` is exactly 1.0 for every larger logit (expit(30) = 1 - 9.4e-14).
_LOGIT_OF_ONE = 30.0


def _min_logit(threshold: float | None) -> float | None:
    """A logit bound a little under ``logit(threshold)``: rows below it cannot reach the threshold."""
    if threshold is None or threshold <= 0.0:
        return None
    if threshold >= 1.0:
        return _LOGIT_OF_ONE
    return math.log(threshold) - math.log1p(-threshold) - 1e-6


def fit(pos: np.ndarray, neg: np.ndarray, *, C: float, class_weight: str | None) -> Any:
    """A fitted ``LogisticRegression`` (label 1 = positive) on float64 fingerprints."""
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([pos, neg]).astype(np.float64)
    y = np.concatenate([np.ones(len(pos), np.int64), np.zeros(len(neg), np.int64)])
    clf = LogisticRegression(C=C, class_weight=class_weight, max_iter=1000)
    clf.fit(x, y)
    return clf


def classify(
    store: Store | str | os.PathLike[str],
    *,
    positives: Sequence[Example],
    negatives: Sequence[Example],
    k: int | None = None,
    threshold: float | None = None,
    area: Area | None = None,
    area_crs: Any = None,
    sources: Iterable[int | str | os.PathLike[str]] | None = None,
    C: float = 1.0,
    class_weight: str | None = "balanced",
    dedup: bool = False,
    include_self: bool = False,
    model: ModelOptions | None = None,
    split_every: int | None = None,
) -> Hits:
    """Tiles a linear classifier trained on the labelled examples calls positive, in one pass.

    Parameters
    ----------
    store : Store or path
    positives, negatives : sequences of examples
        As for :func:`dask_fp.search` (uids, pictures, ``(lon, lat)``, shapely
        geometries in WGS84, ``.geojson``/``.gpkg`` files); at least one of each.
    k : int, optional
        Return the ``k`` tiles of highest probability.
    threshold : float in [0, 1], optional
        Return every tile whose probability is at least ``threshold`` (with
        ``k`` as well: the best ``k`` of those). One of ``k``/``threshold`` is needed.
    area, area_crs, sources
        Filters applied inside the pass, as for :func:`dask_fp.search`.
    C : float
        Inverse regularisation strength of the logistic regression.
    class_weight : "balanced" or None
        "balanced" weighs the classes inversely to their counts (few positives
        against many negatives is the usual case).
    dedup : bool
        Drop a hit that overlaps a better one of the same source (off by default:
        threshold hits are usually dissolved into polygons).
    include_self : bool
        Keep the labelled tiles among the hits.

    Returns
    -------
    Hits
        One query (the classifier), ranked by ``score`` = probability of the
        positive class, best first (ties by row); ``distance`` is NaN.
        ``hits.classifier`` is the fitted estimator.

    Notes
    -----
    Scores are computed in float64 as ``x @ coef_ + intercept_`` and turned into
    probabilities with the logistic function, exactly as ``predict_proba``.
    """
    if k is None and threshold is None:
        raise QueryError("classify needs k (the best k tiles) or threshold (every tile at or above it).")
    if k is not None and (not isinstance(k, int | np.integer) or isinstance(k, bool) or k < 1):
        raise QueryError(f"k must be a whole number >= 1, got {k!r}")
    if threshold is not None:
        try:
            t = float(threshold)
        except (TypeError, ValueError):
            t = float("nan")
        if not 0.0 <= t <= 1.0:
            raise QueryError(f"threshold is a probability from 0 to 1, got {threshold!r}")
    if not (isinstance(C, int | float) and C > 0 and math.isfinite(C)):
        raise QueryError(f"C must be a positive number, got {C!r}")
    st = store if isinstance(store, Store) else open_store(store)
    where = make_filter(st, area, area_crs, sources)
    pos = resolve(st, as_examples(positives), what="positive", model=model)
    neg = resolve(st, as_examples(negatives), what="negative", model=model)
    if len(pos) == 0 or len(neg) == 0:
        raise QueryError(f"the classifier needs at least one positive and one negative example (got {len(pos)}"
                         f" positive, {len(neg)} negative); label some tiles that are NOT what you look for.")
    check_disjoint(pos, neg)
    clf = fit(pos.vectors, neg.vectors, C=float(C), class_weight=class_weight)
    coef, intercept = clf.coef_[0], float(clf.intercept_[0])
    exclude = [] if include_self else list(pos.tiles + neg.tiles)
    m = None
    if k is not None:
        m = candidates_needed(int(k), store_tiling(st), dedup=dedup, from_store=bool(exclude), n_own=len(exclude))

    def run() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        x = st.fingerprints()
        blocks = candidate_blocks(st, where, x.chunks[0])
        if st.persisted:  # scored in cluster memory
            s, r = score_pass(x, coef, intercept, k=m, min_logit=_min_logit(threshold), split_every=split_every,
                              where=where, columns=filter_columns(st, where), blocks=blocks)
        else:  # streamed from Zarr, a few chunks at a time per task (as a search is)
            s, r = stream_score(st, coef, intercept, k=m, min_logit=_min_logit(threshold), split_every=split_every,
                                where=where, blocks=blocks)
        return s, r, st.coords(r)

    logits, rows, meta = reading(st, run)
    if where is not None and threshold is None and rows.size == 0:
        no_hits_in_area(st, where, area if area is not None else sources)
    from scipy.special import expit

    prob = expit(logits)
    sel = np.ones(len(rows), bool) if threshold is None else prob >= float(threshold)
    sel &= keep_mask(meta["source"], meta["wy"], meta["wx"], tiling=store_tiling(st), dedup=dedup, exclude=exclude)
    idx = np.flatnonzero(sel)
    if k is not None:
        idx = idx[: int(k)]
    label = f"classifier: {len(pos)} positive{'s' * (len(pos) != 1)}, {len(neg)} negative{'s' * (len(neg) != 1)}"
    paths = {s["index"]: s["path"] for s in st.sources}
    table = pd.DataFrame({
        "query": np.zeros(len(idx), np.int64), "label": label, "rank": np.arange(1, len(idx) + 1),
        "uid": meta["uid"][idx].astype(np.int64), "distance": np.full(len(idx), np.nan),
        "score": prob[idx].astype(np.float64), "source": meta["source"][idx].astype(np.int64),
        "path": [paths.get(int(s), "") for s in meta["source"][idx]],
        "wy": meta["wy"][idx].astype(np.int64), "wx": meta["wx"][idx].astype(np.int64),
        "x": meta["x"][idx], "y": meta["y"][idx], "lon": meta["lon"][idx], "lat": meta["lat"][idx],
        "row": rows[idx].astype(np.int64),
    }, columns=TABLE_COLUMNS)
    q = Query(label, np.asarray(coef, np.float32), exclude=pos.tiles + neg.tiles,
              shown=pos.tiles[0] if pos.tiles else None)
    hits = Hits(table, [q], st, rank_by="score")
    hits.classifier = clf
    return hits


def write_classified(hits: Hits, out_dir: str | os.PathLike[str], *, mosaic_hits: int = 35) -> dict[str, Any]:
    """Every hit as ``hits.csv``, ``hits.geojson``, places and score rasters; a mosaic of the best ``mosaic_hits``.

    See :func:`dask_fp.export.write_outputs`.
    """
    from .export import write_outputs

    return write_outputs(hits, out_dir, mosaic_hits=mosaic_hits)
