"""RMIA membership inference (Zarifzadeh et al. 2024, "Low-Cost High-Power Membership Inference
Attacks"), offline variant with reference models' OUT scores.

Inputs are logit-scaled confidences c (evaluation.scores); the attack works with the probability of
the true label p = sigmoid(c) = 1 / (1 + exp(-c)), averaged over queries when there are several.

For the target model theta and a reference set of models:

    Pr(x)       = ((1 + a) * mean_{OUT refs of x} p(x | ref) + (1 - a)) / 2      (offline, with a in [0, 1])
                = mean_{all refs} p(x | ref)                                     (online)
    ratio(x)    = p(x | theta) / Pr(x)
    LR(x, z)    = ratio(x) / ratio(z)            for population samples z (e.g. the test split, never
                                                 trained on, so every reference is OUT for them)
    score(x)    = mean_z 1[LR(x, z) > gamma]     (higher = more likely a member)

The offline `a` approximates the IN probability from the OUT one, Pr_in(x) ~ a Pr_out(x) + 1 - a,
so Pr(x) = (Pr_in(x) + Pr_out(x)) / 2.  Pr(z) uses the same formula as Pr(x).  Computed by sorting the
population ratios once and counting with searchsorted: O((E + Z) log Z) per target.
"""
from __future__ import annotations

import numpy as np
from scipy.special import expit

from .vulnerability import check_partner

__all__ = ["rmia_scores", "rmia_leave_one_out", "rmia_leave_pair_out", "rmia_pair_ratios", "rmia_pair_counts",
           "rmia_counts_rows", "rmia_scored_targets"]


def _prob(c, name):
    a = np.asarray(c, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has {int((~np.isfinite(a)).sum())} NaN or infinite values")
    return expit(a)


def _mean_q(p, plain_ndim):
    return p.mean(axis=-1) if p.ndim == plain_ndim + 1 else p


def _count_greater(ratio_x, ratio_z, gamma):
    """mean_z 1[ratio_x / ratio_z > gamma] for every x, via sorted ratio_z (ratios are > 0)."""
    rz = np.sort(ratio_z)
    # ratio_x / rz > gamma  <=>  rz < ratio_x / gamma  (up to rounding at exact ties)
    return np.searchsorted(rz, ratio_x / gamma, side="left") / rz.size


def rmia_scores(target_x, ref_x, ref_x_in, target_z, ref_z, *, a: float = 0.3, gamma: float = 1.0,
                mode: str = "offline") -> np.ndarray:
    """RMIA scores of one target model -> float64[E] in [0, 1], higher = more likely a member.

    target_x[E] or [E, Q]: target confidences on the audited examples; ref_x[M, E] or [M, E, Q] and
    ref_x_in bool[M, E]: reference models' confidences and membership; target_z[Z] or [Z, Q],
    ref_z[M, Z] or [M, Z, Q]: population samples (not trained on by any model).
    offline: Pr(x) = ((1+a) mean_OUT p + 1 - a) / 2 (needs >= 1 OUT reference per example);
    online : Pr(x) = mean over all references.  score = mean_z 1[(p_t(x)/Pr(x)) / (p_t(z)/Pr(z)) > gamma].
    """
    if mode not in ("offline", "online"):
        raise ValueError(f"mode must be 'offline' or 'online', got {mode!r}")
    if not (0.0 <= a <= 1.0):
        raise ValueError(f"a must lie in [0, 1], got {a}")
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    px = _mean_q(_prob(target_x, "target_x"), 1)
    pr = _mean_q(_prob(ref_x, "ref_x"), 2)
    pz = _mean_q(_prob(target_z, "target_z"), 1)
    prz = _mean_q(_prob(ref_z, "ref_z"), 2)
    mask = np.asarray(ref_x_in)
    if px.ndim != 1 or pr.ndim != 2 or pr.shape[1] != px.shape[0]:
        raise ValueError(f"expected target_x[E(,Q)] and ref_x[M,E(,Q)], got {np.shape(target_x)} and {np.shape(ref_x)}")
    if mask.dtype != bool or mask.shape != pr.shape:
        raise ValueError(f"ref_x_in must be boolean with shape {pr.shape}, got {mask.dtype} {mask.shape}")
    if pz.ndim != 1 or prz.ndim != 2 or prz.shape != (pr.shape[0], pz.shape[0]) or pz.size == 0:
        raise ValueError(f"expected target_z[Z(,Q)] and ref_z[M,Z(,Q)] with the same M as ref_x, "
                         f"got {np.shape(target_z)} and {np.shape(ref_z)}")
    if pr.shape[0] < 1:
        raise ValueError("RMIA needs at least 1 reference model")
    if mode == "offline":
        n_out = (~mask).sum(0)
        if (n_out < 1).any():
            e = int(np.argmax(n_out < 1))
            raise ValueError(f"RMIA offline needs at least 1 OUT reference model for every example; example {e} has 0")
        pr_x = ((1 + a) * np.where(mask, 0.0, pr).sum(0) / n_out + (1 - a)) / 2
        pr_z = ((1 + a) * prz.mean(0) + (1 - a)) / 2
    else:
        pr_x = pr.mean(0)
        pr_z = prz.mean(0)
    return _count_greater(px / pr_x, pz / pr_z, gamma)


def rmia_leave_one_out(conf, shadow_in, pop_conf, *, a: float = 0.3, gamma: float = 1.0) -> np.ndarray:
    """Offline RMIA with every shadow in turn as the target and the others as references -> [M, E].

    conf[M, E(, Q)], shadow_in bool[M, E], pop_conf[M, Z(, Q)] (population samples, e.g. the test split).
    For target t: Pr(x) = ((1+a) mean_{OUT s != t} p_s(x) + 1 - a) / 2 from running sums (no refit),
    Pr(z) likewise over all s != t, then score as in rmia_scores.  Needs >= 2 OUT shadows per example.
    """
    p = _mean_q(_prob(conf, "conf"), 2)
    pz = _mean_q(_prob(pop_conf, "pop_conf"), 2)
    mask = np.asarray(shadow_in)
    if p.ndim != 2 or mask.dtype != bool or mask.shape != p.shape:
        raise ValueError(f"expected conf[M,E(,Q)] and boolean shadow_in[M,E], got {np.shape(conf)} and {mask.shape}")
    if pz.ndim != 2 or pz.shape[0] != p.shape[0] or pz.shape[1] < 1:
        raise ValueError(f"pop_conf must have shape [M, Z(, Q)] with M = {p.shape[0]}, got {np.shape(pop_conf)}")
    if not (0.0 <= a <= 1.0):
        raise ValueError(f"a must lie in [0, 1], got {a}")
    m = p.shape[0]
    n_out = (~mask).sum(0)
    if (n_out < 2).any():
        e = int(np.argmax(n_out < 2))
        raise ValueError(f"leave-one-out RMIA needs at least 2 OUT shadows for every example; example {e} has {int(n_out[e])}")
    sum_out = np.where(mask, 0.0, p).sum(0)
    sum_z = pz.sum(0)
    out = np.empty(p.shape, dtype=np.float64)
    for t in range(m):
        is_out = ~mask[t]
        mean_out = (sum_out - np.where(is_out, p[t], 0.0)) / (n_out - is_out)
        pr_x = ((1 + a) * mean_out + (1 - a)) / 2
        pr_z = ((1 + a) * (sum_z - pz[t]) / (m - 1) + (1 - a)) / 2
        out[t] = _count_greater(p[t] / pr_x, pz[t] / pr_z, gamma)
    return out


def rmia_leave_pair_out(conf, shadow_in, partner, pop_conf=None, *, a: float = 0.3, gamma: float = 1.0) -> np.ndarray:
    """Offline RMIA with every shadow t as the target and all shadows except t and its partner as
    references -> float64[M, E] in [0, 1] (NaN rows where partner[t] is -1).

    conf[M, E(, Q)], shadow_in bool[M, E], partner int[M] (or int[M, E] with constant rows) whose
    membership is the opposite of t's on every example (complementary pairs), pop_conf[M, Z(, Q)] or
    None.  p = sigmoid(conf) averaged over queries; R_t = all shadows except t and partner[t]:

        Pr_t(e)   = ((1+a) * mean_{r in R_t, r OUT on e} p_r(e) + 1 - a) / 2    (train examples)
        Pr_t(z)   = ((1+a) * mean_{r in R_t} p_r(z) + 1 - a) / 2                 (pop_conf columns)
        ratio_t   = p_t / Pr_t
        score_t(x) = mean_{z in Z_t} 1[ratio_t(x) / ratio_t(z) > gamma]

    with the population Z_t = the train examples OUT for t plus every pop_conf column.  The OUT mean
    comes from running sums minus the one OUT value of the pair (exactly one of t, partner is OUT on
    e).  Needs >= 2 OUT shadows per example (one remains as reference).
    = rmia_pair_counts(*rmia_pair_ratios(conf, shadow_in, partner, pop_conf, a=a), shadow_in, partner, gamma).
    """
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    ratio, pop_ratio = rmia_pair_ratios(conf, shadow_in, partner, pop_conf, a=a)
    return rmia_pair_counts(ratio, pop_ratio, shadow_in, partner, gamma)


def _sum_models(p):
    """p[M, N] summed over the models in order, ((p0 + p1) + p2) + ..., whatever N (numpy's own axis-0 sum
    takes another order for a single column), so a column's sum does not depend on the other columns."""
    out = np.array(p[0], dtype=np.float64, copy=True)
    for row in p[1:]:
        out += row
    return out


def _one_partner(partner, mask):
    """int[M]: one partner per shadow (checked against the membership of every example given)."""
    pt = check_partner(partner, mask)
    if np.ndim(partner) == 1:  # also with no example to check it on (a chunk of test examples alone)
        one = np.asarray(partner, dtype=np.int64)
        if ((one < -1) | (one >= mask.shape[0]) | (one == np.arange(mask.shape[0]))).any():
            raise ValueError(f"partner {one.tolist()} is not -1 or a valid shadow index other than its own")
        return one
    varies = (pt != pt[:, :1]).any(1)
    if varies.any():
        raise ValueError(f"rmia_leave_pair_out needs one partner per shadow; partner row {int(np.argmax(varies))} "
                         "varies across examples")
    return pt[:, 0] if pt.shape[1] else np.full(mask.shape[0], -1)


def rmia_pair_ratios(conf, shadow_in, partner, pop_conf=None, *,
                     a: float = 0.3) -> tuple[np.ndarray, np.ndarray | None]:
    """rmia_leave_pair_out's likelihood ratios, before the counting -> (ratio_t(x)[M, E], ratio_t(z)[M, Z] or
    None), NaN rows where partner[t] is -1.  Each example's (and population column's) ratios depend on that
    column alone, so the ratios of a subset of the columns (a chunk) equal the same entries computed on all."""
    p = _mean_q(_prob(conf, "conf"), 2)
    mask = np.asarray(shadow_in)
    if p.ndim != 2 or mask.dtype != bool or mask.shape != p.shape:
        raise ValueError(f"expected conf[M,E(,Q)] and boolean shadow_in[M,E], got {np.shape(conf)} and {mask.shape}")
    m = p.shape[0]
    pz = None
    if pop_conf is not None:
        pz = _mean_q(_prob(pop_conf, "pop_conf"), 2)
        if pz.ndim != 2 or pz.shape[0] != m:
            raise ValueError(f"pop_conf must have shape [M, Z(, Q)] with M = {m}, got {np.shape(pop_conf)}")
    if not (0.0 <= a <= 1.0):
        raise ValueError(f"a must lie in [0, 1], got {a}")
    pt = _one_partner(partner, mask)
    n_out = (~mask).sum(0)
    if (n_out < 2).any():
        e = int(np.argmax(n_out < 2))
        raise ValueError(f"leave-pair-out RMIA needs at least 2 OUT shadows for every example; "
                         f"example {e} has {int(n_out[e])}")
    sum_out = _sum_models(np.where(mask, 0.0, p))
    sum_z = _sum_models(pz) if pz is not None and pz.shape[1] else None
    ratio = np.full(p.shape, np.nan)
    pop_ratio = np.full(pz.shape, np.nan) if pz is not None else None
    for t in range(m):
        q = int(pt[t])
        if q < 0:
            continue
        removed = np.where(mask[t], p[q], p[t])  # the OUT member's value on each example
        pr_x = ((1 + a) * (sum_out - removed) / (n_out - 1) + (1 - a)) / 2
        ratio[t] = p[t] / pr_x
        if sum_z is not None:
            pr_z = ((1 + a) * (sum_z - pz[t] - pz[q]) / (m - 2) + (1 - a)) / 2
            pop_ratio[t] = pz[t] / pr_z
    return ratio, pop_ratio


def rmia_pair_counts(ratio, pop_ratio, shadow_in, partner, gamma: float = 1.0) -> np.ndarray:
    """rmia_leave_pair_out's scores from its ratios over every example (rmia_pair_ratios): per target t,
    mean over the population (the train examples OUT for t, then every pop_ratio column) of
    1[ratio_t(x) / ratio_t(z) > gamma] -> float64[M, E] (NaN rows where partner[t] is -1)."""
    mask = np.asarray(shadow_in)
    return rmia_counts_rows(ratio, pop_ratio, mask, rmia_scored_targets(partner, mask), gamma)


def rmia_scored_targets(partner, shadow_in) -> np.ndarray:
    """bool[M]: the targets rmia_pair_counts scores (those with a partner)."""
    return _one_partner(partner, np.asarray(shadow_in)) >= 0


def rmia_counts_rows(ratio, pop_ratio, shadow_in, scored, gamma: float = 1.0, first: int = 0) -> np.ndarray:
    """rmia_pair_counts of some target rows (``first``: the first one's index, for messages): ratio[m, E],
    pop_ratio[m, Z] (or None), shadow_in bool[m, E] and scored bool[m] (whether each target has a partner)
    -> float64[m, E].  Rows do not depend on one another, so blocks of rows can be counted apart."""
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    mask = np.asarray(shadow_in)
    out = np.full(mask.shape, np.nan)
    for t in np.flatnonzero(scored):
        pop = ratio[t][~mask[t]]
        if pop_ratio is not None:
            pop = np.concatenate([pop, pop_ratio[t]])
        if pop.size == 0:
            raise ValueError(f"target {first + t} has an empty population (no OUT train example and no pop_conf)")
        out[t] = _count_greater(ratio[t], pop, gamma)
    return out
