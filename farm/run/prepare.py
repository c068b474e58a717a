"""Prepare a run: validate everything that can fail on bad input, plan its jobs, write the manifest and
examples under the store's lease, and find the models already committed. Nothing here imports Ray."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone

from farm.data import Dataset, load_dataset
from farm.plan import Job, Plan, make_plan
from farm.spec import Spec, SpecError
from farm.store import FORMAT_VERSION, RunStore, examples_table
from farm.train.engine import RunContext
from farm.train.methods import get_method

log = logging.getLogger("ufarm")


@dataclass
class RunResult:
    store: str
    planned: int
    already_done: int
    trained: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # model_id -> one-line error
    seconds: float = 0.0


@dataclass
class PreparedRun:
    spec: Spec
    store: RunStore
    dataset: Dataset
    plan: Plan
    done: dict[str, dict]  # model_id -> marker of models already committed and intact
    beyond: dict[str, int] = field(default_factory=dict)  # role -> committed models this plan does not hold

    @property
    def pending(self) -> list[Job]:
        return [j for j in self.plan.jobs if j.model_id not in self.done]

    def context(self) -> RunContext:
        return RunContext(spec=self.spec, store_uri=self.store.uri, images=self.dataset.images,
                          labels=self.dataset.labels, split=self.dataset.split, forget=self.plan.forget,
                          n_classes=self.dataset.n_classes)


def build_manifest(spec: Spec, dataset: Dataset) -> dict:
    """The manifest in its JSON form (tuples as lists), so it compares equal to one read back from a store."""
    return json.loads(json.dumps({
        "format_version": FORMAT_VERSION,
        "spec": spec.to_dict(),
        "identity": spec.identity_hash(),
        "identity_fields": spec.identity(),
        "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint,
                    "splits": {s: int((dataset.split == s).sum()) for s in ("train", "val", "test")}},
        "n_examples": int(len(dataset.labels)),
        "n_classes": int(dataset.n_classes),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }))


def prepare_run(spec: Spec, store_uri: "str | RunStore", verify: bool = False) -> PreparedRun:
    """Everything that can fail on bad input happens here, before the first byte is written.

    Committed models count as done when their logits file has the recorded size, or with verify=True
    the recorded sha256 of the logits and weights files (which reads every file); the others, and those
    whose markers are damaged, are trained again. The store's lease is held while the manifest and
    examples.parquet are written (a missing or damaged examples.parquet is rewritten from the spec); a
    store leased by another live run is refused with a StoreError naming it."""
    for u in spec.unlearn:
        get_method(u.method).resolve(u.hparams)
    # a RunStore passed in keeps its lease re-entrant (`ufarm tune` holds one for the whole search)
    store = store_uri if isinstance(store_uri, RunStore) else RunStore(store_uri)
    store.check_reachable()
    dataset = load_dataset(spec.dataset, spec.seed)
    plan = make_plan(spec, dataset.split, dataset.labels, dataset.groups)
    with store.lease():  # taking over a dead run's lease removes that run's temporaries
        store.init_run(build_manifest(spec, dataset), examples_table(dataset.split, dataset.labels,
                                                                     dataset.groups, plan.forget))
    planned = {j.model_id for j in plan.jobs}
    committed = store.verified_models() if verify else store.intact_models()
    log.info("store %s: %d models committed%s; the plan has %d", store.uri, len(committed),
             " (every file's sha256 checked)" if verify else "", len(plan.jobs))
    done = {mid: m for mid, m in committed.items() if mid in planned}
    check_parents(plan, done, store.uri)
    beyond: dict[str, int] = {}
    for mid in sorted(set(committed) - planned):
        role = committed[mid].get("role", "unknown")
        beyond[role] = beyond.get(role, 0) + 1
    return PreparedRun(spec, store, dataset, plan, done, beyond)


def check_parents(plan: Plan, done: dict[str, dict], uri: str) -> None:
    """Unlearned model i starts from original i mod counts.original: a committed unlearned model made from
    another original than this plan names (counts.original changed after it was made) is refused."""
    for job in plan.jobs:
        marker = done.get(job.model_id)
        if job.role == "unlearned" and marker is not None and marker.get("parent") != job.parent:
            raise SpecError(
                f"counts.original: store {uri} holds {job.model_id} made from {marker.get('parent')}, but with "
                f"{plan.spec.count('original')} originals this spec starts it from {job.parent}; keep "
                "counts.original as it was when unlearned models were added (grow originals first), or use "
                "another store")

