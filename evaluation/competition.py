"""The NeurIPS 2023 Machine Unlearning Challenge forgetting score, vectorized.

Reproduces the organizers' released metric (Triantafillou et al., "Are we making progress in
unlearning?", metric.py of google-deepmind/unlearning_evaluation) from per-example logit-scaled
confidences of N unlearned and N retrained models, without the per-example, per-threshold loops.

Per forget example e, with u = unlearned[:, e] and r = retrained[:, e]:

* positive group ``pos`` = r if median(r) > median(u) else u (ties: unlearned is positive);
  ``neg`` = the other group.
* if min(range(pos), range(neg)) / max(range(pos), range(neg)) < 0.01: eps_e = 50.
* single-threshold rules: t in linspace(min, max, ceil((max - min) * 100)) over both groups,
  predict positive when conf >= t.  The released code builds this grid with ``torch.linspace`` and
  no dtype, i.e. in float32 (start, end and step rounded to float32, the first half of the points
  computed as start + step*i and the second half as end - step*(n-1-i), each with one rounding);
  this module builds the same float32 grid in numpy and compares it with the float64 confidences.
* double-threshold rules: the positive group is the one with the smaller range (on equal ranges the
  groups swap, so the former negative group is positive), width w = that smaller range,
  min_ = (pos.min() + w) - 2, max_ = pos.max() + 2 (float64, in this order),
  right thresholds R = np.linspace(min_, max_, ceil((max_ - min_) * 100)), and for each r in R the
  left thresholds np.linspace((r - w) - 2, (r - w) + 2, 400); predict positive when l <= conf <= r.
* for every rule, FPR = FP / |neg|, FNR = FN / |pos| (float64; the released code averages in float32,
  which moves eps by < 1e-6):  FPR = FNR = 0 gives eps = inf; exactly one of them 0 discards the rule;
  otherwise eps = max(log(1 - delta - FPR) - log(FNR), log(1 - delta - FNR) - log(FPR)) with NaN
  parts ignored (a rule with both parts NaN is discarded), clipped below at 0.
* eps_e = max over kept rules of both families, clipped to [0, 50].  (If no rule is kept, which only
  happens in degenerate inputs such as two identical constant groups, the released code stops with an
  assertion; here eps_e = 0.)

Forgetting quality F = mean_e h(eps_e) with h(eps) = 2^-floor(2 eps) when floor(2 eps) < 2 K,
K = ceil(ln(N - 1)) (buckets [0, .5), [.5, 1), ... whose end is <= K, worth 1, 1/2, 1/4, ...), else 0.
N is the number of unlearned models, as in the released code.

Vectorization: every rule only needs the counts of each group inside the predicted-positive region,
so each example's confidences are merged and sorted once, the thresholds are located with one
``searchsorted``, and eps is read from a precomputed table over (TP, FP) in [0, |pos|] x [0, |neg|].
Examples are processed in chunks so memory stays bounded (a few tens of MB for 512 + 512 models).
"""
from __future__ import annotations

import math

import numpy as np

DELTA = 1e-5
EPSILON_CAP = 50.0
THRESHOLDS_PER_UNIT = 100
BUFFER = 2.0
NUM_LEFT_THRESHOLDS = int(np.ceil(2 * BUFFER * THRESHOLDS_PER_UNIT))  # 400
RANGE_RATIO_MIN = 0.01
_CHUNK = 256

__all__ = [
    "per_example_epsilons",
    "forgetting_quality",
    "forgetting_quality_from_epsilons",
    "forgetting_quality_null",
    "final_score",
    "single_thresholds",
    "double_thresholds",
    "epsilon_table",
]


# ----------------------------------------------------------------------------- input checks
def _as_models_by_examples(x, name: str, min_models: int = 2) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must have shape [models, examples], got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    if a.shape[0] < min_models:
        raise ValueError(f"{name} has {a.shape[0]} models; at least {min_models} are needed")
    if a.shape[1] < 1:
        raise ValueError(f"{name} has no examples (shape {a.shape})")
    if not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))
        m, e = bad[0]
        raise ValueError(f"{name} has {len(bad)} NaN or infinite values (first at model {m}, example {e})")
    return a


def _check_pair(unlearned, retrained):
    u = _as_models_by_examples(unlearned, "unlearned")
    r = _as_models_by_examples(retrained, "retrained")
    if u.shape[1] != r.shape[1]:
        raise ValueError(f"unlearned has {u.shape[1]} examples but retrained has {r.shape[1]}")
    return u, r


# ----------------------------------------------------------------------------- grids
def single_thresholds(lo: float, hi: float) -> np.ndarray:
    """The released single-threshold grid: torch.linspace(lo, hi, ceil((hi - lo) * 100)) in float32.

    n = ceil((hi - lo) * 100) in float64; s = f32(lo), e = f32(hi), step = f32((e - s) / (n - 1));
    t_i = f32(s + step * i) for i < n // 2 and f32(e - step * (n - 1 - i)) otherwise (one rounding,
    as torch's CPU kernel with fused multiply-add); n == 1 gives [s], n == 0 an empty grid.
    Returned as float64 (the comparison with the float64 confidences happens in float64).
    """
    n = int(np.ceil((np.float64(hi) - np.float64(lo)) * THRESHOLDS_PER_UNIT))
    if n <= 0:
        return np.empty(0, dtype=np.float64)
    s = np.float32(lo)
    if n == 1:
        return np.array([s], dtype=np.float64)
    e = np.float32(hi)
    step = np.float32((e - s) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    half = n // 2
    out = np.empty(n, dtype=np.float64)
    out[:half] = np.float64(s) + np.float64(step) * i[:half]
    out[half:] = np.float64(e) - np.float64(step) * (n - 1 - i[half:])
    return out.astype(np.float32).astype(np.float64)


def double_thresholds(pos_min: float, pos_max: float, width: float):
    """The released double-threshold grid for a positive group [pos_min, pos_max] and width w.

    min_ = (pos_min + w) - 2, max_ = pos_max + 2, R = np.linspace(min_, max_, ceil((max_ - min_) * 100));
    left[:, k] = np.linspace((R[k] - w) - 2, (R[k] - w) + 2, 400).  Returns (R[K], left[400, K]),
    bit-identical to building each column with a scalar np.linspace call.
    """
    pos_min = np.float64(pos_min)
    width = np.float64(width)
    min_ = pos_min + width - BUFFER
    max_ = np.float64(pos_max) + BUFFER
    n_right = int(np.ceil((max_ - min_) * THRESHOLDS_PER_UNIT))
    right = np.linspace(min_, max_, num=n_right)
    centre = right - width
    left = np.linspace(centre - BUFFER, centre + BUFFER, num=NUM_LEFT_THRESHOLDS)  # [400, K]
    return right, left


# ----------------------------------------------------------------------------- eps table
_TABLES: dict = {}


def epsilon_table(n_pos: int, n_neg: int, delta: float = DELTA) -> np.ndarray:
    """eps of a rule as a function of its counts: table[tp, fp], shape [n_pos + 1, n_neg + 1].

    FPR = fp / n_neg, FNR = (n_pos - tp) / n_pos.  FPR = FNR = 0 -> +inf; exactly one of them 0 ->
    discarded (-inf); else max(log(1-delta-FPR) - log FNR, log(1-delta-FNR) - log FPR), NaN parts
    ignored (both NaN -> discarded, -inf), clipped below at 0.
    """
    key = (int(n_pos), int(n_neg), float(delta))
    t = _TABLES.get(key)
    if t is not None:
        return t
    tp = np.arange(n_pos + 1, dtype=np.float64)[:, None]
    fp = np.arange(n_neg + 1, dtype=np.float64)[None, :]
    fpr = fp / n_neg
    fnr = (n_pos - tp) / n_pos
    fpr, fnr = np.broadcast_arrays(fpr, fnr)
    with np.errstate(divide="ignore", invalid="ignore"):
        e1 = np.log(1 - delta - fpr) - np.log(fnr)
        e2 = np.log(1 - delta - fnr) - np.log(fpr)
    both_nan = np.isnan(e1) & np.isnan(e2)
    e = np.fmax(e1, e2)  # NaN parts ignored
    e = np.maximum(e, 0.0)
    e[both_nan] = -np.inf
    zero_fpr = fpr == 0
    zero_fnr = fnr == 0
    e[zero_fpr ^ zero_fnr] = -np.inf
    e[zero_fpr & zero_fnr] = np.inf
    if len(_TABLES) > 16:
        _TABLES.clear()
    _TABLES[key] = e
    return e


# ----------------------------------------------------------------------------- core

_BINS_PER_POINT = 16


def _take_count_below(sorted_vals, queries, values):
    """values[#(sorted_vals < q)] for every q in ``queries`` (any shape; its first element in C order
    must be the smallest query and its last the largest), exactly.

    Equivalent to values[np.searchsorted(sorted_vals, queries, "left")], but faster for many queries:
    both data and queries go through the same monotone map b(x) = floor((x - lo) * scale) onto a
    uniform grid of bins.  Monotonicity gives: b(z) < b(q) implies z < q and b(z) > b(q) implies
    z > q, so for a query whose bin holds no data point the count is the number of points in lower
    bins; only queries that share a bin with a data point fall back to a binary search.
    """
    q = queries.reshape(-1)
    lo = q[0]
    span = q[-1] - lo
    n_bins = _BINS_PER_POINT * sorted_vals.size + 1
    if not span > 0 or q.size < 4 * n_bins:
        return values[np.searchsorted(sorted_vals, q, side="left")].reshape(queries.shape)
    scale = (n_bins - 1) / span
    bz = np.floor((sorted_vals - lo) * scale)
    np.clip(bz, -1, n_bins, out=bz)
    bz = bz.astype(np.intp) + 1  # bins of the data in [0, n_bins + 1]
    hist = np.bincount(bz, minlength=n_bins + 2)
    below = np.zeros(n_bins + 2, dtype=np.intp)
    np.cumsum(hist[:-1], out=below[1:])  # below[b] = #(data in bins < b)
    bq = ((q - lo) * scale).astype(np.intp)  # q >= lo, so truncation is floor
    np.clip(bq, 0, n_bins - 1, out=bq)  # rounding guard, keeps monotonicity
    bq += 1
    out = values[below][bq]
    shared = np.flatnonzero(hist[bq])
    if shared.size:
        out[shared] = values[np.searchsorted(sorted_vals, q[shared], side="left")]
    return out.reshape(queries.shape)

def _example_eps(sorted_vals, cum_r, n_u, n_r, retrain_pos, pos_range, neg_range, exhaustive, delta):
    """eps of one example from its merged sorted confidences (see module docstring)."""
    n_all = n_u + n_r
    idx = np.arange(n_all + 1)
    cum_u = idx - cum_r
    # -------- single threshold: positive = larger median, predict positive when conf >= t
    if retrain_pos:
        n_pos, n_neg, cpos = n_r, n_u, cum_r
    else:
        n_pos, n_neg, cpos = n_u, n_r, cum_u
    table_s = epsilon_table(n_pos, n_neg, delta).ravel()
    if exhaustive:
        below = np.searchsorted(sorted_vals, np.unique(sorted_vals), side="left")
    else:
        ts = single_thresholds(sorted_vals[0], sorted_vals[-1])
        below = np.searchsorted(sorted_vals, ts, side="left")
    best = -np.inf
    if below.size:
        tp = n_pos - cpos[below]
        fp = n_neg - (below - cpos[below])
        best = table_s[tp * (n_neg + 1) + fp].max()
    if best == np.inf:
        return best
    # -------- double threshold: positive = smaller range (swap on ties), predict l <= conf <= r
    if pos_range >= neg_range:  # swap: the former negative group becomes positive
        retrain_dpos = not retrain_pos
        width = pos_range if pos_range == neg_range else neg_range
    else:
        retrain_dpos = retrain_pos
        width = pos_range
    if retrain_dpos:
        n_dp, n_dn, cdp = n_r, n_u, cum_r
    else:
        n_dp, n_dn, cdp = n_u, n_r, cum_u
    table_d = epsilon_table(n_dp, n_dn, delta).ravel()
    # flat table index of (tp, fp) = tp*(n_dn+1) + fp = n_dn*(cdp[ir]-cdp[il]) + (ir-il) = A[ir]-A[il]
    a = n_dn * cdp + idx
    if exhaustive:
        u_vals = np.unique(sorted_vals)
        il = np.searchsorted(sorted_vals, u_vals, side="left")
        ir = np.searchsorted(sorted_vals, u_vals, side="right")
        flat = a[ir][None, :] - a[il][:, None]  # interval [u_vals[i], u_vals[j]]
    else:
        if retrain_dpos:
            pmask = np.diff(cum_r).astype(bool)
        else:
            pmask = ~np.diff(cum_r).astype(bool)
        pv = sorted_vals[pmask]
        right, left = double_thresholds(pv[0], pv[-1], width)
        ir = np.searchsorted(sorted_vals, right, side="right")
        a_il = _take_count_below(sorted_vals, left, a)
        flat = a[ir][None, :] - a_il
    np.maximum(flat, 0, out=flat)  # an empty interval (l > r) is the discarded (0, 0) rule
    best = max(best, table_d[flat].max())
    return best


def per_example_epsilons(unlearned, retrained, delta: float = DELTA, *, exhaustive: bool = False) -> np.ndarray:
    """Per-example privacy degree eps of the NeurIPS 2023 unlearning challenge -> float64[E].

    unlearned[N_u, E], retrained[N_r, E]: logit-scaled confidences of each forget example under each
    model (N >= 2 each).  Rules and grids as in the module docstring: positive = group with the larger
    median (retrained only when its median is strictly larger); range ratio < 0.01 -> 50;
    single thresholds t (float32 torch.linspace grid, conf >= t) and double thresholds
    (l <= conf <= r on the released float64 grid); per rule eps = max(log(1-d-FPR) - log FNR,
    log(1-d-FNR) - log FPR), FPR = FNR = 0 -> inf, one of them 0 -> discarded; eps_e = max over rules,
    clipped to [0, 50].

    exhaustive=True replaces both grids by every achievable rule (a threshold at every observed
    value, an interval between every pair of observed values), so it is an upper bound of the grid
    version for every example.
    """
    u, r = _check_pair(unlearned, retrained)
    if not (0.0 <= float(delta) < 1.0):
        raise ValueError(f"delta must lie in [0, 1), got {delta}")
    n_u, n_r = u.shape[0], r.shape[0]
    n_ex = u.shape[1]
    out = np.empty(n_ex, dtype=np.float64)
    labels = np.concatenate([np.zeros(n_u, dtype=np.int64), np.ones(n_r, dtype=np.int64)])
    for start in range(0, n_ex, _CHUNK):
        sl = slice(start, min(start + _CHUNK, n_ex))
        uc = np.asarray(u[:, sl], dtype=np.float64)
        rc = np.asarray(r[:, sl], dtype=np.float64)
        retrain_pos = np.median(rc, axis=0) > np.median(uc, axis=0)
        range_u = uc.max(axis=0) - uc.min(axis=0)
        range_r = rc.max(axis=0) - rc.min(axis=0)
        pos_range = np.where(retrain_pos, range_r, range_u)
        neg_range = np.where(retrain_pos, range_u, range_r)
        largest = np.maximum(pos_range, neg_range)
        smallest = np.minimum(pos_range, neg_range)
        with np.errstate(divide="ignore", invalid="ignore"):
            peaky = smallest / largest < RANGE_RATIO_MIN  # 0/0 is NaN -> False, as in the released code
        both = np.concatenate([uc, rc], axis=0)
        order = np.argsort(both, axis=0, kind="stable")
        sorted_all = np.take_along_axis(both, order, axis=0)
        cum_r_all = np.zeros((n_u + n_r + 1, uc.shape[1]), dtype=np.int64)
        np.cumsum(labels[order], axis=0, out=cum_r_all[1:])
        for j in range(uc.shape[1]):
            if peaky[j]:
                eps = EPSILON_CAP
            else:
                eps = _example_eps(sorted_all[:, j], cum_r_all[:, j], n_u, n_r, bool(retrain_pos[j]),
                                   pos_range[j], neg_range[j], exhaustive, float(delta))
                if eps == -np.inf:
                    eps = 0.0
            out[start + j] = eps
    return np.clip(out, 0.0, EPSILON_CAP)


def _bucket_points(eps: np.ndarray, n_models: int) -> np.ndarray:
    max_eps = math.ceil(math.log(n_models - 1)) if n_models > 2 else 0
    n_buckets = int(2 * max_eps)  # buckets [k/2, (k+1)/2) with (k+1)/2 <= max_eps
    b = np.floor(2.0 * np.asarray(eps, dtype=np.float64))
    return np.where(b < n_buckets, np.exp2(-np.minimum(b, 1074.0)), 0.0)


def forgetting_quality_from_epsilons(eps, n_models: int) -> float:
    """F = mean_e 2^-floor(2 eps_e) over examples with floor(2 eps_e) < 2 ceil(ln(n_models - 1)), else 0.

    Buckets of width 0.5 from 0 while the bucket's end <= ceil(ln(N - 1)), worth 1, 1/2, 1/4, ...
    """
    eps = np.asarray(eps, dtype=np.float64)
    if eps.ndim != 1 or eps.size == 0:
        raise ValueError(f"eps must be a non-empty 1-D array, got shape {eps.shape}")
    if np.isnan(eps).any():
        raise ValueError("eps contains NaN")
    if n_models < 2:
        raise ValueError(f"n_models is {n_models}; at least 2 are needed")
    return float(_bucket_points(eps, n_models).sum() / eps.size)


def forgetting_quality(unlearned, retrained, *, delta: float = DELTA, exhaustive: bool = False) -> float:
    """Forgetting quality F of the NeurIPS 2023 unlearning challenge.

    F = (1/E) sum_e h(eps_e), eps_e = per_example_epsilons(unlearned, retrained)[e],
    h(eps) = 2^-floor(2 eps) if floor(2 eps) < 2 ceil(ln(N - 1)) else 0, N = unlearned.shape[0].
    """
    eps = per_example_epsilons(unlearned, retrained, delta, exhaustive=exhaustive)
    return forgetting_quality_from_epsilons(eps, np.shape(unlearned)[0])


def _mean_acc(x, name: str) -> float:
    a = np.asarray(x, dtype=np.float64)
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if (a < 0).any() or (a > 1).any():
        raise ValueError(f"{name} must be accuracies in [0, 1], got range [{a.min()}, {a.max()}]")
    return float(a.mean())


def final_score(forgetting_quality, retain_acc_unlearned, test_acc_unlearned,
                retain_acc_retrained, test_acc_retrained) -> float:
    """Challenge score = F * (RA_u / RA_r) * (TA_u / TA_r).

    Each accuracy argument is a number or an array of per-model accuracies (its mean is used):
    RA = retain accuracy, TA = test accuracy, u = unlearned, r = retrained.
    """
    f = float(forgetting_quality)
    if not np.isfinite(f) or f < 0 or f > 1:
        raise ValueError(f"forgetting_quality must lie in [0, 1], got {forgetting_quality}")
    ra_u = _mean_acc(retain_acc_unlearned, "retain_acc_unlearned")
    ta_u = _mean_acc(test_acc_unlearned, "test_acc_unlearned")
    ra_r = _mean_acc(retain_acc_retrained, "retain_acc_retrained")
    ta_r = _mean_acc(test_acc_retrained, "test_acc_retrained")
    if ra_r == 0 or ta_r == 0:
        raise ValueError("retrained retain and test accuracies must be > 0")
    return f * (ra_u / ra_r) * (ta_u / ta_r)


def forgetting_quality_null(retrained, n_splits: int = 20, seed: int = 0, *, n_per_side: int | None = None,
                            delta: float = DELTA) -> dict:
    """Calibration of F: the same statistic between two disjoint sets of retrained models, averaged over splits.

    F_null = mean over ``n_splits`` seeded random splits s of F(A_s as "unlearned", B_s as "retrained"),
    A_s and B_s disjoint sets of n = ``n_per_side`` (default floor(N/2)) retrained models, N = n in the
    bucket rule.  One split is a noisy draw (its spread is returned as "sd"); compare F_null with F
    computed on n unlearned and n retrained models (F depends on the number of models).  Needs N >= 4
    retrained models and 2 <= n <= N/2.

    Returns {"f_null": mean, "sd": spread of single splits (ddof 1), "splits": float64[n_splits],
    "n_per_half": n}.
    """
    r = _as_models_by_examples(retrained, "retrained", min_models=4)
    if n_splits < 1:
        raise ValueError(f"n_splits must be >= 1, got {n_splits}")
    n = r.shape[0] // 2 if n_per_side is None else int(n_per_side)
    if not 2 <= n <= r.shape[0] // 2:
        raise ValueError(f"n_per_side must lie in [2, {r.shape[0] // 2}] for {r.shape[0]} retrained models, got {n}")
    rng = np.random.default_rng(seed)
    splits = np.empty(n_splits, dtype=np.float64)
    for i in range(n_splits):
        perm = rng.permutation(r.shape[0])
        splits[i] = forgetting_quality(r[np.sort(perm[:n])], r[np.sort(perm[n:2 * n])], delta=delta)
    sd = float(splits.std(ddof=1)) if n_splits > 1 else float("nan")
    return {"f_null": float(splits.mean()), "sd": sd, "splits": splits, "n_per_half": n}
