"""`ufarm evaluate`: read a run store, compute the report's sections, render and write them.

The modules follow the pipeline: store_io (the only one that touches the store: what a run holds, conf
arrays, the report's files), membership and unlearning (each section from numpy arrays into a typed result),
utility (accuracy and cost from the markers), render (figures, report.md, JSON, terminal summary) and
evaluate (the orchestrator, evaluate_store).  tune_table renders the results table and plot of `ufarm tune`.
"""
from .evaluate import (DEFAULT_MAX_EXAMPLES, DEFAULT_N_BOOT, DEFAULT_RMIA_A, DEFAULT_RMIA_GAMMA, ReportSettings,
                       evaluate_store)
from .render import markdown, summary_lines
from .store_io import ReportError

__all__ = ["evaluate_store", "summary_lines", "markdown", "ReportError", "ReportSettings", "DEFAULT_N_BOOT",
           "DEFAULT_MAX_EXAMPLES", "DEFAULT_RMIA_A", "DEFAULT_RMIA_GAMMA"]
