"""`ufarm status` and `ufarm plan`: what a store holds against what its spec plans (from the store alone,
no dataset), and what a run would train, with a time estimate from the store's own timings."""
from __future__ import annotations

import json

import numpy as np

from farm.plan import make_plan
from farm.spec import spec_from_dict
from farm.store import RunStore, StoreError
from farm.targets import ROUNDS_FILE


def summarize(store: RunStore) -> dict:
    """Counts per role of planned, done, missing and failed models, from the store alone (no dataset)."""
    manifest = store.read_manifest()
    if manifest is None:
        raise StoreError(f"{store.uri} is not a run store (no manifest.json)")
    spec = spec_from_dict(manifest["spec"])
    ex = store.read_examples(manifest)
    split = np.asarray(ex.column("split").to_numpy(zero_copy_only=False)).astype(str)
    labels = ex.column("label").to_numpy().astype(np.int64)
    groups_col = ex.column("group")
    groups = None if groups_col.null_count == len(groups_col) else groups_col.to_numpy(zero_copy_only=False)
    plan = make_plan(spec, split, labels, groups)
    markers = store.intact_models()
    failures = store.failures()
    roles: dict[str, dict] = {}
    for job in plan.jobs:
        row = roles.setdefault(job.role, {"planned": 0, "done": 0, "missing": 0, "failed": 0})
        row["planned"] += 1
        if job.model_id in markers:
            row["done"] += 1
        else:
            row["missing"] += 1
            row["failed"] += job.model_id in failures
    extra = sorted(set(markers) - {j.model_id for j in plan.jobs})
    return {"store": store.uri, "spec": spec.name, "manifest": manifest, "roles": roles,
            "failed": {m: f["error"] for m, f in failures.items() if m not in markers},
            "other_models": extra, "targets": target_lines(store, spec), "last_stop": last_stop(store)}


def target_lines(store: RunStore, spec) -> list[str] | None:
    """Each targeted figure of the spec's `targets` now: value, 95% half-width, target and the models it
    still needs (farm.rounds.figure_line); None when the spec has no targets."""
    if spec.targets is None:
        return None
    # on demand: reading the figures loads scipy and scikit-learn, which a store without targets never needs
    from evaluation.report.targets import read_figures
    from farm.rounds import assess, figure_line, unlearn_keys

    readings = read_figures(store.uri, list(spec.targets.figures), methods=list(unlearn_keys(spec)))
    return [figure_line(st) for st in assess(readings, spec.targets)]


def last_stop(store: RunStore) -> str | None:
    """The stop message of the store's rounds.json (untrusted: anything but a short string is ignored)."""
    try:
        data = store.read_bytes(ROUNDS_FILE)
        log = json.loads(data) if len(data) < 10_000_000 else None
    except (StoreError, OSError, ValueError):
        return None
    message = log.get("message") if isinstance(log, dict) else None
    return message if isinstance(message, str) and len(message) < 2000 else None



def plan_summary(plan_jobs, store: RunStore | None) -> dict:
    """Models per role that a run would plan, those the store already holds, and an estimate of the
    model-seconds still to train: per role, the pending count times the mean `seconds` of the store's
    committed models of that role (None where the store has none to go by)."""
    markers = store.intact_models() if store is not None and store.read_manifest() is not None else {}
    roles: dict[str, dict] = {}
    for job in plan_jobs:
        row = roles.setdefault(job.role, {"planned": 0, "done": 0, "pending": 0})
        row["planned"] += 1
        row["done" if job.model_id in markers else "pending"] += 1
    for role, row in roles.items():
        times = [m["seconds"] for m in markers.values()
                 if m.get("role") == role and isinstance(m.get("seconds"), (int, float))]
        row["seconds_each"] = float(np.mean(times)) if times else None
        row["seconds_left"] = row["pending"] * row["seconds_each"] if times else None
    return {"roles": roles, "timed_from": sum(1 for m in markers.values() if isinstance(m.get("seconds"), (int, float)))}
