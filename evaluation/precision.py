"""Precision of the report's headline figures: grouped (delete-a-group) jackknife standard errors over
models, equal-count comparisons of F, and the model counts a target precision would need.

Why a jackknife and not a bootstrap: the competition's F depends on the number of models (its epsilon
grid and buckets do), and a bootstrap resample with repeated models shrinks the groups' ranges and
raises epsilon, so percentile-bootstrap intervals of F lean low and can exclude their own estimate.
A jackknife replicate deletes whole groups and never duplicates a model; its variance formula

    SE^2 = (G - 1) / G * sum_g (theta_g - mean_g theta_g)^2

(theta_g: the statistic without group g) is the standard delete-a-group estimator, and intervals are
theta +- t_{G-1, (1+ci)/2} * SE, so they always contain their estimate.  Groups keep dependent models
together: unlearned models are grouped by parent (the original they were made from), shadows by
complementary pair, so the interval accounts for siblings.  The attacks' figures (``roc_jackknife``) add
the jackknife variances over target groups and over example groups.

Equal-count comparisons (``equal_count_f``): F between n unlearned and n retrained models, and F_null
between two disjoint sets of n retrained models, each the mean over S random draws (an incomplete
U-statistic of the models).  Draw s leaves out group g(s) = s mod G, so the draws that leave out g are
a jackknife replicate of the same estimator on the other groups; the replicate means carry Monte Carlo
noise from having S/G draws each, which is removed before the jackknife is applied:

    V_model = max(0, (G-1)/G * [sum_g (m_g - m)^2 - (G-1) * w])  with w = within-group draw variance / k
    SE^2    = V_model + s^2 / S                                  (s^2: variance of single draws)

(k = draws per group; the second term is the Monte Carlo error of the S-draw mean itself).

Model counts for a target half-width h: standard errors shrink as 1/sqrt(models), so a figure with
standard error SE from N models needs about N * (z * SE / h)^2 models (z = 1.96 for 95%).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import stats

from .lira import roc_auc, tpr_at_fpr

__all__ = ["assign_groups", "jackknife_se", "t_interval", "models_needed", "equal_count_f", "jackknife_stat",
           "roc_jackknife", "Z95", "JACKKNIFE_GROUPS", "DRAW_GROUPS"]

Z95 = float(stats.norm.ppf(0.975))
# Delete-a-group jackknife of a statistic of every model: 10 groups (9 degrees of freedom).
JACKKNIFE_GROUPS = 10
# Equal-count draws: 4 groups, so S = 20 draws give 5 per group, enough to estimate and remove their
# Monte Carlo noise (measured: 95% intervals covered 0.95-0.96 of 200 simulated stores, 32 + 32 models).
DRAW_GROUPS = 4


def assign_groups(labels, n_groups: int, seed) -> tuple[np.ndarray, int]:
    """Deal the distinct labels (e.g. parents) into at most ``n_groups`` groups of whole labels, as evenly
    as possible in number of labels, after a seeded shuffle -> (group index per unit int[N], G).
    G = min(n_groups, number of distinct labels)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    uniq, inv = np.unique(labels, return_inverse=True)
    g = min(n_groups, uniq.size)
    order = np.random.default_rng(seed).permutation(uniq.size)
    label_group = np.empty(uniq.size, dtype=np.int64)
    label_group[order] = np.arange(uniq.size) % g
    return label_group[inv], g


def jackknife_se(replicates) -> float | np.ndarray:
    """Delete-a-group jackknife standard error from replicates[G, ...] (the statistic without group g):
    sqrt((G-1)/G * sum_g (theta_g - mean theta)^2).  NaN when G < 2."""
    r = np.asarray(replicates, dtype=np.float64)
    g = r.shape[0]
    if g < 2:
        return np.full(r.shape[1:], np.nan) if r.ndim > 1 else float("nan")
    d = r - r.mean(axis=0)
    se = np.sqrt((g - 1) / g * (d * d).sum(axis=0))
    return se if r.ndim > 1 else float(se)


def t_interval(estimate: float, se: float, dof: int, ci: float = 0.95, lo: float = -np.inf,
               hi: float = np.inf) -> tuple[float, float]:
    """estimate +- t_{dof, (1+ci)/2} * se, clipped to [lo, hi] (so it always contains the estimate)."""
    if not (np.isfinite(se) and dof >= 1):
        return float("nan"), float("nan")
    half = float(stats.t.ppf((1 + ci) / 2, dof)) * float(se)
    return float(max(lo, estimate - half)), float(min(hi, estimate + half))


def models_needed(n_models: int, se: float, half_width: float, z: float = Z95, floor: float = 0.0) -> int | None:
    """Models for a 95% half-width ``half_width``, from a standard error ``se`` measured with ``n_models``, of
    which the part ``floor`` does not shrink with models (e.g. the examples' part of an attack's SE):

        ceil(n_models * (se^2 - floor^2) / ((half_width / z)^2 - floor^2))

    (the rest of the variance shrinks as 1/models); ceil(n_models * (z * se / half_width)^2) without a floor.
    None if unknown; -1 when the floor alone is at least the target (more models cannot reach it)."""
    if not (np.isfinite(se) and se >= 0 and n_models > 0 and half_width > 0 and np.isfinite(floor)):
        return None
    target_var, floor_var = (half_width / z) ** 2, min(floor, se) ** 2
    if floor_var >= target_var:
        return -1
    return int(math.ceil(n_models * (se ** 2 - floor_var) / (target_var - floor_var)))


def jackknife_stat(stat: Callable, u: np.ndarray, r: np.ndarray, group_u: np.ndarray, group_r: np.ndarray,
                   n_groups: int) -> tuple[float, np.ndarray]:
    """stat(u, r) on every model and on every delete-a-group replicate (group g of the unlearned and of the
    retrained models deleted together) -> (estimate, replicates[G])."""
    est = float(stat(u, r))
    reps = np.array([stat(u[group_u != g], r[group_r != g]) for g in range(n_groups)], dtype=np.float64)
    return est, reps


def _draw_summary(values: np.ndarray, leave_out: np.ndarray, n_groups: int) -> dict:
    """Mean of the draws, their spread and the Monte-Carlo-corrected jackknife SE (module docstring)."""
    s = values.size
    out = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if s > 1 else float("nan"),
           "draws": values}
    mc_var = (values.var(ddof=1) / s) if s > 1 else float("nan")
    per_group = [values[leave_out == g] for g in range(n_groups)]
    k = min(v.size for v in per_group) if per_group else 0
    if n_groups < 2 or k < 2:
        out["se"] = float(np.sqrt(mc_var)) if np.isfinite(mc_var) else float("nan")
        out["se_model_part"] = float("nan")
        return out
    means = np.array([v.mean() for v in per_group])
    within = float(np.mean([v.var(ddof=1) / v.size for v in per_group]))
    ss = float(((means - means.mean()) ** 2).sum())
    v_model = max(0.0, (n_groups - 1) / n_groups * (ss - (n_groups - 1) * within))
    out["se"] = float(np.sqrt(v_model + mc_var))
    out["se_model_part"] = float(np.sqrt(v_model))
    return out


def equal_count_f(stat: Callable, r: np.ndarray, group_r: np.ndarray, n_groups: int, n: int, n_draws: int,
                  seed, u: np.ndarray | None = None, group_u: np.ndarray | None = None) -> dict:
    """Equal-count F (``stat`` = forgetting_quality or any stat(a[n, E], b[n, E]) -> float).

    Without ``u``: F_null(n) = mean over ``n_draws`` draws of stat(A, B) for disjoint random sets A, B of n
    retrained models.  With ``u``: F(n) = mean over draws of stat(n unlearned, n retrained).  Draw s leaves
    out group s mod G of both kinds (groups from assign_groups); its models come from the other groups.
    Returns {"mean", "sd", "se", "se_model_part", "draws", "n", "n_draws", "n_groups"}.
    """
    if n < 2:
        raise ValueError(f"an equal-count comparison needs at least 2 models per side, got n = {n}")
    rng = np.random.default_rng(seed)
    values = np.empty(n_draws, dtype=np.float64)
    leave_out = np.arange(n_draws) % max(n_groups, 1)
    for s in range(n_draws):
        g = leave_out[s] if n_groups >= 2 else -1
        pool_r = np.flatnonzero(group_r != g)
        if u is None:
            if pool_r.size < 2 * n:
                raise ValueError(f"F_null at {n} models per side needs {2 * n} retrained models outside each "
                                 f"jackknife group; {pool_r.size} are available")
            pick = rng.choice(pool_r, 2 * n, replace=False)
            values[s] = stat(r[np.sort(pick[:n])], r[np.sort(pick[n:])])
        else:
            pool_u = np.flatnonzero(group_u != g)
            if pool_u.size < n or pool_r.size < n:
                raise ValueError(f"F at {n} models per side needs {n} unlearned and {n} retrained models outside "
                                 f"each jackknife group; {pool_u.size} and {pool_r.size} are available")
            values[s] = stat(u[np.sort(rng.choice(pool_u, n, replace=False))],
                             r[np.sort(rng.choice(pool_r, n, replace=False))])
    out = _draw_summary(values, leave_out, n_groups)
    out.update(n=int(n), n_draws=int(n_draws), n_groups=int(n_groups))
    return out


def roc_jackknife(scores: np.ndarray, member: np.ndarray, groupings, fprs, grid: np.ndarray) -> dict:
    """Pooled ROC figures and their standard errors from a two-way delete-a-group jackknife, from one ROC curve.

    scores, member: 1-D over (target, example) cells.  ``groupings``: a list of (group[cell], G), e.g. the
    cell's target-pair group and its example group.  For all cells and for every replicate without one group:
    AUC (trapezoid over the full ROC, ties counted 1/2), TPR at each FPR a of ``fprs`` (the last ROC point with
    FPR < a, as roc_metrics) and the TPR on ``grid`` (the last ROC point with FPR <= x, for a band).
    The cells are sorted by score once; the full ROC (the points of evaluation.lira.roc_curve, which is
    sklearn's: a test pins them equal) and every replicate are cumulative counts over that one order, read at
    the last cell of each distinct score (a replicate keeps the full curve's points; a point with none of its
    cells left repeats the one before, which changes no figure). One sort and sequential passes, rather than
    locating each of millions of cells on sklearn's curve (which scripts/bench_evaluate_store.py measured slower).
    SE^2 = the sum over groupings of their jackknife variances: targets and examples are crossed, and the
    scores of one target depend on the others as references, which a jackknife over targets alone misses
    (scripts/check_statistics.py: its 95% intervals covered 0.80-0.83 of no-signal worlds at 8 to 32
    shadows, the sum 0.99).
    Returns {"auc", "tpr_at_fpr": {a: tpr}, "grid_tpr", "dof"} and, with groupings, the "_se" of each and
    "auc_se_parts" and "tpr_at_fpr_se_parts": the jackknife SE of each grouping alone, in the order given (the
    example groups' part does not shrink with more targets: a floor more models cannot go below).
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(member, dtype=bool)
    order = np.argsort(-s, kind="stable")
    y_sorted = y[order]
    s_sorted = s[order]
    # the last cell of each distinct score (compared, not differenced: inf - inf is NaN, inf == inf)
    last = np.r_[np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), s.size - 1]
    del s_sorted

    def figures(keep):
        tp = np.cumsum(y_sorted & keep if keep is not None else y_sorted)[last]
        fp = np.cumsum(~y_sorted & keep if keep is not None else ~y_sorted)[last]
        fpr, tpr = np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]
        at = [tpr_at_fpr(fpr, tpr, a) for a in fprs]
        band = tpr[np.searchsorted(fpr, grid, side="right") - 1]
        return np.r_[roc_auc(fpr, tpr), at, band]

    full = figures(None)
    k = len(fprs)
    out = {"auc": float(full[0]), "tpr_at_fpr": dict(zip(fprs, full[1:1 + k].tolist())), "grid_tpr": full[1 + k:]}
    var, dofs, parts = np.zeros_like(full), [], []
    for group, n_groups in groupings:
        if n_groups < 2:
            parts.append(np.full_like(full, np.nan))
            continue
        g_sorted = np.asarray(group)[order]
        parts.append(jackknife_se(np.array([figures(g_sorted != g) for g in range(n_groups)])))
        var += parts[-1] ** 2
        dofs.append(n_groups - 1)
    if dofs:
        se = np.sqrt(var)
        out.update(auc_se=float(se[0]), tpr_at_fpr_se=dict(zip(fprs, se[1:1 + k].tolist())), grid_tpr_se=se[1 + k:],
                   dof=min(dofs), auc_se_parts=[float(p[0]) for p in parts],
                   tpr_at_fpr_se_parts={a: [float(p[1 + i]) for p in parts] for i, a in enumerate(fprs)})
    return out
