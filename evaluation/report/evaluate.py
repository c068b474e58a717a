"""Evaluate a run store: membership inference over the shadows, the competition's forgetting score and
two-sample tests per unlearning method, utility and cost; write report.json, report.md and figures.

``evaluate_store(uri, out=None, method=None, *, n_boot, max_examples, seed, progress, rmia_a, rmia_gamma, verify,
map_chunks, chunk_examples)``

The pipeline, one step per function below: read what the run holds (store_io.open_run), choose the examples
(select_examples), compute each section as jobs (chunks: membership by chunks of examples into
membership.membership_from_chunks; the unlearning models read by jobs, whose forgetting scores run as jobs
behind unlearning.headline_f_null and unlearning.method_section; utility), then render them (render: figures,
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
Memory: a membership job holds its chunk of examples of every shadow (float32), a ROC job a bucket of one
attack's scores of about as many cells, the unlearning read jobs only the forget and control examples, and the
driver the stacked per-example scores (float64, shadows x train examples, one array per attack) while it cuts
them into the ROC jobs' buckets.
"""
from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from tqdm import tqdm

from ..competition import DELTA
from .chunks import (DEFAULT_CHUNK_EXAMPLES, FORGET_EMPTY, ExampleSelection, membership_by_chunks, select_examples,
                     unlearning_by_jobs, verify_by_jobs)
from .membership import FPRS, MIN_SHADOWS, MembershipResult, Map, serial_map
from .render import figures, json_safe, markdown, safe_name
from .store_io import ReportError, ReportWriter, RunContents, open_run, parquet_bytes
from .unlearning import BH_Q, FNullResult, MethodFigure
from .utility import accuracy_summary

__all__ = ["evaluate_store", "ReportSettings", "ExampleSelection", "select_examples", "DEFAULT_N_BOOT",
           "DEFAULT_MAX_EXAMPLES", "DEFAULT_RMIA_A", "DEFAULT_RMIA_GAMMA", "DEFAULT_CHUNK_EXAMPLES"]

DEFAULT_N_BOOT = 20  # draws of the equal-count F and F_null (4 groups of 5 for their jackknife)
DEFAULT_MAX_EXAMPLES = 1000
DEFAULT_RMIA_A = 0.3  # RMIA's offline approximation Pr_in ~ a Pr_out + 1 - a (the paper's value for CIFAR-10)
DEFAULT_RMIA_GAMMA = 1.0  # RMIA's likelihood-ratio threshold against the population
CI = 0.95
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
    chunk_examples: int = DEFAULT_CHUNK_EXAMPLES  # examples per job (memory per job follows it)

    def __post_init__(self):
        if self.n_boot < 0:
            raise ReportError(f"n_boot must be >= 0, got {self.n_boot}")
        if not (0.0 <= self.rmia_a <= 1.0) or not (self.rmia_gamma > 0 and math.isfinite(self.rmia_gamma)):
            raise ReportError(f"rmia_a must lie in [0, 1] and rmia_gamma be a positive number, got {self.rmia_a}, "
                              f"{self.rmia_gamma}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ReportError(f"max_examples must be >= 1 (or None for all), got {self.max_examples}")
        if isinstance(self.chunk_examples, bool) or not isinstance(self.chunk_examples, int) \
                or self.chunk_examples < 1:
            raise ReportError(f"chunk_examples must be a whole number >= 1, got {self.chunk_examples!r}")


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
class _Later:
    """fn() run now in a daemon thread (``now``), or when its result is first asked for: a map that runs
    jobs elsewhere (Ray) then holds the unlearning jobs beside the membership ones."""

    def __init__(self, fn: Callable, now: bool):
        self.fn, self.out, self.error, self.thread = fn, None, None, None
        if now:
            self.thread = threading.Thread(target=self._run, name="ufarm-evaluate-unlearning", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        try:
            self.out = self.fn()
        except BaseException as exc:  # re-raised in the caller's thread by result()
            self.error = exc

    def result(self):
        if self.thread is None:
            return self.fn()
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.out


@dataclass
class _Sections:
    membership: MembershipResult
    f_null: FNullResult
    methods: dict[str, dict]
    method_figures: dict[str, MethodFigure]
    utility: dict
    nonfinite: list[dict]  # in the order the models were read
    notes: list[str]  # in report order


def _compute_sections(run: RunContents, sel: ExampleSelection, settings: ReportSettings, bar, map_jobs: Map,
                      distributed: bool) -> _Sections:
    status = bar.set_postfix_str
    chunk = settings.chunk_examples
    unlearning = _Later(lambda: unlearning_by_jobs(run, sel, chunk=chunk, n_boot=settings.n_boot,
                                                   seed=settings.seed, map_jobs=map_jobs), now=distributed)
    membership, nonfinite = membership_by_chunks(
        run, sel, chunk=chunk, seed=settings.seed, rmia_a=settings.rmia_a, rmia_gamma=settings.rmia_gamma,
        map_jobs=map_jobs, workers=1 if distributed else None, status=status)
    bar.update(1)
    status("retrained models, F_null and the methods")
    unl = unlearning.result()
    nonfinite += unl.retrained_nonfinite
    f_null = unl.f_null
    notes = membership.notes + ([FORGET_EMPTY] if sel.forget.size == 0 else []) + f_null.notes
    bar.update(1)
    nonfinite += unl.originals_nonfinite  # only to report NaN / inf conf by model id
    s = _Sections(membership, f_null, {}, {}, _role_utility(run, nonfinite), nonfinite, notes)
    for key, part in zip(run.groups, unl.methods):
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
                   verify: bool = False, map_chunks: Map | None = None,
                   chunk_examples: int = DEFAULT_CHUNK_EXAMPLES) -> dict:
    """Evaluate the run store at ``uri`` and write report.json, report.md, per-example Parquet files and
    PNG figures to ``out`` (default ``<run>/report/``; a local folder or s3://).  ``method`` restricts
    the unlearning part to one method (its name, or ``<method>-<hparams hash>``).  ``max_examples``
    caps the forget examples (and each control sample) of the per-example unlearning statistics (a
    seeded sample; None = all).  ``n_boot`` is the number of draws behind the equal-count F and F_null.
    ``rmia_a`` and ``rmia_gamma`` set RMIA's offline a and its threshold gamma.  ``verify`` first reads every
    logits file the evaluation uses whole, once, against its marker's sha256 (jobs of chunks.verify_by_jobs);
    every read reads only the columns used, each page against its CRC-32.
    Returns the report as a dict, plus ``out`` and ``files``.

    The work runs as jobs (evaluation.report.chunks): membership jobs over chunks of ``chunk_examples``
    examples, whose memory follows the chunk (shadows x chunk examples), read jobs of the unlearning models'
    forget and control examples, and a job per forgetting score behind F_null and each method's F.
    ``map_chunks(fn, [args, ...]) -> [fn(*args), ...]`` runs them: by default here, one after the other;
    farm.run.evaluate_ray.ray_map runs them as Ray tasks (then the unlearning jobs run beside the membership
    jobs, from a second thread of this process).  The report is the same to the bit whatever the map and the
    chunk size (except its "seconds").

    Raises ReportError (a StoreError and a ValueError) when the store is not a run store, the method
    is unknown, or the store has too few models for any statistic.
    """
    t0 = time.perf_counter()
    settings = ReportSettings(n_boot, max_examples, seed, rmia_a, rmia_gamma, method, chunk_examples)
    run = open_run(uri, method)
    _check_enough_models(run)
    if verify:
        verify_by_jobs(run, map_chunks or serial_map)
    sel = select_examples(run.split, run.forget, max_examples, seed)
    output = ReportWriter(run.store, out)
    bar = tqdm(total=3 + len(run.groups), desc="ufarm evaluate", unit="stage", disable=not progress,
               dynamic_ncols=True)
    try:
        sections = _compute_sections(run, sel, settings, bar, map_chunks or serial_map, map_chunks is not None)
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
