"""LiRA membership inference (Carlini et al. 2022, "Membership Inference Attacks From First Principles").

Scores are logit-scaled confidences (evaluation.scores.logit_scaled_confidence).  For example e and
query q, the shadows where e was in the training set (IN) and those where it was not (OUT) give

    mu_in[e,q]  = median of the IN shadows' scores,   s_in[e,q]  = their standard deviation (ddof 0)
    mu_out[e,q] = median of the OUT shadows' scores,  s_out[e,q] = their standard deviation (ddof 0)

as in the reference code (tensorflow/privacy research/mi_lira_2021).  1e-30 is added to every spread,
as there, so a group with zero range does not divide by zero.  Higher scores mean "more likely a
member":

    online : score[e] = mean_q [ log N(x[e,q]; mu_in, s_in) - log N(x[e,q]; mu_out, s_out) ]
    offline: score[e] = mean_q log Phi((x[e,q] - mu_out) / s_out)   (the paper's one-sided test; the
             public reference code scores with the two-sided density -log N(x; mu_out, s_out) instead)
    global : score[e] = mean_q x[e,q]                              (the baseline attack)

variance="global" replaces s_in (s_out) by one spread per side pooled over all examples and queries
after centring each (example, query) group at its own mean: s^2 = sum (x - mean_group)^2 / count.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy.special import log_ndtr

_STD_GUARD = 1e-30
_MODES = ("online", "offline", "global")
_VARIANCES = ("per_example", "global")

__all__ = ["lira_scores", "lira_leave_one_out", "roc_curve", "roc_metrics"]


# ----------------------------------------------------------------------------- checks
def _finite(a, name):
    if not np.isfinite(a).all():
        idx = np.argwhere(~np.isfinite(a))[0]
        raise ValueError(f"{name} has {int((~np.isfinite(a)).sum())} NaN or infinite values "
                         f"(first at index {tuple(int(i) for i in idx)})")


def _check_mode(mode, variance):
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if variance not in _VARIANCES:
        raise ValueError(f"variance must be one of {_VARIANCES}, got {variance!r}")


def _check_counts(n_in, n_out, mode, need_in, need_out, what):
    """Raise when an example lacks the IN / OUT shadows that ``mode`` needs."""
    if mode == "online" and (n_in < need_in).any():
        e = int(np.argmax(n_in < need_in))
        raise ValueError(f"LiRA online needs at least {need_in} IN {what} for every example; "
                         f"example {e} has {int(n_in[e])} (and {int((n_in < need_in).sum())} examples are short)")
    if mode in ("online", "offline") and (n_out < need_out).any():
        e = int(np.argmax(n_out < need_out))
        raise ValueError(f"LiRA {mode} needs at least {need_out} OUT {what} for every example; "
                         f"example {e} has {int(n_out[e])} (and {int((n_out < need_out).sum())} examples are short)")


# ----------------------------------------------------------------------------- fitting
def _group_sorted(x, member):
    """x[C, Q, M] and member[C, M] -> values of the member group sorted ascending and padded with +inf."""
    return np.sort(np.where(member[:, None, :], x, np.inf), axis=-1)


def _median_sorted(s, n):
    """Median of the first n[C] entries of s[C, Q, M] (sorted along the last axis)."""
    n = n[:, None, None]
    lo = np.take_along_axis(s, np.maximum((n - 1) // 2, 0), axis=-1)[..., 0]
    hi = np.take_along_axis(s, np.maximum(n // 2, 0), axis=-1)[..., 0] if s.shape[-1] else lo
    return np.where((n[..., 0] % 2) == 1, lo, (lo + hi) / 2)


def _fit(x, member):
    """Per (example, query): median, mean, sum of squared deviations and count of the member group.

    x[C, Q, M] float64, member[C, M] bool.  Returns (median[C,Q], mean[C,Q], ssd[C,Q], n[C]).
    """
    n = member.sum(axis=1)
    w = member[:, None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(w, x, 0.0).sum(-1) / n[:, None]
        d = np.where(w, x - mean[..., None], 0.0)
        ssd = (d * d).sum(-1)
    srt = _group_sorted(x, member)
    med = _median_sorted(srt, n)
    return med, mean, ssd, n, srt


def _pooled_std(ssd, n):
    total = float((n[:, None] * np.ones(ssd.shape[1])).sum())
    return np.sqrt(ssd.sum() / total) if total > 0 else np.nan


def _score(mode, x, mu_in, sd_in, mu_out, sd_out, query_axis=-1):
    """Per-query scores (see module docstring) -> mean over the query axis."""
    if mode == "online":
        zi = (x - mu_in) / (sd_in + _STD_GUARD)
        zo = (x - mu_out) / (sd_out + _STD_GUARD)
        s = (-0.5 * zi * zi - np.log(sd_in + _STD_GUARD)) - (-0.5 * zo * zo - np.log(sd_out + _STD_GUARD))
    else:
        s = log_ndtr((x - mu_out) / (sd_out + _STD_GUARD))
    return s.mean(axis=query_axis)


def _as_eq(a, name, ndim_plain):
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == ndim_plain:
        a = a[..., None]
    if a.ndim != ndim_plain + 1:
        raise ValueError(f"{name} must have {ndim_plain} or {ndim_plain + 1} dimensions, got shape {a.shape}")
    return a


def lira_scores(target, shadow, shadow_in, *, mode: str = "online", variance: str = "per_example") -> np.ndarray:
    """LiRA scores of one target model -> float64[E], higher = more likely a member.

    target[E] or [E, Q]: the target model's logit-scaled confidences; shadow[M, E] or [M, E, Q]: the
    shadows'; shadow_in bool[M, E]: whether example e was in shadow m's training set.

    online : mean_q [log N(x; mu_in, s_in) - log N(x; mu_out, s_out)]
    offline: mean_q log Phi((x - mu_out) / s_out)
    global : mean_q x
    with mu = median and s = standard deviation (+1e-30) of the IN / OUT shadows per example and query;
    variance="global" pools s per side over all examples after centring each group at its mean.
    online needs >= 1 IN and >= 1 OUT shadow per example, offline >= 1 OUT shadow.
    """
    _check_mode(mode, variance)
    x = _as_eq(target, "target", 1)
    sh = _as_eq(shadow, "shadow", 2)
    mask = np.asarray(shadow_in)
    if mask.dtype != bool:
        raise ValueError(f"shadow_in must be boolean, got dtype {mask.dtype}")
    if sh.shape[1:] != x.shape:
        raise ValueError(f"shadow has shape {np.shape(shadow)} but target has shape {np.shape(target)}; "
                         "expected shadow[M, E(, Q)] with target[E(, Q)]")
    if mask.shape != sh.shape[:2]:
        raise ValueError(f"shadow_in must have shape {sh.shape[:2]}, got {mask.shape}")
    _finite(x, "target")
    if mode == "global":
        return x.mean(axis=-1)
    _finite(sh, "shadow")
    if sh.shape[0] < 1:
        raise ValueError("LiRA needs at least 1 shadow model")
    n_in = mask.sum(0)
    _check_counts(n_in, sh.shape[0] - n_in, mode, 1, 1, "shadows")
    xs = np.ascontiguousarray(np.moveaxis(sh, 0, -1))  # [E, Q, M]
    mk = np.ascontiguousarray(mask.T)  # [E, M]
    mu_out, _, ssd_out, n_out, _ = _fit(xs, ~mk)
    sd_out = np.sqrt(ssd_out / n_out[:, None])
    mu_in = sd_in = None
    if mode == "online":
        mu_in, _, ssd_in, n_in, _ = _fit(xs, mk)
        sd_in = np.sqrt(ssd_in / n_in[:, None])
        if variance == "global":
            sd_in = np.full_like(sd_in, _pooled_std(ssd_in, n_in))
    if variance == "global":
        sd_out = np.full_like(sd_out, _pooled_std(ssd_out, n_out))
    return _score(mode, x, mu_in, sd_in, mu_out, sd_out)


# ----------------------------------------------------------------------------- leave one out
def _loo_median_rule(s, n):
    """Per group, the median after removing one copy of a value x, as a rule on x.

    s[C,Q,M]: the group's values sorted (first n[C] valid).  Returns (thr, v_lt, v_eq, v_gt) [C,Q,1]
    such that the leave-one-out median is v_lt if x < thr, v_eq if x == thr, v_gt if x > thr:
      n even (n-1 odd):  thr = s[n/2-1]; v_lt = v_eq = s[n/2], v_gt = s[n/2-1]
      n odd (n-1 even):  b = (n-1)/2, thr = s[b]; v_lt = (s[b]+s[b+1])/2, v_eq = (s[b-1]+s[b+1])/2,
                         v_gt = (s[b-1]+s[b])/2
    (with ties, removing any copy leaves the same multiset).
    """
    m = s.shape[-1]
    nn = n[:, None, None]

    def at(k):
        return np.take_along_axis(s, np.clip(k, 0, m - 1), axis=-1)  # [C, Q, 1]

    even = (nn % 2) == 0
    lo_e, hi_e = at(nn // 2 - 1), at(nn // 2)
    b = (nn - 1) // 2
    sb, sb1, sbm = at(b), at(b + 1), at(b - 1)
    thr = np.where(even, lo_e, sb)
    v_lt = np.where(even, hi_e, (sb + sb1) / 2)
    v_eq = np.where(even, hi_e, (sbm + sb1) / 2)
    v_gt = np.where(even, lo_e, (sbm + sb) / 2)
    return thr, v_lt, v_eq, v_gt


def _loo_median(s, n, x):
    """Median of a sorted group (first n[C] of s[C,Q,M]) after removing one copy of x[C,Q,T]."""
    thr, v_lt, v_eq, v_gt = _loo_median_rule(s, n)
    return np.where(x < thr, v_lt, np.where(x > thr, v_gt, v_eq))


def _loo_std(mean, ssd, n, x):
    """Std (ddof 0) of a group with mean[C,Q], sum of squared deviations ssd[C,Q] and n[C] members,
    after removing x[C,Q,T]: with d = x - mean, the remaining n-1 values have mean shift -d/(n-1) and
    sum of squared deviations ssd - d^2 * n/(n-1)."""
    nn = n[:, None, None].astype(np.float64)
    d = x - mean[..., None]
    d *= d
    d *= -(nn / (nn - 1))
    d += ssd[..., None]
    np.maximum(d, 0.0, out=d)
    d /= (nn - 1)
    return np.sqrt(d, out=d)


def lira_leave_one_out(conf, shadow_in, *, mode: str = "online", variance: str = "per_example",
                       chunk: int = 1024, workers: int | None = None) -> np.ndarray:
    """Leave-one-out LiRA over a set of shadows -> scores float64[M, E].

    conf[M, E] or [M, E, Q]: logit-scaled confidences of every shadow; shadow_in bool[M, E].
    scores[t] = lira_scores(conf[t], conf[others], shadow_in[others], mode=mode, variance=variance)
    for every shadow t, computed without refitting: each (example, query) group is sorted once, the
    median without the target is read from the sorted order (see _loo_median) and the standard
    deviation without the target from the group's mean and sum of squared deviations.  Examples are
    processed ``chunk`` at a time by ``workers`` threads (default min(2, CPUs); memory about
    300 * chunk * M * Q bytes per worker).  Pair scores[t, e] with
    shadow_in[t, e] for the pooled ROC and the per-example vulnerability.

    online needs >= 2 IN and >= 2 OUT shadows per example (so every left-out target leaves 1 of
    each), offline >= 2 OUT.  variance="global" pools one spread per side over all examples (computed
    once from all shadows, not refitted per target).
    """
    _check_mode(mode, variance)
    c = np.asarray(conf)
    if c.ndim == 2:
        c = c[..., None]
    if c.ndim != 3:
        raise ValueError(f"conf must have shape [M, E] or [M, E, Q], got {np.shape(conf)}")
    mask = np.asarray(shadow_in)
    if mask.dtype != bool or mask.shape != c.shape[:2]:
        raise ValueError(f"shadow_in must be boolean with shape {c.shape[:2]}, got {mask.dtype} {mask.shape}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    m, n_ex, q = c.shape
    if m < 2:
        raise ValueError(f"leave-one-out LiRA needs at least 2 shadows (1 target + 1 reference), got {m}")
    for start in range(0, n_ex, 65536):
        _finite(c[:, start:start + 65536], "conf")
    if mode == "global":
        return np.asarray(c, dtype=np.float64).mean(axis=-1)
    n_in_all = mask.sum(0)
    _check_counts(n_in_all, m - n_in_all, mode, 2, 2, "shadows (leave-one-out removes one)")
    out = np.empty((m, n_ex), dtype=np.float64)
    pooled = None
    if variance == "global":
        pooled = _pooled_global(c, mask, chunk, mode)

    def work(start):
        sl = slice(start, min(start + chunk, n_ex))
        xs = np.ascontiguousarray(np.moveaxis(np.asarray(c[:, sl], dtype=np.float64), 0, -1))  # [C, Q, M]
        mk = np.ascontiguousarray(mask[:, sl].T)  # [C, M]
        out[:, sl] = _loo_chunk(xs, mk, mode, pooled).T  # [C, M] -> [M, C]

    starts = range(0, n_ex, chunk)
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    if workers <= 1 or len(starts) == 1:
        for st in starts:
            work(st)
    else:  # numpy releases the GIL inside its loops, so threads share the chunks
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(work, starts))
    return out


def _pooled_global(c, mask, chunk, mode):
    tot = {"in": [0.0, 0.0], "out": [0.0, 0.0]}
    for start in range(0, c.shape[1], chunk):
        sl = slice(start, min(start + chunk, c.shape[1]))
        xs = np.moveaxis(np.asarray(c[:, sl], dtype=np.float64), 0, -1)
        mk = mask[:, sl].T
        for side, mm in (("in", mk), ("out", ~mk)):
            _, _, ssd, n, _ = _fit(xs, mm)
            tot[side][0] += float(ssd.sum())
            tot[side][1] += float(n.sum()) * xs.shape[1]
    return {side: np.sqrt(v[0] / v[1]) for side, v in tot.items()}


def _loo_chunk(xs, mk, mode, pooled):
    """Leave-one-out scores for a chunk: xs[C, Q, M] float64, mk[C, M] bool -> [C, M]."""
    x = xs  # the target of column t is xs[..., t]
    tin = mk[:, None, :]  # [C, 1, M]
    sides = (("out", ~mk),) if mode == "offline" else (("in", mk), ("out", ~mk))
    stats = {}
    for side, member in sides:
        med, mean, ssd, n, s = _fit(xs, member)
        is_member = tin if side == "in" else ~tin
        mu = _loo_median(s, n, x)
        mu = np.where(is_member, mu, med[..., None])
        if pooled is not None:
            sd = np.full(x.shape, pooled[side])
        else:
            sd_full = np.sqrt(ssd / n[:, None])[..., None]
            with np.errstate(invalid="ignore", divide="ignore"):
                sd = _loo_std(mean, ssd, n, x)
            # a remaining group of equal values has spread exactly 0 (as np.std of it), not rounding
            # noise; only groups whose values other than the min or the max are all equal can get there
            mm = s.shape[-1]
            nn = n[:, None, None]

            def at(k):
                return np.take_along_axis(s, np.clip(k, 0, mm - 1), axis=-1)

            first, second, last, before_last = at(nn * 0), at(nn * 0 + 1), at(nn - 1), at(nn - 2)
            risky = ((second == last) | (first == before_last)).any()
            if risky:
                rem_min = np.where(x <= first, second, first)
                rem_max = np.where(x >= last, before_last, last)
                sd = np.where(rem_min == rem_max, 0.0, sd)
            sd = np.where(is_member, sd, sd_full)
        stats[side] = (mu, sd)
    mu_out, sd_out = stats["out"]
    mu_in, sd_in = stats["in"] if mode == "online" else (None, None)
    return _score(mode, x, mu_in, sd_in, mu_out, sd_out, query_axis=1)


# ----------------------------------------------------------------------------- ROC
def roc_curve(scores, is_member):
    """Full ROC (no point dropped): predict member when score >= t for every distinct score t,
    from the highest down, after a first point (0, 0).  Returns (fpr, tpr, thresholds)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_member)
    if s.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"scores and is_member must be 1-D of the same length, got {s.shape} and {y.shape}")
    if y.dtype != bool:
        raise ValueError(f"is_member must be boolean, got dtype {y.dtype}")
    if np.isnan(s).any():
        raise ValueError(f"scores has {int(np.isnan(s).sum())} NaN values")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC needs at least 1 member and 1 non-member, got {n_pos} and {n_neg}")
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    y_sorted = y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), s.size - 1]  # last index of each distinct score
    tps = np.cumsum(y_sorted)[last]
    fps = (last + 1) - tps
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    thr = np.r_[np.inf, s_sorted[last]]
    return fpr, tpr, thr


def roc_metrics(scores, is_member, fprs=(1e-3, 1e-2)) -> dict:
    """AUC, best balanced accuracy and TPR at fixed FPRs of a membership score (higher = member).

    On the full ROC (roc_curve): auc = trapezoidal area (= P(s_member > s_nonmember) + P(tie)/2);
    accuracy = max over ROC points of (TPR + 1 - FPR) / 2; tpr_at_fpr[a] = TPR of the last ROC
    point whose FPR is strictly below a (the first point is (0, 0), so it is 0 when none is).
    """
    fpr, tpr, _ = roc_curve(scores, is_member)
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    acc = float(np.max((tpr + 1 - fpr) / 2))
    out = {}
    for a in fprs:
        a = float(a)
        below = np.flatnonzero(fpr < a)
        out[a] = float(tpr[below[-1]]) if below.size else 0.0
    return {"auc": auc, "accuracy": acc, "tpr_at_fpr": out}
