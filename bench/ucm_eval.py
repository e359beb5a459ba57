"""Retrieval quality on the UC Merced scenes, through dask-fp's own search verbs.

Every number comes from :class:`dask_fp.Hits` tables: the library ranks, this
module only reads the ranked rows back and scores them against the scene
labels. Kernels (pure numpy, tested on hand-made cases) first, then the
experiments.

Experiments (all seeded, deterministic)
---------------------------------------
- ``one``: every stored tile queries the store by uid, its own tile excluded;
  the full ranking of the other tiles is scored.
- ``pos5`` / ``pos10``: for a fixed sample of query tiles, the query tile plus
  4 / 9 other tiles of its class (seeded draw) are the positives of one
  ``dask_fp.search`` call; the positives are not in the ranking.
- ``fb5``: relevance feedback: the 5 positives of ``pos5`` plus, as
  negatives, the wrong hits among the one-example search's top 10 (the
  first 5 in rank order; fewer when fewer are wrong). The labelled tiles
  leave the ranking, which by itself removes wrong hits, so the row
  ``one-same`` scores the one-example ranking with the same labelled tiles
  removed: the fair control for feedback.
- ``clf10`` / ``clf20``: ``dask_fp.classify`` per class with 10 / 20 labelled
  tiles per class (positives: the class's; negatives: the labelled tiles of
  all other classes); P@10 and AP of the probability ranking of the
  unlabelled tiles, per class, averaged over classes; accuracy is the
  argmax over the per-class probabilities of each unlabelled tile.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# --------------------------------------------------------------------------- kernels


def precision_at(query_labels: np.ndarray, ranked_labels: np.ndarray, k: int) -> np.ndarray:
    """Per-query share of the first ``k`` ranked items with the query's label (padding -1 is wrong)."""
    h = np.asarray(ranked_labels)[:, :k]
    return (h == np.asarray(query_labels)[:, None]).sum(axis=1) / float(k)


def average_precision(query_labels: np.ndarray, ranked_labels: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """Per-query AP over the full ranking: mean precision at each relevant item, divided by
    ``n_relevant`` (relevant items missing from the ranking count as precision 0)."""
    rel = (np.asarray(ranked_labels) == np.asarray(query_labels)[:, None]).astype(np.float64)
    prec = np.cumsum(rel, axis=1) / np.arange(1, rel.shape[1] + 1)
    n = np.asarray(n_relevant, dtype=np.float64)
    return np.where(n > 0, (prec * rel).sum(axis=1) / np.maximum(n, 1), 0.0)


def knn_vote(ranked_labels: np.ndarray, k: int = 5) -> np.ndarray:
    """Majority label of the first ``k`` ranked items (ties: the tied label ranked first)."""
    out = np.zeros(len(ranked_labels), dtype=np.int64)
    for i, row in enumerate(np.asarray(ranked_labels)):
        lab = row[row > 0][:k]
        if lab.size:
            values, first, counts = np.unique(lab, return_index=True, return_counts=True)
            cands = np.flatnonzero(counts == counts.max())
            out[i] = values[cands[np.argmin(first[cands])]]
    return out


def summarise(query_labels: np.ndarray, ranked_labels: np.ndarray, n_relevant: np.ndarray) -> dict[str, float]:
    """P@10, 5-NN accuracy and mAP (full ranking) over the queries."""
    ql = np.asarray(query_labels)
    return {"P@10": float(precision_at(ql, ranked_labels, 10).mean()),
            "5-NN acc": float((knn_vote(ranked_labels, 5) == ql).mean()),
            "mAP": float(average_precision(ql, ranked_labels, n_relevant).mean()),
            "queries": int(len(ql))}


def ranked_matrix(query: np.ndarray, rank: np.ndarray, value: np.ndarray, n_queries: int, fill: int = -1) -> np.ndarray:
    """A ``(query, rank)`` matrix from a Hits table's ``query``, ``rank`` and one value column."""
    width = int(rank.max()) if len(rank) else 0
    out = np.full((n_queries, width), fill, dtype=np.int64)
    out[np.asarray(query), np.asarray(rank) - 1] = np.asarray(value)
    return out


def drop_items(ranked_rows: np.ndarray, drop: list[set[int]]) -> np.ndarray:
    """Each query's ranking with the rows in ``drop[i]`` removed (padded with -1 at the end)."""
    out = np.full_like(ranked_rows, -1)
    for i, row in enumerate(ranked_rows):
        keep = row[(row >= 0) & ~np.isin(row, list(drop[i]))]
        out[i, : len(keep)] = keep
    return out


def labels_of(rows: np.ndarray, row_labels: np.ndarray) -> np.ndarray:
    r = np.asarray(rows)
    return np.where(r >= 0, np.asarray(row_labels)[np.maximum(r, 0)], -1)


def draw_others(rng: np.random.Generator, pool: np.ndarray, exclude: int, n: int) -> np.ndarray:
    """``n`` rows of ``pool`` other than ``exclude``, in a seeded random order."""
    rest = pool[pool != exclude]
    return rng.permutation(rest)[:n]


# --------------------------------------------------------------------------- experiments


@dataclass
class Eval:
    """One store's rows and labels, and what has been measured on it."""

    store: Any
    labels: np.ndarray  # class of each store row (1-based)
    seed: int = 0
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def uids(self) -> np.ndarray:
        return np.asarray(self.store.coords()["uid"])

    def class_rows(self, c: int) -> np.ndarray:
        return np.flatnonzero(self.labels == c)

    def query_sample(self, per_class: int | None) -> np.ndarray:
        """A seeded sample of ``per_class`` query rows of each class (all rows when None)."""
        if per_class is None:
            return np.arange(len(self.labels))
        rng = np.random.default_rng(self.seed)
        return np.sort(np.concatenate([rng.permutation(self.class_rows(c))[:per_class]
                                       for c in np.unique(self.labels)]))


def _rows(hits: Any, n_queries: int) -> np.ndarray:
    t = hits.table
    return ranked_matrix(t["query"].to_numpy(), t["rank"].to_numpy(), t["row"].to_numpy(), n_queries)


def one_example(ev: Eval, qrows: np.ndarray) -> np.ndarray:
    """Full rankings of the one-example uid searches of ``qrows`` (one batched ``search``)."""
    from dask_fp import search

    t0 = time.perf_counter()
    hits = search(ev.store, uids=ev.uids[qrows].tolist(), k=len(ev.labels) - 1)
    ev.seconds["one"] = time.perf_counter() - t0
    ranked = _rows(hits, len(qrows))
    ql = ev.labels[qrows]
    counts = np.bincount(ev.labels)
    ev.results["one"] = summarise(ql, labels_of(ranked, ev.labels), counts[ql] - 1)
    return ranked


def examples(ev: Eval, qrows: np.ndarray, n_pos: int) -> list[np.ndarray]:
    """For each query row: the row itself and ``n_pos - 1`` other rows of its class (seeded)."""
    rng = np.random.default_rng(ev.seed + 1000 * n_pos)
    return [np.concatenate([[q], draw_others(rng, ev.class_rows(ev.labels[q]), q, n_pos - 1)]) for q in qrows]


def multi_example(ev: Eval, qrows: np.ndarray, positives: list[np.ndarray], negatives: list[np.ndarray] | None,
                  key: str, search_fn: Callable[..., Any] | None = None) -> dict[str, float]:
    """One ``search(positives=..., negatives=...)`` per query row; the labelled rows are not ranked."""
    import dask_fp

    fn = search_fn or dask_fp.search
    uids = ev.uids
    ql = ev.labels[qrows]
    counts = np.bincount(ev.labels)
    ranked, n_rel = [], []
    t0 = time.perf_counter()
    for i in range(len(qrows)):
        neg = [] if negatives is None else uids[negatives[i]].tolist()
        hits = fn(ev.store, positives=uids[positives[i]].tolist(), negatives=neg, k=len(ev.labels))
        ranked.append(hits.table.sort_values("rank")["row"].to_numpy())
        n_rel.append(counts[ql[i]] - int((ev.labels[positives[i]] == ql[i]).sum()))
    ev.seconds[key] = time.perf_counter() - t0
    width = max(len(r) for r in ranked)
    mat = np.full((len(ranked), width), -1, dtype=np.int64)
    for i, r in enumerate(ranked):
        mat[i, : len(r)] = r
    ev.results[key] = summarise(ql, labels_of(mat, ev.labels), np.array(n_rel))
    return ev.results[key]


def feedback_negatives(ranked_one: np.ndarray, query_labels: np.ndarray, row_labels: np.ndarray,
                       n_neg: int = 5) -> list[np.ndarray]:
    """Per query: the wrong hits among its one-example top 10, the first ``n_neg`` in rank order."""
    out = []
    for top, q in zip(np.asarray(ranked_one)[:, :10], np.asarray(query_labels), strict=True):
        wrong = top[(top >= 0) & (np.asarray(row_labels)[np.maximum(top, 0)] != q)]
        out.append(wrong[:n_neg])
    return out


def one_same_control(ev: Eval, ranked_one: np.ndarray, qpos: np.ndarray, qrows: np.ndarray,
                     labelled: list[np.ndarray]) -> dict[str, float]:
    """The one-example rankings of ``qrows`` with the feedback's labelled rows removed."""
    sub = drop_items(ranked_one[qpos], [set(map(int, lab)) for lab in labelled])
    ql = ev.labels[qrows]
    counts = np.bincount(ev.labels)
    n_rel = np.array([counts[ql[i]] - int((ev.labels[labelled[i]] == ql[i]).sum()) for i in range(len(qrows))])
    ev.results["one-same"] = summarise(ql, labels_of(sub, ev.labels), n_rel)
    return ev.results["one-same"]


def classifier(ev: Eval, per_class: int, key: str, classify_fn: Callable[..., Any] | None = None) -> dict[str, float]:
    """``classify`` one class at a time with ``per_class`` labels per class (seeded draw)."""
    import dask_fp

    fn = classify_fn or dask_fp.classify
    rng = np.random.default_rng(ev.seed + 7 * per_class)
    classes = np.unique(ev.labels)
    labelled = {int(c): rng.permutation(ev.class_rows(c))[:per_class] for c in classes}
    all_lab = np.concatenate(list(labelled.values()))
    unl = np.setdiff1d(np.arange(len(ev.labels)), all_lab)
    uids = ev.uids
    prob = np.full((len(classes), len(ev.labels)), np.nan)
    p10, ap = [], []
    t0 = time.perf_counter()
    for j, c in enumerate(classes):
        neg = all_lab[ev.labels[all_lab] != c]
        hits = fn(ev.store, positives=uids[labelled[int(c)]].tolist(), negatives=uids[neg].tolist(),
                  k=len(ev.labels))
        t = hits.table.sort_values("rank")
        rows = t["row"].to_numpy()
        prob[j, rows] = t["score"].to_numpy()
        lab = labels_of(rows[None, :], ev.labels)
        n_rel = np.array([int((ev.labels[unl] == c).sum())])
        p10.append(float(precision_at(np.array([c]), lab, 10)[0]))
        ap.append(float(average_precision(np.array([c]), lab, n_rel)[0]))
    ev.seconds[key] = time.perf_counter() - t0
    pred = classes[np.nanargmax(prob[:, unl], axis=0)]
    ev.results[key] = {"P@10": float(np.mean(p10)), "accuracy": float((pred == ev.labels[unl]).mean()),
                       "mAP": float(np.mean(ap)), "queries": int(len(classes)), "unlabelled": int(len(unl))}
    return ev.results[key]
