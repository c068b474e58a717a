"""`ufarm tune`: `space` (the tune section against the method's space), `trial` (one trial's models and
scores) and `driver` (the reference, the Tuner, resume, and the outputs; the table and plot are drawn by
evaluation.report.tune_table). docs/tune.md documents it for users."""
from .driver import (SearchResult, build_tuner, cmd_tune, is_search_only, merge_search, prepare_setup,
                     resolve_tune_spec, rows_of, run_search)
from .space import param_space, parse_tune, trial_hparams
from .trial import TrialError, TrialSetup, metrics_of, score_hparams, trainable, trial_jobs

__all__ = ["SearchResult", "TrialError", "TrialSetup", "build_tuner", "cmd_tune", "is_search_only", "merge_search", "metrics_of", "param_space",
           "parse_tune", "prepare_setup", "resolve_tune_spec", "rows_of", "run_search", "score_hparams",
           "trainable", "trial_hparams", "trial_jobs"]
