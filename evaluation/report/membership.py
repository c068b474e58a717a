"""The report's membership-inference section: LiRA (online, offline, global) and RMIA over the shadows with
leave-pair-out references, per-example vulnerability from within-pair comparisons, precision (a jackknife
over target pairs and over examples), the Gaussian check of LiRA's assumption, and the shadows a target
precision needs.

Takes numpy arrays (evaluation.report.chunks reads the store) and returns a MembershipResult: the JSON
section, the ROC curves with their bands for the figure, the per-example table and the notes for the report.
The work splits by examples (evaluation.report.chunks runs it as jobs): chunk_scores computes everything that
depends on one example alone for a chunk of them (the LiRA scores of every mode, RMIA's likelihood ratios,
the vulnerability and its jackknife replicates, the Gaussian check's p-values), given a ChunkSetup that
carries the spreads variance="global" pools over every example; membership_from_chunks turns the stacked
chunks into the section: RMIA's counts against each target's population as jobs over blocks of targets
(rmia_counts_rows), then each attack's ROC with its jackknife as jobs over buckets of scores
(evaluation.roc.roc_jackknife), each job about the cells of a membership job.  membership_section does it
all in memory, as one chunk.

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

from ..lira import (gaussian_pvalues, gaussian_summary, lira_group_ssd, lira_leave_pair_out, pair_vulnerability,
                    pair_vulnerability_null, pooled_spreads, random_partners)
from ..precision import JACKKNIFE_GROUPS, assign_groups, jackknife_se, models_needed, t_interval
from ..rmia import rmia_counts_rows, rmia_pair_ratios, rmia_scored_targets
from ..roc import roc_jackknife

__all__ = ["MembershipResult", "RocCurve", "ShadowSetup", "membership_section", "too_few_shadows", "shadow_partners",
           "shadow_setup", "lira_mode", "attack_figures", "ChunkSetup", "chunk_setup", "ChunkScores", "chunk_scores",
           "stack_chunks", "membership_from_chunks", "setup_fields", "unscored", "vulnerability_replicates",
           "serial_map", "Map", "LIRA_MODES", "FPRS", "MIN_SHADOWS", "AUC_HALF_WIDTH", "PER_EXAMPLE_VARIANCE_MIN_REFS"]

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



def _precision_fields(fig: dict, dof: int, n_models: int) -> dict:
    """AUC and TPR intervals from the jackknife, the examples' part of each SE, and the shadows AUC +-
    AUC_HALF_WIDTH would need (-1: more shadows cannot reach it, the examples' part alone is wider)."""
    out = {"auc": fig["auc"], "tpr_at_fpr": fig["tpr_at_fpr"]}
    if "auc_se" in fig:
        out["auc_se"] = fig["auc_se"]
        out["auc_ci"] = t_interval(fig["auc"], fig["auc_se"], dof, lo=0.0, hi=1.0)
        out["tpr_at_fpr_se"] = fig["tpr_at_fpr_se"]
        out["tpr_at_fpr_ci"] = {a: t_interval(v, fig["tpr_at_fpr_se"][a], dof, lo=0.0, hi=1.0)
                                for a, v in fig["tpr_at_fpr"].items()}
        # the examples' part of the jackknife (the second grouping of _Jackknife.cells): more shadows sharpen
        # each example's score but do not change which examples there are, so it is a floor for them
        out["auc_se_examples"] = fig["auc_se_parts"][1]
        out["tpr_at_fpr_se_examples"] = {a: parts[1] for a, parts in fig["tpr_at_fpr_se_parts"].items()}
        need = models_needed(n_models, fig["auc_se"], AUC_HALF_WIDTH, floor=out["auc_se_examples"])
        out["shadows_for_auc_half_width"] = {"half_width": AUC_HALF_WIDTH, "shadows": need}
    return out


def _curve(fig: dict, dof: int) -> RocCurve:
    if "grid_tpr_se" not in fig:
        return RocCurve(ROC_GRID, fig["grid_tpr"])
    half = float(stats.t.ppf(0.975, dof)) * fig["grid_tpr_se"]
    return RocCurve(ROC_GRID, fig["grid_tpr"], np.clip(fig["grid_tpr"] - half, 0, 1),
                    np.clip(fig["grid_tpr"] + half, 0, 1))


def attack_figures(scores, member, jk: _Jackknife, rmia: tuple | None = None, *, cells_per_job: int | None = None,
                   map_jobs: "Map | None" = None) -> tuple[dict, int]:
    """One attack's pooled ROC figures with their jackknife standard errors (roc_jackknife over the scored
    cells) -> (figures, number of cells).  scores[M, T], member bool[M, T]; with ``rmia`` = (pop_ratio,
    partner, gamma), ``scores`` are RMIA's ratios over every train example (rmia_pair_ratios), counted
    against each target's population first (rmia_counts_rows).  With ``cells_per_job``, both run as jobs of
    ``map_jobs`` of about that many cells (blocks of targets, buckets of scores); without, here at once."""
    run = map_jobs or serial_map
    if rmia is not None:
        pop, partner, gamma = rmia
        scored = rmia_scored_targets(partner, member)
        rows = scores.shape[0] if cells_per_job is None else max(1, cells_per_job // max(1, scores.shape[1]))
        blocks = [(scores[a:a + rows], None if pop is None else pop[a:a + rows], member[a:a + rows],
                   scored[a:a + rows], gamma, a) for a in range(0, scores.shape[0], rows)]
        scores = np.concatenate(run(rmia_counts_rows, blocks)) if blocks else np.zeros(member.shape)
        del blocks
    ok = np.isfinite(scores)
    rows, cols = np.nonzero(ok)
    groupings = [(jk.groups[rows], jk.n_groups), (jk.ex_groups[cols], jk.n_ex_groups)]
    del rows, cols
    fig = roc_jackknife(scores[ok], member[ok], groupings, FPRS, ROC_GRID, cells_per_bucket=cells_per_job,
                        map_jobs=run)
    return fig, int(ok.sum())


def lira_mode(conf_tr, member, setup: "ShadowSetup", mode: str) -> tuple[dict, RocCurve, np.ndarray]:
    """One LiRA mode's figures with their precision, as the report gives them -> (fields, curve, scores[M, T])."""
    jk = setup.jk
    scores = lira_leave_pair_out(conf_tr, member, setup.refs.partner, mode=mode, variance=setup.variance)
    fig, n_cells = attack_figures(scores, member, jk)
    return {**_precision_fields(fig, jk.dof, member.shape[0]), "n_cells": n_cells}, _curve(fig, jk.dof), scores


def _rmia_fields(fig: dict, member, pop_size: int | None, jk: _Jackknife, rmia_a, rmia_gamma) -> dict:
    """RMIA's section from its figures (pop_size: the test examples in its population, None without them)."""
    m, n_train = member.shape
    fewest = int(n_train - member.sum(1).max())
    population = (f"per target, the train examples it was not trained on (at least {fewest})"
                  + (f" and {pop_size} test examples" if pop_size is not None else ""))
    return {**_precision_fields(fig, jk.dof, m), "a": rmia_a, "gamma": rmia_gamma, "population": population}


RMIA_UNPAIRED = {"message": "RMIA with leave-pair-out references needs shadows in complementary pairs"}


def vulnerability_replicates(scores, member, partner, groups, n_groups) -> np.ndarray:
    """Per-example vulnerability without each group of target pairs -> float64[G, T] (no rows when G < 2): the
    jackknife replicates of the mean vulnerability, per example, so chunks of examples can be stacked."""
    if n_groups < 2:
        return np.empty((0, member.shape[1]))
    reps = []
    for g in range(n_groups):
        drop = groups == g
        p = np.where(drop[:, None] if partner.ndim == 2 else drop, -1, partner)
        if partner.ndim == 2:  # a matched pair is dropped when either member is in the group
            p = np.where(np.take_along_axis(np.broadcast_to(drop[:, None], p.shape), np.maximum(partner, 0), 0)
                         & (partner >= 0), -1, p)
        reps.append(pair_vulnerability(scores, member, p))
    return np.array(reps)


def _vulnerability(vul, reps, refs: _References, jk: _Jackknife, forget_train, example_ids_train) -> dict:
    """The per-example vulnerability section from the values of every train example and their replicates."""
    fin = vul[np.isfinite(vul)]
    chance = pair_vulnerability_null(refs.n_pairs, VULNERABLE) if refs.n_pairs else float("nan")
    ex_se = jackknife_se([np.nanmean(vul[jk.ex_groups != g]) for g in range(jk.n_ex_groups)])
    pair_se = jackknife_se([float(np.nanmean(v)) for v in reps]) if jk.n_groups >= 2 else float("nan")
    return {
        "score": "LiRA online",
        "definition": ("per train example: the fraction of shadow pairs whose IN member scores above its OUT "
                       "member (ties 1/2), both scored leave-pair-out; chance 0.5"),
        "n_pairs": refs.n_pairs,
        "mean": float(fin.mean()) if fin.size else float("nan"),
        "mean_se": float(np.hypot(pair_se, ex_se)),
        "chance_mean": 0.5,
        f"fraction_ge_{VULNERABLE}": float((fin >= VULNERABLE).mean()) if fin.size else float("nan"),
        f"chance_fraction_ge_{VULNERABLE}": chance,
        "mean_forget": float(np.nanmean(vul[forget_train])) if forget_train.any() else float("nan"),
        "mean_retain": float(np.nanmean(vul[~forget_train])) if (~forget_train).any() else float("nan"),
        "most_vulnerable": [{"example_id": int(example_ids_train[i]), "vulnerability": float(vul[i])}
                            for i in np.argsort(-np.nan_to_num(vul, nan=-1.0), kind="stable")[:10]],
    }


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


# ------------------------------------------------------------------------------------ by chunks of examples
@dataclass(frozen=True)
class ChunkSetup:
    """What scoring a chunk of train examples needs of a ShadowSetup (small: no per-example array of all
    the examples), with the spreads variance="global" pools over every example."""
    partner: np.ndarray  # int[M], or int[M, C]: the chunk's columns of a per-example matching
    variance: str
    pooled: dict | None  # {"in", "out"} when variance is global
    groups: np.ndarray  # int[M]: the target-pair jackknife groups
    n_groups: int
    rmia_a: float
    workers: int | None = None  # LiRA's threads (None: its default)

    @property
    def rmia(self) -> bool:
        return self.partner.ndim == 1


def chunk_setup(setup: ShadowSetup, cols: slice, pooled: dict | None, rmia_a: float,
                workers: int | None = None) -> ChunkSetup:
    """The ChunkSetup of the train examples ``cols`` (a range of the train examples' positions)."""
    partner = setup.refs.partner
    return ChunkSetup(partner if partner.ndim == 1 else np.ascontiguousarray(partner[:, cols]), setup.variance,
                      pooled, setup.jk.groups, setup.jk.n_groups, rmia_a, workers)


@dataclass
class ChunkScores:
    """Per-example results of one chunk of train examples (and of test examples, RMIA's population)."""
    scores: dict[str, np.ndarray]  # LiRA mode -> float64[M, C]
    rmia_ratio: np.ndarray | None  # float64[M, C] (None when the shadows are not in pairs)
    rmia_pop: np.ndarray | None  # float64[M, Z]: the chunk's test examples (None without them)
    vulnerability: np.ndarray  # float64[C]
    vulnerability_reps: np.ndarray  # float64[G, C]
    p_in: np.ndarray  # float64[C]: the Gaussian check's p-values
    p_out: np.ndarray


def chunk_scores(conf_tr, member, pop, cs: ChunkSetup) -> ChunkScores:
    """Everything per example of a chunk: conf_tr[M, C, Q] and member bool[M, C] of its train examples, pop[M, Z,
    Q] of its test examples (or None).  Each value depends on its example alone (and on the pooled spreads), so
    the chunks of a split stacked equal the whole split scored at once, bit for bit."""
    scores = {mode: lira_leave_pair_out(conf_tr, member, cs.partner, mode=mode, variance=cs.variance,
                                        workers=cs.workers, pooled=cs.pooled) for mode in LIRA_MODES}
    ratio = pop_ratio = None
    if cs.rmia:
        ratio, pop_ratio = rmia_pair_ratios(conf_tr, member, cs.partner, pop, a=cs.rmia_a)
    vul = pair_vulnerability(scores["online"], member, cs.partner)
    reps = vulnerability_replicates(scores["online"], member, cs.partner, cs.groups, cs.n_groups)
    p_in, p_out = gaussian_pvalues(conf_tr, member)
    return ChunkScores(scores, ratio, pop_ratio, vul, reps, p_in, p_out)


def stack_chunks(parts: list[ChunkScores]) -> ChunkScores:
    """The chunks of a split, in order, as one (each part's arrays are released as they are stacked)."""
    def take(get):
        out = [get(p) for p in parts]
        return None if out[0] is None else np.concatenate(out, axis=-1)

    scores = {}
    for mode in LIRA_MODES:
        scores[mode] = np.concatenate([p.scores.pop(mode) for p in parts], axis=1)
    ratio, pop = take(lambda p: p.rmia_ratio), None
    pops = [p.rmia_pop for p in parts if p.rmia_pop is not None]
    if pops:
        pop = np.concatenate(pops, axis=1)
    return ChunkScores(scores, ratio, pop, take(lambda p: p.vulnerability), take(lambda p: p.vulnerability_reps),
                       take(lambda p: p.p_in), take(lambda p: p.p_out))


Map = Callable[[Callable, list[tuple]], list]


def serial_map(fn: Callable, args: list[tuple]) -> list:
    """The in-process map: fn(*a) for every argument tuple, in order."""
    return [fn(*a) for a in args]


def setup_fields(m: int, n_queries: int, setup: ShadowSetup) -> dict:
    """The section's first fields: the shadows, the references and, when LiRA can run, the variance rule and
    the precision's method (else the message why not)."""
    sec: dict = {"n_usable_shadows": m, "n_queries": int(n_queries), "references": setup.refs.description}
    if setup.message is not None:
        sec["message"] = setup.message
        return sec
    jk = setup.jk
    sec["variance"] = setup.variance
    sec["variance_rule"] = (f"per_example when every train example keeps >= {PER_EXAMPLE_VARIANCE_MIN_REFS} IN and "
                            f"OUT references (64 shadows in pairs), else global (here {setup.per_side})")
    sec["precision"] = (f"95% intervals: two-way delete-a-group jackknife over {jk.n_groups} groups of target pairs "
                        f"and {jk.n_ex_groups} groups of examples (variances added; t with {jk.dof} degrees of "
                        "freedom)")
    return sec


def unscored(m: int, n_queries: int, setup: ShadowSetup) -> MembershipResult:
    """The section of shadows whose setup has a message (LiRA cannot run)."""
    sec = setup_fields(m, n_queries, setup)
    return MembershipResult(sec, notes=_notes(sec))


def membership_from_chunks(ids: list[str], member: np.ndarray, n_queries: int, setup: ShadowSetup, s: ChunkScores,
                           pop_size: int | None, forget_train: np.ndarray, example_ids_train: np.ndarray, *,
                           rmia_a: float = 0.3, rmia_gamma: float = 1.0, map_jobs: Map = serial_map,
                           cells_per_job: int | None = None,
                           status: Callable[[str], None] = lambda s: None) -> MembershipResult:
    """The membership section from the per-example results of every train example (stack_chunks) of the usable
    shadows ``ids`` with train membership member[M, T] and their ShadowSetup (without a message); pop_size: the
    test examples in RMIA's population (None: none).  Each attack's figures run as jobs of ``map_jobs`` of about
    ``cells_per_job`` cells (attack_figures)."""
    m = member.shape[0]
    refs, jk = setup.refs, setup.jk
    sec = setup_fields(m, n_queries, setup)
    status("LiRA and RMIA figures")
    figs = [attack_figures(s.scores.pop(mode), member, jk, cells_per_job=cells_per_job, map_jobs=map_jobs)
            for mode in LIRA_MODES]
    if s.rmia_ratio is not None:
        figs.append(attack_figures(s.rmia_ratio, member, jk, (s.rmia_pop, refs.partner, rmia_gamma),
                                   cells_per_job=cells_per_job, map_jobs=map_jobs))
    s.rmia_ratio = s.rmia_pop = None
    sec["modes"], curves = {}, {}
    for mode, (fig, n_cells) in zip(LIRA_MODES, figs):
        sec["modes"][mode] = {**_precision_fields(fig, jk.dof, m), "n_cells": n_cells}
        curves[f"LiRA {mode}"] = _curve(fig, jk.dof)
    if len(figs) > len(LIRA_MODES):
        sec["rmia"] = _rmia_fields(figs[-1][0], member, pop_size, jk, rmia_a, rmia_gamma)
        curves["RMIA"] = _curve(figs[-1][0], jk.dof)
    else:
        sec["rmia"] = dict(RMIA_UNPAIRED)
    status("per-example vulnerability")
    sec["vulnerability"] = _vulnerability(s.vulnerability, s.vulnerability_reps, refs, jk, forget_train,
                                          example_ids_train)
    sec["gaussian_check"] = gaussian_summary(s.p_in, s.p_out)
    n_in = member.sum(0)
    per_example = {"example_id": example_ids_train.astype(np.int32), "forget": forget_train,
                   "vulnerability": s.vulnerability, "n_in": n_in.astype(np.int32),
                   "n_out": (m - n_in).astype(np.int32)}
    return MembershipResult(sec, curves, per_example, _notes(sec))


def membership_section(ids: list[str], conf_tr: np.ndarray, member: np.ndarray, pop: np.ndarray | None,
                       forget_train: np.ndarray, example_ids_train: np.ndarray, *, seed: int = 0,
                       rmia_a: float = 0.3, rmia_gamma: float = 1.0,
                       status: Callable[[str], None] = lambda s: None) -> MembershipResult:
    """conf_tr[M, T, Q] and member bool[M, T] of the usable shadows on the train split, pop[M, Z, Q] on the
    test split (RMIA's extra population) -> MembershipResult.  In memory, as one chunk of evaluate_store's."""
    m, n_q = member.shape[0], int(conf_tr.shape[2])
    setup = shadow_setup(ids, member, seed)
    if setup.message is not None:
        return unscored(m, n_q, setup)
    pooled = pooled_spreads(*lira_group_ssd(conf_tr, member)) if setup.variance == "global" else None
    status("LiRA, RMIA and the Gaussian check")
    s = chunk_scores(conf_tr, member, pop, chunk_setup(setup, slice(None), pooled, rmia_a))
    return membership_from_chunks(ids, member, n_q, setup, s, None if pop is None else pop.shape[1], forget_train,
                                  example_ids_train, rmia_a=rmia_a, rmia_gamma=rmia_gamma, status=status)
