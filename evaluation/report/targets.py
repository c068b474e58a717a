"""The report's headline figures that a precision-driven run aims at (`targets` in a spec), computed alone:
only the models and examples each needs, with the report's own functions, examples and seeds, so every
value and standard error equals what `ufarm evaluate` (with its defaults) writes for the same store.

    lira_auc, lira_tpr_at_1pct, lira_tpr_at_0.1pct : LiRA online over the shadows, leave-pair-out, with the
        two-way jackknife SE (report.json lira.modes.online: auc, auc_se, tpr_at_fpr, tpr_at_fpr_se) and its
        examples' part (auc_se_examples, tpr_at_fpr_se_examples), which more shadows do not shrink
    f        : the competition's F of each method on every model, jackknife over whole originals
               (methods.<key>.competition: forgetting_quality, se)
    f_ratio  : F / F_null at equal model counts (methods.<key>.competition.equal_count: ratio, ratio_se)
    f_null   : F_null at the largest count the retrained models allow (f_null: f_null, se)

A figure that cannot be computed yet (too few models) has value and se NaN and a message saying why.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .evaluate import DEFAULT_MAX_EXAMPLES, DEFAULT_N_BOOT, select_examples
from .membership import lira_mode, shadow_setup
from .store_io import RunContents, open_run, read_conf
from .unlearning import RetrainedPool, competition_section, headline_f_null, unlearned_parents

__all__ = ["FIGURES", "Reading", "read_figures"]

# figure -> where report.json holds it
FIGURES = {
    "lira_auc": "lira.modes.online.auc",
    "lira_tpr_at_1pct": "lira.modes.online.tpr_at_fpr[0.01]",
    "lira_tpr_at_0.1pct": "lira.modes.online.tpr_at_fpr[0.001]",
    "f": "methods.<method>.competition.forgetting_quality",
    "f_ratio": "methods.<method>.competition.equal_count.ratio",
    "f_null": "f_null.f_null",
}
_LIRA_FPR = {"lira_tpr_at_1pct": 0.01, "lira_tpr_at_0.1pct": 0.001}
_NAN = float("nan")


@dataclass(frozen=True)
class Reading:
    """One figure (of one method, for the per-method ones) as the report would state it."""
    figure: str
    method: str | None  # <method>-<hparams hash> for f and f_ratio, else None
    value: float
    se: float  # NaN when the figure has no standard error yet
    models: dict  # role -> the models it was computed from
    message: str | None = None  # why value or se is missing
    se_floor: float = 0.0  # the part of se that more models do not shrink (LiRA's: the examples' part)


def _lira(run: RunContents, train: np.ndarray, figures: list[str], seed: int) -> list[Reading]:
    shadows = run.by_role.get("shadow", [])
    read = read_conf(run, shadows) if shadows else None
    ids = read.model_ids if read else []
    if len(ids) < 4:
        why = f"LiRA needs at least 4 usable shadows in complementary pairs, the store has {len(ids)}"
        return [Reading(f, None, _NAN, _NAN, {"shadow": len(ids)}, why) for f in figures]
    member = read.trained_on[:, train]
    setup = shadow_setup(ids, member, seed)
    if setup.message is not None:
        return [Reading(f, None, _NAN, _NAN, {"shadow": len(ids)}, setup.message) for f in figures]
    fields, _, _ = lira_mode(read.conf[:, train], member, setup, "online")
    out = []
    for f in figures:
        if f == "lira_auc":
            value, se, floor = fields["auc"], fields.get("auc_se", _NAN), fields.get("auc_se_examples", _NAN)
        else:
            a = _LIRA_FPR[f]
            value, se = fields["tpr_at_fpr"][a], fields.get("tpr_at_fpr_se", {}).get(a, _NAN)
            floor = fields.get("tpr_at_fpr_se_examples", {}).get(a, _NAN)
        out.append(Reading(f, None, float(value), float(se), {"shadow": len(ids)}, se_floor=float(floor)))
    return out


def _method_readings(run: RunContents, key: str, forget: np.ndarray, retrained, pool: RetrainedPool,
                     figures: list[str], seed: int) -> list[Reading]:
    u = read_conf(run, run.groups[key].model_ids)
    n_u, n_r = len(u.model_ids), pool.n_models
    models = {"unlearned": n_u, "retrain": n_r}
    if n_u < 2 or n_r < 2:
        why = f"{key}: F needs at least 2 unlearned and 2 retrained models; usable: {n_u} unlearned, {n_r} retrained"
        return [Reading(f, key, _NAN, _NAN, models, why) for f in figures]
    u0 = np.ascontiguousarray(u.conf[:, forget][..., 0], dtype=np.float64)
    comp, _, _ = competition_section(key, u0, pool.forget0, unlearned_parents(u.markers, u.model_ids), u.markers,
                                     retrained.markers, pool, seed, lambda s: None)
    out = []
    for f in figures:
        if f == "f":
            out.append(Reading(f, key, comp["forgetting_quality"], comp.get("se", _NAN), models,
                               comp.get("interval_message")))
        else:
            ec = comp.get("equal_count", {})
            out.append(Reading(f, key, ec.get("ratio", _NAN), ec.get("ratio_se", _NAN), models,
                               comp.get("equal_count_message")
                               or (None if "ratio" in ec else f"{key}: F_null is 0, so F / F_null is undefined")))
    return out


def _unlearning(run: RunContents, forget: np.ndarray, figures: list[str], methods, n_boot: int,
                seed: int) -> list[Reading]:
    retrain = run.by_role.get("retrain", [])
    r = read_conf(run, retrain) if retrain else None
    r0 = np.asarray(r.conf[:, forget][..., 0], np.float64) if r else np.zeros((0, forget.size))
    pool = RetrainedPool(r0, n_boot, seed)
    out = []
    if "f_null" in figures:
        sec = headline_f_null(pool, forget.size).section if forget.size else {"message": "the forget set is empty"}
        out.append(Reading("f_null", None, sec.get("f_null", _NAN), sec.get("se", _NAN),
                           {"retrain": pool.n_models}, sec.get("message")))
    per_method = [f for f in figures if f in ("f", "f_ratio")]
    if per_method:
        for key in (k for k in run.groups if methods is None or k in methods):
            out += _method_readings(run, key, forget, r, pool, per_method, seed)
        for key in sorted(set(methods or ()) - set(run.groups)):
            out += [Reading(f, key, _NAN, _NAN, {"unlearned": 0}, f"{key}: no unlearned models yet")
                    for f in per_method]
    return out


def read_figures(uri: str, figures: list[str], *, methods: list[str] | None = None, seed: int = 0,
                 n_boot: int = DEFAULT_N_BOOT, max_examples: int | None = DEFAULT_MAX_EXAMPLES,
                 status: Callable[[str], None] = lambda s: None) -> list[Reading]:
    """The figures named (keys of FIGURES) of the store at ``uri``; f and f_ratio for each method key
    (<method>-<hparams hash>) in ``methods`` (None: every method in the store).  Reads the shadows only for
    the LiRA figures, the retrained and unlearned models only for the others, and of those only the forget
    examples the report uses.  ``seed``, ``n_boot`` and ``max_examples`` as evaluate_store's."""
    unknown = sorted(set(figures) - set(FIGURES))
    if unknown:
        raise ValueError(f"unknown figure(s) {', '.join(unknown)}; allowed: {', '.join(FIGURES)}")
    run = open_run(uri)
    sel = select_examples(run.split, run.forget, max_examples, seed)
    out = []
    lira = [f for f in FIGURES if f in figures and f.startswith("lira_")]
    if lira:
        status("LiRA online")
        out += _lira(run, sel.train, lira, seed)
    rest = [f for f in FIGURES if f in figures and not f.startswith("lira_")]
    if rest:
        status("F")
        out += _unlearning(run, sel.forget, rest, methods, n_boot, seed)
    return out
