"""The output side of `ufarm tune`: its trials in order of the final score, as a text table and as a plot of
forgetting quality against utility.  Rows are dicts with trial_id, status, hparams (JSON text), the metrics
named in ROW_METRICS and error."""
from __future__ import annotations

import io
import math

__all__ = ["ROW_METRICS", "METRIC", "sort_rows", "fmt_cell", "format_table", "plot_png"]

METRIC = "final_score"  # the metric trials are ranked by
ROW_METRICS = ("final_score", "forgetting_quality", "f_null", "f_over_f_null", "retain_acc_ratio", "test_acc_ratio",
               "time_ratio", "over_time_cutoff", "models", "models_trained", "models_reused")


def sort_rows(rows: list[dict]) -> list[dict]:
    """Finished trials (DONE or BASELINE) with a finite score first, best score first; the others after them;
    ties by trial id."""
    def key(r):
        s = r.get(METRIC)
        ok = r["status"] in ("DONE", "BASELINE") and s is not None and math.isfinite(s)
        return (not ok, -(s if ok else 0.0), r["trial_id"])

    return sorted(rows, key=key)


def fmt_cell(v, width=8) -> str:
    """A table cell right-aligned in ``width``: '-' for missing or non-finite, floats with 4 decimals."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return f"{'-':>{width}}"
    if isinstance(v, bool):
        return f"{str(v).lower():>{width}}"
    if isinstance(v, float):
        return f"{v:>{width}.4f}"
    return f"{v!s:>{width}}"


def format_table(rows: list[dict]) -> str:
    """The trials as a text table, one line per row in the given order."""
    head = (f"{'trial':<18} {'status':<9} {'final':>8} {'F':>8} {'F/Fnull':>8} {'RA/RAr':>8} {'TA/TAr':>8} "
            f"{'t/t_re':>8} {'models':>6}  hparams")
    lines = [head]
    for r in rows:
        lines.append(f"{str(r['trial_id']):<18} {r['status']:<9} {fmt_cell(r.get('final_score'))} "
                     f"{fmt_cell(r.get('forgetting_quality'))} {fmt_cell(r.get('f_over_f_null'))} "
                     f"{fmt_cell(r.get('retain_acc_ratio'))} {fmt_cell(r.get('test_acc_ratio'))} "
                     f"{fmt_cell(r.get('time_ratio'))} {fmt_cell(r.get('models'), 6)}  {r['hparams']}"
                     + (f"  {r['error']}" if r.get("error") else ""))
    return "\n".join(lines)


def plot_png(rows: list[dict], ts) -> bytes | None:
    """Forgetting quality against utility ((RA_u / RA_r) (TA_u / TA_r)) per trial, the default hyper-parameters
    as a star; None when no row has both or matplotlib is missing.  ``ts``: the search's TuneSpec (its
    search_name, method and models go in the title)."""
    pts = [r for r in rows if r.get("forgetting_quality") is not None and r.get("retain_acc_ratio") is not None]
    if not pts:
        return None
    try:
        import matplotlib  # here, not at the top: it is slow to import and only the plot needs it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # after choosing the Agg backend: no display needed
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in pts:
        util = r["retain_acc_ratio"] * r["test_acc_ratio"]
        base = r["status"] == "BASELINE"
        ax.scatter(util, r["forgetting_quality"], marker="*" if base else "o", s=120 if base else 40,
                   c="tab:red" if base else "tab:blue", alpha=0.5 if r["status"] != "DONE" and not base else 1.0)
        ax.annotate("default" if base else str(r["trial_id"])[-5:], (util, r["forgetting_quality"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("utility: (RA_u / RA_r) * (TA_u / TA_r)")
    ax.set_ylabel("forgetting quality F")
    ax.set_title(f"{ts.search_name}: {ts.method}, {ts.models} models per trial")
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
