"""The results table of `ufarm tune`: order and formatting."""
import math
from types import SimpleNamespace

from evaluation.report.tune_table import fmt_cell, format_table, plot_png, sort_rows


def _row(trial_id, status, final=None, **metrics):
    return {"trial_id": trial_id, "status": status, "hparams": '{"lr": 0.1}', "final_score": final, "error": "",
            **metrics}


def test_sort_rows_puts_finished_trials_first_best_first():
    rows = [_row("b", "DONE", 0.2), _row("a", "ERROR"), _row("c", "DONE", 0.5), _row("d", "BASELINE", 0.3),
            _row("e", "STOPPED", 0.9), _row("f", "DONE", math.nan), _row("g", "DONE", 0.5)]
    assert [r["trial_id"] for r in sort_rows(rows)] == ["c", "g", "d", "b", "a", "e", "f"]


def test_fmt_cell():
    assert fmt_cell(None) == "       -" and fmt_cell(math.inf) == "       -"
    assert fmt_cell(True) == "    true" and fmt_cell(0.123456) == "  0.1235" and fmt_cell(32, 6) == "    32"
    assert fmt_cell("x", 3) == "  x"


def test_format_table():
    rows = [_row("t_00001", "DONE", 0.25, forgetting_quality=0.5, f_over_f_null=1.0, retain_acc_ratio=0.99,
                 test_acc_ratio=0.98, time_ratio=0.1, models=32),
            {**_row("t_00002", "ERROR"), "error": "TrialError: boom"}]
    lines = format_table(rows).splitlines()
    assert lines[0] == ("trial              status       final        F  F/Fnull   RA/RAr   TA/TAr   t/t_re "
                        "models  hparams")
    assert lines[1] == ('t_00001            DONE        0.2500   0.5000   1.0000   0.9900   0.9800   0.1000     32  '
                        '{"lr": 0.1}')
    assert lines[2] == ('t_00002            ERROR            -        -        -        -        -        -      -  '
                        '{"lr": 0.1}  TrialError: boom')


def test_plot_png():
    ts = SimpleNamespace(search_name="finetune-grid", method="finetune", models=4)
    assert plot_png([_row("a", "DONE", 0.2)], ts) is None  # nothing to plot
    rows = [_row("a", "DONE", 0.2, forgetting_quality=0.3, retain_acc_ratio=0.9, test_acc_ratio=0.95),
            _row("base", "BASELINE", 0.1, forgetting_quality=0.2, retain_acc_ratio=1.0, test_acc_ratio=1.0)]
    assert plot_png(rows, ts)[:8] == b"\x89PNG\r\n\x1a\n"
