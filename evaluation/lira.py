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

Leave-pair-out (lira_leave_pair_out) scores every shadow t against all shadows except t and a
partner whose membership is the opposite of t's, so the references keep equal IN / OUT counts when
the shadows come in complementary pairs (leave-one-out leaves M/2-1 of t's own side and M/2 of the
other).  random_partners pairs IN with OUT shadows per example for shadow sets without such pairs;
pair_vulnerability / pair_vulnerability_null (defined in evaluation.vulnerability) compare the two
members of each pair.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import stats
from scipy.special import log_ndtr
from sklearn import metrics

from .vulnerability import check_partner, pair_vulnerability, pair_vulnerability_null

_STD_GUARD = 1e-30
_MODES = ("online", "offline", "global")
_VARIANCES = ("per_example", "global")
_NORMALTEST_MIN = 8  # scipy.stats.skewtest needs >= 8 values

__all__ = ["lira_scores", "lira_leave_one_out", "lira_leave_pair_out", "lira_group_ssd", "pooled_spreads",
           "random_partners", "gaussian_check", "gaussian_pvalues", "gaussian_summary",
           "pair_vulnerability", "pair_vulnerability_null", "roc_curve", "roc_auc", "tpr_at_fpr", "roc_metrics"]


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
    mean, ssd, n = _moments(x, member)
    srt = _group_sorted(x, member)
    med = _median_sorted(srt, n)
    return med, mean, ssd, n, srt


def _moments(x, member):
    """_fit's mean[C, Q], sum of squared deviations ssd[C, Q] and count n[C] alone (no sort)."""
    n = member.sum(axis=1)
    w = member[:, None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(w, x, 0.0).sum(-1) / n[:, None]
        d = np.where(w, x - mean[..., None], 0.0)
        ssd = (d * d).sum(-1)
    return mean, ssd, n


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
    c, mask = _as_conf_mask(conf, shadow_in, chunk)
    m, n_ex, q = c.shape
    if m < 2:
        raise ValueError(f"leave-one-out LiRA needs at least 2 shadows (1 target + 1 reference), got {m}")
    for start in range(0, n_ex, 65536):
        _finite(c[:, start:start + 65536], "conf")
    if mode == "global":
        return np.asarray(c, dtype=np.float64).mean(axis=-1)
    n_in_all = mask.sum(0)
    _check_counts(n_in_all, m - n_in_all, mode, 2, 2, "shadows (leave-one-out removes one)")
    return _leave_out(c, mask, mode, variance, chunk, workers, None)


def lira_leave_pair_out(conf, shadow_in, partner, *, mode: str = "online", variance: str = "per_example",
                        chunk: int = 1024, workers: int | None = None, pooled: dict | None = None) -> np.ndarray:
    """Leave-pair-out LiRA over a set of shadows -> scores float64[M, E] (NaN where partner is -1).

    conf[M, E] or [M, E, Q]: logit-scaled confidences; shadow_in bool[M, E]; partner int[M] (one
    partner per shadow, for every example, e.g. [1, 0, 3, 2, ...] for complementary pairs) or
    int[M, E] (per example, e.g. random_partners), -1 = cell not scored.  With p = partner[t(, e)]:

        scores[t, e] = lira_scores(conf[t, e], conf[o, e], shadow_in[o, e], mode, variance)
                       with o = every shadow except t and p,

    which needs shadow_in[p, e] != shadow_in[t, e]: removing the pair removes exactly one value from
    each side, r_in = x_t if t is IN else x_p and r_out = the other.  Computed without refitting, as
    lira_leave_one_out (shared chunk code): the median without r is read from each group's sorted
    order (_loo_median) and the spread from mean and sum of squared deviations,
    s^2 = (ssd - (r - mean)^2 * n / (n - 1)) / (n - 1) (_loo_std).

    online needs >= 2 IN and >= 2 OUT shadows for every example with a scored cell (one of each
    remains), offline >= 2 OUT.  variance="global" pools one spread per side over all examples,
    computed once from all shadows (as lira_leave_one_out); ``pooled`` ({"in": s_in, "out": s_out}, from
    pooled_spreads over every example) uses spreads pooled elsewhere instead, so that a subset of the
    examples (a chunk) is scored exactly as within the whole.  mode="global" is mean_q conf.
    """
    _check_mode(mode, variance)
    c, mask = _as_conf_mask(conf, shadow_in, chunk)
    m, n_ex, q = c.shape
    pt = check_partner(partner, mask)
    for start in range(0, n_ex, 65536):
        _finite(c[:, start:start + 65536], "conf")
    scored = pt >= 0
    if mode == "global":
        out = np.asarray(c, dtype=np.float64).mean(axis=-1)
    else:
        active = scored.any(0)  # examples without a scored cell need nothing
        n_in_all = mask.sum(0)
        _check_counts(np.where(active, n_in_all, 2), np.where(active, m - n_in_all, 2), mode, 2, 2,
                      "shadows (leave-pair-out removes one of each)")
        out = _leave_out(c, mask, mode, variance, chunk, workers, np.where(scored, pt, np.arange(m)[:, None]),
                         pooled)
    out[~scored] = np.nan
    return out


def _as_conf_mask(conf, shadow_in, chunk):
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
    return c, mask


def random_partners(shadow_in, seed) -> np.ndarray:
    """Random IN/OUT partners per example -> int64[M, E] for lira_leave_pair_out.

    For every example e independently, its IN shadows and its OUT shadows are each put in a uniformly
    random order (np.random.default_rng(seed)) and the k-th IN shadow is matched with the k-th OUT
    shadow, k < min(n_in[e], n_out[e]): partner[i, e] = o and partner[o, e] = i; unmatched shadows
    get -1.  Vectorized: one argsort per column of keys u + 2 * OUT with u ~ U[0, 1).
    """
    mask = np.asarray(shadow_in)
    if mask.dtype != bool or mask.ndim != 2:
        raise ValueError(f"shadow_in must be a 2-D boolean array, got {mask.dtype} with shape {mask.shape}")
    m, n_ex = mask.shape
    keys = np.random.default_rng(seed).random((m, n_ex)) + 2.0 * ~mask
    order = np.argsort(keys, axis=0)  # [M, E]: each column's IN shadows (random order), then its OUT ones
    n_in = mask.sum(0)
    n_pairs = np.minimum(n_in, m - n_in)
    k = np.arange(m)[:, None]
    ins = order  # k-th IN shadow at row k
    outs = np.take_along_axis(order, np.minimum(n_in[None, :] + k, m - 1), axis=0)  # k-th OUT shadow
    ok = k < n_pairs[None, :]
    col = np.broadcast_to(np.arange(n_ex)[None, :], (m, n_ex))[ok]
    partner = np.full((m, n_ex), -1, dtype=np.int64)
    partner[ins[ok], col] = outs[ok]
    partner[outs[ok], col] = ins[ok]
    return partner


def _leave_out(c, mask, mode, variance, chunk, workers, partner, pooled=None):
    """Shared driver: scores [M, E] by chunks of examples (partner int64[M, E] or None = leave-one-out)."""
    m, n_ex, q = c.shape
    out = np.empty((m, n_ex), dtype=np.float64)
    if variance != "global":
        pooled = None
    elif pooled is None:
        pooled = pooled_spreads(*lira_group_ssd(c, mask, chunk), block=chunk)

    def work(start):
        sl = slice(start, min(start + chunk, n_ex))
        xs = np.ascontiguousarray(np.moveaxis(np.asarray(c[:, sl], dtype=np.float64), 0, -1))  # [C, Q, M]
        mk = np.ascontiguousarray(mask[:, sl].T)  # [C, M]
        if partner is None:
            out[:, sl] = _loo_chunk(xs, mk, mode, pooled).T  # [C, M] -> [M, C]
        else:  # examples without a scored cell may have degenerate groups; their cells become NaN
            with np.errstate(all="ignore"):
                out[:, sl] = _loo_chunk(xs, mk, mode, pooled, np.ascontiguousarray(partner[:, sl].T)).T

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


def lira_group_ssd(conf, shadow_in, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per example and query, the sum of squared deviations from its group's mean of the IN shadows' and
    of the OUT shadows' confidences, with the group sizes -> (ssd_in[E, Q], n_in[E], ssd_out[E, Q],
    n_out[E]), float64 and int.  Each example's values depend on that example alone, so those of a subset
    of the examples equal the same rows computed on all of them; pooled_spreads combines them."""
    c, mask = _as_conf_mask(conf, shadow_in, chunk)
    n_ex, q = c.shape[1], c.shape[2]
    out = (np.empty((n_ex, q)), np.empty(n_ex, np.int64), np.empty((n_ex, q)), np.empty(n_ex, np.int64))
    for start in range(0, n_ex, chunk):
        sl = slice(start, min(start + chunk, n_ex))
        xs = np.moveaxis(np.asarray(c[:, sl], dtype=np.float64), 0, -1)
        mk = mask[:, sl].T
        for k, mm in ((0, mk), (2, ~mk)):
            _, out[k][sl], out[k + 1][sl] = _moments(xs, mm)
    return out


def pooled_spreads(ssd_in, n_in, ssd_out, n_out, block: int = 1024) -> dict:
    """variance="global"'s spread per side, sqrt(sum ssd / sum count) over every example and query, from
    lira_group_ssd's per-example sums (of all examples, in order) -> {"in": s_in, "out": s_out}.  The sums
    run over blocks of ``block`` examples in order (the chunk of lira_leave_pair_out), so the spreads equal
    those lira_leave_pair_out pools itself with chunk = block, bit for bit."""
    tot = {"in": [0.0, 0.0], "out": [0.0, 0.0]}
    n_ex, q = np.shape(ssd_in)
    for start in range(0, n_ex, block):
        sl = slice(start, min(start + block, n_ex))
        for side, ssd, n in (("in", ssd_in, n_in), ("out", ssd_out, n_out)):
            tot[side][0] += float(np.ascontiguousarray(ssd[sl]).sum())
            tot[side][1] += float(n[sl].sum()) * q
    return {side: np.sqrt(v[0] / v[1]) for side, v in tot.items()}


def _loo_chunk(xs, mk, mode, pooled, partner=None):
    """Leave-one-out scores for a chunk: xs[C, Q, M] float64, mk[C, M] bool -> [C, M].

    Each side's group loses one value r[C, Q, M] per target column t: leave-one-out (partner None)
    removes x_t from t's own side only; leave-pair-out (partner int[C, M], the partner of target t
    on each example) removes x_t from t's side and x_partner from the other side.
    """
    x = xs  # the target of column t is xs[..., t]
    tin = mk[:, None, :]  # [C, 1, M]
    if partner is None:
        removed = {"in": (x, tin), "out": (x, ~tin)}  # (removed value, where the side loses it)
    else:
        xp = np.take_along_axis(xs, partner[:, None, :], axis=-1)  # [C, Q, M]: the partner's values
        removed = {"in": (np.where(tin, x, xp), None), "out": (np.where(tin, xp, x), None)}  # None: always
    sides = (("out", ~mk),) if mode == "offline" else (("in", mk), ("out", ~mk))
    fits = {}
    for side, member in sides:
        med, mean, ssd, n, s = _fit(xs, member)
        r, is_member = removed[side]
        mu = _loo_median(s, n, r)
        if is_member is not None:
            mu = np.where(is_member, mu, med[..., None])
        if pooled is not None:
            sd = np.full(x.shape, pooled[side])
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                sd = _loo_std(mean, ssd, n, r)
            # a remaining group of equal values has spread exactly 0 (as np.std of it), not rounding
            # noise; only groups whose values other than the min or the max are all equal can get there
            mm = s.shape[-1]
            nn = n[:, None, None]

            def at(k):
                return np.take_along_axis(s, np.clip(k, 0, mm - 1), axis=-1)

            first, second, last, before_last = at(nn * 0), at(nn * 0 + 1), at(nn - 1), at(nn - 2)
            risky = ((second == last) | (first == before_last)).any()
            if risky:
                rem_min = np.where(r <= first, second, first)
                rem_max = np.where(r >= last, before_last, last)
                sd = np.where(rem_min == rem_max, 0.0, sd)
            if is_member is not None:
                sd = np.where(is_member, sd, np.sqrt(ssd / n[:, None])[..., None])
        fits[side] = (mu, sd)
    mu_out, sd_out = fits["out"]
    mu_in, sd_in = fits["in"] if mode == "online" else (None, None)
    return _score(mode, x, mu_in, sd_in, mu_out, sd_out, query_axis=1)


def gaussian_check(conf, shadow_in, alpha: float = 0.05) -> dict:
    """How often the per-example IN and OUT confidences look non-Gaussian (LiRA's model) -> dict.

    For every example, scipy.stats.normaltest (D'Agostino-Pearson K^2) is applied to the IN shadows'
    confidences (query 0 of conf[M, E(, Q)]) and to the OUT shadows'; examples are grouped by
    (n_in, n_out) and each group is tested in one vectorized call.  An example is tested when both
    groups have >= min_group_size = 8 values (skewtest's minimum) and both p-values are finite (not a
    constant group); the others are not tested.  Returns {"alpha", "n_tested",
    "fraction_in_rejected", "fraction_out_rejected", "fraction_either_rejected" (p < alpha, fractions
    of the tested examples, NaN when none), "expected_either_by_chance": 1 - (1 - alpha)^2,
    "min_group_size": 8}.  = gaussian_summary(*gaussian_pvalues(conf, shadow_in), alpha).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    return gaussian_summary(*gaussian_pvalues(conf, shadow_in), alpha)


def gaussian_pvalues(conf, shadow_in) -> tuple[np.ndarray, np.ndarray]:
    """gaussian_check's per-example p-values of the IN and of the OUT group -> (p_in[E], p_out[E]), NaN where
    an example is not tested.  Each example's p-values depend on that example alone (a group of one example is
    tested as a column of two equal ones, as numpy sums a single column in another order), so those of a
    subset of the examples equal the same entries computed on all of them."""
    c = np.asarray(conf, dtype=np.float64)
    if c.ndim == 3:
        c = c[..., 0]
    mask = np.asarray(shadow_in)
    if c.ndim != 2 or mask.dtype != bool or mask.shape != c.shape:
        raise ValueError(f"expected conf[M, E(, Q)] and boolean shadow_in[M, E], got {np.shape(conf)} and "
                         f"{mask.dtype} {mask.shape}")
    _finite(c, "conf")
    m = c.shape[0]
    n_in = mask.sum(0)
    p_in = np.full(c.shape[1], np.nan)
    p_out = np.full(c.shape[1], np.nan)
    size = np.minimum(n_in, m - n_in)
    for k in np.unique(n_in[size >= _NORMALTEST_MIN]):
        ex = np.flatnonzero((n_in == k) & (size >= _NORMALTEST_MIN))
        cols = np.repeat(ex, 2) if ex.size == 1 else ex
        order = np.argsort(~mask[:, cols], axis=0, kind="stable")  # IN shadows first
        vals = np.take_along_axis(c[:, cols], order, axis=0)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")  # kurtosistest warns below n = 20; constant groups give NaN
            p_in[ex] = stats.normaltest(vals[:k], axis=0).pvalue[:ex.size]
            p_out[ex] = stats.normaltest(vals[k:], axis=0).pvalue[:ex.size]
    return p_in, p_out


def gaussian_summary(p_in, p_out, alpha: float = 0.05) -> dict:
    """gaussian_check's figures from the per-example p-values of every example (gaussian_pvalues)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    p_in, p_out = np.asarray(p_in, dtype=np.float64), np.asarray(p_out, dtype=np.float64)
    tested = np.isfinite(p_in) & np.isfinite(p_out)
    n_tested = int(tested.sum())
    rin, rout = p_in[tested] < alpha, p_out[tested] < alpha

    def frac(v):
        return float(v.mean()) if n_tested else float("nan")

    return {"alpha": float(alpha), "n_tested": n_tested, "fraction_in_rejected": frac(rin),
            "fraction_out_rejected": frac(rout), "fraction_either_rejected": frac(rin | rout),
            "expected_either_by_chance": 1.0 - (1.0 - alpha) ** 2,
            "min_group_size": _NORMALTEST_MIN}


# ----------------------------------------------------------------------------- ROC
def roc_curve(scores, is_member):
    """Full ROC (no point dropped): predict member when score >= t for every distinct score t,
    from the highest down, after a first point (0, 0).  Returns (fpr, tpr, thresholds).

    sklearn.metrics.roc_curve with drop_intermediate=False computes exactly these points: the rates are
    counts over totals, float64 division of integers either way.  sklearn rejects infinite scores; with any,
    the curve is computed on the scores' dense ranks (the same order, so the same points) and the thresholds
    are mapped back to the scores.
    """
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
    if np.isfinite(s).all():
        return metrics.roc_curve(y, s, drop_intermediate=False)
    distinct, rank = np.unique(s, return_inverse=True)
    fpr, tpr, thr = metrics.roc_curve(y, rank.reshape(s.shape), drop_intermediate=False)
    return fpr, tpr, np.r_[np.inf, distinct[thr[1:].astype(np.int64)]]


def roc_auc(fpr, tpr) -> float:
    """Trapezoidal area under the ROC points (fpr, tpr) (= P(s_member > s_nonmember) + P(tie)/2 on the full ROC)."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def tpr_at_fpr(fpr, tpr, level: float) -> float:
    """TPR of the last ROC point whose FPR is strictly below ``level`` (0 when none is)."""
    below = np.flatnonzero(fpr < level)
    return float(tpr[below[-1]]) if below.size else 0.0


def roc_metrics(scores, is_member, fprs=(1e-3, 1e-2)) -> dict:
    """AUC, best balanced accuracy and TPR at fixed FPRs of a membership score (higher = member).

    On the full ROC (roc_curve): auc = trapezoidal area (= P(s_member > s_nonmember) + P(tie)/2);
    accuracy = max over ROC points of (TPR + 1 - FPR) / 2; tpr_at_fpr[a] = TPR of the last ROC
    point whose FPR is strictly below a (the first point is (0, 0), so it is 0 when none is).
    """
    fpr, tpr, _ = roc_curve(scores, is_member)
    acc = float(np.max((tpr + 1 - fpr) / 2))
    at = {float(a): tpr_at_fpr(fpr, tpr, float(a)) for a in fprs}
    return {"auc": roc_auc(fpr, tpr), "accuracy": acc, "tpr_at_fpr": at}
