"""The `ufarm tune` driver: a Ray Tune search over an unlearning method's hyper-parameters, scored against the
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
import os
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs
import yaml
from ray import tune

from evaluation.competition import forgetting_quality_null
from evaluation.report.tune_table import METRIC, ROW_METRICS, format_table, plot_png, sort_rows
from farm.data import load_dataset
from farm.plan import make_plan
from farm.spec import Spec, SpecError, TuneSpec, load_spec_dict, spec_from_dict
from farm.store import RunStore, StoreError, check_compatible
from farm.train.engine import RunContext
from farm.train.methods import get_method

from ..local import run_local
from ..prepare import build_manifest, prepare_run
from ..ray_executor import ensure_ray, keep_credentials_out_of_tune, run_ray
from .space import param_space, parse_tune, trial_hparams
from .trial import TrialSetup, score_hparams, trainable

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
        report_every=report_every, seed=ts.seed, threads=max(1, int(ts.resources.cpus)), forget_idx=forget_idx,
        retrain_conf=retrain_conf, retrain_ids=retrain_ids,
        retrain_retain_acc=float(np.mean([m["accuracy"]["retain"] for m in rmarks])),
        retrain_test_acc=float(np.mean([m["accuracy"]["test"] for m in rmarks])),
        retrain_seconds=float(np.mean([m["train_seconds"] for m in rmarks])), f_null=float(f_null))
    return setup


def _storage(ts: TuneSpec, store) -> tuple[str, object, str]:
    """(storage_path for Ray, its pyarrow filesystem or None, the experiment path for restore)."""
    if ts.storage_path:
        path = ts.storage_path.rstrip("/")
        if path.startswith("s3://"):
            other = RunStore(path)  # the endpoint and credentials of the standard AWS environment, as the store
            return other.root, other.fs, f"{other.root}/{ts.search_name}"
        if "://" not in path:
            path = os.path.abspath(path)
        return path, None, f"{path}/{ts.search_name}"
    if store.is_s3:
        return f"{store.root}/tune", store.fs, f"{store.root}/tune/{ts.search_name}"
    return store.path("tune"), None, store.path(f"tune/{ts.search_name}")


def build_tuner(setup: TrialSetup, ts: TuneSpec, store, *, restart: bool = False, progress: bool = True):
    """A new Tuner, or the interrupted search restored (resume_unfinished); (tuner, restored)."""
    method = get_method(ts.method)
    searched, _ = param_space(ts, method)
    fn = tune.with_resources(tune.with_parameters(trainable, setup=setup),
                             {"cpu": ts.resources.cpus, "gpu": ts.resources.gpus})
    storage_path, fs, exp_path = _storage(ts, store)
    restorable = tune.Tuner.can_restore(exp_path, storage_filesystem=fs)
    if restorable and not restart:
        print(f"ufarm tune: resuming search {ts.search_name!r} from {exp_path}", flush=True)
        return tune.Tuner.restore(exp_path, fn, resume_unfinished=True, resume_errored=False,
                                  storage_filesystem=fs), True
    if restorable and restart:
        if fs is None and "://" not in exp_path:
            shutil.rmtree(exp_path, ignore_errors=True)
        else:
            (fs or pafs.FileSystem.from_uri(exp_path)[0]).delete_dir_contents(exp_path, missing_dir_ok=True)
    search_alg, scheduler, num_samples = None, None, 1
    if ts.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator  # searchers load when chosen

        search_alg, num_samples = BasicVariantGenerator(random_state=ts.seed), ts.samples
    elif ts.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch  # needs optuna, an optional dependency

        search_alg, num_samples = OptunaSearch(seed=ts.seed), ts.samples
    if ts.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler  # schedulers load when chosen

        scheduler = ASHAScheduler(time_attr="models", max_t=ts.models, grace_period=ts.grace_models,
                                  reduction_factor=2)
    tuner = tune.Tuner(
        fn, param_space=searched,
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", search_alg=search_alg, scheduler=scheduler,
                                    num_samples=num_samples, max_concurrent_trials=ts.max_concurrent or None),
        run_config=tune.RunConfig(name=ts.search_name, storage_path=storage_path, storage_filesystem=fs,
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=1 if progress else 0),
    )
    return tuner, False


def rows_of(results, ts: TuneSpec) -> list[dict]:
    """One row per trial of a ResultGrid: its status, hparams, last reported metrics and error. Every
    Result's metrics carry its trial_id, also for a trial that failed before its first report."""
    rows = []
    for r in results:
        m = r.metrics or {}
        hp = json.loads(m["hparams_json"]) if m.get("hparams_json") else dict(r.config or {})
        if r.error is not None:
            status = "ERROR"
        elif m.get("models") == ts.models:
            status = "DONE"
        elif m.get("models"):
            status = "STOPPED" if ts.scheduler == "asha" else "UNFINISHED"
        else:
            status = "UNFINISHED"
        row = {"trial_id": m.get("trial_id", "?"), "status": status, "hparams": json.dumps(hp, sort_keys=True)}
        row.update({k: m.get(k) for k in ROW_METRICS})
        row["timestamp"] = m.get("timestamp")
        row["error"] = "" if r.error is None else trial_error_line(r.error)
        rows.append(row)
    return sort_rows(rows)


def trial_error_line(error: BaseException) -> str:
    """The line of a trial's error that names the failing model (TrialError), else its last line."""
    text = str(getattr(error, "cause", None) or error)
    lines = [ln for ln in text.splitlines() if "TrialError" in ln or "failed:" in ln]
    return (lines[-1] if lines else text.strip().splitlines()[-1]).strip()


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


def run_search(spec: Spec, store_uri: str, *, address: str | None = None, restart: bool = False,
               progress: bool = True, local_reference: bool = False) -> SearchResult:
    """The whole `ufarm tune`: reference, Tune search (or resume), baseline, table, best spec and plot."""
    ts = parse_tune(spec)
    store = RunStore(store_uri)
    store.check_reachable()
    # one writer at a time for the whole search: the reference models it may train and every trial's models
    with store.lease():
        ensure_ray(address)
        keep_credentials_out_of_tune()
        # trials run in the user's folder, not Tune's trial folder: relative method paths keep their meaning
        os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
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
            defaults = {k: v for k, v in method.defaults.items() if k in searched}
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


SEARCH_ONLY_FIELDS = {"tune", "counts", "time_cutoff", "name"}


def is_search_only(raw) -> bool:
    return isinstance(raw, dict) and set(raw) <= SEARCH_ONLY_FIELDS


def merge_search(search: dict, run: dict) -> Spec:
    """A search-only spec (`tune`, and optionally `counts` of originals / retrain models, `time_cutoff`,
    `name`) completed with a run spec's mapping (its unlearn list dropped)."""
    merged = {k: v for k, v in run.items() if k != "unlearn"}
    merged["tune"] = search.get("tune")
    if search.get("counts"):
        merged["counts"] = search["counts"]
    for key in ("time_cutoff", "name"):
        if key in search:
            merged[key] = search[key]
    return spec_from_dict(merged)


def resolve_tune_spec(raw: dict, store_uri: str) -> Spec:
    """The spec a search runs: a full run spec with a tune section as given, or a search-only spec
    completed from the run spec in the store's manifest."""
    if not is_search_only(raw):
        return spec_from_dict(raw)
    manifest = RunStore(store_uri).read_manifest()
    if manifest is None:
        raise SpecError(f"the tune spec holds only a search and store {store_uri} holds no run to complete it "
                        "from; run `ufarm run SPEC --store URI` first, or give the whole run spec")
    return merge_search(raw, manifest["spec"])


def cmd_tune(args) -> int:
    raw = load_spec_dict(args.spec)
    spec = resolve_tune_spec(raw, args.store)
    res = run_search(spec, args.store, address=args.address, restart=args.restart, progress=not args.no_progress,
                     local_reference=args.executor == "local")
    if not res.complete:
        return 130
    return 0 if res.best is not None else 1
