"""The report's membership-inference section: LiRA (online, offline, global) and RMIA over the shadows with
leave-pair-out references, per-example vulnerability from within-pair comparisons, precision (a jackknife
over target pairs), the Gaussian check of LiRA's assumption, and the shadows a target precision needs.

Takes numpy arrays (evaluation.report reads the store); returns the JSON section, the ROC curves with their
bands for the figure, and the per-example table.

Why leave-pair-out: shadows come in complementary pairs (every train example is IN for exactly one shadow
of a pair).  Leaving only the target out gives an IN target M/2-1 IN references and M/2 OUT ones and the
reverse for an OUT target, so the fitted means' noise no longer cancels and members score low whenever the
true gap is small (no-signal AUC 0.466 at 8 shadows).  Leaving out the target and its partner keeps equal
counts for both.  Shadows that do not pair up (a user's own masks) get, per example, a seeded random
one-to-one matching of IN and OUT shadows instead (unmatched cells are not scored), and the report says so.
"""
from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from .lira import (gaussian_check, lira_leave_pair_out, pair_vulnerability, pair_vulnerability_null,
                   random_partners)
from .precision import JACKKNIFE_GROUPS, assign_groups, jackknife_se, models_needed, roc_jackknife, t_interval
from .rmia import rmia_leave_pair_out

__all__ = ["membership_section", "shadow_partners", "LIRA_MODES", "FPRS", "AUC_HALF_WIDTH",
           "PER_EXAMPLE_VARIANCE_MIN_REFS"]

LIRA_MODES = ("online", "offline", "global")
FPRS = (1e-3, 1e-2)
# LiRA's paper fits per-example variances from 64 shadows on; leave-pair-out keeps 31 references per side there
PER_EXAMPLE_VARIANCE_MIN_REFS = 31
AUC_HALF_WIDTH = 0.01  # the precision the report sizes the shadow count for
VULNERABLE = 0.9
ROC_GRID = np.logspace(-4, 0, 81)
_SHADOW_ID = re.compile(r"^shadow-(\d+)$")


def shadow_partners(ids: list[str], member: np.ndarray) -> np.ndarray | None:
    """int[M]: each shadow's complementary partner (shadow 2k with 2k+1, when both are usable and their train
    memberships are exact complements), or None when any shadow has no such partner."""
    index = {int(m.group(1)): k for k, mid in enumerate(ids) if (m := _SHADOW_ID.match(mid))}
    partner = np.full(len(ids), -1, dtype=np.int64)
    for i, k in index.items():
        j = index.get(i ^ 1)
        if j is not None and bool(np.all(member[k] != member[j])):
            partner[k] = j
    return partner if len(ids) and (partner >= 0).all() else None


def _precision_fields(fig: dict, dof: int, n_models: int) -> dict:
    """AUC and TPR intervals from the jackknife, and the shadows AUC +- AUC_HALF_WIDTH would need."""
    out = {"auc": fig["auc"], "tpr_at_fpr": fig["tpr_at_fpr"]}
    if "auc_se" in fig:
        out["auc_se"] = fig["auc_se"]
        out["auc_ci"] = t_interval(fig["auc"], fig["auc_se"], dof, lo=0.0, hi=1.0)
        out["tpr_at_fpr_se"] = fig["tpr_at_fpr_se"]
        out["tpr_at_fpr_ci"] = {a: t_interval(v, fig["tpr_at_fpr_se"][a], dof, lo=0.0, hi=1.0)
                                for a, v in fig["tpr_at_fpr"].items()}
        out["shadows_for_auc_half_width"] = {"half_width": AUC_HALF_WIDTH,
                                             "shadows": models_needed(n_models, fig["auc_se"], AUC_HALF_WIDTH)}
    return out


def _curve(fig: dict, dof: int) -> dict:
    c = {"fpr": ROC_GRID, "tpr": fig["grid_tpr"]}
    if "grid_tpr_se" in fig:
        from scipy import stats

        half = float(stats.t.ppf(0.975, dof)) * fig["grid_tpr_se"]
        c["lo"], c["hi"] = np.clip(fig["grid_tpr"] - half, 0, 1), np.clip(fig["grid_tpr"] + half, 0, 1)
    return c


def _vulnerability_se(scores, member, partner, groups, n_groups) -> float:
    """Jackknife SE of the mean vulnerability: each replicate drops one group of target pairs."""
    if n_groups < 2:
        return float("nan")
    reps = []
    for g in range(n_groups):
        drop = groups == g
        p = np.where(drop[:, None] if partner.ndim == 2 else drop, -1, partner)
        if partner.ndim == 2:  # a matched pair is dropped when either member is in the group
            p = np.where(np.take_along_axis(np.broadcast_to(drop[:, None], p.shape), np.maximum(partner, 0), 0)
                         & (partner >= 0), -1, p)
        v = pair_vulnerability(scores, member, p)
        reps.append(float(np.nanmean(v)))
    return jackknife_se(reps)


def membership_section(ids: list[str], conf_tr: np.ndarray, member: np.ndarray, pop: np.ndarray | None,
                       forget_train: np.ndarray, example_ids_train: np.ndarray, *, seed: int = 0,
                       rmia_a: float = 0.3, rmia_gamma: float = 1.0,
                       status: Callable[[str], None] = lambda s: None) -> tuple[dict, dict, dict | None]:
    """conf_tr[M, T, Q] and member bool[M, T] of the usable shadows on the train split, pop[M, Z, Q] on the
    test split (RMIA's extra population) -> (section, curves, per-example columns or None)."""
    m, n_train = member.shape
    sec: dict = {"n_usable_shadows": m, "n_queries": int(conf_tr.shape[2])}
    curves: dict = {}
    partner = shadow_partners(ids, member)
    if partner is not None:
        sec["references"] = ("leave-pair-out: each target is scored against every shadow but itself and its "
                             "complementary partner (equal IN and OUT counts for every example)")
        pair_id = np.minimum(np.arange(m), partner)
        n_pairs = m // 2
    else:
        sec["references"] = ("the shadows are not all in complementary pairs: per example, IN and OUT shadows "
                             "are matched at random (seeded) and each target is scored without itself and its "
                             "match; cells without a match are not scored")
        partner = random_partners(member, seed=[seed, 0x9A17])
        pair_id = np.arange(m)
        n_pairs = int(min(member.sum(0).min(), (~member).sum(0).min())) if m else 0
    n_in = member.sum(0)
    n_out = m - n_in
    refs = int(min(n_in.min(), n_out.min())) - 1 if m else 0
    if refs < 1:
        msg = (f"LiRA needs at least 4 shadows in complementary pairs (every train example keeps >= 1 IN and >= 1 "
               f"OUT reference after leaving out the target and its partner); {m} usable shadows leave {max(refs, 0)}")
        sec["message"] = msg
        return sec, curves, None
    variance = "per_example" if refs >= PER_EXAMPLE_VARIANCE_MIN_REFS else "global"
    sec["variance"] = variance
    sec["variance_rule"] = (f"per_example when every train example keeps >= {PER_EXAMPLE_VARIANCE_MIN_REFS} IN and "
                            f"OUT references (64 shadows in pairs), else global (here {refs})")
    groups, n_groups = assign_groups(pair_id, JACKKNIFE_GROUPS, [seed, 0x1AC])
    ex_groups, n_ex_groups = assign_groups(np.arange(n_train), JACKKNIFE_GROUPS, [seed, 0x1AD])
    dof = min(n_groups, n_ex_groups) - 1
    sec["precision"] = (f"95% intervals: two-way delete-a-group jackknife over {n_groups} groups of target pairs "
                        f"and {n_ex_groups} groups of examples (variances added; t with {dof} degrees of freedom)")
    cells = [(np.broadcast_to(groups[:, None], member.shape), n_groups),
             (np.broadcast_to(ex_groups[None, :], member.shape), n_ex_groups)]
    sec["modes"] = {}
    online = None
    for mode in LIRA_MODES:
        status(f"LiRA {mode} leave-pair-out")
        scores = lira_leave_pair_out(conf_tr, member, partner, mode=mode, variance=variance)
        ok = np.isfinite(scores)
        fig = roc_jackknife(scores[ok], member[ok], [(c[ok], k) for c, k in cells], FPRS, ROC_GRID)
        curves[f"LiRA {mode}"] = _curve(fig, dof)
        sec["modes"][mode] = {**_precision_fields(fig, dof, m), "n_cells": int(ok.sum())}
        if mode == "online":
            online = scores
    status("RMIA leave-pair-out")
    rmia_partner = partner if partner.ndim == 1 else None
    if rmia_partner is None:
        sec["rmia"] = {"message": "RMIA with leave-pair-out references needs shadows in complementary pairs"}
    else:
        rs = rmia_leave_pair_out(conf_tr, member, rmia_partner, pop, a=rmia_a, gamma=rmia_gamma)
        fig = roc_jackknife(rs.ravel(), member.ravel(), [(c.ravel(), k) for c, k in cells], FPRS, ROC_GRID)
        curves["RMIA"] = _curve(fig, dof)
        sec["rmia"] = {**_precision_fields(fig, dof, m), "a": rmia_a, "gamma": rmia_gamma,
                       "population": (f"per target, the train examples it was not trained on (at least "
                                      f"{int(n_train - member.sum(1).max())})" + (f" and {pop.shape[1]} test examples"
                                                                                  if pop is not None else ""))}
    status("per-example vulnerability")
    vul = pair_vulnerability(online, member, partner)
    fin = vul[np.isfinite(vul)]
    chance = pair_vulnerability_null(n_pairs, VULNERABLE) if n_pairs else float("nan")
    sec["vulnerability"] = {
        "score": "LiRA online",
        "definition": ("per train example: the fraction of shadow pairs whose IN member scores above its OUT "
                       "member (ties 1/2), both scored leave-pair-out; chance 0.5"),
        "n_pairs": n_pairs,
        "mean": float(fin.mean()) if fin.size else float("nan"),
        "mean_se": float(np.hypot(_vulnerability_se(online, member, partner, groups, n_groups),
                                  jackknife_se([np.nanmean(vul[ex_groups != g]) for g in range(n_ex_groups)]))),
        "chance_mean": 0.5,
        f"fraction_ge_{VULNERABLE}": float((fin >= VULNERABLE).mean()) if fin.size else float("nan"),
        f"chance_fraction_ge_{VULNERABLE}": chance,
        "mean_forget": float(np.nanmean(vul[forget_train])) if forget_train.any() else float("nan"),
        "mean_retain": float(np.nanmean(vul[~forget_train])) if (~forget_train).any() else float("nan"),
        "most_vulnerable": [{"example_id": int(example_ids_train[i]), "vulnerability": float(vul[i])}
                            for i in np.argsort(-np.nan_to_num(vul, nan=-1.0), kind="stable")[:10]],
    }
    status("Gaussian check")
    sec["gaussian_check"] = gaussian_check(conf_tr, member)
    per_example = {"example_id": example_ids_train.astype(np.int32), "forget": forget_train,
                   "vulnerability": vul, "n_in": n_in.astype(np.int32), "n_out": n_out.astype(np.int32)}
    return sec, curves, per_example

