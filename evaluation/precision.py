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
complementary pair, so the interval accounts for siblings.  The attacks' figures (evaluation.roc.roc_jackknife)
add the jackknife variances over target groups and over example groups.

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


__all__ = ["assign_groups", "jackknife_se", "t_interval", "models_needed", "equal_count_f", "jackknife_stat",
           "StatMap", "serial_stats", "Z95", "JACKKNIFE_GROUPS", "DRAW_GROUPS"]

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


StatMap = Callable[[Callable, list[tuple[np.ndarray, np.ndarray]]], list]


def serial_stats(stat: Callable, pairs: list[tuple[np.ndarray, np.ndarray]]) -> list:
    """The in-process StatMap: stat(a, b) for every pair, in order."""
    return [stat(a, b) for a, b in pairs]


def jackknife_stat(stat: Callable, u: np.ndarray, r: np.ndarray, group_u: np.ndarray, group_r: np.ndarray,
                   n_groups: int, map_stat: StatMap = serial_stats, estimate: float | None = None
                   ) -> tuple[float, np.ndarray]:
    """stat(u, r) on every model (unless its ``estimate`` is given) and on every delete-a-group replicate (group g
    of the unlearned and of the retrained models deleted together) -> (estimate, replicates[G]).
    ``map_stat(stat, [(a, b), ...])`` evaluates them (all at once: they are independent)."""
    pairs = [(u[group_u != g], r[group_r != g]) for g in range(n_groups)]
    if estimate is None:
        pairs.insert(0, (u, r))
    values = np.array(map_stat(stat, pairs), dtype=np.float64)
    return (float(values[0]), values[1:]) if estimate is None else (float(estimate), values)


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
                  seed, u: np.ndarray | None = None, group_u: np.ndarray | None = None,
                  map_stat: StatMap = serial_stats) -> dict:
    """Equal-count F (``stat`` = forgetting_quality or any stat(a[n, E], b[n, E]) -> float).

    Without ``u``: F_null(n) = mean over ``n_draws`` draws of stat(A, B) for disjoint random sets A, B of n
    retrained models.  With ``u``: F(n) = mean over draws of stat(n unlearned, n retrained).  Draw s leaves
    out group s mod G of both kinds (groups from assign_groups); its models come from the other groups.
    Every draw is made first, then ``map_stat(stat, [(a, b), ...])`` evaluates them (all at once: they are
    independent, and no draw depends on a value).
    Returns {"mean", "sd", "se", "se_model_part", "draws", "n", "n_draws", "n_groups"}.
    """
    if n < 2:
        raise ValueError(f"an equal-count comparison needs at least 2 models per side, got n = {n}")
    rng = np.random.default_rng(seed)
    pairs = []
    leave_out = np.arange(n_draws) % max(n_groups, 1)
    for s in range(n_draws):
        g = leave_out[s] if n_groups >= 2 else -1
        pool_r = np.flatnonzero(group_r != g)
        if u is None:
            if pool_r.size < 2 * n:
                raise ValueError(f"F_null at {n} models per side needs {2 * n} retrained models outside each "
                                 f"jackknife group; {pool_r.size} are available")
            pick = rng.choice(pool_r, 2 * n, replace=False)
            pairs.append((r[np.sort(pick[:n])], r[np.sort(pick[n:])]))
        else:
            pool_u = np.flatnonzero(group_u != g)
            if pool_u.size < n or pool_r.size < n:
                raise ValueError(f"F at {n} models per side needs {n} unlearned and {n} retrained models outside "
                                 f"each jackknife group; {pool_u.size} and {pool_r.size} are available")
            pairs.append((u[np.sort(rng.choice(pool_u, n, replace=False))],
                          r[np.sort(rng.choice(pool_r, n, replace=False))]))
    values = np.array(map_stat(stat, pairs), dtype=np.float64).reshape(n_draws)
    out = _draw_summary(values, leave_out, n_groups)
    out.update(n=int(n), n_draws=int(n_draws), n_groups=int(n_groups))
    return out
