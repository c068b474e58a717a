#!/usr/bin/env python
"""What the report's statistics read in worlds whose truth is known, against the choices they replace.

Prints, each measured in this run (seeded; about two minutes on 2 cores, --quick about 20 s):
  1. no membership signal (Gaussian confidences, shadows in complementary pairs): pooled online LiRA AUC with
     leave-one-out references (the old choice) and with leave-pair-out references (the report's), and the
     mean per-example vulnerability as the AUC of IN against OUT targets (old) and within pairs (the report's),
     averaged over seeds, at 8, 16, 32 and 64 shadows; chance is 0.5 everywhere;
  2. coverage of 95% AUC intervals over repeated no-signal worlds: a jackknife over target pairs alone
     against the two-way jackknife over target pairs and examples (the report's);
  3. coverage of the equal-count draws' interval (4 groups, 20 draws, Monte Carlo part removed) over
     repeated pools of 32 + 32 models, for a statistic that depends on the model count as F does.

    python scripts/check_statistics.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from scipy.stats import rankdata

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from evaluation.lira import (lira_leave_one_out, lira_leave_pair_out, pair_vulnerability,  # noqa: E402
                             roc_metrics)
from evaluation.precision import DRAW_GROUPS, assign_groups, equal_count_f, t_interval  # noqa: E402
from evaluation.roc import roc_jackknife  # noqa: E402


def pairs_world(rng, m, e, base):
    mask = np.empty((m, e), bool)
    mask[0::2] = rng.random((m // 2, e)) < 0.5
    mask[1::2] = ~mask[0::2]
    return base + rng.normal(0, 1, (m, e)), mask, np.arange(m) ^ 1


def rank_vulnerability(scores, member):
    """The old per-example vulnerability: AUC of the IN targets' scores against the OUT targets'."""
    r = rankdata(scores, axis=0)
    n_in = member.sum(0)
    return (np.where(member, r, 0).sum(0) - n_in * (n_in + 1) / 2) / (n_in * (len(member) - n_in))


def bias(seeds, e):
    print(f"[1] no membership signal, {e} examples, mean over {seeds} seeds (chance 0.5)")
    print("  shadows   AUC leave-one-out   AUC leave-pair-out   vulnerability IN-vs-OUT   vulnerability within pairs")
    for m in (8, 16, 32, 64):
        rows = []
        for seed in range(seeds):
            rng = np.random.default_rng([m, seed])
            conf, mask, partner = pairs_world(rng, m, e, rng.normal(0, 1.5, e))
            loo = lira_leave_one_out(conf, mask, variance="global")
            lpo = lira_leave_pair_out(conf, mask, partner, variance="global")
            rows.append((roc_metrics(loo.ravel(), mask.ravel())["auc"], roc_metrics(lpo.ravel(), mask.ravel())["auc"],
                         rank_vulnerability(loo, mask).mean(), np.nanmean(pair_vulnerability(lpo, mask, partner))))
        a = np.mean(rows, 0)
        print(f"  {m:>7}   {a[0]:>17.3f}   {a[1]:>18.3f}   {a[2]:>23.3f}   {a[3]:>26.3f}")


def auc_coverage(reps, e):
    print(f"[2] 95% AUC intervals over {reps} no-signal worlds (examples fixed, shadows drawn anew): coverage of 0.5")
    base = np.random.default_rng(999).normal(0, 1.5, e)
    for m in (8, 16, 32):
        hit_t = hit_2 = 0
        for seed in range(reps):
            conf, mask, partner = pairs_world(np.random.default_rng([m, seed, 1]), m, e, base)
            s = lira_leave_pair_out(conf, mask, partner, variance="global")
            g_t, n_t = assign_groups(np.minimum(np.arange(m), partner), 10, seed)
            g_e, n_e = assign_groups(np.arange(e), 10, seed + 1)
            by_t = (np.repeat(g_t, e), n_t)
            for groupings, hit in (([by_t], "t"), ([by_t, (np.tile(g_e, m), n_e)], "2")):
                fig = roc_jackknife(s.ravel(), mask.ravel(), groupings, (0.01,), np.array([0.1]))
                lo, hi = t_interval(fig["auc"], fig["auc_se"], fig["dof"])
                if hit == "t":
                    hit_t += lo <= 0.5 <= hi
                else:
                    hit_2 += lo <= 0.5 <= hi
        print(f"  {m:>2} shadows: target pairs only {hit_t / reps:.2f}, target pairs and examples {hit_2 / reps:.2f}")


def median_gap(a, b):
    return float(np.mean(np.abs(np.median(a, 0) - np.median(b, 0))))


def draws_coverage(reps):
    e, n_pool, n = 40, 32, 12
    print(f"[3] equal-count means at {n} per side from pools of {n_pool} (a count-dependent statistic), "
          f"{reps} pools: coverage of the expectation by 95% intervals")
    rng = np.random.default_rng(0)

    def pool(k):
        return rng.normal(size=(k, e)) + rng.normal(scale=0.3, size=(k, 1))

    truth = np.mean([median_gap(pool(n), pool(n)) for _ in range(4000)])
    hits, ses, means = 0, [], []
    for rep in range(reps):
        r = pool(n_pool)
        gr, g = assign_groups(np.arange(n_pool), DRAW_GROUPS, rep)
        res = equal_count_f(median_gap, r, gr, g, n, 20, rep)
        lo, hi = t_interval(res["mean"], res["se"], g - 1)
        hits += lo <= truth <= hi
        ses.append(res["se"])
        means.append(res["mean"])
    print(f"  coverage {hits / reps:.3f}; mean stated SE {np.mean(ses):.4f} against the spread of the estimates "
          f"{np.std(means):.4f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    bias(*((5, 2000) if args.quick else (20, 4000)))
    auc_coverage(*((40, 300) if args.quick else (200, 300)))
    draws_coverage(60 if args.quick else 300)


if __name__ == "__main__":
    main()
