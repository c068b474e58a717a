"""One trial of `ufarm tune`: K unlearned models made in-process from the run's originals (committed to
the store like any model, reused when already there) and scored against the store's retrained reference
after every `report_every` models."""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
from ray import tune

from evaluation.competition import final_score, forgetting_quality
from evaluation.report.tune_table import METRIC
from farm.plan import make_plan
from farm.spec import Spec, UnlearnSpec
from farm.store import RunStore
from farm.train.engine import Engine
from farm.train.methods import get_method

from .space import trial_hparams


class TrialError(RuntimeError):
    """A model of a trial failed (the method raised, returned a wrong model, or produced NaN)."""


@dataclass
class TrialSetup:
    """What every trial needs, shipped once through Ray's object store (tune.with_parameters)."""
    spec: Spec
    ctx: object = field(repr=False)  # farm.train.engine.RunContext
    groups: np.ndarray | None = field(repr=False)
    method: str
    fixed: dict
    models: int
    report_every: int
    seed: int
    threads: int
    forget_idx: np.ndarray = field(repr=False)  # example ids of the forget set
    retrain_conf: np.ndarray = field(repr=False)  # float [N_r, E_forget], plain query
    retrain_ids: list
    retrain_retain_acc: float
    retrain_test_acc: float
    retrain_seconds: float
    f_null: float


def trial_jobs(setup: TrialSetup, hparams: dict):
    u = UnlearnSpec(method=setup.method, count=setup.models, hparams=hparams)
    spec = dataclasses.replace(setup.spec, unlearn=(u,))
    plan = make_plan(spec, setup.ctx.split, setup.ctx.labels, setup.groups)
    return [j for j in plan.jobs if j.role == "unlearned"]


def metrics_of(setup: TrialSetup, conf: list, markers: list, trained: int) -> dict:
    u = np.stack(conf)
    fq = forgetting_quality(u, setup.retrain_conf)
    ra = float(np.mean([m["accuracy"]["retain"] for m in markers]))
    ta = float(np.mean([m["accuracy"]["test"] for m in markers]))
    secs = float(np.mean([m["train_seconds"] for m in markers]))
    cut = setup.spec.time_cutoff
    time_ratio = secs / setup.retrain_seconds if setup.retrain_seconds else float("nan")
    return {
        "models": len(markers), "forgetting_quality": fq, "f_null": setup.f_null,
        "f_over_f_null": fq / setup.f_null if setup.f_null and setup.f_null > 0 else float("nan"),
        "retain_acc": ra, "test_acc": ta,
        "retain_acc_ratio": ra / setup.retrain_retain_acc, "test_acc_ratio": ta / setup.retrain_test_acc,
        METRIC: final_score(fq, ra, ta, setup.retrain_retain_acc, setup.retrain_test_acc),
        "unlearn_seconds": secs, "time_ratio": time_ratio,
        "over_time_cutoff": bool(time_ratio > cut) if cut and math.isfinite(time_ratio) else False,
        "models_trained": trained, "models_reused": len(markers) - trained,
    }


def score_hparams(setup: TrialSetup, hparams: dict, report=None, engine=None) -> dict:
    """Make (or reuse) the trial's K models in this process and score them; `report(metrics)` is called
    after every setup.report_every models (from 2 on) and at the end. Returns the last metrics.

    The models missing from the store are made in stacks, as `ufarm run` makes them (the run's
    resources.batch_models, within each report_every models so the reports come where they would).

    A model that fails is written to <run>/failed/<model_id>.json with its traceback, and the trial stops
    with TrialError naming the model (the search goes on with the other trials); in a stack that fails,
    its models are made again one at a time to find which."""
    store = RunStore(setup.ctx.store_uri)
    jobs = trial_jobs(setup, hparams)
    n_q = len(setup.spec.queries)
    conf, markers, trained, metrics = [], [], 0, {}
    every = setup.report_every or setup.models
    for start in range(0, len(jobs), every):
        chunk = jobs[start:start + every]
        made: dict[str, dict] = {}
        todo = []
        for job in chunk:
            try:
                if not store.exists(f"models/{job.model_id}.json"):
                    todo.append(job)
            except Exception:
                _fail(store, job)
        if todo and engine is None:
            engine = Engine(setup.ctx, threads=setup.threads)
        size = engine.stack_size() if todo else 1
        for i in range(0, len(todo), size):
            made.update(_make(engine, store, todo[i:i + size]))
        trained += len(todo)
        for job in chunk:
            try:
                marker = made.get(job.model_id) or store.read_json(f"models/{job.model_id}.json")
                table = store.read_logits(job.model_id, marker, columns=["conf"])
            except Exception:
                _fail(store, job)
            c = table.column("conf").to_numpy().reshape(-1, n_q)[:, 0]
            conf.append(c[setup.forget_idx].astype(np.float64))
            markers.append(marker)
            n = len(markers)
            if n >= 2 and (n % every == 0 or n == len(jobs)):
                metrics = metrics_of(setup, conf, markers, trained)
                if report is not None:
                    report(metrics)
    return metrics


def _make(engine: Engine, store: RunStore, jobs: list) -> dict[str, dict]:
    """The jobs' markers, made as one stack (Engine.run_batch); if the stack fails, one at a time, so that
    the failing model is named (_fail) and the models before it are kept."""
    try:
        return dict(zip((j.model_id for j in jobs), engine.run_batch(jobs)))
    except Exception:
        if len(jobs) == 1:
            _fail(store, jobs[0])
    made = {}
    for job in jobs:  # those the stack committed before it failed (models made one at a time) are kept
        rel = f"models/{job.model_id}.json"
        try:
            made[job.model_id] = store.read_json(rel) if store.exists(rel) else engine.run_batch([job])[0]
        except Exception:
            _fail(store, job)
    return made


def _fail(store: RunStore, job) -> None:
    """Record the exception being handled as the model's failure and stop the trial with TrialError."""
    exc = sys.exc_info()[1]
    message = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    store.write_failure(job.model_id, {
        "role": job.role, "error": message, "traceback": traceback.format_exc(), "attempts": 1,
        "worker_deaths": 0, "failed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    raise TrialError(f"model {job.model_id} failed: {message}") from exc


def trainable(config, setup: TrialSetup):
    """The Tune trainable (function API): one point of the space, K models, reports via tune.report.
    Runs in the user's working folder (the driver sets RAY_CHDIR_TO_TRIAL_DIR=0), so relative paths of
    user methods mean what they mean in the spec."""
    method = get_method(setup.method)
    hparams = trial_hparams(method, config, setup.fixed, setup.seed)
    score_hparams(setup, hparams, report=lambda m: tune.report({**m, "hparams_json": json.dumps(hparams)}))
