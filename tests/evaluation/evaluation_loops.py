"""Straightforward per-example loops used as independent references by the evaluation tests.

They follow the written definitions literally (one example at a time, every rule materialized,
rates as means of boolean predictions) and share no code with evaluation/ except the grid builders
whose bit-exactness is tested separately.
"""
from __future__ import annotations


import numpy as np
from scipy import stats


def torch_like_linspace_f32(lo, hi, n):
    """float32 torch.linspace(lo, hi, n) computed one point at a time with math.fma-free float64 ops."""
    if n <= 0:
        return np.empty(0)
    s = np.float32(lo)
    if n == 1:
        return np.array([float(s)])
    e = np.float32(hi)
    step = np.float32((e - s) / np.float32(n - 1))
    out = []
    for i in range(n):
        if i < n // 2:
            v = float(s) + float(step) * i
        else:
            v = float(e) - float(step) * (n - 1 - i)
        out.append(float(np.float32(v)))
    return np.array(out)


def epsilons_loop(unlearned, retrained, delta=1e-5, single_grid=None):
    """Per-example eps of the challenge metric, one example and one rule family at a time."""
    unlearned = np.asarray(unlearned, dtype=np.float64)
    retrained = np.asarray(retrained, dtype=np.float64)
    out = []
    for e in range(unlearned.shape[1]):
        u = unlearned[:, e]
        r = retrained[:, e]
        if np.median(r) > np.median(u):
            pos, neg = r, u
        else:
            pos, neg = u, r
        pd = pos.max() - pos.min()
        nd = neg.max() - neg.min()
        largest = pd if pd > nd else nd
        smallest = nd if pd > nd else pd
        with np.errstate(divide="ignore", invalid="ignore"):
            if smallest / largest < 0.01:
                out.append(50.0)
                continue
        # double threshold
        dpos, dneg = (neg, pos) if pd >= nd else (pos, neg)
        width = smallest
        min_ = dpos.min() + width - 2.0
        max_ = dpos.max() + 2.0
        n_right = int(np.ceil((max_ - min_) * 100))
        rights = np.linspace(min_, max_, num=n_right)
        lefts = np.concatenate([np.linspace(tr - width - 2.0, tr - width + 2.0, num=400) for tr in rights])
        rr = np.repeat(rights, 400)
        pp_pos = (lefts[None, :] <= dpos[:, None]) & (dpos[:, None] <= rr[None, :])
        pp_neg = (lefts[None, :] <= dneg[:, None]) & (dneg[:, None] <= rr[None, :])
        tpr_d, fnr_d = pp_pos.mean(0), (~pp_pos).mean(0)
        fpr_d, tnr_d = pp_neg.mean(0), (~pp_neg).mean(0)
        # single threshold
        allc = np.concatenate([pos, neg])
        n_s = int(np.ceil((allc.max() - allc.min()) * 100))
        if single_grid is None:
            ts = torch_like_linspace_f32(allc.min(), allc.max(), n_s)
        else:
            ts = single_grid(allc.min(), allc.max(), n_s)
        tpr_s = (pos[:, None] >= ts[None, :]).mean(0)
        fpr_s = (neg[:, None] >= ts[None, :]).mean(0)
        tnr_s = (neg[:, None] < ts[None, :]).mean(0)
        fnr_s = (pos[:, None] < ts[None, :]).mean(0)
        tpr = np.concatenate([tpr_d, tpr_s])
        fnr = np.concatenate([fnr_d, fnr_s])
        fpr = np.concatenate([fpr_d, fpr_s])
        tnr = np.concatenate([tnr_d, tnr_s])
        thr = np.zeros(len(tpr))
        thr = np.where((fpr + fnr == 0) & (tpr + tnr == 2), np.inf, thr)
        thr = np.where((thr == 0) & (fpr * fnr == 0), np.nan, thr)
        with np.errstate(divide="ignore", invalid="ignore"):
            e1 = np.log(1 - delta - fpr) - np.log(fnr)
            e2 = np.log(1 - delta - fnr) - np.log(fpr)
        both_nan = np.isnan(e1) & np.isnan(e2)
        val = np.where(both_nan, np.nan, np.fmax(e1, e2))
        val = np.where(np.isnan(val), np.nan, np.maximum(val, 0))
        thr = np.where(thr == 0, val, thr)
        kept = thr[~np.isnan(thr)]
        out.append(float(kept.max()) if kept.size else 0.0)
    return np.clip(np.array(out), 0, 50)


def forgetting_quality_loop(eps, n_models):
    max_epsilon = np.ceil(np.log(n_models - 1))
    start, size, points = 0.0, 0.5, 1.0
    buckets = {}
    while start + size <= max_epsilon:
        buckets[start] = points
        points /= 2
        start += size
    score = 0.0
    for e in eps:
        for s, p in buckets.items():
            if e < s + size:
                score += p
                break
    return score / len(eps)


def lira_fit_loop(shadow, shadow_in):
    """Per example and query: median / std of the IN and OUT shadows (LiRA reference fit)."""
    m, n_ex, q = shadow.shape
    mu_in = np.empty((n_ex, q)); mu_out = np.empty((n_ex, q))
    sd_in = np.empty((n_ex, q)); sd_out = np.empty((n_ex, q))
    for e in range(n_ex):
        xin = shadow[shadow_in[:, e], e, :]
        xout = shadow[~shadow_in[:, e], e, :]
        mu_in[e] = np.median(xin, 0) if len(xin) else np.nan
        mu_out[e] = np.median(xout, 0) if len(xout) else np.nan
        sd_in[e] = np.std(xin, 0) if len(xin) else np.nan
        sd_out[e] = np.std(xout, 0) if len(xout) else np.nan
    return mu_in, sd_in, mu_out, sd_out


def lira_loop(target, shadow, shadow_in, mode):
    target = np.asarray(target, dtype=np.float64)
    shadow = np.asarray(shadow, dtype=np.float64)
    if target.ndim == 1:
        target = target[:, None]
        shadow = shadow[:, :, None]
    if mode == "global":
        return target.mean(1)
    mu_in, sd_in, mu_out, sd_out = lira_fit_loop(shadow, shadow_in)
    out = []
    for e in range(target.shape[0]):
        if mode == "online":
            s = stats.norm.logpdf(target[e], mu_in[e], sd_in[e] + 1e-30) - stats.norm.logpdf(
                target[e], mu_out[e], sd_out[e] + 1e-30)
        else:
            s = stats.norm.logcdf(target[e], mu_out[e], sd_out[e] + 1e-30)
        out.append(np.mean(s))
    return np.array(out)


def roc_loop(scores, is_member):
    """ROC points by brute force over every distinct threshold (predict member when score >= t)."""
    scores = np.asarray(scores, dtype=np.float64)
    is_member = np.asarray(is_member, dtype=bool)
    pts = [(0.0, 0.0)]
    for t in sorted(set(scores.tolist()), reverse=True):
        pred = scores >= t
        tpr = (pred & is_member).sum() / is_member.sum()
        fpr = (pred & ~is_member).sum() / (~is_member).sum()
        pts.append((fpr, tpr))
    return np.array(pts)


def bh_step_up_loop(p, q):
    """Benjamini-Hochberg as written: reject the k smallest p-values, k = max{i : p_(i) <= i q / m}."""
    m = len(p)
    ranked = sorted(range(m), key=lambda i: p[i])
    k = max([i for i in range(1, m + 1) if p[ranked[i - 1]] <= i * q / m], default=0)
    reject = np.zeros(m, dtype=bool)
    reject[ranked[:k]] = True
    return reject


def auc_pairs(scores, is_member):
    s1 = scores[is_member]
    s0 = scores[~is_member]
    gt = (s1[:, None] > s0[None, :]).sum()
    eq = (s1[:, None] == s0[None, :]).sum()
    return (gt + 0.5 * eq) / (len(s1) * len(s0))


def rmia_loop(target_x, ref_x, ref_in, target_z, ref_z, a, gamma):
    """RMIA offline score per example with an explicit double loop over x and z."""
    n_ex = len(target_x)
    px_t = 1 / (1 + np.exp(-target_x))
    pz_t = 1 / (1 + np.exp(-target_z))
    pref_x = 1 / (1 + np.exp(-ref_x))
    pref_z = 1 / (1 + np.exp(-ref_z))
    out = []
    ratios_z = []
    for k in range(len(target_z)):
        pz = 0.5 * ((1 + a) * pref_z[:, k].mean() + (1 - a))
        ratios_z.append(pz_t[k] / pz)
    for e in range(n_ex):
        outs = pref_x[~ref_in[:, e], e]
        px = 0.5 * ((1 + a) * outs.mean() + (1 - a))
        rx = px_t[e] / px
        out.append(np.mean([rx / rz > gamma for rz in ratios_z]))
    return np.array(out)


def lira_pair_loop(conf, shadow_in, partner, mode, variance):
    """Leave-pair-out LiRA one (target, example) cell at a time: refit on every shadow except the
    target and partner[t, e] (partner int[M, E], -1 = NaN).  variance="global" uses one spread per
    side pooled over all shadows, examples and queries after centring each (example, query) group."""
    conf = np.asarray(conf, dtype=np.float64)
    if conf.ndim == 2:
        conf = conf[..., None]
    m, n_ex, q = conf.shape
    pooled = {}
    if variance == "global":
        for side, want in (("in", True), ("out", False)):
            num, den = 0.0, 0
            for e in range(n_ex):
                for k in range(q):
                    vals = [conf[s, e, k] for s in range(m) if shadow_in[s, e] == want]
                    if vals:
                        mean = sum(vals) / len(vals)
                        num += sum((v - mean) ** 2 for v in vals)
                        den += len(vals)
            pooled[side] = np.sqrt(num / den)
    out = np.full((m, n_ex), np.nan)
    for t in range(m):
        for e in range(n_ex):
            p = partner[t, e]
            if p < 0:
                continue
            x = conf[t, e]
            if mode == "global":
                out[t, e] = x.mean()
                continue
            refs = [s for s in range(m) if s != t and s != p]
            xin = np.array([conf[s, e] for s in refs if shadow_in[s, e]]).reshape(-1, q)
            xout = np.array([conf[s, e] for s in refs if not shadow_in[s, e]]).reshape(-1, q)
            sd_out = np.full(q, pooled["out"]) if variance == "global" else np.std(xout, 0)
            if mode == "online":
                sd_in = np.full(q, pooled["in"]) if variance == "global" else np.std(xin, 0)
                s = stats.norm.logpdf(x, np.median(xin, 0), sd_in + 1e-30) - stats.norm.logpdf(
                    x, np.median(xout, 0), sd_out + 1e-30)
            else:
                s = stats.norm.logcdf(x, np.median(xout, 0), sd_out + 1e-30)
            out[t, e] = np.mean(s)
    return out


def pair_vulnerability_loop(scores, shadow_in, partner):
    """Per example: collect the distinct unordered pairs {t, partner[t, e]} and compare IN vs OUT."""
    m, n_ex = scores.shape
    out = []
    for e in range(n_ex):
        pairs = set()
        for t in range(m):
            if partner[t, e] >= 0:
                pairs.add(frozenset((t, int(partner[t, e]))))
        wins = []
        for pair in pairs:
            a, b = sorted(pair)
            i, o = (a, b) if shadow_in[a, e] else (b, a)
            wins.append(1.0 if scores[i, e] > scores[o, e] else 0.5 if scores[i, e] == scores[o, e] else 0.0)
        out.append(np.mean(wins) if wins else np.nan)
    return np.array(out)


def rmia_pair_loop(conf, shadow_in, partner, pop_conf, a, gamma):
    """Leave-pair-out offline RMIA, one target and one example at a time (partner int[M])."""
    p = 1 / (1 + np.exp(-np.asarray(conf, dtype=np.float64)))
    if p.ndim == 3:
        p = p.mean(-1)
    pz = None
    if pop_conf is not None:
        pz = 1 / (1 + np.exp(-np.asarray(pop_conf, dtype=np.float64)))
        if pz.ndim == 3:
            pz = pz.mean(-1)
    m, n_ex = p.shape
    out = np.full((m, n_ex), np.nan)
    for t in range(m):
        refs = [r for r in range(m) if r != t and r != partner[t]]

        def ratio_train(e):
            outs = [p[r, e] for r in refs if not shadow_in[r, e]]
            return p[t, e] / (((1 + a) * np.mean(outs) + 1 - a) / 2)

        population = [ratio_train(e) for e in range(n_ex) if not shadow_in[t, e]]
        if pz is not None:
            for z in range(pz.shape[1]):
                population.append(pz[t, z] / (((1 + a) * np.mean([pz[r, z] for r in refs]) + 1 - a) / 2))
        for e in range(n_ex):
            rx = ratio_train(e)
            out[t, e] = np.mean([rx / rz > gamma for rz in population])
    return out


def ulira_grouped_loop(unlearned, retrained, groups_u, groups_r, folds, seed):
    """Grouped U-LiRA by the written recipe: the sorted distinct groups of each kind are permuted
    (default_rng(seed), unlearned first), split into folds with np.array_split, and every target is
    scored against the models outside its fold, one example at a time."""
    rng = np.random.default_rng(seed)
    fold_sets = []
    for groups in (groups_u, groups_r):
        labels = sorted(set(groups.tolist()))
        perm = rng.permutation(len(labels))
        parts = np.array_split(perm, folds)
        fold_of = {labels[g]: k for k, part in enumerate(parts) for g in part}
        fold_sets.append([fold_of[g] for g in groups])
    fu, fr = fold_sets
    n_ex = unlearned.shape[1]
    per_example = []
    for e in range(n_ex):
        acc = []
        for models, fold, is_u in ((unlearned, fu, True), (retrained, fr, False)):
            right = 0.0
            for i in range(len(models)):
                ref_u = [unlearned[j, e] for j in range(len(unlearned)) if fu[j] != fold[i]]
                ref_r = [retrained[j, e] for j in range(len(retrained)) if fr[j] != fold[i]]
                # no model of the target's group is a reference
                grp = groups_u if is_u else groups_r
                assert all(fold[j] == fold[i] for j in range(len(models)) if grp[j] == grp[i])
                lr = stats.norm.logpdf(models[i, e], np.mean(ref_u), np.std(ref_u) + 1e-30) - stats.norm.logpdf(
                    models[i, e], np.mean(ref_r), np.std(ref_r) + 1e-30)
                right += (lr > 0 if is_u else lr < 0) + 0.5 * (lr == 0)
            acc.append(right / len(models))
        per_example.append(0.5 * (acc[0] + acc[1]))
    return np.array(per_example)


def normal_rejections_loop(conf, shadow_in, alpha):
    """scipy.stats.normaltest on each example's IN and OUT groups (query 0), one example at a time."""
    import warnings
    c = np.asarray(conf, dtype=np.float64)
    if c.ndim == 3:
        c = c[..., 0]
    rin, rout = [], []
    for e in range(c.shape[1]):
        xin, xout = c[shadow_in[:, e], e], c[~shadow_in[:, e], e]
        if len(xin) < 8 or len(xout) < 8:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pi, po = stats.normaltest(xin).pvalue, stats.normaltest(xout).pvalue
        if np.isnan(pi) or np.isnan(po):
            continue
        rin.append(pi < alpha)
        rout.append(po < alpha)
    return np.array(rin), np.array(rout)
