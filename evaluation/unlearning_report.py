"""The report's section per unlearning method, against the retrained models: the competition's F with a
jackknife interval, F and F_null at equal model counts (the headline ratio), two-sample tests, U-LiRA with
folds grouped by parent, and the dependence between unlearned models made from the same original.

Takes numpy arrays (evaluation.report reads the store).  Why each choice (measured on digits stores):
- Unlearned models from one original are not independent draws.  U-LiRA's folds mixed siblings and read
  0.735 on forget, retain and test examples alike (it learned the parent); grouped by parent it reads chance.
  Two-sample tests with 2 originals rejected on 0.93 of *control* examples.  So the number of originals is
  reported, U-LiRA refuses with fewer than 2 parents per fold, and the tests and F are repeated on one model
  per original where that leaves enough models.
- F depends on the model count (F_null 0.263 / 0.202 / 0.197 / 0.193 at 4 / 8 / 16 / 32 per side), and one
  split of the retrained models is a noisy draw; so the headline ratio compares F and F_null at the same count
  n, each averaged over many draws (evaluation.precision.equal_count_f).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .competition import (DELTA, final_score, forgetting_quality, forgetting_quality_from_epsilons,
                          per_example_epsilons)
from .precision import (DRAW_GROUPS, JACKKNIFE_GROUPS, assign_groups, equal_count_f, jackknife_se, jackknife_stat,
                        models_needed, t_interval)
from .twosample import per_example_tests
from .ulira import ulira_attack

__all__ = ["method_section", "f_null_section", "equal_count_n", "F_HALF_WIDTH", "BH_Q", "N_LEAKING",
           "MIN_PARENTS_ONE_PER_PARENT"]

BH_Q = 0.05
N_LEAKING = 6
F_HALF_WIDTH = 0.02  # the precision the report sizes the model counts for
MIN_PARENTS_ONE_PER_PARENT = 4  # F with 3 or fewer models has at most one bucket; the tests have little power
ULIRA_FOLDS = 2
CI = 0.95


def equal_count_n(group_r: np.ndarray, n_groups: int, n_u: int | None = None,
                  group_u: np.ndarray | None = None) -> int:
    """The largest per-side count every equal-count draw can take: the models outside the largest group."""
    def outside(groups, total):
        return total - (int(np.bincount(groups).max()) if n_groups >= 2 else 0)
    n = outside(group_r, group_r.size) // 2
    if n_u is not None:
        n = min(n, outside(group_u, n_u))
    return n


def f_null_section(r_f0: np.ndarray, n: int, group_r: np.ndarray, n_groups: int, n_draws: int, seed) -> dict:
    """F_null at n retrained models per side: the mean over draws of disjoint sets, its spread and SE."""
    res = equal_count_f(forgetting_quality, r_f0, group_r, n_groups, n, n_draws, [*np.atleast_1d(seed), 0xF0])
    lo, hi = t_interval(res["mean"], res["se"], max(n_groups - 1, 1), CI, 0.0, 1.0)
    return {"f_null": res["mean"], "sd_over_draws": res["sd"], "se": res["se"], "ci_low": lo, "ci_high": hi,
            "n_per_side": n, "n_draws": n_draws, "n_groups": n_groups, "draws": res["draws"]}


def _parents(u_markers: list[dict], u_ids: list[str]) -> np.ndarray:
    return np.array([str(mk.get("parent") or mid) for mk, mid in zip(u_markers, u_ids)])


def _one_per_parent(parents: np.ndarray) -> np.ndarray:
    """Index of the first model (in id order) of every parent."""
    _, first = np.unique(parents, return_index=True)
    return np.sort(first)


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


def method_section(key: str, method: str, hparams: dict, u_ids: list[str], u_markers: list[dict], u_forget: np.ndarray,
                   u_controls: dict, r_markers: list[dict], r_forget: np.ndarray, r_controls: dict,
                   group_r: Callable, f_null_cache: Callable, n_draws: int, seed: int, example_ids: np.ndarray,
                   status: Callable[[str], None] = lambda s: None) -> tuple[dict, dict, list[str]]:
    """One method's section.  u_forget[N_u, F, Q], r_forget[N_r, F, Q]: confidences on the forget examples used;
    u_controls / r_controls: name -> [N, C, Q] on control samples (retain, test); group_r(G) -> int[N_r]: the
    retrained models' G groups (shared by every method); f_null_cache(n, G) -> f_null_section.
    Returns (section, figure data, messages)."""
    messages: list[str] = []
    n_u, n_r = len(u_ids), r_forget.shape[0]
    parents = _parents(u_markers, u_ids)
    n_par = int(np.unique(parents).size)
    sec: dict = {"method": method, "hparams_hash": key.rsplit("-", 1)[-1], "hparams": hparams,
                 "n_unlearned": n_u, "n_retrained": n_r, "n_originals": n_par,
                 "forget_examples_used": int(u_forget.shape[1])}
    fig: dict = {}
    if n_par < n_u:
        note = (f"{key}: {n_u} unlearned models come from {n_par} original(s) ({n_u / n_par:.1f} per original); "
                "models of one original are not independent draws, which the two-sample tests and F assume; "
                "read the rows on one model per original")
        if n_par < MIN_PARENTS_ONE_PER_PARENT:
            note += (f", which need at least {MIN_PARENTS_ONE_PER_PARENT} originals (have {n_par}): train more "
                     "originals (counts.original) for tests that hold")
        sec["dependence"] = note
        messages.append(note)
    u0 = np.ascontiguousarray(u_forget[..., 0], dtype=np.float64)
    r0 = np.ascontiguousarray(r_forget[..., 0], dtype=np.float64)
    ctrl0 = {k: (np.asarray(u_controls[k][..., 0], np.float64), np.asarray(r_controls[k][..., 0], np.float64))
             for k in u_controls}
    if n_u < 2 or n_r < 2:
        msg = (f"{key}: the competition score and the two-sample tests need at least 2 unlearned and 2 retrained "
               f"models; usable: {n_u} unlearned, {n_r} retrained")
        messages.append(msg)
        sec["competition"] = sec["two_sample"] = {"message": msg}
    else:
        status(f"{key}: epsilons and F")
        eps = per_example_epsilons(u0, r0, DELTA)
        f = forgetting_quality_from_epsilons(eps, n_u)
        comp: dict = {"forgetting_quality": f, "delta": DELTA,
                      "epsilon": {"mean": float(eps.mean()), "median": float(np.median(eps)), "max": float(eps.max()),
                                  "fraction_at_cap": float((eps >= 50).mean()),
                                  "quantiles": {str(q): float(np.quantile(eps, q)) for q in (0.1, 0.5, 0.9)}}}
        # jackknife of F: groups of whole originals on the unlearned side, deleted with a group of retrained
        gu, g = assign_groups(parents, min(JACKKNIFE_GROUPS, n_r), [seed, 0x6F])
        gr, _ = assign_groups(np.arange(n_r), g, [seed, 0x6E])
        if g >= 2 and n_u - np.bincount(gu).max() >= 2 and n_r - np.bincount(gr).max() >= 2:
            status(f"{key}: F jackknife")
            _, reps = jackknife_stat(forgetting_quality, u0, r0, gu, gr, g)
            se = jackknife_se(reps)
            comp["se"] = se
            comp["ci_low"], comp["ci_high"] = t_interval(f, se, g - 1, CI, 0.0, 1.0)
            comp["interval"] = f"{int(CI * 100)}% delete-a-group jackknife, {g} groups (whole originals)"
            comp["models_for_f_half_width"] = {"half_width": F_HALF_WIDTH,
                                               "unlearned": models_needed(n_u, se, F_HALF_WIDTH),
                                               "retrained": models_needed(n_r, se, F_HALF_WIDTH)}
        else:
            comp["interval_message"] = (f"no interval for F: the jackknife needs at least 2 originals and 2 models "
                                        f"left after deleting a group (have {n_par} originals)")
        _equal_count(comp, key, u0, r0, parents, group_r, f_null_cache, n_draws, seed, status, messages)
        ra_u, ta_u = _accs(u_markers, "retain"), _accs(u_markers, "test")
        ra_r, ta_r = _accs(r_markers, "retain"), _accs(r_markers, "test")
        try:
            comp["final_score"] = final_score(f, ra_u, ta_u, ra_r, ta_r)
            comp["accuracies"] = {"retain_unlearned": float(np.mean(ra_u)), "test_unlearned": float(np.mean(ta_u)),
                                  "retain_retrained": float(np.mean(ra_r)), "test_retrained": float(np.mean(ta_r))}
        except ValueError as exc:
            msg = f"{key}: no final score: {exc}"
            comp["final_score_message"] = msg
            messages.append(msg)
        sec["competition"] = comp
        fig["eps"], fig["f"] = eps, comp
        status(f"{key}: two-sample tests")
        tests = per_example_tests(u0, r0, BH_Q)
        order = np.lexsort((-tests["ks_stat"], -eps))[:N_LEAKING]
        sec["most_leaking"] = [{"example_id": int(example_ids[i]), "epsilon": float(eps[i]),
                                "ks_p": float(tests["ks_p"][i]), "mw_p": float(tests["mw_p"][i])} for i in order]
        fig["leaking"] = [(int(example_ids[i]), float(eps[i]), u0[:, i], r0[:, i]) for i in order]
        sec["two_sample"] = _tests(u0, r0, ctrl0)
        fig["per_example"] = {"example_id": example_ids.astype(np.int32), "epsilon": eps,
                              "ks_p": tests["ks_p"], "mw_p": tests["mw_p"],
                              "ks_reject": tests["ks_reject"], "mw_reject": tests["mw_reject"]}
        if n_par < n_u:
            one = _one_per_parent(parents)
            if n_par >= MIN_PARENTS_ONE_PER_PARENT:
                status(f"{key}: one model per original")
                sec["one_per_original"] = {
                    "n_unlearned": int(one.size),
                    "forgetting_quality": forgetting_quality(u0[one], r0),
                    "two_sample": _tests(u0[one], r0, {k: (a[one], b) for k, (a, b) in ctrl0.items()})}
            else:
                sec["one_per_original"] = {"message": f"needs at least {MIN_PARENTS_ONE_PER_PARENT} originals, "
                                                      f"have {n_par}"}
    sec["ulira"] = _ulira(key, u_forget, r_forget, u_controls, r_controls, parents, seed, messages, status)
    if "per_example" in fig and "per_example_accuracy" in sec["ulira"].get("forget", {}):
        fig["per_example"]["ulira_accuracy"] = sec["ulira"]["forget"].pop("per_example_accuracy")
    for k in ("retain_control", "test_control"):
        sec["ulira"].get(k, {}).pop("per_example_accuracy", None)
    return sec, fig, messages


def _equal_count(comp, key, u0, r0, parents, group_r, f_null_cache, n_draws, seed, status, messages) -> None:
    """F and F_null at the same count n per side, their ratio (the headline) and its interval."""
    gu, g = assign_groups(parents, min(DRAW_GROUPS, r0.shape[0]), [seed, 0xEC])
    gr = group_r(g) if g >= 2 else np.zeros(r0.shape[0], np.int64)
    n = equal_count_n(gr, g, u0.shape[0], gu)
    if n < 3 or n_draws < 2:
        msg = (f"{key}: no equal-count comparison with F_null: it needs at least 3 models per side in every draw "
               f"(have {n}) and at least 2 draws (have {n_draws})")
        comp["equal_count_message"] = msg
        messages.append(msg)
        return
    status(f"{key}: F and F_null at {n} models per side")
    null = f_null_cache(n, g)
    res = equal_count_f(forgetting_quality, r0, gr, g, n, n_draws, [seed, 0xEC, 1], u=u0, group_u=gu)
    dof = max(g - 1, 1)
    ec = {"n_per_side": n, "n_draws": n_draws, "n_groups": g,
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
    comp["equal_count"] = ec


def _ulira(key, u_forget, r_forget, u_controls, r_controls, parents, seed, messages, status) -> dict:
    """U-LiRA on the forget examples and, beside it, the same attack on retain and test control examples."""
    n_par = int(np.unique(parents).size)
    need = 2 * ULIRA_FOLDS
    if n_par < need or r_forget.shape[0] < need:
        msg = (f"{key}: U-LiRA needs at least {need} originals behind the unlearned models ({ULIRA_FOLDS} folds of "
               f">= 2, grouped by original so siblings never sit on both sides) and {need} retrained models; have "
               f"{n_par} originals and {r_forget.shape[0]} retrained")
        messages.append(msg)
        return {"message": msg}
    status(f"{key}: U-LiRA")
    out = {"folds": ULIRA_FOLDS, "grouped_by": "original", "n_originals": n_par, "queries": int(u_forget.shape[2])}
    for name, (u, r) in {"forget": (u_forget, r_forget),
                         **{k: (u_controls[k], r_controls[k]) for k in u_controls}}.items():
        if u.shape[1] == 0:
            continue
        res = ulira_attack(u, r, folds=ULIRA_FOLDS, seed=seed, groups_unlearned=parents)
        out[name] = {"accuracy": res["accuracy"], "n_examples": int(u.shape[1]),
                     "per_example_accuracy": res["per_example_accuracy"]}
    out["accuracy"] = out["forget"]["accuracy"]
    return out


def _accs(markers: list[dict], split: str) -> list[float]:
    return [float(mk["accuracy"][split]) for mk in markers
            if isinstance(mk.get("accuracy"), dict) and mk["accuracy"].get(split) is not None]
