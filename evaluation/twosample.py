"""Per-example two-sample tests between unlearned and retrained confidences.

For every example e, the N_u unlearned and N_r retrained confidences are compared with the
two-sided Kolmogorov-Smirnov test (D = sup_t |F_u(t) - F_r(t)|) and the two-sided Mann-Whitney U
test (U = #{(i, j): u_i > r_j} + #{u_i = r_j} / 2), both from scipy.stats vectorized over examples
(axis=0).  The p-values of all examples are corrected with Benjamini-Hochberg at level q (scipy's
false_discovery_control): sort the m p-values p_(1) <= ... <= p_(m), find the largest k with
p_(k) <= k q / m and reject the k smallest.
The reported fraction is the share of examples whose distributions differ (rejected).
"""
from __future__ import annotations

import numpy as np
from scipy import stats

__all__ = ["benjamini_hochberg", "per_example_tests"]


def benjamini_hochberg(pvalues, q: float = 0.05) -> np.ndarray:
    """Benjamini-Hochberg step-up procedure -> bool[m], True where the null is rejected.

    Rejects the k smallest p-values, k = max{i : p_(i) <= i q / m} (none when no such i): the adjusted
    p-values of scipy.stats.false_discovery_control(method="bh"), min_{j >= i} p_(j) m / j, are <= q for
    exactly those (in floating point the two forms can disagree only for a p-value within rounding of j q / m).
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"pvalues must be 1-D, got shape {p.shape}")
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError("pvalues must lie in [0, 1] without NaN")
    if not (0 < q < 1):
        raise ValueError(f"q must lie in (0, 1), got {q}")
    if p.size == 0:
        return np.zeros(0, dtype=bool)
    return stats.false_discovery_control(p, method="bh") <= q


def per_example_tests(unlearned, retrained, q: float = 0.05, *, ks_method: str = "auto") -> dict:
    """KS and Mann-Whitney tests per example with Benjamini-Hochberg at level q.

    unlearned[N_u, E], retrained[N_r, E] (N >= 2 each, finite).  Returns a dict with float64[E]
    arrays ks_stat, ks_p, mw_stat, mw_p, bool[E] ks_reject, mw_reject, and the fractions
    ks_fraction, mw_fraction of examples whose distributions differ.
    """
    u = np.asarray(unlearned, dtype=np.float64)
    r = np.asarray(retrained, dtype=np.float64)
    for name, a in (("unlearned", u), ("retrained", r)):
        if a.ndim != 2:
            raise ValueError(f"{name} must have shape [models, examples], got {a.shape}")
        if a.shape[0] < 2:
            raise ValueError(f"{name} has {a.shape[0]} models; at least 2 are needed")
        if not np.isfinite(a).all():
            raise ValueError(f"{name} has {int((~np.isfinite(a)).sum())} NaN or infinite values")
    if u.shape[1] != r.shape[1]:
        raise ValueError(f"unlearned has {u.shape[1]} examples but retrained has {r.shape[1]}")
    ks = stats.ks_2samp(u, r, axis=0, method=ks_method)
    mw = stats.mannwhitneyu(u, r, axis=0, alternative="two-sided")
    ks_p = np.atleast_1d(np.asarray(ks.pvalue, dtype=np.float64))
    mw_p = np.atleast_1d(np.asarray(mw.pvalue, dtype=np.float64))
    # identical constant samples give NaN p-values in some scipy versions: nothing differs there
    ks_p = np.where(np.isnan(ks_p), 1.0, ks_p)
    mw_p = np.where(np.isnan(mw_p), 1.0, mw_p)
    ks_rej = benjamini_hochberg(ks_p, q)
    mw_rej = benjamini_hochberg(mw_p, q)
    return {
        "ks_stat": np.atleast_1d(np.asarray(ks.statistic, dtype=np.float64)), "ks_p": ks_p,
        "mw_stat": np.atleast_1d(np.asarray(mw.statistic, dtype=np.float64)), "mw_p": mw_p,
        "ks_reject": ks_rej, "mw_reject": mw_rej,
        "ks_fraction": float(ks_rej.mean()), "mw_fraction": float(mw_rej.mean()),
    }
