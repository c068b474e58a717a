#!/usr/bin/env python
"""Benchmark of the vectorized evaluation core against per-example / per-target loops.

Prints ratios measured in this run (the loops are timed on a subset and extrapolated linearly):
  1. competition eps: per_example_epsilons vs a per-example loop over the same threshold grid,
     512 + 512 models x 1,000 forget examples (--quick: 64 + 64 x 100);
  2. leave-out LiRA (online and offline): lira_leave_one_out and lira_leave_pair_out (the report's, shadows
     in complementary pairs) vs refitting the Gaussians per target with nanmedian / nanstd, 256 shadows x
     70,000 examples x 2 queries (--quick: 64 x 5,000 x 2).
Peak memory: the process's maximum resident set size (inputs included), from resource.getrusage.

    python scripts/bench_evaluation.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from evaluation.competition import per_example_epsilons, single_thresholds  # noqa: E402
from evaluation.lira import lira_leave_one_out, lira_leave_pair_out  # noqa: E402


def eps_loop(unlearned, retrained, delta=1e-5):
    """The baseline: one example at a time, every rule materialized, rates as boolean means."""
    out = []
    for e in range(unlearned.shape[1]):
        u, r = unlearned[:, e], retrained[:, e]
        pos, neg = (r, u) if np.median(r) > np.median(u) else (u, r)
        pd, nd = np.ptp(pos), np.ptp(neg)
        largest, smallest = max(pd, nd), min(pd, nd)
        if largest > 0 and smallest / largest < 0.01:
            out.append(50.0)
            continue
        dpos, dneg = (neg, pos) if pd >= nd else (pos, neg)
        min_, max_ = dpos.min() + smallest - 2.0, dpos.max() + 2.0
        rights = np.linspace(min_, max_, num=int(np.ceil((max_ - min_) * 100)))
        lefts = np.concatenate([np.linspace(t - smallest - 2.0, t - smallest + 2.0, num=400) for t in rights])
        rr = np.repeat(rights, 400)
        pp_p = (lefts <= dpos[:, None]) & (dpos[:, None] <= rr)
        pp_n = (lefts <= dneg[:, None]) & (dneg[:, None] <= rr)
        allc = np.concatenate([pos, neg])
        ts = single_thresholds(allc.min(), allc.max())  # the released float32 grid
        fpr = np.concatenate([pp_n.mean(0), (neg[:, None] >= ts).mean(0)])
        fnr = np.concatenate([(~pp_p).mean(0), (pos[:, None] < ts).mean(0)])
        with np.errstate(divide="ignore", invalid="ignore"):
            e1 = np.log(1 - delta - fpr) - np.log(fnr)
            e2 = np.log(1 - delta - fnr) - np.log(fpr)
        val = np.where(np.isnan(e1) & np.isnan(e2), np.nan, np.maximum(np.fmax(e1, e2), 0))
        val = np.where((fpr == 0) & (fnr == 0), np.inf, np.where((fpr == 0) | (fnr == 0), np.nan, val))
        kept = val[~np.isnan(val)]
        out.append(min(float(kept.max()), 50.0) if kept.size else 0.0)
    return np.array(out)


def refit_target(conf, mask, t, mode, partner=None):
    """The baseline: fit the IN / OUT Gaussians again from the other shadows for target t (and without its
    partner, for leave-pair-out)."""
    oth = np.arange(conf.shape[0]) != t
    if partner is not None:
        oth &= np.arange(conf.shape[0]) != partner[t]
    ref = conf[oth].astype(np.float64)
    m = mask[oth][..., None]
    x = conf[t].astype(np.float64)
    out_v = np.where(m, np.nan, ref)
    mu_out, sd_out = np.nanmedian(out_v, 0), np.nanstd(out_v, 0) + 1e-30
    if mode == "offline":
        from scipy.special import log_ndtr
        return log_ndtr((x - mu_out) / sd_out).mean(-1)
    in_v = np.where(m, ref, np.nan)
    mu_in, sd_in = np.nanmedian(in_v, 0), np.nanstd(in_v, 0) + 1e-30
    s = (-0.5 * ((x - mu_in) / sd_in) ** 2 - np.log(sd_in)) - (-0.5 * ((x - mu_out) / sd_out) ** 2 - np.log(sd_out))
    return s.mean(-1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n_models, n_ex, n_loop = (64, 100, 5) if args.quick else (512, 1000, 12)
    print(f"[competition] {n_models} unlearned + {n_models} retrained models x {n_ex} forget examples")
    base = rng.normal(0, 2, n_ex)
    u = rng.normal(0, 1, (n_models, n_ex)) * rng.uniform(0.5, 2, n_ex) + base
    r = rng.normal(0.2, 1, (n_models, n_ex)) * rng.uniform(0.5, 2, n_ex) + base
    t0 = time.perf_counter()
    eps = per_example_epsilons(u, r)
    t_vec = time.perf_counter() - t0
    sample = np.linspace(0, n_ex - 1, n_loop).round().astype(int)  # spread: grid sizes vary by example
    t0 = time.perf_counter()
    ref = eps_loop(u[:, sample], r[:, sample])
    t_loop = (time.perf_counter() - t0) / n_loop * n_ex
    print(f"  vectorized: {t_vec:.2f} s for {n_ex} examples")
    print(f"  per-example loop: measured on {n_loop} examples spread over the set, extrapolated to {n_ex}: "
          f"{t_loop:.1f} s")
    print(f"  max |eps_vec - eps_loop| on the measured examples: {np.max(np.abs(eps[sample] - ref)):.3g}")
    print(f"  speed-up: {t_loop / t_vec:.0f}x")

    m, e, q, n_targets = (64, 5000, 2, 2) if args.quick else (256, 70000, 2, 2)
    print(f"[leave-out LiRA] {m} shadows in complementary pairs x {e} examples x {q} queries (float32 input)")
    mask = np.zeros((m, e), bool)
    mask[0::2] = rng.random((m // 2, e)) < 0.5
    mask[1::2] = ~mask[0::2]
    partner = np.arange(m) ^ 1
    conf = rng.standard_normal((m, e, q), dtype=np.float32)
    conf += 0.5 * mask[..., None]
    vec = {}
    for kind, fn in (("leave-one-out", lambda mode: lira_leave_one_out(conf, mask, mode=mode)),
                     ("leave-pair-out", lambda mode: lira_leave_pair_out(conf, mask, partner, mode=mode))):
        for mode in ("online", "offline"):
            t0 = time.perf_counter()
            vec[kind, mode] = (fn(mode), time.perf_counter() - t0)
    peak_vec = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for (kind, mode), (s, t_vec) in vec.items():
        t0 = time.perf_counter()
        p = partner if kind == "leave-pair-out" else None
        diffs = [np.max(np.abs(refit_target(conf, mask, t, mode, p) - s[t])) for t in range(n_targets)]
        t_loop = (time.perf_counter() - t0) / n_targets * m
        print(f"  {kind} {mode}: vectorized all {m} targets {t_vec:.2f} s; per-target refit measured on "
              f"{n_targets} targets, extrapolated to {m}: {t_loop:.1f} s; speed-up {t_loop / t_vec:.0f}x; "
              f"max |diff| {max(diffs):.2g}")
    print(f"peak resident memory of the process after the vectorized runs (inputs, both score arrays and the "
          f"competition part included): {peak_vec:.0f} MB")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory after the refit baselines too: {peak:.0f} MB")


if __name__ == "__main__":
    main()
