"""Run a spec against a store: prepare (validate, plan, manifest), then train what is missing, either
through long-lived Ray actors or in a plain in-process loop.

Scheduling rules (the same for both executors):
- a job that raises is retried up to spec.max_retries times, then reported by id with its error in
  <run>/failed/<model_id>.json while the other jobs go on;
- with Ray, a worker that dies mid-job (process killed, node lost) is replaced and its job re-queued;
  that does not count as a retry, up to MAX_WORKER_DEATHS deaths of the same job;
- unlearned jobs wait for their original; if the original fails, they fail with that reason.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone


from .datasets import Dataset, load_dataset
from .engine import STUCK_MARK, RunContext
from .methods import get_method
from .plan import Job, Plan, make_plan
from .spec import Spec, SpecError
from .store import FORMAT_VERSION, RunStore, examples_table
from .timelimit import grace_seconds

MAX_WORKER_DEATHS = 3
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its remote tracebacks
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
    done = {mid: m for mid, m in committed.items() if mid in planned}
    return PreparedRun(spec, store, dataset, plan, done)


class _Scheduler:
    """Job bookkeeping shared by both executors: ready queue, parents, retries, failures, progress."""

    def __init__(self, prep: PreparedRun, progress: bool):
        self.prep = prep
        self.result = RunResult(store=prep.store.uri, planned=len(prep.plan.jobs), already_done=len(prep.done))
        self.done = set(prep.done)
        self.attempts: dict[str, int] = {}
        self.deaths: dict[str, int] = {}
        self.queue: deque[Job] = deque()
        self.solo: set[str] = set()  # jobs of a batch that raised: retried one at a time to isolate the cause
        self.waiting: list[Job] = []
        for job in prep.pending:
            (self.waiting if job.parent and job.parent not in self.done else self.queue).append(job)
        from tqdm import tqdm  # here: the engine and planning import this module on machines without tqdm

        self.bar = tqdm(total=len(prep.plan.jobs), initial=len(prep.done), unit="model", desc=prep.spec.name,
                        disable=not progress, dynamic_ncols=True)

    def release_waiting(self) -> None:
        still = []
        for job in self.waiting:
            if job.parent in self.done:
                self.queue.append(job)
            elif job.parent in self.result.failed:
                self.fail(job, f"its original {job.parent} failed", "")
            else:
                still.append(job)
        self.waiting = still

    def take(self, k: int) -> list[Job]:
        """The next job, plus up to k-1 more that can share a stacked batch (trained from scratch)."""
        first = self.queue.popleft()
        unit = [first]
        if k > 1 and first.role != "unlearned" and first.model_id not in self.solo:
            rest = deque()
            while self.queue and len(unit) < k:
                job = self.queue.popleft()
                (unit if job.role != "unlearned" and job.model_id not in self.solo else rest).append(job)
            self.queue.extendleft(reversed(rest))
        return unit

    def batch_raised(self, jobs: list[Job], error: BaseException, tb: str) -> None:
        if len(jobs) == 1:
            return self.raised(jobs[0], error, tb)
        log.warning("a batch of %d models raised (%s); retrying them one at a time", len(jobs), _one_line(error))
        self.solo.update(j.model_id for j in jobs)
        self.queue.extendleft(reversed(jobs))

    def succeeded(self, job: Job) -> None:
        self.done.add(job.model_id)
        self.result.trained.append(job.model_id)
        self.bar.update(1)
        self.release_waiting()

    def raised(self, job: Job, error: BaseException, tb: str) -> None:
        n = self.attempts[job.model_id] = self.attempts.get(job.model_id, 0) + 1
        if n <= self.prep.spec.max_retries:
            log.warning("%s raised (%s); retry %d of %d", job.model_id, _one_line(error), n,
                        self.prep.spec.max_retries)
            self.queue.append(job)
        else:
            self.fail(job, _one_line(error), tb)

    def worker_died(self, job: Job, error: BaseException) -> None:
        n = self.deaths[job.model_id] = self.deaths.get(job.model_id, 0) + 1
        if n <= MAX_WORKER_DEATHS:
            log.warning("worker running %s died (%s); re-queued", job.model_id, _one_line(error))
            self.queue.appendleft(job)
        else:
            self.fail(job, f"its worker died {n} times: {_one_line(error)}", "")

    def fail(self, job: Job, message: str, tb: str) -> None:
        self.result.failed[job.model_id] = message
        self.prep.store.write_failure(job.model_id, {
            "role": job.role, "error": message, "traceback": tb,
            "attempts": self.attempts.get(job.model_id, 0), "worker_deaths": self.deaths.get(job.model_id, 0),
            "failed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        self.bar.write(f"ufarm: {job.model_id} failed: {message}")
        self.release_waiting()

    def finish(self, started: float) -> RunResult:
        self.bar.close()
        self.result.seconds = time.perf_counter() - started
        return self.result


def _one_line(error: BaseException) -> str:
    lines = [ln for ln in str(error).strip().splitlines() if ln.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}".strip()


def run_local(prep: PreparedRun, progress: bool = True, device: str | None = None,
              threads: int | None = None) -> RunResult:
    """The plain in-process loop: no Ray; used on machines without Ray and as the benchmark baseline."""
    from .engine import Engine

    with prep.store.lease():  # one writer at a time; released (and own temporaries removed) on every exit
        started = time.perf_counter()
        sched = _Scheduler(prep, progress)
        # the same thread count as a Ray worker gets, so both executors give bit-identical models on CPU
        threads = threads or max(1, int(prep.spec.resources.cpus))
        engine = Engine(prep.context(), device=device, threads=threads) if prep.pending else None
        batch_models = prep.spec.resources.batch_models
        k = 1 if engine is None else engine.batch_capacity() if batch_models == "auto" else int(batch_models)
        while sched.queue:
            jobs = sched.take(k)
            try:
                engine.run_batch(jobs)
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM (farm.cli): the run stops, committed models stay
                raise
            except BaseException as exc:  # a job's failure (sys.exit() in a method included) must not stop the run
                sched.batch_raised(jobs, exc, traceback.format_exc())
            else:
                for job in jobs:
                    sched.succeeded(job)
        return sched.finish(started)


# ---------------------------------------------------------------------------------------------- Ray

_INITIALISED_RAY = False  # ensure_ray called ray.init in this process (shutdown_ray undoes it)


def ensure_ray(address: str | None = None) -> None:
    """Connect to the cluster at address (or RAY_ADDRESS), or start a local one; reuse a live connection.

    A local Ray started here inherits this process's environment, credentials included; workers of a
    cluster find theirs the way AWS tools do (their environment, profile or instance role). Only the
    non-secret settings of FORWARDED_ENV travel in Ray's runtime_env, which Ray writes into its logs."""
    import ray

    global _INITIALISED_RAY
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(address=address, logging_level=logging.WARNING, log_to_driver=True)
    if address is None:
        kwargs.update(include_dashboard=False)
    env = forwarded_env()
    if env:  # every worker of this job (actors, Ray Train workers, Tune trials) sees the driver's S3 settings
        kwargs.update(runtime_env={"env_vars": env})
    import signal
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
    ray.init(**kwargs)
    _INITIALISED_RAY = True
    if callable(sigterm):  # Ray replaces it; the caller's own (farm.cli: SIGTERM ends a run like Ctrl-C) stays
        signal.signal(signal.SIGTERM, sigterm)


def shutdown_ray() -> None:
    """Undo ensure_ray: stop the local Ray it started (or leave the cluster it joined). A Ray that the
    caller initialised itself is left alone."""
    global _INITIALISED_RAY
    if not _INITIALISED_RAY:
        return
    _INITIALISED_RAY = False
    import ray

    if ray.is_initialized():
        ray.shutdown()


# The only environment variables the driver hands its Ray workers: where the store is and how to reach it.
# Never credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN): Ray writes runtime_env
# into its session logs, which every user of the machine can read.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
                 "UFARM_S3_CONNECT_TIMEOUT", "UFARM_S3_REQUEST_TIMEOUT", "UFARM_S3_ATTEMPTS", "UFARM_S3_RETRIES")


def forwarded_env() -> dict[str, str]:
    """The driver's non-secret S3 settings, so workers write to the same store the driver checked."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


AUTOSCALER_WAIT_SECONDS = 900.0  # default wait for a node big enough when the cluster has an autoscaler


def _cluster_autoscales() -> bool:
    """Whether the connected Ray cluster has an autoscaler that may add nodes. A Ray that ensure_ray
    started here never does; on a joined cluster, Ray's monitor names the node types of a cluster launched
    with an autoscaling config (cluster.yaml: head, gpu_spot, ...) and only mirrors each node of a cluster
    without one (type node_<id>). When the monitor's report cannot be read, assume it may autoscale."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if _INITIALISED_RAY and node is not None and getattr(node, "head", False):
        return False
    try:
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get("__autoscaling_status")
        for _ in range(20):  # a cluster that just started: its monitor reports within seconds
            if raw:
                break
            time.sleep(0.5)
            raw = _internal_kv_get("__autoscaling_status")
        report = json.loads(raw)["autoscaler_report"] if raw else None
        types = set((report or {}).get("node_type_mapping", {}).values())
    except Exception:
        return True
    return not types or any(not str(t).startswith("node_") for t in types)


def _unfit(spec: Spec) -> str | None:
    """Why no live node of the connected cluster can hold one worker of the spec, or None if one can."""
    import ray

    res = spec.resources
    nodes = [(float(n.get("Resources", {}).get("CPU", 0)), float(n.get("Resources", {}).get("GPU", 0)))
             for n in ray.nodes() if n.get("Alive")]
    cpu_ok = [c + 1e-9 >= res.cpus for c, _ in nodes]
    gpu_ok = [g + 1e-9 >= res.gpus for _, g in nodes]
    if any(a and b for a, b in zip(cpu_ok, gpu_ok)):
        return None
    cpus, gpus = max(nodes, default=(0.0, 0.0))
    largest = f"the largest node has {cpus:g} CPUs and {gpus:g} GPUs"
    if not any(cpu_ok):
        return f"resources.cpus {res.cpus:g} is more than any node of the Ray cluster has ({largest})"
    if not any(gpu_ok):
        return f"resources.gpus {res.gpus:g} is more than any node of the Ray cluster has ({largest})"
    return (f"resources.cpus {res.cpus:g} with resources.gpus {res.gpus:g} is more than any node of the Ray "
            f"cluster has ({largest})")


def check_cluster_fits(spec: Spec, wait_for_resources: float | None = None) -> None:
    """Fail with a one-line SpecError if no node of the connected cluster can ever hold one worker.

    wait_for_resources: seconds to wait for such a node to join (an autoscaling cluster); None: the
    UFARM_WAIT_FOR_RESOURCES variable, else AUTOSCALER_WAIT_SECONDS when the cluster autoscales and 0
    (fail at once) when it does not."""
    why = _unfit(spec)
    if why is None:
        return
    if wait_for_resources is None:
        env = os.environ.get("UFARM_WAIT_FOR_RESOURCES")
        try:
            wait_for_resources = float(env) if env else None
        except ValueError:
            raise SpecError(f"UFARM_WAIT_FOR_RESOURCES must be a number of seconds, got {env!r}") from None
        if wait_for_resources is None:
            wait_for_resources = AUTOSCALER_WAIT_SECONDS if _cluster_autoscales() else 0.0
    if wait_for_resources > 0:
        log.warning("%s; waiting up to %g s for a bigger node to join", why, wait_for_resources)
        deadline = time.monotonic() + wait_for_resources
        while time.monotonic() < deadline:
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
            why = _unfit(spec)
            if why is None:
                return
        raise SpecError(f"{why}, also after waiting {wait_for_resources:g} s (--wait-for-resources)")
    raise SpecError(f"{why}; no worker could ever start (--wait-for-resources SECONDS waits for an autoscaler)")


class FarmWorker:
    """A long-lived Ray actor: holds the dataset once on its device and trains job after job."""

    def __init__(self, ctx: RunContext, threads: int | None):
        from .engine import Engine

        self.engine = Engine(ctx, threads=threads)

    def run(self, jobs: list[Job]) -> list[dict]:
        return self.engine.run_batch(jobs)

    def batch_capacity(self) -> int:
        return self.engine.batch_capacity()

    def pid(self) -> int:
        return os.getpid()


def worker_count(spec: Spec, n_jobs: int, max_workers: int | None) -> int:
    import ray

    total = ray.cluster_resources()
    fits = [math.floor(total.get("CPU", 0) / spec.resources.cpus + 1e-9)]
    if spec.resources.gpus > 0:
        fits.append(math.floor(total.get("GPU", 0) / spec.resources.gpus + 1e-9))
    n = max(1, min(fits))
    if max_workers:
        n = min(n, max_workers)
    return max(1, min(n, n_jobs))


DRIVER_GRACE_SECONDS = 120.0  # beyond a method's time limit and the worker's own grace, before the driver acts


def _deadline(jobs: list[Job], dispatched: float) -> float | None:
    """When the driver gives up on a batch holding an unlearned job (None: no time limit applies)."""
    limits = [j.time_limit for j in jobs if j.role == "unlearned" and j.time_limit]
    if not limits:
        return None
    limit = max(limits)
    return dispatched + limit + grace_seconds(limit) + DRIVER_GRACE_SECONDS


def _next_deadline(inflight: dict) -> float | None:
    """ray.wait's timeout: seconds to the nearest deadline of the batches in flight (None: wait for one)."""
    ends = [d for _, jobs, t in inflight.values() if (d := _deadline(jobs, t)) is not None]
    return max(0.0, min(ends) - time.monotonic()) if ends else None


def _overdue(inflight: dict) -> list:
    now = time.monotonic()
    return [ref for ref, (_, jobs, t) in inflight.items() if (d := _deadline(jobs, t)) is not None and d <= now]


def _stuck_record(store: RunStore, job: Job, dispatched: float) -> str | None:
    """The error a worker wrote before ending itself for this job past its time limit (engine.Engine._stuck),
    when it wrote one during this dispatch; None otherwise (a worker lost for another reason)."""
    if job.role != "unlearned":
        return None
    record = store.failures().get(job.model_id)
    if not record or STUCK_MARK not in str(record.get("error", "")):
        return None
    try:
        failed_at = datetime.fromisoformat(record["failed_at"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return None
    # failed_at has whole seconds: allow one for rounding
    return record["error"] if failed_at >= time.time() - (time.monotonic() - dispatched) - 1 else None


def run_ray(prep: PreparedRun, address: str | None = None, max_workers: int | None = None,
            progress: bool = True, wait_for_resources: float | None = None) -> RunResult:
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    with prep.store.lease():  # one writer at a time; released (and own temporaries removed) on every exit
        started = time.perf_counter()
        sched = _Scheduler(prep, progress)
        if not prep.pending:
            return sched.finish(started)
        ensure_ray(address)
        try:  # a request no node can ever hold would wait forever
            check_cluster_fits(prep.spec, wait_for_resources)
        except SpecError:
            sched.bar.close()
            raise
        res = prep.spec.resources
        threads = max(1, int(res.cpus))
        # also per actor, for a Ray that the caller initialised without them; an empty runtime_env lets Ray
        # use its prestarted worker processes
        env = forwarded_env()
        Actor = ray.remote(num_cpus=res.cpus, num_gpus=res.gpus, max_restarts=0, max_task_retries=0,
                           **({"runtime_env": {"env_vars": env}} if env else {}))(FarmWorker)
        ctx_ref = ray.put(prep.context())
        n_workers = worker_count(prep.spec, len(prep.pending), max_workers)
        idle = [Actor.remote(ctx_ref, threads) for _ in range(n_workers)]
        k = int(ray.get(idle[0].batch_capacity.remote())) if res.batch_models == "auto" else int(res.batch_models)
        inflight: dict = {}
        try:
            while sched.queue or inflight:
                while idle and sched.queue:
                    # share the ready jobs evenly over the workers, at most k per stacked batch
                    jobs = sched.take(min(k, math.ceil(len(sched.queue) / n_workers)))
                    actor = idle.pop()
                    inflight[actor.run.remote(jobs)] = (actor, jobs, time.monotonic())
                if not inflight:
                    break
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=_next_deadline(inflight))
                for ref in _overdue(inflight) if not ready else ():
                    # the worker's own time limit could not end it (hung in native code, its watchdog
                    # starved): the driver ends the worker and fails the job, without retries
                    actor, jobs, _ = inflight.pop(ref)
                    ray.kill(actor, no_restart=True)
                    idle.append(Actor.remote(ctx_ref, threads))
                    for job in jobs:
                        sched.fail(job, f"method {job.method!r} ran past its time limit of {job.time_limit:g} s "
                                        "and its worker did not end it; the driver ended the worker", "")
                for ref in ready:
                    actor, jobs, dispatched = inflight.pop(ref)
                    try:
                        ray.get(ref)
                    except RayActorError as exc:  # the worker process or its node died: replace it
                        ray.kill(actor, no_restart=True)
                        idle.append(Actor.remote(ctx_ref, threads))
                        for job in jobs:
                            stuck = _stuck_record(prep.store, job, dispatched)
                            if stuck:  # it ended itself past its time limit: a failed model, not a lost worker
                                sched.fail(job, stuck, "")
                            else:
                                sched.worker_died(job, exc)
                    except RayTaskError as exc:
                        idle.append(actor)
                        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                        sched.batch_raised(jobs, cause, _ANSI.sub("", str(exc)))
                    else:
                        idle.append(actor)
                        for job in jobs:
                            sched.succeeded(job)
        finally:
            for actor in idle + [a for a, _, _ in inflight.values()]:
                ray.kill(actor, no_restart=True)
        return sched.finish(started)


def run_spec(spec: Spec, store_uri: str, *, executor: str = "ray", address: str | None = None,
             max_workers: int | None = None, progress: bool = True) -> RunResult:
    prep = prepare_run(spec, store_uri)
    if executor == "local":
        return run_local(prep, progress=progress)
    return run_ray(prep, address=address, max_workers=max_workers, progress=progress)

