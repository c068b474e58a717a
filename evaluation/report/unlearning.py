"""The report's section per unlearning method, against the retrained models: the competition's F with a
jackknife interval, F and F_null at equal model counts (the headline ratio), two-sample tests, U-LiRA with
folds grouped by parent, and the dependence between unlearned models made from the same original.

Takes numpy arrays (evaluation.report.evaluate reads the store).  Why each choice (measured on digits stores):
- Unlearned models from one original are not independent draws.  U-LiRA's folds mixed siblings and read
  0.735 on forget, retain and test examples alike (it learned the parent); grouped by parent it reads chance.
  Two-sample tests with 2 originals rejected on 0.93 of *control* examples.  So the number of originals is
  reported, U-LiRA refuses with fewer than 2 parents per fold, and the tests and F are repeated on one model
  per original where that leaves enough models.
- F depends on the model count (F_null 0.263 / 0.202 / 0.197 / 0.193 at 4 / 8 / 16 / 32 per side), and one
  split of the retrained models is a noisy draw; so the headline ratio compares F and F_null at the same count
  n, each averaged over many draws (evaluation.precision.equal_count_f).  F_null depends on the retrained models
  only, so RetrainedPool computes it once per count for the headline and every method.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..competition import (DELTA, final_score, forgetting_quality, forgetting_quality_from_epsilons,
                           per_example_epsilons)
from ..precision import (DRAW_GROUPS, JACKKNIFE_GROUPS, StatMap, assign_groups, equal_count_f, jackknife_se,
                         jackknife_stat, models_needed, serial_stats, t_interval)
from ..twosample import per_example_tests
from ..ulira import ulira_attack
from .utility import accuracies

__all__ = ["MethodModels", "MethodFigure", "MethodResult", "FNullResult", "RetrainedPool", "method_section",
           "competition_section", "unlearned_parents", "headline_f_null", "f_null_section", "equal_count_n",
           "F_HALF_WIDTH", "BH_Q", "N_LEAKING", "MIN_PARENTS_ONE_PER_PARENT"]

BH_Q = 0.05
N_LEAKING = 6
F_HALF_WIDTH = 0.02  # the precision the report sizes the model counts for
MIN_PARENTS_ONE_PER_PARENT = 4  # F with 3 or fewer models has at most one bucket; the tests have little power
ULIRA_FOLDS = 2
CI = 0.95


@dataclass(frozen=True)
class MethodModels:
    """Models (one method's unlearned ones, or the retrained ones) on the examples the statistics use."""
    ids: list[str]
    markers: list[dict]
    forget: np.ndarray  # float32[N, F, Q]: the forget examples used
    controls: dict[str, np.ndarray]  # "retain_control", "test_control" -> float32[N, C, Q]


@dataclass
class MethodFigure:
    """What the figures and the per-example table need of one method."""
    eps: np.ndarray | None = None  # per forget example
    competition: dict = field(default_factory=dict)  # the section's "competition"
    leaking: list = field(default_factory=list)  # (example id, epsilon, unlearned conf[N_u], retrained conf[N_r])
    per_example: dict | None = None  # the columns of per_example_<method>-<hash>.parquet


@dataclass(frozen=True)
class MethodResult:
    section: dict  # report.json's methods[<method>-<hash>], without utility and cost
    figure: MethodFigure
    notes: list[str]


@dataclass(frozen=True)
class FNullResult:
    section: dict  # report.json's "f_null"
    notes: list[str]


def equal_count_n(group_r: np.ndarray, n_groups: int, n_u: int | None = None,
                  group_u: np.ndarray | None = None) -> int:
    """The largest per-side count every equal-count draw can take: the models outside the largest group."""
    def outside(groups, total):
        return total - (int(np.bincount(groups).max()) if n_groups >= 2 else 0)
    n = outside(group_r, group_r.size) // 2
    if n_u is not None:
        n = min(n, outside(group_u, n_u))
    return n


def f_null_section(r_f0: np.ndarray, n: int, group_r: np.ndarray, n_groups: int, n_draws: int, seed,
                   map_stat: StatMap = serial_stats) -> dict:
    """F_null at n retrained models per side: the mean over draws of disjoint sets, its spread and SE."""
    res = equal_count_f(forgetting_quality, r_f0, group_r, n_groups, n, n_draws, [*np.atleast_1d(seed), 0xF0],
                        map_stat=map_stat)
    lo, hi = t_interval(res["mean"], res["se"], max(n_groups - 1, 1), CI, 0.0, 1.0)
    return {"f_null": res["mean"], "sd_over_draws": res["sd"], "se": res["se"], "ci_low": lo, "ci_high": hi,
            "n_per_side": n, "n_draws": n_draws, "n_groups": n_groups, "draws": res["draws"]}


class RetrainedPool:
    """The retrained models' query-0 confidences on the forget examples used, their groups for the equal-count
    draws and F_null at each (count, groups), each computed once and shared by the headline and every method.
    ``map_stat`` evaluates the forgetting scores behind F_null and every method's F interval and equal-count F
    (evaluation.report.chunks runs them as jobs)."""

    def __init__(self, forget0: np.ndarray, n_draws: int, seed: int, status: Callable[[str], None] = lambda s: None,
                 map_stat: StatMap = serial_stats):
        self.forget0 = forget0  # float64[N_r, F]
        self.n_draws, self.seed, self.status, self.map_stat = n_draws, seed, status, map_stat
        self._groups: dict[int, np.ndarray] = {}
        self._f_null: dict[tuple[int, int], dict] = {}

    @property
    def n_models(self) -> int:
        return self.forget0.shape[0]

    def groups(self, g: int) -> np.ndarray:
        """int[N_r]: the retrained models dealt into g groups (seeded by g)."""
        if g not in self._groups:
            self._groups[g] = assign_groups(np.arange(self.n_models), g, [self.seed, 0x6E, g])[0]
        return self._groups[g]

    def f_null(self, n: int, g: int) -> dict:
        """f_null_section at n models per side, draws dealt over g groups (one group when g < 2)."""
        if (n, g) not in self._f_null:
            self.status(f"F_null at {n} models per side")
            gr = self.groups(g) if g >= 2 else np.zeros(self.n_models, np.int64)
            self._f_null[n, g] = f_null_section(self.forget0, n, gr, g, self.n_draws, self.seed, self.map_stat)
        return self._f_null[n, g]


def headline_f_null(pool: RetrainedPool, n_forget: int) -> FNullResult:
    """F_null at the largest count the retrained models allow (the methods' sections carry F_null at their own
    count, usually the same)."""
    if n_forget == 0:
        return FNullResult({"message": "the store's forget set is empty"}, [])
    n_r = pool.n_models
    g = min(DRAW_GROUPS, n_r)
    n = equal_count_n(pool.groups(g), g) if g >= 2 else n_r // 2
    if n < 3 or pool.n_draws < 2:
        enough = next(k for k in range(4, 64) if (k - -(-k // DRAW_GROUPS)) // 2 >= 3)  # outside the largest group
        msg = (f"F_null needs at least 3 retrained models per side in every draw (here {n}: train at least {enough} "
               f"retrained models) and at least 2 draws (--n-boot, here {pool.n_draws})")
        return FNullResult({"message": msg}, [msg])
    return FNullResult({k: v for k, v in pool.f_null(n, g).items() if k != "draws"}, [])


def unlearned_parents(u_markers: list[dict], u_ids: list[str]) -> np.ndarray:
    """str[N]: each unlearned model's original (its own id when the marker names none)."""
    return np.array([str(mk.get("parent") or mid) for mk, mid in zip(u_markers, u_ids)])


def _dependence_note(key: str, n_u: int, n_par: int) -> str | None:
    if n_par >= n_u:
        return None
    note = (f"{key}: {n_u} unlearned models come from {n_par} original(s) ({n_u / n_par:.1f} per original); "
            "models of one original are not independent draws, which the two-sample tests and F assume; "
            "read the rows on one model per original")
    if n_par < MIN_PARENTS_ONE_PER_PARENT:
        note += (f", which need at least {MIN_PARENTS_ONE_PER_PARENT} originals (have {n_par}): train more "
                 "originals (counts.original) for tests that hold")
    return note


def _epsilon_summary(eps: np.ndarray) -> dict:
    return {"mean": float(eps.mean()), "median": float(np.median(eps)), "max": float(eps.max()),
            "fraction_at_cap": float((eps >= 50).mean()),
            "quantiles": {str(q): float(np.quantile(eps, q)) for q in (0.1, 0.5, 0.9)}}


def _f_interval(f: float, u0, r0, parents, seed: int, status, map_stat: StatMap) -> dict:
    """F's jackknife interval: groups of whole originals on the unlearned side, deleted with a group of
    retrained models; and the models F +- F_HALF_WIDTH would need."""
    n_u, n_r = u0.shape[0], r0.shape[0]
    gu, g = assign_groups(parents, min(JACKKNIFE_GROUPS, n_r), [seed, 0x6F])
    gr, _ = assign_groups(np.arange(n_r), g, [seed, 0x6E])
    if not (g >= 2 and n_u - np.bincount(gu).max() >= 2 and n_r - np.bincount(gr).max() >= 2):
        return {"interval_message": (f"no interval for F: the jackknife needs at least 2 originals and 2 models "
                                     f"left after deleting a group (have {np.unique(parents).size} originals)")}
    status("F jackknife")
    _, reps = jackknife_stat(forgetting_quality, u0, r0, gu, gr, g, map_stat, estimate=f)
    se = jackknife_se(reps)
    lo, hi = t_interval(f, se, g - 1, CI, 0.0, 1.0)
    return {"se": se, "ci_low": lo, "ci_high": hi,
            "interval": f"{int(CI * 100)}% delete-a-group jackknife, {g} groups (whole originals)",
            "models_for_f_half_width": {"half_width": F_HALF_WIDTH, "unlearned": models_needed(n_u, se, F_HALF_WIDTH),
                                        "retrained": models_needed(n_r, se, F_HALF_WIDTH)}}


def _equal_count(key: str, u0, r0, parents, pool: RetrainedPool, seed: int, status) -> tuple[dict | None, str | None]:
    """F and F_null at the same count n per side, their ratio (the headline) and its interval
    -> (section, None) or (None, why not)."""
    gu, g = assign_groups(parents, min(DRAW_GROUPS, r0.shape[0]), [seed, 0xEC])
    gr = pool.groups(g) if g >= 2 else np.zeros(r0.shape[0], np.int64)
    n = equal_count_n(gr, g, u0.shape[0], gu)
    if n < 3 or pool.n_draws < 2:
        return None, (f"{key}: no equal-count comparison with F_null: it needs at least 3 models per side in every "
                      f"draw (have {n}) and at least 2 draws (have {pool.n_draws})")
    status(f"F and F_null at {n} models per side")
    null = pool.f_null(n, g)
    res = equal_count_f(forgetting_quality, r0, gr, g, n, pool.n_draws, [seed, 0xEC, 1], u=u0, group_u=gu,
                        map_stat=pool.map_stat)
    dof = max(g - 1, 1)
    ec = {"n_per_side": n, "n_draws": pool.n_draws, "n_groups": g,
          "f": res["mean"], "f_sd_over_draws": res["sd"], "f_se": res["se"],
          "f_null": null["f_null"], "f_null_sd_over_draws": null["sd_over_draws"], "f_null_se": null["se"]}
    ec["f_ci"] = t_interval(res["mean"], res["se"], dof, CI, 0.0, 1.0)
    ec["f_null_ci"] = (null["ci_low"], null["ci_high"])
    if null["f_null"] > 0:
        ratio = res["mean"] / null["f_null"]
        # delta method, the two treated as independent (they share the retrained pool)
        rse = ratio * float(np.hypot(res["se"] / res["mean"] if res["mean"] > 0 else 0.0,
                                     null["se"] / null["f_null"]))
        ec["ratio"], ec["ratio_se"] = ratio, rse
        ec["ratio_ci"] = t_interval(ratio, rse, dof, CI, 0.0)
    if g < 2:
        ec["interval_note"] = "one original: the intervals hold the Monte Carlo error of the draws only"
    return ec, None


def _final_score(key: str, f: float, u_markers: list[dict], r_markers: list[dict]) -> dict:
    """The final score with the markers' mean retain and test accuracies, or why there is none."""
    ra_u, ta_u = accuracies(u_markers, "retain"), accuracies(u_markers, "test")
    ra_r, ta_r = accuracies(r_markers, "retain"), accuracies(r_markers, "test")
    try:
        score = final_score(f, ra_u, ta_u, ra_r, ta_r)
    except ValueError as exc:
        return {"final_score_message": f"{key}: no final score: {exc}"}
    return {"final_score": score,
            "accuracies": {"retain_unlearned": float(np.mean(ra_u)), "test_unlearned": float(np.mean(ta_u)),
                           "retain_retrained": float(np.mean(ra_r)), "test_retrained": float(np.mean(ta_r))}}


def competition_section(key: str, u0, r0, parents, u_markers, r_markers, pool: RetrainedPool, seed: int,
                        status) -> tuple[dict, np.ndarray, list[str]]:
    """The competition's F on every model with its interval, F / F_null at equal counts and the final score
    -> (section, per-example epsilons, notes)."""
    status("epsilons and F")
    eps = per_example_epsilons(u0, r0, DELTA)
    f = forgetting_quality_from_epsilons(eps, u0.shape[0])
    comp: dict = {"forgetting_quality": f, "delta": DELTA, "epsilon": _epsilon_summary(eps)}
    comp.update(_f_interval(f, u0, r0, parents, seed, status, pool.map_stat))
    notes = []
    ec, why_not = _equal_count(key, u0, r0, parents, pool, seed, status)
    if ec is None:
        comp["equal_count_message"] = why_not
        notes.append(why_not)
    else:
        comp["equal_count"] = ec
    comp.update(_final_score(key, f, u_markers, r_markers))
    if "final_score_message" in comp:
        notes.append(comp["final_score_message"])
    return comp, eps, notes


def _tests(u: np.ndarray, r: np.ndarray, controls: dict) -> dict:
    """KS / Mann-Whitney with BH on the forget examples and on each control sample."""
    out = {"q": BH_Q}
    for name, (uc, rc) in {"forget": (u, r), **controls}.items():
        if uc.shape[1] == 0:
            out[name] = {"message": f"no {name.split('_')[0]} examples to sample"}
            continue
        t = per_example_tests(uc, rc, BH_Q)
        out[name] = {"n_examples": int(uc.shape[1]), "ks_fraction": t["ks_fraction"], "mw_fraction": t["mw_fraction"]}
    return out


def _leaking(u0, r0, eps, example_ids) -> tuple[list[dict], list[tuple], dict]:
    """The most leaking forget examples (by epsilon, then KS statistic) -> (section rows, figure data,
    per-example columns)."""
    tests = per_example_tests(u0, r0, BH_Q)
    order = np.lexsort((-tests["ks_stat"], -eps))[:N_LEAKING]
    rows = [{"example_id": int(example_ids[i]), "epsilon": float(eps[i]), "ks_p": float(tests["ks_p"][i]),
             "mw_p": float(tests["mw_p"][i])} for i in order]
    figure = [(int(example_ids[i]), float(eps[i]), u0[:, i], r0[:, i]) for i in order]
    per_example = {"example_id": example_ids.astype(np.int32), "epsilon": eps, "ks_p": tests["ks_p"],
                   "mw_p": tests["mw_p"], "ks_reject": tests["ks_reject"], "mw_reject": tests["mw_reject"]}
    return rows, figure, per_example


def _one_per_original(u0, r0, ctrl0, parents, status) -> dict:
    """F and the tests on the first model (in id order) of every original."""
    n_par = int(np.unique(parents).size)
    if n_par < MIN_PARENTS_ONE_PER_PARENT:
        return {"message": f"needs at least {MIN_PARENTS_ONE_PER_PARENT} originals, have {n_par}"}
    status("one model per original")
    one = np.sort(np.unique(parents, return_index=True)[1])
    return {"n_unlearned": int(one.size), "forgetting_quality": forgetting_quality(u0[one], r0),
            "two_sample": _tests(u0[one], r0, {k: (a[one], b) for k, (a, b) in ctrl0.items()})}


def _ulira(key: str, unlearned: MethodModels, retrained: MethodModels, parents, seed: int,
           status) -> tuple[dict, np.ndarray | None, list[str]]:
    """U-LiRA on the forget examples and, beside it, the same attack on retain and test control examples
    -> (section, per-example accuracy on the forget examples, notes)."""
    n_par = int(np.unique(parents).size)
    n_r = retrained.forget.shape[0]
    need = 2 * ULIRA_FOLDS
    if n_par < need or n_r < need:
        msg = (f"{key}: U-LiRA needs at least {need} originals behind the unlearned models ({ULIRA_FOLDS} folds of "
               f">= 2, grouped by original so siblings never sit on both sides) and {need} retrained models; have "
               f"{n_par} originals and {n_r} retrained")
        return {"message": msg}, None, [msg]
    status("U-LiRA")
    out = {"folds": ULIRA_FOLDS, "grouped_by": "original", "n_originals": n_par,
           "queries": int(unlearned.forget.shape[2])}
    per_example = None
    for name, (u, r) in {"forget": (unlearned.forget, retrained.forget),
                         **{k: (unlearned.controls[k], retrained.controls[k]) for k in unlearned.controls}}.items():
        if u.shape[1] == 0:
            continue
        res = ulira_attack(u, r, folds=ULIRA_FOLDS, seed=seed, groups_unlearned=parents)
        out[name] = {"accuracy": res["accuracy"], "n_examples": int(u.shape[1])}
        if name == "forget":
            per_example = res["per_example_accuracy"]
    out["accuracy"] = out["forget"]["accuracy"]
    return out, per_example, []


def method_section(key: str, method: str, hparams: dict, unlearned: MethodModels, retrained: MethodModels,
                   pool: RetrainedPool, example_ids: np.ndarray, seed: int,
                   status: Callable[[str], None] = lambda s: None) -> MethodResult:
    """One method's section against the retrained models (``pool`` holds their forget confidences and F_null);
    ``example_ids``: the forget examples used."""
    def stage(what: str) -> None:
        status(f"{key}: {what}")

    n_u, n_r = len(unlearned.ids), retrained.forget.shape[0]
    parents = unlearned_parents(unlearned.markers, unlearned.ids)
    n_par = int(np.unique(parents).size)
    sec: dict = {"method": method, "hparams_hash": key.rsplit("-", 1)[-1], "hparams": hparams,
                 "n_unlearned": n_u, "n_retrained": n_r, "n_originals": n_par,
                 "forget_examples_used": int(unlearned.forget.shape[1])}
    notes, figure = [], MethodFigure()
    if (dependence := _dependence_note(key, n_u, n_par)) is not None:
        sec["dependence"] = dependence
        notes.append(dependence)
    u0 = np.ascontiguousarray(unlearned.forget[..., 0], dtype=np.float64)
    r0 = np.ascontiguousarray(retrained.forget[..., 0], dtype=np.float64)
    ctrl0 = {k: (np.asarray(unlearned.controls[k][..., 0], np.float64),
                 np.asarray(retrained.controls[k][..., 0], np.float64)) for k in unlearned.controls}
    if n_u < 2 or n_r < 2:
        msg = (f"{key}: the competition score and the two-sample tests need at least 2 unlearned and 2 retrained "
               f"models; usable: {n_u} unlearned, {n_r} retrained")
        notes.append(msg)
        sec["competition"] = sec["two_sample"] = {"message": msg}
    else:
        sec["competition"], eps, competition_notes = competition_section(key, u0, r0, parents, unlearned.markers,
                                                                         retrained.markers, pool, seed, stage)
        notes += competition_notes
        stage("two-sample tests")
        sec["most_leaking"], leaking, per_example = _leaking(u0, r0, eps, example_ids)
        figure = MethodFigure(eps, sec["competition"], leaking, per_example)
        sec["two_sample"] = _tests(u0, r0, ctrl0)
        if n_par < n_u:
            sec["one_per_original"] = _one_per_original(u0, r0, ctrl0, parents, stage)
    sec["ulira"], ulira_per_example, ulira_notes = _ulira(key, unlearned, retrained, parents, seed, stage)
    notes += ulira_notes
    if figure.per_example is not None and ulira_per_example is not None:
        figure.per_example["ulira_accuracy"] = ulira_per_example
    return MethodResult(sec, figure, notes)
