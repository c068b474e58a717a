"""Render an evaluation report (evaluation.report.evaluate_store computes it): the PNG figures, report.md
and the terminal summary.  Nothing here writes files: evaluate_store writes what these return.
"""
from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Iterator

import numpy as np

__all__ = ["figures", "markdown", "summary_lines", "safe_name"]


# ------------------------------------------------------------------------------------- figures
def figures(curves: dict, method_figs: dict, f_null: dict, utility: dict, ci: float) -> Iterator[tuple[str, bytes]]:
    """Yields (file name, PNG bytes) one figure at a time, so the caller writes each before the next is drawn:
    the ROC curves, the epsilon histogram, F beside F_null, accuracy per role, the most leaking examples."""
    import matplotlib  # on first use: it is slow to import

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    def png(fig) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        return buf.getvalue()

    if curves:
        fig, ax = plt.subplots(figsize=(5, 4.5))
        lo = 1.0
        for name, c in curves.items():
            keep = (c["fpr"] > 0) & (c["tpr"] > 0)
            if keep.any():
                ax.plot(c["fpr"][keep], c["tpr"][keep], label=name)
                lo = min(lo, float(c["fpr"][keep].min()))
        lo = max(min(lo, 1e-3), 1e-6)
        ax.plot([lo, 1], [lo, 1], "k:", lw=0.8, label="chance")
        ax.set(xscale="log", yscale="log", xlim=(lo, 1), ylim=(lo, 1.05), xlabel="false positive rate",
               ylabel="true positive rate", title="Leave-one-out membership inference (shadows)")
        ax.legend(fontsize=8)
        yield "lira_roc.png", png(fig)
    eps_groups = {k: v["eps"] for k, v in method_figs.items() if "eps" in v}
    if eps_groups:
        fig, ax = plt.subplots(figsize=(6, 4))
        bins = np.linspace(0, max(1.0, max(float(e.max()) for e in eps_groups.values())), 41)
        for k, e in eps_groups.items():
            ax.hist(e, bins=bins, histtype="step", lw=1.5, label=f"{k} (n={e.size})")
        ax.set(xlabel="per-example epsilon (forget set)", ylabel="examples",
               title="Competition per-example epsilon: unlearned vs retrained")
        ax.legend(fontsize=8)
        yield "epsilon_hist.png", png(fig)
        fig, ax = plt.subplots(figsize=(1.6 + 1.4 * (len(eps_groups) + 1), 4))
        labels, x = [], 0
        for k, v in method_figs.items():
            if "f" not in v:
                continue
            c = v["f"]
            err = _yerr(c["forgetting_quality"], c["ci_low"], c["ci_high"])
            ax.bar(x, c["forgetting_quality"], color="C0", yerr=err, capsize=4)
            if "f_matched" in c:
                ax.plot(x, c["f_matched"], "kD", ms=5, label="F at the F_null model count" if x == 0 else None)
            labels.append(k)
            x += 1
        if "f_null" in f_null:
            ax.bar(x, f_null["f_null"], color="C2", yerr=_yerr(f_null["f_null"], f_null["ci_low"], f_null["ci_high"]),
                   capsize=4)
            labels.append(f"F_null\n(retrained halves,\n{f_null['n_per_half']} vs {f_null['n_per_half']})")
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set(ylabel="forgetting quality F", ylim=(0, 1.05),
               title=f"F ({int(ci * 100)}% bootstrap interval) beside F_null")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        yield "forgetting_quality.png", png(fig)
    if utility:
        roles = list(utility)
        splits = [s for s in ("retain", "forget", "test") if any(s in utility[r] for r in roles)]
        if splits:
            fig, ax = plt.subplots(figsize=(1.5 + 1.3 * len(roles), 4))
            w = 0.8 / len(splits)
            for j, s in enumerate(splits):
                vals = [utility[r].get(s, {}).get("mean", np.nan) for r in roles]
                errs = [utility[r].get(s, {}).get("std", 0.0) for r in roles]
                ax.bar(np.arange(len(roles)) + (j - (len(splits) - 1) / 2) * w, vals, w, yerr=errs, capsize=2, label=s)
            ax.set_xticks(range(len(roles)), roles, fontsize=7, rotation=15)
            ax.set(ylabel="accuracy (plain query)", ylim=(0, 1.05), title="Accuracy per role")
            ax.legend(fontsize=8)
            yield "accuracy_per_role.png", png(fig)
    for k, v in method_figs.items():
        if not v.get("leaking"):
            continue
        n = len(v["leaking"])
        cols = min(3, n)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
        for ax, (eid, eps, u, r) in zip(axes.ravel(), v["leaking"]):
            lo, hi = float(min(u.min(), r.min())), float(max(u.max(), r.max()))
            bins = np.linspace(lo, hi if hi > lo else lo + 1, 21)
            ax.hist(r, bins=bins, alpha=0.6, label="retrained")
            ax.hist(u, bins=bins, alpha=0.6, label="unlearned")
            ax.set_title(f"example {eid}: eps {eps:.2f}", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in axes.ravel()[n:]:
            ax.axis("off")
        axes[0, 0].legend(fontsize=7)
        fig.suptitle(f"{k}: confidences (query 0) of the most leaking forget examples", fontsize=9)
        yield f"leaking_{safe_name(k)}.png", png(fig)


def _yerr(point, lo, hi):
    """Error bar lengths for a percentile interval (which need not contain the point estimate)."""
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return None
    return [[max(0.0, point - lo)], [max(0.0, hi - point)]]


def safe_name(name: str) -> str:
    """A method key as part of a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# ------------------------------------------------------------------------------------ markdown
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
    lira = rep["lira"]
    L += ["## Membership inference over the shadows (leave-one-out)", ""]
    if "modes" in lira:
        L.append(f"{lira['n_usable_shadows']} usable shadows x {lira['n_train_examples']} train examples x "
                 f"{lira['n_queries']} queries; pooled over every (target shadow, train example); "
                 f"variance {lira['variance']} ({lira['variance_rule']}).")
        L += ["", "| attack | AUC | balanced accuracy | TPR at 0.1% FPR | TPR at 1% FPR |", "|---|---|---|---|---|"]
        rows = [(f"LiRA {k}", v) for k, v in lira["modes"].items()] + [("RMIA (offline, a=0.3)", lira.get("rmia", {}))]
        for name, v in rows:
            if "auc" in v:
                t = v["tpr_at_fpr"]
                L.append(f"| {name} | {_fmt(v['auc'])} | {_fmt(v['accuracy'])} | {_fmt(t.get(0.001, t.get('0.001')), 4)} | "
                         f"{_fmt(t.get(0.01, t.get('0.01')), 4)} |")
            else:
                L.append(f"| {name} | not computed: {v.get('message', '')} | | | |")
        if "vulnerability" in lira:
            v = lira["vulnerability"]
            L += ["", f"Per-example vulnerability ({v['score']}; {v['definition']}): mean {_fmt(v['mean'])}, "
                      f"forget {_fmt(v['mean_forget'])}, retain {_fmt(v['mean_retain'])}, quantiles "
                      + ", ".join(f"{q}: {_fmt(x)}" for q, x in v["quantiles"].items())
                      + f"; fraction with AUC >= 0.9: {_fmt(v['fraction_auc_ge_0.9'])}. "
                      "Every value: per_example_lira.parquet."]
        if any(f == "lira_roc.png" for f in rep["files"]):
            L += ["", "![LiRA ROC](lira_roc.png)"]
    else:
        L.append(lira.get("message", ""))
    L.append("")
    fn = rep["f_null"]
    L += ["## Unlearning methods against the retrained models", ""]
    if "f_null" in fn:
        L.append(f"F_null (two disjoint halves of {fn['n_per_half']} retrained models): {_fmt(fn['f_null'])} "
                 f"[{_fmt(fn['ci_low'])}, {_fmt(fn['ci_high'])}] ({int(fn['ci'] * 100)}% bootstrap, {fn['n_boot']} resamples).")
    elif "message" in fn:
        L.append(f"F_null: {fn['message']}.")
    L.append("")
    for key, m in rep["methods"].items():
        L += [f"### {key}", "", f"method `{m['method']}`, hparams `{json.dumps(m['hparams'], sort_keys=True)}`; "
              f"{m['n_unlearned']} unlearned vs {m['n_retrained']} retrained models; "
              f"{m['forget_examples_used']} forget examples.", ""]
        c = m["competition"]
        if "forgetting_quality" in c:
            L.append(f"- forgetting quality F = {_fmt(c['forgetting_quality'])} [{_fmt(c['ci_low'])}, "
                     f"{_fmt(c['ci_high'])}]; F / F_null = {_fmt(c.get('f_over_f_null'))}; "
                     f"F at the F_null model count = {_fmt(c.get('f_matched'))}, over F_null = "
                     f"{_fmt(c.get('f_matched_over_f_null'))}")
            e = c["epsilon"]
            L.append(f"- per-example epsilon: mean {_fmt(e['mean'])}, median {_fmt(e['median'])}, max {_fmt(e['max'])}, "
                     f"at the cap 50: {_fmt(e['fraction_at_cap'])}")
            if "final_score" in c:
                a = c["accuracies"]
                L.append(f"- final score = F x (RA_u/RA_r) x (TA_u/TA_r) = {_fmt(c['final_score'])} "
                         f"(RA {_fmt(a['retain_unlearned'])}/{_fmt(a['retain_retrained'])}, "
                         f"TA {_fmt(a['test_unlearned'])}/{_fmt(a['test_retrained'])})")
        else:
            L.append(f"- competition: {c['message']}")
        t = m["two_sample"]
        if "forget" in t:
            parts = []
            for name in ("forget", "retain_control", "test_control"):
                v = t.get(name, {})
                parts.append(f"{name} {_fmt(v.get('ks_fraction'))} / {_fmt(v.get('mw_fraction'))}"
                             + (f" (n={v['n_examples']})" if "n_examples" in v else ""))
            L.append(f"- fraction of examples whose distributions differ (KS / Mann-Whitney, BH q={t['q']}): "
                     + "; ".join(parts))
        u = m["ulira"]
        L.append(f"- U-LiRA accuracy: {_fmt(u['accuracy'])} (0.5 = nothing leaks)" if "accuracy" in u
                 else f"- U-LiRA: {u['message']}")
        cost = m["cost"]
        if "ratio" in cost:
            L.append(f"- cost: unlearning {_fmt(cost['unlearn_seconds_mean'], 2)} s vs retraining "
                     f"{_fmt(cost['retrain_seconds_mean'], 2)} s per model: ratio {_fmt(cost['ratio'])}")
        if "time_cutoff" in cost:
            L.append(f"- time cut-off {_fmt(cost['time_cutoff'])} of retraining: "
                     f"{len(cost['over_time_cutoff'])} of {m['n_unlearned']} models over it"
                     + (f" ({', '.join(cost['over_time_cutoff'][:5])}{' ...' if len(cost['over_time_cutoff']) > 5 else ''})"
                        if cost["over_time_cutoff"] else ""))
        if m.get("most_leaking"):
            L.append("- most leaking forget examples: " + ", ".join(
                f"{x['example_id']} (eps {_fmt(x['epsilon'], 2)})" for x in m["most_leaking"]))
        leaking = f"leaking_{safe_name(key)}.png"
        if leaking in rep["files"]:
            L += ["", f"![most leaking]({leaking})"]
        L.append("")
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


def summary_lines(rep: dict) -> list[str]:
    """A few lines for the terminal: attack AUCs, F per method, notes, and where the report is."""
    lines = []
    lira = rep["lira"]
    for name, v in [(f"LiRA {k}", v) for k, v in lira.get("modes", {}).items()] + [("RMIA", lira.get("rmia", {}))]:
        if "auc" in v:
            lines.append(f"{name}: AUC {_fmt(v['auc'])}, TPR at 0.1% FPR {_fmt(v['tpr_at_fpr'].get('0.001'), 4)}, "
                         f"at 1% FPR {_fmt(v['tpr_at_fpr'].get('0.01'), 4)}")
    for key, m in rep["methods"].items():
        c = m.get("competition", {})
        if "forgetting_quality" in c:
            u = m.get("ulira", {})
            lines.append(f"{key}: F {_fmt(c['forgetting_quality'])} [{_fmt(c.get('ci_low'))}, {_fmt(c.get('ci_high'))}], "
                         f"F_null {_fmt(c.get('f_null'))}, F/F_null {_fmt(c.get('f_over_f_null'))}, "
                         f"final score {_fmt(c.get('final_score'))}, U-LiRA accuracy {_fmt(u.get('accuracy'))}")
        else:
            lines.append(f"{key}: {c.get('message', m.get('message', 'not computed'))}")
    lines += [f"note: {line}" for line in rep["messages"]]
    lines.append(f"report: {rep['out']}/report.md")
    return lines
