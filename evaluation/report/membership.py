"""The report's membership-inference section: LiRA (online, offline, global) and RMIA over the shadows with
leave-pair-out references, per-example vulnerability from within-pair comparisons, precision (a jackknife
over target pairs and over examples), the Gaussian check of LiRA's assumption, and the shadows a target
precision needs.

Takes numpy arrays (evaluation.report.evaluate reads the store) and returns a MembershipResult: the JSON
section, the ROC curves with their bands for the figure, the per-example table and the notes for the report.

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
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from ..lira import (gaussian_check, lira_leave_pair_out, pair_vulnerability, pair_vulnerability_null,
                    random_partners)
from ..precision import JACKKNIFE_GROUPS, assign_groups, jackknife_se, models_needed, roc_jackknife, t_interval
from ..rmia import rmia_leave_pair_out

__all__ = ["MembershipResult", "RocCurve", "ShadowSetup", "membership_section", "too_few_shadows", "shadow_partners",
           "shadow_setup", "lira_mode", "LIRA_MODES", "FPRS", "MIN_SHADOWS", "AUC_HALF_WIDTH", "PER_EXAMPLE_VARIANCE_MIN_REFS"]

LIRA_MODES = ("online", "offline", "global")
FPRS = (1e-3, 1e-2)
MIN_SHADOWS = 4  # one complementary pair left after leaving out the target's pair: >= 1 IN and >= 1 OUT reference
# LiRA's paper fits per-example variances from 64 shadows on; leave-pair-out keeps 31 references per side there
PER_EXAMPLE_VARIANCE_MIN_REFS = 31
AUC_HALF_WIDTH = 0.01  # the precision the report sizes the shadow count for
VULNERABLE = 0.9
ROC_GRID = np.logspace(-4, 0, 81)
_SHADOW_ID = re.compile(r"^shadow-(\d+)$")


@dataclass(frozen=True)
class RocCurve:
    """An attack's TPR on the FPR grid of the figure, with its pointwise 95% band when there is one."""
    fpr: np.ndarray
    tpr: np.ndarray
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None


@dataclass(frozen=True)
class MembershipResult:
    section: dict  # report.json's "lira"
    curves: dict[str, RocCurve] = field(default_factory=dict)  # attack name -> curve, for lira_roc.png
    per_example: dict | None = None  # the columns of per_example_lira.parquet
    notes: list[str] = field(default_factory=list)  # for the report's notes


def too_few_shadows(section: dict, n_shadows: int) -> MembershipResult:
    """The section when the store has fewer than MIN_SHADOWS shadows."""
    msg = (f"LiRA needs at least {MIN_SHADOWS} shadow models (in complementary pairs, so every train example keeps "
           f">= 1 IN and >= 1 OUT reference after leaving out the target and its partner); the store has {n_shadows}")
    return MembershipResult({**section, "message": msg}, notes=[msg])


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


@dataclass(frozen=True)
class _References:
    partner: np.ndarray  # int[M] (complementary pairs) or int[M, T] (random matching per example)
    pair_id: np.ndarray  # int[M]: the unit the target jackknife deletes
    n_pairs: int
    description: str


def _references(ids: list[str], member: np.ndarray, seed: int) -> _References:
    m = member.shape[0]
    partner = shadow_partners(ids, member)
    if partner is not None:
        return _References(partner, np.minimum(np.arange(m), partner), m // 2, (
            "leave-pair-out: each target is scored against every shadow but itself and its "
            "complementary partner (equal IN and OUT counts for every example)"))
    n_pairs = int(min(member.sum(0).min(), (~member).sum(0).min())) if m else 0
    return _References(random_partners(member, seed=[seed, 0x9A17]), np.arange(m), n_pairs, (
        "the shadows are not all in complementary pairs: per example, IN and OUT shadows "
        "are matched at random (seeded) and each target is scored without itself and its "
        "match; cells without a match are not scored"))


@dataclass(frozen=True)
class _Jackknife:
    """Target shadows grouped by pair and train examples grouped, for the two-way delete-a-group jackknife."""
    groups: np.ndarray  # int[M]
    n_groups: int
    ex_groups: np.ndarray  # int[T]
    n_ex_groups: int

    @property
    def dof(self) -> int:
        return min(self.n_groups, self.n_ex_groups) - 1

    def cells(self, shape) -> list[tuple[np.ndarray, int]]:
        """(group of every (target, example) cell, G) for both groupings."""
        return [(np.broadcast_to(self.groups[:, None], shape), self.n_groups),
                (np.broadcast_to(self.ex_groups[None, :], shape), self.n_ex_groups)]


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


def _curve(fig: dict, dof: int) -> RocCurve:
    if "grid_tpr_se" not in fig:
        return RocCurve(ROC_GRID, fig["grid_tpr"])
    half = float(stats.t.ppf(0.975, dof)) * fig["grid_tpr_se"]
    return RocCurve(ROC_GRID, fig["grid_tpr"], np.clip(fig["grid_tpr"] - half, 0, 1),
                    np.clip(fig["grid_tpr"] + half, 0, 1))


def lira_mode(conf_tr, member, setup: "ShadowSetup", mode: str) -> tuple[dict, RocCurve, np.ndarray]:
    """One LiRA mode's figures with their precision, as the report gives them -> (fields, curve, scores[M, T])."""
    jk = setup.jk
    scores = lira_leave_pair_out(conf_tr, member, setup.refs.partner, mode=mode, variance=setup.variance)
    ok = np.isfinite(scores)
    fig = roc_jackknife(scores[ok], member[ok], [(c[ok], k) for c, k in jk.cells(member.shape)], FPRS, ROC_GRID)
    return ({**_precision_fields(fig, jk.dof, member.shape[0]), "n_cells": int(ok.sum())}, _curve(fig, jk.dof),
            scores)


def _lira_modes(conf_tr, member, setup: "ShadowSetup", status) -> tuple[dict, dict, np.ndarray]:
    """Every LiRA mode's figures -> (section per mode, curves, the online scores)."""
    modes, curves = {}, {}
    for mode in LIRA_MODES:
        status(f"LiRA {mode} leave-pair-out")
        modes[mode], curves[f"LiRA {mode}"], scores = lira_mode(conf_tr, member, setup, mode)
        if mode == "online":
            online = scores
    return modes, curves, online


def _rmia(conf_tr, member, refs: _References, pop, jk: _Jackknife, rmia_a, rmia_gamma) -> tuple[dict, RocCurve | None]:
    """RMIA's figures -> (section, curve), or a message and no curve when the shadows are not in pairs."""
    if refs.partner.ndim != 1:
        return {"message": "RMIA with leave-pair-out references needs shadows in complementary pairs"}, None
    m, n_train = member.shape
    rs = rmia_leave_pair_out(conf_tr, member, refs.partner, pop, a=rmia_a, gamma=rmia_gamma)
    fig = roc_jackknife(rs.ravel(), member.ravel(), [(c.ravel(), k) for c, k in jk.cells(member.shape)], FPRS,
                        ROC_GRID)
    fewest = int(n_train - member.sum(1).max())
    population = (f"per target, the train examples it was not trained on (at least {fewest})"
                  + (f" and {pop.shape[1]} test examples" if pop is not None else ""))
    return ({**_precision_fields(fig, jk.dof, m), "a": rmia_a, "gamma": rmia_gamma, "population": population},
            _curve(fig, jk.dof))


def _vulnerability_se(scores, member, partner, groups, n_groups) -> float:
    """Jackknife SE of the mean vulnerability over target pairs: each replicate drops one group of pairs."""
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


def _vulnerability(online, member, refs: _References, jk: _Jackknife, forget_train,
                   example_ids_train) -> tuple[dict, np.ndarray]:
    """Per-example vulnerability from within-pair comparisons of the online scores -> (section, values)."""
    vul = pair_vulnerability(online, member, refs.partner)
    fin = vul[np.isfinite(vul)]
    chance = pair_vulnerability_null(refs.n_pairs, VULNERABLE) if refs.n_pairs else float("nan")
    ex_se = jackknife_se([np.nanmean(vul[jk.ex_groups != g]) for g in range(jk.n_ex_groups)])
    section = {
        "score": "LiRA online",
        "definition": ("per train example: the fraction of shadow pairs whose IN member scores above its OUT "
                       "member (ties 1/2), both scored leave-pair-out; chance 0.5"),
        "n_pairs": refs.n_pairs,
        "mean": float(fin.mean()) if fin.size else float("nan"),
        "mean_se": float(np.hypot(_vulnerability_se(online, member, refs.partner, jk.groups, jk.n_groups), ex_se)),
        "chance_mean": 0.5,
        f"fraction_ge_{VULNERABLE}": float((fin >= VULNERABLE).mean()) if fin.size else float("nan"),
        f"chance_fraction_ge_{VULNERABLE}": chance,
        "mean_forget": float(np.nanmean(vul[forget_train])) if forget_train.any() else float("nan"),
        "mean_retain": float(np.nanmean(vul[~forget_train])) if (~forget_train).any() else float("nan"),
        "most_vulnerable": [{"example_id": int(example_ids_train[i]), "vulnerability": float(vul[i])}
                            for i in np.argsort(-np.nan_to_num(vul, nan=-1.0), kind="stable")[:10]],
    }
    return section, vul


def _notes(section: dict) -> list[str]:
    notes = [section["message"]] if "message" in section else []
    if "message" in section.get("rmia", {}):
        notes.append(section["rmia"]["message"])
    if not section.get("references", "leave-pair-out").startswith("leave-pair-out"):
        notes.append(f"LiRA: {section['references']}")
    return notes


@dataclass(frozen=True)
class ShadowSetup:
    """How the shadows score each other: references, the variance rule and the jackknife groups."""
    refs: _References
    per_side: int  # the fewest IN (and OUT) references any train example keeps
    variance: str = ""  # per_example or global
    jk: _Jackknife | None = None
    message: str | None = None  # why LiRA cannot run (then variance and jk are unset)


def shadow_setup(ids: list[str], member: np.ndarray, seed: int = 0) -> ShadowSetup:
    """The references, variance rule and jackknife groups of the shadows ``ids`` with train membership
    member[M, T], or a message when they leave some example without an IN or an OUT reference."""
    m, n_train = member.shape
    refs = _references(ids, member, seed)
    n_in = member.sum(0)
    per_side = int(min(n_in.min(), (m - n_in).min())) - 1 if m else 0
    if per_side < 1:
        return ShadowSetup(refs, per_side, message=(
            f"LiRA needs at least 4 shadows in complementary pairs (every train example keeps >= 1 IN and >= 1 OUT "
            f"reference after leaving out the target and its partner); {m} usable shadows leave {max(per_side, 0)}"))
    variance = "per_example" if per_side >= PER_EXAMPLE_VARIANCE_MIN_REFS else "global"
    jk = _Jackknife(*assign_groups(refs.pair_id, JACKKNIFE_GROUPS, [seed, 0x1AC]),
                    *assign_groups(np.arange(n_train), JACKKNIFE_GROUPS, [seed, 0x1AD]))
    return ShadowSetup(refs, per_side, variance, jk)


def membership_section(ids: list[str], conf_tr: np.ndarray, member: np.ndarray, pop: np.ndarray | None,
                       forget_train: np.ndarray, example_ids_train: np.ndarray, *, seed: int = 0,
                       rmia_a: float = 0.3, rmia_gamma: float = 1.0,
                       status: Callable[[str], None] = lambda s: None) -> MembershipResult:
    """conf_tr[M, T, Q] and member bool[M, T] of the usable shadows on the train split, pop[M, Z, Q] on the
    test split (RMIA's extra population) -> MembershipResult."""
    m = member.shape[0]
    sec: dict = {"n_usable_shadows": m, "n_queries": int(conf_tr.shape[2])}
    setup = shadow_setup(ids, member, seed)
    sec["references"] = setup.refs.description
    if setup.message is not None:
        sec["message"] = setup.message
        return MembershipResult(sec, notes=_notes(sec))
    refs, jk = setup.refs, setup.jk
    n_in = member.sum(0)
    n_out = m - n_in
    sec["variance"] = setup.variance
    sec["variance_rule"] = (f"per_example when every train example keeps >= {PER_EXAMPLE_VARIANCE_MIN_REFS} IN and "
                            f"OUT references (64 shadows in pairs), else global (here {setup.per_side})")
    sec["precision"] = (f"95% intervals: two-way delete-a-group jackknife over {jk.n_groups} groups of target pairs "
                        f"and {jk.n_ex_groups} groups of examples (variances added; t with {jk.dof} degrees of "
                        "freedom)")
    sec["modes"], curves, online = _lira_modes(conf_tr, member, setup, status)
    status("RMIA leave-pair-out")
    sec["rmia"], rmia_curve = _rmia(conf_tr, member, refs, pop, jk, rmia_a, rmia_gamma)
    if rmia_curve is not None:
        curves["RMIA"] = rmia_curve
    status("per-example vulnerability")
    sec["vulnerability"], vul = _vulnerability(online, member, refs, jk, forget_train, example_ids_train)
    status("Gaussian check")
    sec["gaussian_check"] = gaussian_check(conf_tr, member)
    per_example = {"example_id": example_ids_train.astype(np.int32), "forget": forget_train,
                   "vulnerability": vul, "n_in": n_in.astype(np.int32), "n_out": n_out.astype(np.int32)}
    return MembershipResult(sec, curves, per_example, _notes(sec))
