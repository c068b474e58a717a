"""`ufarm tune`: a Ray Tune search over an unlearning method's hyper-parameters, scored against the
retrained reference already in a run store.

Each trial is one point of the method's space. It makes K unlearned models from the run's originals
(in-process, with farm.train.engine.Engine: no nested Ray actors), commits them to the run store under their own
hparams hash (so a model whose marker exists is reused, on resume or when two searches meet), and reports
to Tune after every `report_every` models: forgetting quality F of the models so far against the store's
retrain models, F_null (the same statistic between two halves of the retrain models), F / F_null, retain
and test accuracy ratios, the challenge's final score, and the time ratio against retraining.

Nothing is retrained per trial. Results and Tune's state live under <storage>/<search> (default storage:
<run>/tune, which may be s3://); an interrupted search is resumed with Tuner.restore. At the end:
<run>/tune/<search>/trials.csv (sorted by final score), best.yaml (a ready-to-run spec) and
fq_vs_utility.png. The spec's `tune` section is documented in docs/tune.md.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import yaml

from farm.train.methods import Method, get_method
from farm.spec import Spec, SpecError, UnlearnSpec, method_label

SEARCHES = ("grid", "random", "optuna")
SCHEDULERS = ("fifo", "asha")
METRIC = "final_score"
TUNE_FIELDS = ("method", "params", "models", "search", "samples", "scheduler", "grace_models", "report_every",
               "max_concurrent", "resources", "storage_path", "name", "seed", "baseline")


class TrialError(RuntimeError):
    """A model of a trial failed (the method raised, returned a wrong model, or produced NaN)."""


# ------------------------------------------------------------------------------------------ the spec

@dataclass(frozen=True)
class TuneSpec:
    method: str = "finetune"
    params: dict = field(default_factory=dict)  # name -> list (grid/choice) | {low, high, log} | scalar (fixed)
    models: int = 32  # K: unlearned models per trial
    search: str = "grid"
    samples: int = 8  # trials of a random / optuna search
    scheduler: str = "fifo"
    grace_models: int = 4  # ASHA: models every trial makes before it can be stopped
    report_every: int = 0  # models between reports to Tune; 0: once at the end (fifo), grace_models (asha)
    max_concurrent: int = 0  # 0: as many trials as the cluster's resources fit
    cpus: float = 1.0  # per trial
    gpus: float = 0.0  # per trial; fractions pack several trials on one GPU
    storage_path: str | None = None  # default <run>/tune
    name: str | None = None  # the search's folder; default <method>-<search>
    seed: int = 0  # random/optuna sampler seed; non-zero also makes new replicates (a `seed` hparam)
    baseline: bool = True  # also score the method's default hyper-parameters, for comparison

    @property
    def search_name(self) -> str:
        return self.name or f"{method_label(self.method)}-{self.search}"


def _int(value, where, low=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SpecError(f"{where} must be an integer >= {low}, got {value!r}")
    return value


def parse_tune(spec: Spec) -> TuneSpec:
    raw = dict(spec.tune or {})
    unknown = sorted(set(raw) - set(TUNE_FIELDS))
    if unknown:
        raise SpecError(f"tune: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(TUNE_FIELDS)}")
    method_name = raw.get("method") or (spec.unlearn[0].method if spec.unlearn else "finetune")
    method = get_method(str(method_name))
    params = raw.get("params") or {}
    if not isinstance(params, dict):
        raise SpecError(f"tune.params must be a mapping of hyper-parameter to values, got {params!r}")
    res = raw.get("resources") or {}
    if not isinstance(res, dict) or set(res) - {"cpus", "gpus"}:
        raise SpecError(f"tune.resources must be a mapping with cpus and/or gpus, got {res!r}")
    cpus, gpus = res.get("cpus", 1.0), res.get("gpus", 0.0)
    for key, v in (("cpus", cpus), ("gpus", gpus)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (key == "cpus" and v == 0):
            raise SpecError(f"tune.resources.{key} must be a {'positive' if key == 'cpus' else 'non-negative'} "
                            f"number, got {v!r}")
    if gpus > 1 and gpus != int(gpus):
        raise SpecError(f"tune.resources.gpus must be a fraction in [0, 1] or a whole number, got {gpus}")
    ts = TuneSpec(
        method=str(method_name), params=dict(params),
        models=_int(raw.get("models", 32), "tune.models", 2),
        search=str(raw.get("search", "grid")), samples=_int(raw.get("samples", 8), "tune.samples"),
        scheduler=str(raw.get("scheduler", "fifo")), grace_models=_int(raw.get("grace_models", 4), "tune.grace_models", 2),
        report_every=_int(raw.get("report_every", 0), "tune.report_every", 0),
        max_concurrent=_int(raw.get("max_concurrent", 0), "tune.max_concurrent", 0),
        cpus=float(cpus), gpus=float(gpus), storage_path=raw.get("storage_path"),
        name=raw.get("name"), seed=_int(raw.get("seed", 0), "tune.seed", 0),
        baseline=bool(raw.get("baseline", True)),
    )
    if ts.search not in SEARCHES:
        raise SpecError(f"tune.search {ts.search!r} is unknown; allowed: {', '.join(SEARCHES)}")
    if ts.scheduler not in SCHEDULERS:
        raise SpecError(f"tune.scheduler {ts.scheduler!r} is unknown; allowed: {', '.join(SCHEDULERS)}")
    if ts.name is not None and (not isinstance(ts.name, str) or not ts.name or "/" in ts.name):
        raise SpecError(f"tune.name must be a folder name without '/', got {ts.name!r}")
    if ts.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise SpecError("tune.search 'optuna' needs the optuna package (pip install optuna); "
                            "or use grid or random") from None
    param_space(ts, method)  # checks every value against the method's declared space
    if spec.count("original") == 0:
        raise SpecError("tune needs originals to start from: set counts.original to at least 1")
    if spec.count("retrain") < 2:
        raise SpecError(f"tune needs a retrained reference: set counts.retrain to at least 2 (4 or more for "
                        f"F_null), got {spec.count('retrain')}")
    return ts


def param_space(ts: TuneSpec, method: Method) -> tuple[dict, dict]:
    """(searched, fixed): the Tune search space of the searched parameters and the fixed hparams."""
    from ray import tune

    names = ts.params or {k: None for k, p in method.space.items() if p.grid}
    if not names:
        raise SpecError(f"tune.params is empty and method {method.name!r} declares no grid; name the "
                        "hyper-parameters to search with their values")
    searched, fixed = {}, {}
    for name, value in names.items():
        where = f"tune.params.{name}"
        p = method.space.get(name)
        if p is None and not method.open_space:
            raise SpecError(f"{where}: method {method.name!r} has no hyper-parameter {name!r}; allowed: "
                            f"{', '.join(method.space)}")
        check = (lambda v, w: p.check(v, w)) if p is not None else (lambda v, w: v)
        if value is None:
            if p is None:
                raise SpecError(f"{where}: give values for a user method's parameter")
            if ts.search == "grid":
                if not p.grid:
                    raise SpecError(f"{where}: {method.name!r} declares no grid for {name!r}; list the values")
                value = list(p.grid)
            else:
                value = {"low": p.low, "high": p.high, "log": p.log} if p.type in ("int", "float") \
                    else list(p.choices or (True, False))
        if isinstance(value, list):
            if not value:
                raise SpecError(f"{where} lists no values")
            vals = [check(v, f"{where}[{i}]") for i, v in enumerate(value)]
            searched[name] = tune.grid_search(vals) if ts.search == "grid" else tune.choice(vals)
        elif isinstance(value, dict):
            if ts.search == "grid":
                raise SpecError(f"{where}: a grid search needs a list of values, got the range {value!r}")
            if set(value) - {"low", "high", "log"} or "low" not in value or "high" not in value:
                raise SpecError(f"{where} must be {{low, high, log}}, got {value!r}")
            lo, hi = check(value["low"], f"{where}.low"), check(value["high"], f"{where}.high")
            if not lo < hi:
                raise SpecError(f"{where}: low must be below high, got {value!r}")
            is_int = (p is not None and p.type == "int")
            if value.get("log"):
                if lo <= 0:
                    raise SpecError(f"{where}: a log range needs low > 0, got {lo}")
                searched[name] = tune.lograndint(lo, hi + 1) if is_int else tune.loguniform(lo, hi)
            else:
                searched[name] = tune.randint(lo, hi + 1) if is_int else tune.uniform(lo, hi)
        else:
            fixed[name] = check(value, where)
    if not searched:
        raise SpecError("tune.params fixes every value; list several values (or a range) for at least one")
    return searched, fixed


def trial_hparams(method: Method, config: dict, fixed: dict, seed: int) -> dict:
    """The hparams a trial's models are made with (and hashed by): plain Python values of the right type."""
    out = dict(fixed)
    for k, v in config.items():
        v = v.item() if hasattr(v, "item") else v
        p = method.space.get(k)
        out[k] = p.check(v, f"hparams.{k}") if p is not None else v
        if isinstance(out[k], float):
            out[k] = float(f"{out[k]:.6g}")  # stable, readable ids for sampled floats
    if seed:
        out["seed"] = seed
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------------------- scoring

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
    cwd: str = ""


def trial_jobs(setup: TrialSetup, hparams: dict):
    from farm.plan import make_plan

    u = UnlearnSpec(method=setup.method, count=setup.models, hparams=hparams)
    spec = dataclasses.replace(setup.spec, unlearn=(u,))
    plan = make_plan(spec, setup.ctx.split, setup.ctx.labels, setup.groups)
    return [j for j in plan.jobs if j.role == "unlearned"]


def metrics_of(setup: TrialSetup, conf: list, markers: list, trained: int) -> dict:
    from evaluation.competition import final_score, forgetting_quality

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

    A model that fails is written to <run>/failed/<model_id>.json with its traceback, and the trial stops
    with TrialError naming the model (the search goes on with the other trials)."""
    from farm.train.engine import Engine
    from farm.store import RunStore

    store = RunStore(setup.ctx.store_uri)
    jobs = trial_jobs(setup, hparams)
    n_q = len(setup.spec.queries)
    conf, markers, trained, metrics = [], [], 0, {}
    every = setup.report_every or setup.models
    for job in jobs:
        marker_rel = f"models/{job.model_id}.json"
        marker = store.read_json(marker_rel) if store.exists(marker_rel) else None
        try:
            if marker is None:
                if engine is None:
                    engine = Engine(setup.ctx, threads=setup.threads)
                marker = engine.run(job)
                trained += 1
            table = store.read_logits(job.model_id, marker, columns=["conf"])
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
            store.write_failure(job.model_id, {
                "role": job.role, "error": message, "traceback": traceback.format_exc(), "attempts": 1,
                "worker_deaths": 0, "failed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
            raise TrialError(f"model {job.model_id} failed: {message}") from exc
        c = table.column("conf").to_numpy().reshape(-1, n_q)[:, 0]
        conf.append(c[setup.forget_idx].astype(np.float64))
        markers.append(marker)
        n = len(markers)
        if n >= 2 and (n % every == 0 or n == len(jobs)):
            metrics = metrics_of(setup, conf, markers, trained)
            if report is not None:
                report(metrics)
    return metrics


def _trial(config, setup: TrialSetup):
    """The Tune trainable (function API): one point of the space, K models, reports via tune.report."""
    from ray import tune

    if setup.cwd:
        os.chdir(setup.cwd)  # Tune runs trials in their own folder; relative paths mean the user's folder
    method = get_method(setup.method)
    hparams = trial_hparams(method, config, setup.fixed, setup.seed)
    score_hparams(setup, hparams, report=lambda m: tune.report({**m, "hparams_json": json.dumps(hparams)}))


# ------------------------------------------------------------------------------------------- driver

@dataclass
class SearchResult:
    name: str
    rows: list  # dicts, sorted by final score (errors last)
    best: dict | None
    baseline: dict | None
    complete: bool
    folder: str  # <run>/tune/<search>
    files: dict = field(default_factory=dict)


def prepare_setup(spec: Spec, ts: TuneSpec, store, *, address: str | None = None, local: bool = False,
                  progress: bool = True) -> TrialSetup:
    """Load the dataset, check the store holds this run (training missing originals / retrain models
    first, as `ufarm run` would), read the retrained reference and compute F_null."""
    from evaluation.competition import forgetting_quality_null

    from farm.data import load_dataset
    from farm.train.engine import RunContext
    from farm.plan import make_plan
    from farm.run import build_manifest, prepare_run, run_local, run_ray
    from farm.store import RunStore, StoreError, check_compatible

    store = store if isinstance(store, RunStore) else RunStore(store)
    dataset = load_dataset(spec.dataset, spec.seed)
    base = dataclasses.replace(spec, unlearn=(), counts={r: spec.count(r) for r in ("original", "retrain")})
    old = store.read_manifest()
    if old is not None:
        check_compatible(old, build_manifest(base, dataset), store.uri)
    plan = make_plan(base, dataset.split, dataset.labels, dataset.groups)
    intact = store.intact_models() if old is not None else {}
    missing = [j.model_id for j in plan.jobs if j.model_id not in intact]
    if missing:
        print(f"ufarm tune: the store lacks {len(missing)} originals / retrain models of the spec; training them "
              "first", flush=True)
        prep = prepare_run(base, store)  # the same RunStore: its lease, held by run_search, is re-entrant
        result = run_local(prep, progress=progress) if local else run_ray(prep, address=address, progress=progress)
        if result.failed:
            raise StoreError(f"could not train the reference models: {result.failed}")
        intact = store.intact_models()
    retrain_ids = [j.model_id for j in plan.jobs if j.role == "retrain"]
    forget_idx = np.flatnonzero(plan.forget)
    rc = store.read_conf(retrain_ids)
    retrain_conf = rc.conf[:, forget_idx, 0].astype(np.float64)
    rmarks = [intact[m] for m in retrain_ids]
    # F_null at the trials' model count where the retrained models allow it (F depends on the count)
    n_null = min(ts.models, len(retrain_ids) // 2)
    f_null = (forgetting_quality_null(retrain_conf, n_splits=20, seed=spec.seed, n_per_side=n_null)["f_null"]
              if n_null >= 2 else float("nan"))
    store_uri_abs = store.uri if store.is_s3 else store.root
    ctx = RunContext(spec=spec, store_uri=store_uri_abs, images=dataset.images, labels=dataset.labels,
                     split=dataset.split, forget=plan.forget, n_classes=dataset.n_classes)
    method = get_method(ts.method)
    _, fixed = param_space(ts, method)
    report_every = ts.report_every or (ts.grace_models if ts.scheduler == "asha" else ts.models)
    setup = TrialSetup(
        spec=spec, ctx=ctx, groups=dataset.groups, method=ts.method, fixed=fixed, models=ts.models,
        report_every=report_every, seed=ts.seed, threads=max(1, int(ts.cpus)), forget_idx=forget_idx,
        retrain_conf=retrain_conf, retrain_ids=retrain_ids,
        retrain_retain_acc=float(np.mean([m["accuracy"]["retain"] for m in rmarks])),
        retrain_test_acc=float(np.mean([m["accuracy"]["test"] for m in rmarks])),
        retrain_seconds=float(np.mean([m["train_seconds"] for m in rmarks])), f_null=float(f_null),
        cwd=os.getcwd())
    return setup


def _storage(ts: TuneSpec, store) -> tuple[str, object, str]:
    """(storage_path for Ray, its pyarrow filesystem or None, the experiment path for restore)."""
    if ts.storage_path:
        path = ts.storage_path.rstrip("/")
        if path.startswith("s3://"):
            from farm.store import RunStore

            other = RunStore(path)  # the endpoint and credentials of the standard AWS environment, as the store
            return other.root, other.fs, f"{other.root}/{ts.search_name}"
        if "://" not in path:
            path = os.path.abspath(path)
        return path, None, f"{path}/{ts.search_name}"
    if store.is_s3:
        return f"{store.root}/tune", store.fs, f"{store.root}/tune/{ts.search_name}"
    return store.path("tune"), None, store.path(f"tune/{ts.search_name}")


def build_tuner(setup: TrialSetup, ts: TuneSpec, store, *, restart: bool = False, progress: bool = True):
    from ray import tune

    method = get_method(ts.method)
    searched, _ = param_space(ts, method)
    trainable = tune.with_resources(tune.with_parameters(_trial, setup=setup), {"cpu": ts.cpus, "gpu": ts.gpus})
    storage_path, fs, exp_path = _storage(ts, store)
    restorable = tune.Tuner.can_restore(exp_path, storage_filesystem=fs)
    if restorable and not restart:
        print(f"ufarm tune: resuming search {ts.search_name!r} from {exp_path}", flush=True)
        return tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=False,
                                  storage_filesystem=fs), True
    if restorable and restart:
        if fs is None and "://" not in exp_path:
            import shutil

            shutil.rmtree(exp_path, ignore_errors=True)
        else:
            import pyarrow.fs as pafs

            (fs or pafs.FileSystem.from_uri(exp_path)[0]).delete_dir_contents(exp_path, missing_dir_ok=True)
    search_alg, scheduler, num_samples = None, None, 1
    if ts.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search_alg, num_samples = BasicVariantGenerator(random_state=ts.seed), ts.samples
    elif ts.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg, num_samples = OptunaSearch(seed=ts.seed), ts.samples
    if ts.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="models", max_t=ts.models, grace_period=ts.grace_models,
                                  reduction_factor=2)
    tuner = tune.Tuner(
        trainable, param_space=searched,
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", search_alg=search_alg, scheduler=scheduler,
                                    num_samples=num_samples, max_concurrent_trials=ts.max_concurrent or None),
        run_config=tune.RunConfig(name=ts.search_name, storage_path=storage_path, storage_filesystem=fs,
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=1 if progress else 0),
    )
    return tuner, False


ROW_METRICS = ("final_score", "forgetting_quality", "f_null", "f_over_f_null", "retain_acc_ratio", "test_acc_ratio",
               "time_ratio", "over_time_cutoff", "models", "models_trained", "models_reused")


def rows_of(results, ts: TuneSpec) -> list[dict]:
    rows = []
    for r in results:
        m = r.metrics or {}
        found = re.search(r"_([0-9a-f]{5}_\d{5})(_|$)", os.path.basename(str(r.path or "")))
        trial_id = m.get("trial_id") or (found.group(1) if found else "?")
        hp = json.loads(m["hparams_json"]) if m.get("hparams_json") else dict(r.config or {})
        if r.error is not None:
            status = "ERROR"
        elif m.get("done") or m.get("models") == ts.models:
            status = "DONE" if m.get("models") == ts.models else "STOPPED"
        elif m:
            status = "STOPPED" if ts.scheduler == "asha" else "UNFINISHED"
        else:
            status = "UNFINISHED"
        row = {"trial_id": trial_id, "status": status, "hparams": json.dumps(hp, sort_keys=True)}
        row.update({k: m.get(k) for k in ROW_METRICS})
        row["timestamp"] = m.get("timestamp")
        err = r.error
        if err is not None:
            text = str(getattr(err, "cause", None) or err)
            lines = [ln for ln in text.splitlines() if "TrialError" in ln or "failed:" in ln]
            row["error"] = (lines[-1] if lines else text.strip().splitlines()[-1]).strip()
        else:
            row["error"] = ""
        rows.append(row)
    return sort_rows(rows)


def sort_rows(rows: list[dict]) -> list[dict]:
    def key(r):
        s = r.get(METRIC)
        ok = r["status"] in ("DONE", "BASELINE") and s is not None and math.isfinite(s)
        return (not ok, -(s if ok else 0.0), r["trial_id"])

    return sorted(rows, key=key)


def _fmt(v, width=8):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return f"{'-':>{width}}"
    if isinstance(v, bool):
        return f"{str(v).lower():>{width}}"
    if isinstance(v, float):
        return f"{v:>{width}.4f}"
    return f"{v!s:>{width}}"


def format_table(rows: list[dict]) -> str:
    head = (f"{'trial':<18} {'status':<9} {'final':>8} {'F':>8} {'F/Fnull':>8} {'RA/RAr':>8} {'TA/TAr':>8} "
            f"{'t/t_re':>8} {'models':>6}  hparams")
    lines = [head]
    for r in rows:
        lines.append(f"{str(r['trial_id']):<18} {r['status']:<9} {_fmt(r.get('final_score'))} "
                     f"{_fmt(r.get('forgetting_quality'))} {_fmt(r.get('f_over_f_null'))} "
                     f"{_fmt(r.get('retain_acc_ratio'))} {_fmt(r.get('test_acc_ratio'))} "
                     f"{_fmt(r.get('time_ratio'))} {_fmt(r.get('models'), 6)}  {r['hparams']}"
                     + (f"  {r['error']}" if r.get("error") else ""))
    return "\n".join(lines)


def write_outputs(store, folder_rel: str, rows: list[dict], spec: Spec, ts: TuneSpec, best: dict | None) -> dict:
    files = {}
    cols = ["trial_id", "status", "hparams", *ROW_METRICS, "timestamp", "error"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    store.write_bytes(f"{folder_rel}/trials.csv", buf.getvalue().encode())
    files["trials"] = f"{store.uri}/{folder_rel}/trials.csv"
    if best is not None:
        d = json.loads(json.dumps(spec.to_dict()))
        d.pop("tune", None)
        d["name"] = f"{spec.name}-best-{ts.search_name}"
        hp = {k: v for k, v in json.loads(best["hparams"]).items()}
        d["unlearn"] = [{"method": ts.method, "count": ts.models, "hparams": hp}]
        header = (f"# best trial {best['trial_id']} of search {ts.search_name!r} over {ts.method!r}: "
                  f"final score {best['final_score']:.4f} on {ts.models} models\n"
                  f"# run it with: ufarm run best.yaml --store {store.uri}\n")
        store.write_bytes(f"{folder_rel}/best.yaml", (header + yaml.safe_dump(d, sort_keys=False)).encode())
        files["best"] = f"{store.uri}/{folder_rel}/best.yaml"
    png = plot_png(rows, ts)
    if png is not None:
        store.write_bytes(f"{folder_rel}/fq_vs_utility.png", png)
        files["plot"] = f"{store.uri}/{folder_rel}/fq_vs_utility.png"
    return files


def plot_png(rows: list[dict], ts: TuneSpec) -> bytes | None:
    pts = [r for r in rows if r.get("forgetting_quality") is not None and r.get("retain_acc_ratio") is not None]
    if not pts:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
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


def run_search(spec: Spec, store_uri: str, *, address: str | None = None, restart: bool = False,
               progress: bool = True, local_reference: bool = False) -> SearchResult:
    """The whole `ufarm tune`: reference, Tune search (or resume), baseline, table, best spec and plot."""
    from farm.run import ensure_ray
    from farm.store import RunStore

    ts = parse_tune(spec)
    store = RunStore(store_uri)
    store.check_reachable()
    # one writer at a time for the whole search: the reference models it may train and every trial's models
    with store.lease():
        ensure_ray(address)
        setup = prepare_setup(spec, ts, store, address=address, local=local_reference, progress=progress)
        print(f"ufarm tune: search {ts.search_name!r}: {ts.method} ({ts.search}"
              f"{', ' + str(ts.samples) + ' samples' if ts.search != 'grid' else ''}, scheduler {ts.scheduler}), "
              f"{ts.models} models per trial, reference: {len(setup.retrain_ids)} retrain models, "
              f"F_null {setup.f_null:.4f}", flush=True)
        tuner, _ = build_tuner(setup, ts, store, restart=restart, progress=progress)
        results = tuner.fit()
        rows = rows_of(results, ts)
        complete = all(r["status"] in ("DONE", "STOPPED", "ERROR") for r in rows)
        folder_rel = f"tune/{ts.search_name}"
        baseline = None
        if complete and ts.baseline:
            method = get_method(ts.method)
            searched, _ = param_space(ts, method)
            defaults = {k: method.space[k].default for k in searched if k in method.space}
            hp = trial_hparams(method, defaults, setup.fixed, setup.seed)
            m = score_hparams(setup, hp)
            baseline = {"trial_id": "default", "status": "BASELINE", "hparams": json.dumps(hp, sort_keys=True),
                        **{k: m.get(k) for k in ROW_METRICS}, "timestamp": int(time.time()), "error": ""}
        table_rows = sort_rows(rows + ([baseline] if baseline else []))
        done = [r for r in rows if r["status"] == "DONE"]
        best = done[0] if done else None
        print(format_table(table_rows))
        files = write_outputs(store, folder_rel, table_rows, spec, ts, best if complete else None)
        if not complete:
            n = sum(r["status"] == "UNFINISHED" for r in rows)
            print(f"ufarm tune: search interrupted with {n} unfinished trials; run the same command again to resume "
                  "(finished trials are kept, models already written are reused)", flush=True)
        elif best is None:
            print("ufarm tune: no trial finished all its models; see the errors above", flush=True)
        elif baseline is not None:
            b, d = best[METRIC], baseline[METRIC]
            verdict = ("beats" if b > d else "does not beat") + " the default hyper-parameters"
            print(f"ufarm tune: best trial {best['trial_id']} {best['hparams']}: final score {b:.4f}, which {verdict} "
                  f"{baseline['hparams']} ({d:.4f}) on the same store and {ts.models} models"
                  + ("" if b > d else "; the defaults (or an equal point) remain the best known setting"), flush=True)
        for k, v in files.items():
            print(f"ufarm tune: {k}: {v}")
        return SearchResult(ts.search_name, table_rows, best, baseline, complete, f"{store.uri}/{folder_rel}", files)


def cmd_tune(args) -> int:
    from farm.spec import load_spec

    spec = load_spec(args.spec)
    res = run_search(spec, args.store, address=args.address, restart=args.restart, progress=not args.no_progress,
                     local_reference=args.local)
    if not res.complete:
        return 130
    return 0 if res.best is not None else 1
