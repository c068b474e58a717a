"""Evaluate a run store: membership inference over the shadows, the competition's forgetting score and
two-sample tests per unlearning method, utility and cost; write report.json, report.md and figures.

``evaluate_store(uri, out=None, method=None, *, n_boot, max_examples, seed, progress, rmia_a, rmia_gamma)``

The pipeline, one step per function below: read what the run holds (store_io.open_run), choose the examples
(select_examples), compute each section from numpy arrays into a typed result (membership.membership_section,
unlearning.headline_f_null and unlearning.method_section, utility), then render them (render: figures,
report.md, report.json) and write the files (store_io.ReportWriter).
* membership: LiRA (online, offline, global) and RMIA over the shadows with leave-pair-out references,
  per-example vulnerability from within-pair comparisons with its chance level, a jackknife over target pairs
  and examples for every figure's precision (and the ROC band), LiRA's Gaussian check.
* unlearning, per unlearning method and hyper-parameters (model ids ``unlearned-<method>-<hash>-NNNNN``), on
  the forget set (at most ``max_examples``, a seeded sample) and on control samples of retain and test examples:
  F with a jackknife interval over whole originals, F and F_null at equal model counts (means over ``n_boot``
  draws; their ratio is the headline), the final score, KS and Mann-Whitney with Benjamini-Hochberg, U-LiRA with
  folds grouped by original, the number of originals and the tests on one model per original.
* utility (mean accuracy per split and role, from the markers) and cost (unlearning over retraining time).

Models whose conf column holds NaN or infinite values are listed by model id and left out of every statistic.
Memory: one role is held at a time as float32, LiRA works in chunks of examples, and the unlearning
statistics only hold the forget and control examples.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from ..competition import DELTA
from .membership import FPRS, MIN_SHADOWS, MembershipResult, membership_section, too_few_shadows
from .render import figures, json_safe, markdown, safe_name
from .store_io import ReportError, ReportWriter, RunContents, UnlearnedGroup, open_run, parquet_bytes, read_conf
from .unlearning import BH_Q, FNullResult, MethodFigure, MethodModels, RetrainedPool, headline_f_null, method_section
from .utility import accuracy_summary, cost_section

__all__ = ["evaluate_store", "ReportSettings", "ExampleSelection", "select_examples", "DEFAULT_N_BOOT",
           "DEFAULT_MAX_EXAMPLES", "DEFAULT_RMIA_A", "DEFAULT_RMIA_GAMMA"]

DEFAULT_N_BOOT = 20  # draws of the equal-count F and F_null (4 groups of 5 for their jackknife)
DEFAULT_MAX_EXAMPLES = 1000
DEFAULT_RMIA_A = 0.3  # RMIA's offline approximation Pr_in ~ a Pr_out + 1 - a (the paper's value for CIFAR-10)
DEFAULT_RMIA_GAMMA = 1.0  # RMIA's likelihood-ratio threshold against the population
CI = 0.95
FORGET_EMPTY = "the store's forget set is empty: no unlearning statistic can be computed"
Status = Callable[[str], None]


@dataclass(frozen=True)
class ReportSettings:
    """What `ufarm evaluate` is asked for; validated here, so a bad value fails before the store is read."""
    n_boot: int = DEFAULT_N_BOOT
    max_examples: int | None = DEFAULT_MAX_EXAMPLES
    seed: int = 0
    rmia_a: float = DEFAULT_RMIA_A
    rmia_gamma: float = DEFAULT_RMIA_GAMMA
    method: str | None = None

    def __post_init__(self):
        if self.n_boot < 0:
            raise ReportError(f"n_boot must be >= 0, got {self.n_boot}")
        if not (0.0 <= self.rmia_a <= 1.0) or not (self.rmia_gamma > 0 and math.isfinite(self.rmia_gamma)):
            raise ReportError(f"rmia_a must lie in [0, 1] and rmia_gamma be a positive number, got {self.rmia_a}, "
                              f"{self.rmia_gamma}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ReportError(f"max_examples must be >= 1 (or None for all), got {self.max_examples}")


@dataclass(frozen=True)
class ExampleSelection:
    """Indices into the run's examples: the train and test splits (membership inference), and the forget
    examples and control samples the unlearning statistics use."""
    train: np.ndarray
    test: np.ndarray
    forget: np.ndarray
    controls: dict[str, np.ndarray]  # "retain_control", "test_control"


def _sample(idx: np.ndarray, k: int | None, rng) -> np.ndarray:
    if k is None or idx.size <= k:
        return idx
    return np.sort(rng.choice(idx, k, replace=False))


def select_examples(split: np.ndarray, forget: np.ndarray, max_examples: int | None, seed: int) -> ExampleSelection:
    """At most ``max_examples`` forget examples (a seeded sample), and control samples of as many retain and
    test examples."""
    test = np.flatnonzero(split == "test")
    rng = np.random.default_rng([seed, 0xE7A1])
    forget_sel = _sample(np.flatnonzero(forget), max_examples, rng)
    n_ctrl = forget_sel.size if max_examples is None else min(forget_sel.size, max_examples)
    controls = {"retain_control": _sample(np.flatnonzero((split == "train") & ~forget), n_ctrl, rng),
                "test_control": _sample(test, n_ctrl, rng)}
    return ExampleSelection(np.flatnonzero(split == "train"), test, forget_sel, controls)


def _check_enough_models(run: RunContents) -> None:
    shadows, retrain = run.by_role.get("shadow", []), run.by_role.get("retrain", [])
    can_unlearn = len(retrain) >= 2 and any(len(g.model_ids) >= 2 for g in run.groups.values())
    if len(shadows) < MIN_SHADOWS and not can_unlearn:
        counts = ", ".join(f"{k}: {len(g.model_ids)}" for k, g in run.groups.items()) or "no unlearned"
        raise ReportError(
            f"store {run.store.uri} has too few models to evaluate: membership inference needs at least "
            f"{MIN_SHADOWS} shadows (it has {len(shadows)}); the competition score needs at least 2 unlearned models "
            f"of one method and 2 retrained models (it has {counts} and {len(retrain)} retrained)")


# ------------------------------------------------------------------------------------ sections
def _membership(run: RunContents, sel: ExampleSelection, settings: ReportSettings,
                status: Status) -> tuple[MembershipResult, list[dict]]:
    """Read the shadows and compute the membership section -> (result, models left out for NaN / inf)."""
    shadows = run.by_role.get("shadow", [])
    header: dict = {"n_shadows": len(shadows), "n_train_examples": int(sel.train.size)}
    if len(shadows) < MIN_SHADOWS:
        return too_few_shadows(header, len(shadows)), []
    status("reading shadows")
    read = read_conf(run, shadows)
    if len(read.model_ids) < len(shadows):
        header["note"] = (f"{len(shadows) - len(read.model_ids)} shadow(s) left out for NaN or infinite conf "
                          "(see nonfinite)")
    ids, nonfinite, member = read.model_ids, read.nonfinite, read.trained_on[:, sel.train]
    conf_tr = read.conf[:, sel.train]  # [M, T, Q] float32
    pop = read.conf[:, sel.test] if sel.test.size else None
    del read
    res = membership_section(ids, conf_tr, member, pop, run.forget[sel.train], run.example_ids[sel.train],
                             seed=settings.seed, rmia_a=settings.rmia_a, rmia_gamma=settings.rmia_gamma, status=status)
    return dataclasses.replace(res, section={**header, **res.section}), nonfinite


def _retrained(run: RunContents, sel: ExampleSelection) -> tuple[MethodModels, list[dict]]:
    """The retrained models on the forget and control examples only."""
    retrain = run.by_role.get("retrain", [])
    if not retrain:
        return MethodModels([], [], np.zeros((0, sel.forget.size, 1), np.float32),
                            {name: np.zeros((0, idx.size, 1), np.float32) for name, idx in sel.controls.items()}), []
    read = read_conf(run, retrain)
    return MethodModels(read.model_ids, read.markers, read.conf[:, sel.forget],
                        {name: read.conf[:, idx] for name, idx in sel.controls.items()}), read.nonfinite


@dataclass(frozen=True)
class _MethodPart:
    section: dict  # with utility and cost
    figure: MethodFigure | None  # None when nothing was computed (an empty forget set)
    notes: list[str]
    nonfinite: list[dict]
    markers: list[dict]  # of the usable unlearned models


def _method(run: RunContents, group: UnlearnedGroup, sel: ExampleSelection, retrained: MethodModels,
            pool: RetrainedPool, seed: int, status: Status) -> _MethodPart:
    """Read one method's models and compute its section, utility and cost."""
    status(f"reading {group.key}")
    read = read_conf(run, group.model_ids)
    if sel.forget.size == 0:
        return _MethodPart({"method": group.method, "message": FORGET_EMPTY}, None, [], read.nonfinite, read.markers)
    unlearned = MethodModels(read.model_ids, read.markers, read.conf[:, sel.forget],
                             {name: read.conf[:, idx] for name, idx in sel.controls.items()})
    del read
    res = method_section(group.key, group.method, group.hparams, unlearned, retrained, pool,
                         run.example_ids[sel.forget], seed, status=status)
    cost, cost_notes = cost_section(group.key, unlearned.ids, unlearned.markers, retrained.markers)
    utility = {"unlearned": accuracy_summary(unlearned.markers), "retrained": accuracy_summary(retrained.markers)}
    return _MethodPart({**res.section, "utility": utility, "cost": cost}, res.figure, res.notes + cost_notes, [],
                       unlearned.markers)


@dataclass
class _Sections:
    membership: MembershipResult
    f_null: FNullResult
    methods: dict[str, dict]
    method_figures: dict[str, MethodFigure]
    utility: dict
    nonfinite: list[dict]  # in the order the models were read
    notes: list[str]  # in report order


def _compute_sections(run: RunContents, sel: ExampleSelection, settings: ReportSettings, bar) -> _Sections:
    status = bar.set_postfix_str
    membership, nonfinite = _membership(run, sel, settings, status)
    bar.update(1)
    status("reading retrained models")
    retrained, bad = _retrained(run, sel)
    nonfinite += bad
    pool = RetrainedPool(np.asarray(retrained.forget[..., 0], np.float64), settings.n_boot, settings.seed, status)
    f_null = headline_f_null(pool, sel.forget.size)
    notes = membership.notes + ([FORGET_EMPTY] if sel.forget.size == 0 else []) + f_null.notes
    bar.update(1)
    if run.by_role.get("original"):
        nonfinite += read_conf(run, run.by_role["original"]).nonfinite  # only to report NaN / inf conf by model id
    s = _Sections(membership, f_null, {}, {}, _role_utility(run, nonfinite), nonfinite, notes)
    for key, group in run.groups.items():
        part = _method(run, group, sel, retrained, pool, settings.seed, status)
        s.nonfinite += part.nonfinite
        s.methods[key] = part.section
        if part.figure is not None:
            s.method_figures[key] = part.figure
            s.notes += part.notes
            if part.markers:
                s.utility[f"unlearned:{key}"] = accuracy_summary(part.markers)
        bar.update(1)
    return s


def _role_utility(run: RunContents, nonfinite: list[dict]) -> dict:
    """Accuracy per split of the originals, retrained models and shadows, without those left out."""
    bad = {b["model_id"] for b in nonfinite}
    utility = {}
    for role in ("original", "retrain", "shadow"):
        markers = [run.markers[i] for i in run.by_role.get(role, []) if i not in bad]
        if markers:
            utility[role] = accuracy_summary(markers)
    return utility


# ------------------------------------------------------------------------------------ the report
def _write_tables_and_figures(output: ReportWriter, s: _Sections) -> None:
    if s.membership.per_example is not None:
        output.write("per_example_lira.parquet", parquet_bytes(s.membership.per_example))
    for key, fig in s.method_figures.items():
        if fig.per_example is not None:
            output.write(f"per_example_{safe_name(key)}.parquet", parquet_bytes(fig.per_example))
    for name, png in figures(s.membership.curves, s.method_figures, s.utility, CI):
        output.write(name, png)


def _messages(run: RunContents, s: _Sections) -> list[str]:
    """The report's notes: models left out for NaN / inf conf first, then each section's, then broken models."""
    messages = [f"model {b['model_id']} ({b['role']}) has {b['n_nan']} NaN and {b['n_inf']} infinite conf values; "
                "left out of every statistic" for b in reversed(s.nonfinite)]
    messages += s.notes
    if run.broken:
        messages.append(f"{len(run.broken)} model(s) have a marker but a missing or truncated logits file and were "
                        f"left out: {', '.join(run.broken[:5])}{' ...' if len(run.broken) > 5 else ''}")
    return messages


def _report(run: RunContents, sel: ExampleSelection, settings: ReportSettings, s: _Sections) -> dict:
    spec = run.manifest.get("spec", {})
    return {
        "store": run.store.uri,
        "spec": spec.get("name"),
        "queries": spec.get("queries"),
        "n_examples": int(run.manifest.get("n_examples", len(run.split))),
        "splits": {name: int((run.split == name).sum()) for name in ("train", "val", "test")},
        "n_forget": int(run.forget.sum()),
        "models": {**{r: len(v) for r, v in run.by_role.items() if r != "unlearned"},
                   **{f"unlearned:{k}": len(g.model_ids) for k, g in run.groups.items()}},
        "nonfinite": s.nonfinite,
        "messages": _messages(run, s),
        "lira": s.membership.section,
        "f_null": s.f_null.section,
        "methods": s.methods,
        "utility": s.utility,
        "settings": {"n_boot": settings.n_boot, "max_examples": settings.max_examples, "seed": settings.seed,
                     "delta": DELTA, "rmia_a": settings.rmia_a, "rmia_gamma": settings.rmia_gamma,
                     "bh_q": BH_Q, "fprs": list(FPRS), "method": settings.method,
                     "forget_examples_used": int(sel.forget.size),
                     "control_examples": {k: int(v.size) for k, v in sel.controls.items()}},
    }


def evaluate_store(uri: str, out: str | None = None, method: str | None = None, *, n_boot: int = DEFAULT_N_BOOT,
                   max_examples: int | None = DEFAULT_MAX_EXAMPLES, seed: int = 0, progress: bool = True,
                   rmia_a: float = DEFAULT_RMIA_A, rmia_gamma: float = DEFAULT_RMIA_GAMMA,
                   verify: bool = False) -> dict:
    """Evaluate the run store at ``uri`` and write report.json, report.md, per-example Parquet files and
    PNG figures to ``out`` (default ``<run>/report/``; a local folder or s3://).  ``method`` restricts
    the unlearning part to one method (its name, or ``<method>-<hparams hash>``).  ``max_examples``
    caps the forget examples (and each control sample) of the per-example unlearning statistics (a
    seeded sample; None = all).  ``n_boot`` is the number of draws behind the equal-count F and F_null.
    ``rmia_a`` and ``rmia_gamma`` set RMIA's offline a and its threshold gamma.  ``verify`` reads whole logits
    files against their markers' sha256 instead of only the columns used (each page against its CRC-32).
    Returns the report as a dict, plus ``out`` and ``files``.

    Raises ReportError (a StoreError and a ValueError) when the store is not a run store, the method
    is unknown, or the store has too few models for any statistic.
    """
    t0 = time.perf_counter()
    settings = ReportSettings(n_boot, max_examples, seed, rmia_a, rmia_gamma, method)
    run = open_run(uri, method, whole_file=verify)
    _check_enough_models(run)
    sel = select_examples(run.split, run.forget, max_examples, seed)
    output = ReportWriter(run.store, out)
    bar = tqdm(total=3 + len(run.groups), desc="ufarm evaluate", unit="stage", disable=not progress,
               dynamic_ncols=True)
    try:
        sections = _compute_sections(run, sel, settings, bar)
        bar.set_postfix_str("figures and report")
        _write_tables_and_figures(output, sections)
        bar.update(1)
    finally:
        bar.close()
    rep = _report(run, sel, settings, sections)
    rep["seconds"] = time.perf_counter() - t0
    rep["files"] = list(output.files) + ["report.json", "report.md"]
    rep = json_safe(rep)
    output.write("report.md", markdown(rep).encode())
    output.write("report.json", json.dumps(rep, indent=2, sort_keys=False).encode())
    rep["out"] = output.where
    return rep
