"""Pooled ROC figures with a two-way delete-a-group jackknife, computed by buckets of scores so that no job holds
more than a bucket of cells.

``roc_jackknife(scores, member, groupings, fprs, grid, *, cells_per_bucket=None, map_jobs=None)``

The figures of one attack over its (target, example) cells, for all cells and for every replicate without one
group of a grouping (target pairs, example groups):
* AUC: the trapezoid under the full ROC (ties counted 1/2), i.e. with the ROC's points (FP_k, TP_k) in counts,
  AUC = sum_k (FP_k - FP_{k-1}) (TP_k + TP_{k-1}) / (2 P N), summed exactly in integers and divided once;
* TPR at each FPR a of ``fprs``: the TPR of the last ROC point with FPR < a (as evaluation.lira.tpr_at_fpr);
* TPR on ``grid`` (the band): the TPR of the last ROC point with FPR <= x.
The SE of each figure adds the jackknife variances of the groupings (targets and examples are crossed, and a
target's scores depend on the others as references: scripts/check_statistics.py measured 95% intervals covering
0.80-0.83 of no-signal worlds with targets alone, 0.99 with the sum); each grouping's SE alone is returned too
(the example groups' part does not shrink with more targets: a floor more models cannot go below).

Buckets: the cells are dealt into contiguous score ranges (edges from quantiles of a strided sample, so equal
scores share a bucket) of about ``cells_per_bucket`` cells.  The ROC's points are the distinct scores from the
highest down, and every count at a point is the count in the higher buckets plus the count inside the bucket up
to that point; so each bucket's job needs, besides its own cells, only each replicate's positives and negatives
in the higher buckets (computed here from per-bucket, per-group counts).  A job sorts its cells once and returns
per replicate its part of 2 x area (an integer), and the last of its points below each FPR level, if any; the
figures take the last bucket that has one.  Memory per job follows the bucket; the result is the same whatever
the buckets (a test pins it to a one-sort sweep and to sklearn's curve).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .precision import jackknife_se

__all__ = ["roc_jackknife", "RocBucket", "RocBucketPart", "roc_bucket_job", "roc_buckets", "bucket_edges"]

SAMPLE_PER_BUCKET = 256  # sample points per bucket for the edges


def bucket_edges(scores: np.ndarray, n_buckets: int) -> np.ndarray:
    """Ascending, distinct score edges that cut ``scores`` into at most ``n_buckets`` ranges of about equal
    counts: quantiles of a strided sample (deterministic).  A cell's bucket is searchsorted(edges, s, "right")."""
    if n_buckets <= 1 or scores.size == 0:
        return np.empty(0, np.float64)
    step = max(1, scores.size // (SAMPLE_PER_BUCKET * n_buckets))
    sample = np.sort(scores[::step])
    return np.unique(sample[(np.arange(1, n_buckets) * sample.size) // n_buckets])


@dataclass(frozen=True)
class RocBucket:
    """One bucket's cells and what its job needs of the others.  Replicates: r = 0 is every cell, then for each
    grouping j and each of its groups g, the cells without group g, in that order."""
    scores: np.ndarray  # float64[c]
    member: np.ndarray  # bool[c]
    groups: list[np.ndarray]  # per grouping: the cells' groups, int[c]
    n_groups: list[int]
    tp0: np.ndarray  # int64[R]: each replicate's positives in the higher buckets
    fp0: np.ndarray  # int64[R]: its negatives there
    pos: np.ndarray  # int64[R]: its positives in all
    neg: np.ndarray  # int64[R]: its negatives in all
    fprs: tuple
    grid: np.ndarray


@dataclass
class RocBucketPart:
    area2: np.ndarray  # int64[R]: sum over the bucket's points of (FP_k - FP_{k-1}) (TP_k + TP_{k-1})
    below: np.ndarray  # float64[R, L]: the TPR of the bucket's last point below each level (NaN: none)
    found: np.ndarray  # bool[R, L]


def _replicate_keeps(groups: list[np.ndarray], n_groups: list[int]):
    yield None
    for g_cells, n in zip(groups, n_groups):
        for g in range(n):
            yield g_cells != g


def roc_bucket_job(b: RocBucket) -> RocBucketPart:
    """A bucket's part of every replicate's figures (module docstring).  A job of roc_jackknife's map."""
    order = np.argsort(-b.scores, kind="stable")
    y = b.member[order]
    s = b.scores[order]
    # the last cell of each distinct score (compared, not differenced: inf - inf is NaN, inf == inf)
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1] if s.size else np.empty(0, np.int64)
    del s
    groups = [g[order] for g in b.groups]
    k = len(b.fprs)
    n_rep = b.tp0.size
    area2 = np.zeros(n_rep, np.int64)
    below = np.full((n_rep, k + b.grid.size), np.nan)
    found = np.zeros((n_rep, k + b.grid.size), bool)
    for r, keep in enumerate(_replicate_keeps(groups, b.n_groups)):
        if not last.size:
            break
        pos_cells, neg_cells = (y, ~y) if keep is None else (y & keep, ~y & keep)
        tp = b.tp0[r] + np.cumsum(pos_cells, dtype=np.int64)[last]
        fp = b.fp0[r] + np.cumsum(neg_cells, dtype=np.int64)[last]
        area2[r] = int(np.dot(np.diff(fp, prepend=b.fp0[r]), tp + np.r_[b.tp0[r], tp[:-1]]))
        with np.errstate(divide="ignore", invalid="ignore"):
            fpr, tpr = fp / b.neg[r], tp / b.pos[r]
        at = np.r_[np.searchsorted(fpr, b.fprs, side="left"), np.searchsorted(fpr, b.grid, side="right")] - 1
        found[r] = at >= 0
        below[r, found[r]] = tpr[at[found[r]]]
    return RocBucketPart(area2, below, found)


def roc_buckets(scores, member, groupings, fprs, grid, n_buckets: int) -> list[RocBucket]:
    """The cells dealt into buckets of scores, highest first, each with its replicates' counts in the higher
    buckets and in all."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(member, dtype=bool)
    if np.isnan(s).any():
        raise ValueError("ROC scores must not be NaN")
    edges = bucket_edges(s, n_buckets)
    n_b = edges.size + 1
    bucket = np.searchsorted(edges, s, side="right").astype(np.int32)
    # per bucket, each replicate's positives and negatives: every cell, then without each group
    pos_b, neg_b = np.bincount(bucket[y], minlength=n_b), np.bincount(bucket[~y], minlength=n_b)
    reps_pos, reps_neg = [pos_b], [neg_b]
    cells_groups = []
    for group, n_groups in groupings:
        g = np.asarray(group)
        cells_groups.append(g)
        key = bucket.astype(np.int64) * n_groups + g
        in_g_pos = np.bincount(key[y], minlength=n_b * n_groups).reshape(n_b, n_groups)
        in_g_neg = np.bincount(key[~y], minlength=n_b * n_groups).reshape(n_b, n_groups)
        reps_pos += [pos_b - in_g_pos[:, k] for k in range(n_groups)]
        reps_neg += [neg_b - in_g_neg[:, k] for k in range(n_groups)]
    p_rb, n_rb = np.array(reps_pos, np.int64), np.array(reps_neg, np.int64)  # [R, buckets]
    # counts in the buckets above b (higher scores): the sum over b' > b
    above_p = np.cumsum(p_rb[:, ::-1], axis=1)[:, ::-1] - p_rb
    above_n = np.cumsum(n_rb[:, ::-1], axis=1)[:, ::-1] - n_rb
    order = np.argsort(bucket, kind="stable")
    starts = np.r_[0, np.cumsum(np.bincount(bucket, minlength=n_b))]
    out = []
    for b in range(n_b - 1, -1, -1):
        idx = order[starts[b]:starts[b + 1]]
        out.append(RocBucket(s[idx], y[idx], [np.asarray(g[idx], np.int32) for g in cells_groups],
                             [n for _, n in groupings], above_p[:, b], above_n[:, b], p_rb.sum(1), n_rb.sum(1),
                             tuple(fprs), np.asarray(grid, np.float64)))
    return out


def _figures(parts: list[RocBucketPart], pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """float64[R, 1 + L]: each replicate's AUC, then the TPR at each level, from its buckets' parts (highest
    bucket first); a level no point reaches reads the first point (0, 0)."""
    area2 = np.sum([p.area2 for p in parts], axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = area2 / (2 * pos * neg)
    levels = np.zeros(parts[0].below.shape)
    for p in parts:  # the last bucket with a point below the level holds the last such point
        levels[p.found] = p.below[p.found]
    return np.c_[auc, levels]


def roc_jackknife(scores, member, groupings, fprs, grid, *, cells_per_bucket: int | None = None,
                  map_jobs: Callable[[Callable, list[tuple]], list] | None = None) -> dict:
    """Pooled ROC figures and their standard errors from a two-way delete-a-group jackknife (module docstring).

    scores, member: 1-D over (target, example) cells (no NaN).  ``groupings``: a list of (group[cell], G), e.g.
    the cell's target-pair group and its example group.  ``cells_per_bucket``: about this many cells per job
    (None: one bucket); ``map_jobs(fn, [args, ...])`` runs the buckets' jobs (default: here, in order).
    Returns {"auc", "tpr_at_fpr": {a: tpr}, "grid_tpr", "dof"} and, with groupings, the "_se" of each and
    "auc_se_parts" and "tpr_at_fpr_se_parts": the jackknife SE of each grouping alone, in the order given.
    """
    s = np.asarray(scores, dtype=np.float64)
    n_buckets = 1 if cells_per_bucket is None else max(1, -(-s.size // max(1, int(cells_per_bucket))))
    buckets = roc_buckets(s, member, groupings, fprs, grid, n_buckets)
    pos, neg = buckets[0].pos, buckets[0].neg
    run = map_jobs or (lambda fn, args: [fn(*a) for a in args])
    parts = run(roc_bucket_job, [(b,) for b in buckets])
    del buckets
    figs = _figures(parts, pos, neg)
    full, k = figs[0], len(fprs)
    out = {"auc": float(full[0]), "tpr_at_fpr": dict(zip(fprs, full[1:1 + k].tolist())), "grid_tpr": full[1 + k:]}
    var, dofs, se_parts, first = np.zeros_like(full), [], [], 1
    for _, n_groups in groupings:
        reps = figs[first:first + n_groups]
        first += n_groups
        if n_groups < 2:
            se_parts.append(np.full_like(full, np.nan))
            continue
        se_parts.append(jackknife_se(reps))
        var += se_parts[-1] ** 2
        dofs.append(n_groups - 1)
    if dofs:
        se = np.sqrt(var)
        out.update(auc_se=float(se[0]), tpr_at_fpr_se=dict(zip(fprs, se[1:1 + k].tolist())), grid_tpr_se=se[1 + k:],
                   dof=min(dofs), auc_se_parts=[float(p[0]) for p in se_parts],
                   tpr_at_fpr_se_parts={a: [float(p[1 + i]) for p in se_parts] for i, a in enumerate(fprs)})
    return out
