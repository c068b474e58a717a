"""Render an evaluation report (evaluation.report.evaluate computes it): the PNG figures, report.md, the
JSON-safe report dict and the terminal summary.  Nothing here writes files: evaluate_store writes what these
return.
"""
from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Iterator

import numpy as np

from .membership import RocCurve
from .unlearning import MethodFigure

__all__ = ["figures", "markdown", "summary_lines", "safe_name", "json_safe"]


# ------------------------------------------------------------------------------------- figures
def figures(curves: dict[str, RocCurve], method_figs: dict[str, MethodFigure], utility: dict,
            ci: float) -> Iterator[tuple[str, bytes]]:
    """Yields (file name, PNG bytes) one figure at a time, so the caller writes each before the next is drawn:
    the ROC curves, the epsilon histogram, F beside F_null, accuracy per role, the most leaking examples."""
    import matplotlib  # here, not at the top: it is slow to import and only the figures need it

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # after choosing the Agg backend: no display needed

    def png(fig) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        return buf.getvalue()

    if curves:
        yield "lira_roc.png", png(_roc_figure(plt, curves))
    eps_groups = {k: v.eps for k, v in method_figs.items() if v.eps is not None}
    if eps_groups:
        yield "epsilon_hist.png", png(_epsilon_figure(plt, eps_groups))
        yield "forgetting_quality.png", png(_f_figure(plt, method_figs, ci))
    if utility and (fig := _accuracy_figure(plt, utility)) is not None:
        yield "accuracy_per_role.png", png(fig)
    for k, v in method_figs.items():
        if v.leaking:
            yield f"leaking_{safe_name(k)}.png", png(_leaking_figure(plt, k, v.leaking))


def _roc_figure(plt, curves: dict[str, RocCurve]):
    fig, ax = plt.subplots(figsize=(5, 4.5))
    lo = 1.0
    for name, c in curves.items():
        keep = (c.fpr > 0) & (c.tpr > 0)
        if keep.any():
            line, = ax.plot(c.fpr[keep], c.tpr[keep], label=name)
            if c.lo is not None:  # 95% band: jackknife over target pairs
                ax.fill_between(c.fpr[keep], np.maximum(c.lo[keep], 1e-6), c.hi[keep],
                                color=line.get_color(), alpha=0.2, lw=0)
            lo = min(lo, float(c.fpr[keep].min()))
    lo = max(min(lo, 1e-3), 1e-6)
    ax.plot([lo, 1], [lo, 1], "k:", lw=0.8, label="chance")
    ax.set(xscale="log", yscale="log", xlim=(lo, 1), ylim=(lo, 1.05), xlabel="false positive rate",
           ylabel="true positive rate", title="Leave-pair-out membership inference (shadows)\nbands: 95%, jackknife over target pairs and examples")
    ax.legend(fontsize=8)
    return fig


def _epsilon_figure(plt, eps_groups: dict[str, np.ndarray]):
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, max(1.0, max(float(e.max()) for e in eps_groups.values())), 41)
    for k, e in eps_groups.items():
        ax.hist(e, bins=bins, histtype="step", lw=1.5, label=f"{k} (n={e.size})")
    ax.set(xlabel="per-example epsilon (forget set)", ylabel="examples",
           title="Competition per-example epsilon: unlearned vs retrained")
    ax.legend(fontsize=8)
    return fig


def _f_figure(plt, method_figs: dict[str, MethodFigure], ci: float):
    """F on every model, F and F_null at equal counts, per method, with their intervals."""
    n_with_eps = sum(v.eps is not None for v in method_figs.values())
    fig, ax = plt.subplots(figsize=(2.0 + 1.6 * n_with_eps, 4))
    labels, x, top = [], 0, 0.0
    for k, v in method_figs.items():
        c = v.competition
        ec = c.get("equal_count")
        top = max([top] + [float(h) for h in (c.get("ci_high"), c.get("forgetting_quality"))
                           + (tuple(ec["f_ci"]) + tuple(ec["f_null_ci"]) if ec else ()) if h is not None])
        if "forgetting_quality" in c:
            ax.errorbar(x - 0.2, c["forgetting_quality"], yerr=_yerr(c["forgetting_quality"], c.get("ci_low"),
                        c.get("ci_high")), fmt="o", color="C0", capsize=4,
                        label="F, every model" if x == 0 else None)
        if ec:
            ax.errorbar(x, ec["f"], yerr=_yerr(ec["f"], *ec["f_ci"]), fmt="D", color="C1", capsize=4,
                        label="F at n per side" if x == 0 else None)
            ax.errorbar(x + 0.2, ec["f_null"], yerr=_yerr(ec["f_null"], *ec["f_null_ci"]), fmt="s", color="C2",
                        capsize=4, label="F_null at n per side" if x == 0 else None)
            labels.append(f"{k}\nn = {ec['n_per_side']}\nF / F_null {_fmt(ec.get('ratio'), 2)}")
        else:
            labels.append(k)
        x += 1
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set(ylabel="forgetting quality F", ylim=(0, min(1.05, 1.25 * top + 0.02)), xlim=(-0.6, len(labels) - 0.4),
           title=f"F and F_null at equal model counts ({int(ci * 100)}% intervals)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return fig


def _accuracy_figure(plt, utility: dict):
    """Mean accuracy (and std) per role on retain, forget and test; None when no role has any."""
    roles = list(utility)
    splits = [s for s in ("retain", "forget", "test") if any(s in utility[r] for r in roles)]
    if not splits:
        return None
    fig, ax = plt.subplots(figsize=(1.5 + 1.3 * len(roles), 4))
    w = 0.8 / len(splits)
    for j, s in enumerate(splits):
        vals = [utility[r].get(s, {}).get("mean", np.nan) for r in roles]
        errs = [utility[r].get(s, {}).get("std", 0.0) for r in roles]
        ax.bar(np.arange(len(roles)) + (j - (len(splits) - 1) / 2) * w, vals, w, yerr=errs, capsize=2, label=s)
    ax.set_xticks(range(len(roles)), roles, fontsize=7, rotation=15)
    ax.set(ylabel="accuracy (plain query)", ylim=(0, 1.05), title="Accuracy per role")
    ax.legend(fontsize=8)
    return fig


def _leaking_figure(plt, key: str, leaking: list):
    """Histograms of the unlearned and retrained confidences on the most leaking forget examples."""
    n = len(leaking)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (eid, eps, u, r) in zip(axes.ravel(), leaking):
        lo, hi = float(min(u.min(), r.min())), float(max(u.max(), r.max()))
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 21)
        ax.hist(r, bins=bins, alpha=0.6, label="retrained")
        ax.hist(u, bins=bins, alpha=0.6, label="unlearned")
        ax.set_title(f"example {eid}: eps {eps:.2f}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{key}: confidences (query 0) of the most leaking forget examples", fontsize=9)
    return fig


def _yerr(point, lo, hi):
    """Error bar lengths for an interval around the point estimate."""
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return None
    return [[max(0.0, point - lo)], [max(0.0, hi - point)]]


def safe_name(name: str) -> str:
    """A method key as part of a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# -------------------------------------------------------------------------------------- JSON
def json_safe(obj):
    """The report as JSON allows: numpy scalars and arrays to Python, NaN and infinities to None."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


# ------------------------------------------------------------------------------------ markdown
def _shadows(need) -> str:
    """The shadows column: a count, 'out of reach' (the examples' part of the SE alone is wider), or n/a."""
    if need == -1:
        return "out of reach: more examples needed"
    return str(need) if need else "n/a"


def _fmt(x, nd=3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        if not math.isfinite(x):
            return "n/a"
        return f"{x:.{nd}f}"
    return str(x)


def markdown(rep: dict) -> str:
    """report.md from the report dict (as written to report.json)."""
    L = [f"# Evaluation of {rep['store']}", ""]
    L.append(f"spec `{rep['spec']}`, {rep['n_examples']} examples (splits {rep['splits']}), "
             f"{rep['n_forget']} forget examples; models: " +
             ", ".join(f"{k} {v}" for k, v in rep["models"].items()) + ".")
    s = rep["settings"]
    L.append(f"Settings: n_boot {s['n_boot']}, max_examples {s['max_examples']}, seed {s['seed']}; "
             f"computed in {rep['seconds']:.1f} s.")
    L.append("")
    if rep["nonfinite"]:
        L += ["## Models with NaN or infinite conf (left out of every statistic)", "",
              "| model | role | NaN | inf | examples affected | first example ids |", "|---|---|---|---|---|---|"]
        for b in rep["nonfinite"]:
            L.append(f"| {b['model_id']} | {b['role']} | {b['n_nan']} | {b['n_inf']} | {b['n_examples']} | "
                     f"{', '.join(map(str, b['first_example_ids']))} |")
        L.append("")
    if rep["messages"]:
        L += ["## Notes: statistics not computed, or to read with care", ""] + [f"- {m}" for m in rep["messages"]] + [""]
    L += _membership_md(rep)
    fn = rep["f_null"]
    L += ["## Unlearning methods against the retrained models", ""]
    if "f_null" in fn:
        L.append(f"F_null (two disjoint sets of {fn['n_per_side']} retrained models, mean of {fn['n_draws']} draws): "
                 f"{_ci(fn['f_null'], fn['ci_low'], fn['ci_high'])}; one draw's spread (sd) {_fmt(fn['sd_over_draws'])}. "
                 "Perfect unlearning reads F / F_null = 1 at the same model count.")
    elif "message" in fn:
        L.append(f"F_null: {fn['message']}.")
    L.append("")
    for key, m in rep["methods"].items():
        L += _method_md(key, m, rep["files"])
    for f, title in (("epsilon_hist.png", "epsilon histogram"), ("forgetting_quality.png", "F and F_null")):
        if f in rep["files"]:
            L += [f"![{title}]({f})", ""]
    L += ["## Utility per role (mean accuracy, plain query)", "", "| role | retain | forget | test |", "|---|---|---|---|"]
    for role, acc in rep["utility"].items():
        L.append(f"| {role} | " + " | ".join(_fmt(acc.get(s, {}).get("mean")) for s in ("retain", "forget", "test")) + " |")
    if "accuracy_per_role.png" in rep["files"]:
        L += ["", "![accuracy per role](accuracy_per_role.png)"]
    L.append("")
    return "\n".join(L)


def _prob(p) -> str:
    """A small probability without rounding it to 0."""
    return "n/a" if p is None else (f"{p:.4f}" if p >= 1e-3 else f"{p:.1e}")


def _ci(x, lo, hi, nd=3) -> str:
    return f"{_fmt(x, nd)} [{_fmt(lo, nd)}, {_fmt(hi, nd)}]"


def _get(d: dict, key: float):
    """A dict keyed by an FPR, before (float) or after (str) the JSON round trip."""
    return d.get(key, d.get(str(key)))


def _membership_md(rep: dict) -> list[str]:
    lira = rep["lira"]
    L = ["## Membership inference over the shadows (leave-pair-out)", ""]
    if "modes" not in lira:
        return L + [lira.get("message", ""), ""]
    L.append(f"{lira['n_usable_shadows']} usable shadows x {lira['n_train_examples']} train examples x "
             f"{lira['n_queries']} queries; pooled over every scored (target shadow, train example). References: "
             f"{lira['references']}. Variance {lira['variance']} ({lira['variance_rule']}). {lira['precision']}; "
             "chance is AUC 0.5, balanced accuracy 0.5 and TPR = FPR.")
    L += ["", "| attack | AUC [95%] | TPR at 0.1% FPR [95%] | TPR at 1% FPR [95%] | shadows for AUC +-0.01 |",
          "|---|---|---|---|---|"]
    rows = [(f"LiRA {k}", v) for k, v in lira["modes"].items()]
    rmia = lira.get("rmia", {})
    rows.append((f"RMIA (offline, a={_fmt(rmia.get('a'), 2)}, gamma={_fmt(rmia.get('gamma'), 2)})", rmia))
    for name, v in rows:
        if "auc" not in v:
            L.append(f"| {name} | not computed: {v.get('message', '')} | | | |")
            continue
        t, tci = v["tpr_at_fpr"], v.get("tpr_at_fpr_ci", {})
        need = v.get("shadows_for_auc_half_width", {}).get("shadows")
        L.append(f"| {name} | {_ci(v['auc'], *v.get('auc_ci', (None, None)))} | "
                 f"{_ci(_get(t, 0.001), *(_get(tci, 0.001) or (None, None)), nd=4)} | "
                 f"{_ci(_get(t, 0.01), *(_get(tci, 0.01) or (None, None)), nd=4)} | {_shadows(need)} |")
    if "rmia" in lira and "population" in rmia:
        L.append(f"\nRMIA's population: {rmia['population']}.")
    if "vulnerability" in lira:
        v = lira["vulnerability"]
        L += ["", f"Per-example vulnerability ({v['score']}; {v['definition']}, over {v['n_pairs']} pairs): mean "
                  f"{_fmt(v['mean'])} (SE {_fmt(v['mean_se'], 4)}; chance {_fmt(v['chance_mean'])}), forget "
                  f"{_fmt(v['mean_forget'])}, retain {_fmt(v['mean_retain'])}; share of examples >= 0.9: "
                  f"{_fmt(v['fraction_ge_0.9'], 4)} (chance {_prob(v['chance_fraction_ge_0.9'])}). "
                  "Every value: per_example_lira.parquet."]
    g = lira.get("gaussian_check")
    if g:
        if g.get("n_tested"):
            L += ["", f"LiRA's Gaussian assumption (D'Agostino-Pearson at {g['alpha']}, groups of >= "
                      f"{g['min_group_size']} reference confidences, query 0): rejected for "
                      f"{_fmt(g['fraction_in_rejected'])} of IN groups, {_fmt(g['fraction_out_rejected'])} of OUT "
                      f"groups, {_fmt(g['fraction_either_rejected'])} of examples on either side (by chance "
                      f"{_fmt(g['expected_either_by_chance'])}); {g['n_tested']} examples tested."]
        else:
            L += ["", f"LiRA's Gaussian assumption not checked: groups need >= {g['min_group_size']} reference "
                      "confidences per side."]
    if any(f == "lira_roc.png" for f in rep["files"]):
        L += ["", "![LiRA ROC](lira_roc.png)"]
    return L + [""]


def _tests_md(t: dict) -> str:
    parts = []
    for name in ("forget", "retain_control", "test_control"):
        v = t.get(name, {})
        parts.append(f"{name} {_fmt(v.get('ks_fraction'))} / {_fmt(v.get('mw_fraction'))}"
                     + (f" (n={v['n_examples']})" if "n_examples" in v else ""))
    return "; ".join(parts)


def _method_md(key: str, m: dict, files: list) -> list[str]:
    L = [f"### {key}", ""]
    if "competition" not in m:
        return L + [m.get("message", ""), ""]
    L += [f"method `{m['method']}`, hparams `{json.dumps(m['hparams'], sort_keys=True)}`; {m['n_unlearned']} "
          f"unlearned models from {m['n_originals']} original(s) vs {m['n_retrained']} retrained models; "
          f"{m['forget_examples_used']} forget examples.", ""]
    if "dependence" in m:
        L.append(f"- **dependence**: {m['dependence']}")
    L += _competition_md(m["competition"])
    t = m["two_sample"]
    if "forget" in t:
        L.append(f"- fraction of examples whose distributions differ (KS / Mann-Whitney, BH q={t['q']}; the controls "
                 f"should read about 0 when models are independent): {_tests_md(t)}")
    one = m.get("one_per_original")
    if one:
        L.append(f"- one model per original ({one['n_unlearned']} models): F {_fmt(one['forgetting_quality'])}; "
                 f"tests {_tests_md(one['two_sample'])}" if "two_sample" in one
                 else f"- one model per original: {one['message']}")
    u = m["ulira"]
    if "accuracy" in u:
        ctrl = ", ".join(f"{k} {_fmt(u[k]['accuracy'])}" for k in ("retain_control", "test_control") if k in u)
        L.append(f"- U-LiRA accuracy (folds grouped by original; 0.5 = nothing leaks): forget {_fmt(u['accuracy'])}"
                 + (f"; the same attack on controls: {ctrl}" if ctrl else ""))
    else:
        L.append(f"- U-LiRA: {u['message']}")
    L += _cost_md(m.get("cost", {}), m["n_unlearned"])
    if m.get("most_leaking"):
        L.append("- most leaking forget examples: " + ", ".join(
            f"{x['example_id']} (eps {_fmt(x['epsilon'], 2)})" for x in m["most_leaking"]))
    leaking = f"leaking_{safe_name(key)}.png"
    if leaking in files:
        L += ["", f"![most leaking]({leaking})"]
    return L + [""]


def _competition_md(c: dict) -> list[str]:
    if "forgetting_quality" not in c:
        return [f"- competition: {c['message']}"]
    L = []
    ec = c.get("equal_count")
    if ec:
        L.append(f"- **F / F_null at {ec['n_per_side']} models per side = "
                 f"{_ci(ec.get('ratio'), *ec.get('ratio_ci', (None, None)))}** (1 = like retraining): "
                 f"F {_ci(ec['f'], *ec['f_ci'])}, F_null {_ci(ec['f_null'], *ec['f_null_ci'])}, each the mean "
                 f"of {ec['n_draws']} draws (one draw's sd: {_fmt(ec['f_sd_over_draws'])} and "
                 f"{_fmt(ec['f_null_sd_over_draws'])})")
    elif "equal_count_message" in c:
        L.append(f"- F / F_null: {c['equal_count_message']}")
    need = c.get("models_for_f_half_width", {})
    L.append(f"- forgetting quality F (every model, the competition's number) = "
             f"{_ci(c['forgetting_quality'], c.get('ci_low'), c.get('ci_high'))}"
             + (f" ({c['interval']}); F to +-{need['half_width']} needs about {need['unlearned']} unlearned and "
                f"{need['retrained']} retrained models" if need else f" ({c.get('interval_message', '')})"))
    e = c["epsilon"]
    L.append(f"- per-example epsilon: mean {_fmt(e['mean'])}, median {_fmt(e['median'])}, max {_fmt(e['max'])}, "
             f"at the cap 50: {_fmt(e['fraction_at_cap'])}")
    if "final_score" in c:
        a = c["accuracies"]
        L.append(f"- final score = F x (RA_u/RA_r) x (TA_u/TA_r) = {_fmt(c['final_score'])} "
                 f"(RA {_fmt(a['retain_unlearned'])}/{_fmt(a['retain_retrained'])}, "
                 f"TA {_fmt(a['test_unlearned'])}/{_fmt(a['test_retrained'])})")
    return L


def _cost_md(cost: dict, n_unlearned: int) -> list[str]:
    L = []
    if "ratio" in cost:
        L.append(f"- cost: unlearning {_fmt(cost['unlearn_seconds_mean'], 2)} s vs retraining "
                 f"{_fmt(cost['retrain_seconds_mean'], 2)} s per model: ratio {_fmt(cost['ratio'])}")
    if "time_cutoff" in cost:
        over = cost["over_time_cutoff"]
        L.append(f"- time cut-off {_fmt(cost['time_cutoff'])} of retraining: {len(over)} of {n_unlearned} models "
                 "over it"
                 + (f" ({', '.join(over[:5])}{' ...' if len(over) > 5 else ''})" if over else ""))
    return L


def summary_lines(rep: dict) -> list[str]:
    """A few lines for the terminal: attack AUCs, F per method, notes, and where the report is."""
    lines = []
    lira = rep["lira"]
    for name, v in [(f"LiRA {k}", v) for k, v in lira.get("modes", {}).items()] + [("RMIA", lira.get("rmia", {}))]:
        if "auc" in v:
            lines.append(f"{name}: AUC {_ci(v['auc'], *v.get('auc_ci', (None, None)))}, TPR at 0.1% FPR "
                         f"{_fmt(_get(v['tpr_at_fpr'], 0.001), 4)}, at 1% FPR {_fmt(_get(v['tpr_at_fpr'], 0.01), 4)}")
    vul = lira.get("vulnerability")
    if vul:
        lines.append(f"per-example vulnerability: mean {_fmt(vul['mean'])} (chance 0.5), share >= 0.9 "
                     f"{_fmt(vul['fraction_ge_0.9'], 4)} (chance {_prob(vul['chance_fraction_ge_0.9'])})")
    for key, m in rep["methods"].items():
        c = m.get("competition", {})
        if "forgetting_quality" in c:
            u = m.get("ulira", {})
            ec = c.get("equal_count", {})
            ratio = (f"F/F_null at {ec['n_per_side']} per side {_ci(ec.get('ratio'), *ec.get('ratio_ci', (None, None)))}, "
                     if ec else "")
            lines.append(f"{key} ({m['n_unlearned']} models from {m['n_originals']} originals): {ratio}"
                         f"F {_ci(c['forgetting_quality'], c.get('ci_low'), c.get('ci_high'))}, final score "
                         f"{_fmt(c.get('final_score'))}, U-LiRA accuracy {_fmt(u.get('accuracy'))}")
        else:
            lines.append(f"{key}: {c.get('message', m.get('message', 'not computed'))}")
    lines += [f"note: {line}" for line in rep["messages"]]
    lines.append(f"report: {rep['out']}/report.md")
    return lines
