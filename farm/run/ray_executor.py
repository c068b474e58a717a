"""The Ray executor: long-lived actors that hold the dataset once and train job after job, and the
driver's connection to a Ray cluster (started on demand, checked against the spec's resources)."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import threading
import time
from datetime import datetime

from farm.plan import Job
from farm.settings import SECRET_ENV, Settings, SettingsError, forwarded_env
from farm.spec import Spec, SpecError
from farm.store import RunStore
from farm.train.engine import STUCK_MARK, Engine, RunContext
from farm.train.timelimit import grace_seconds

from .local import run_local
from .prepare import PreparedRun, RunResult, prepare_run
from .scheduler import Scheduler

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its remote tracebacks
log = logging.getLogger("ufarm")

_INITIALISED_RAY = False  # ensure_ray called ray.init in this process (shutdown_ray undoes it)


def keep_credentials_out_of_tune() -> None:
    """Ray Tune (and Ray Train's v1 path, which runs through Tune) copies the driver's AWS credential
    variables into every trial actor's runtime_env, which Ray writes into its session logs. Take them off
    Tune's list: workers find credentials the way AWS tools do (a local Ray's workers inherit the
    driver's environment when Ray starts). Called by the Tune and Ray Train drivers before they create
    actors. Ray is pinned in pyproject; a test searches Ray's logs."""
    from ray.tune.execution import class_cache  # Ray's private list; no public switch exists

    for name in (*SECRET_ENV, "AWS_SECURITY_TOKEN"):
        class_cache.ENV_VARS_TO_PROPAGATE.discard(name)


def ensure_ray(address: str | None = None) -> None:
    """Connect to the cluster at address (or RAY_ADDRESS), or start a local one; reuse a live connection.

    A local Ray started here inherits this process's environment, credentials included; workers of a
    cluster find theirs the way AWS tools do (their environment, profile or instance role). Only the
    non-secret settings of farm.settings (forwarded_env) travel in Ray's runtime_env, which Ray logs."""
    import ray  # Ray on demand: farm.run also serves the plain loop, on machines without Ray

    global _INITIALISED_RAY
    if ray.is_initialized():
        return
    address = address or Settings.from_env().ray_address
    kwargs = dict(address=address, logging_level=logging.WARNING, log_to_driver=True)
    if address is None:
        kwargs.update(include_dashboard=False)
    env = forwarded_env()
    if env:  # every worker of this job (actors, Ray Train workers, Tune trials) sees the driver's S3 settings
        kwargs.update(runtime_env={"env_vars": env})
    main_thread = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
    ray.init(**kwargs)
    if log.isEnabledFor(logging.INFO):  # cluster_resources asks the cluster: only when -v shows it
        log.info("Ray %s: %s", "joined" if address else "started locally", address or ray.cluster_resources())
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
    import ray  # Ray on demand: farm.run also serves the plain loop, on machines without Ray

    if ray.is_initialized():
        ray.shutdown()


AUTOSCALER_WAIT_SECONDS = 900.0  # default wait for a node big enough when the cluster has an autoscaler


def _cluster_autoscales() -> bool:
    """Whether the connected Ray cluster has an autoscaler that may add nodes. A Ray that ensure_ray
    started here never does; on a joined cluster, Ray's monitor names the node types of a cluster launched
    with an autoscaling config (cluster.yaml: head, gpu_spot, ...) and only mirrors each node of a cluster
    without one (type node_<id>). When the monitor's report cannot be read, assume it may autoscale."""
    import ray  # Ray on demand: farm.run also serves the plain loop, on machines without Ray

    node = getattr(ray._private.worker, "_global_node", None)
    if _INITIALISED_RAY and node is not None and getattr(node, "head", False):
        return False
    try:
        # Ray's private key-value store: no public API reads the autoscaler's report
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
    import ray  # Ray on demand: farm.run also serves the plain loop, on machines without Ray

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
        try:
            wait_for_resources = Settings.from_env().wait_for_resources
        except SettingsError as exc:
            raise SpecError(str(exc)) from None
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
        self.engine = Engine(ctx, threads=threads)

    def run(self, jobs: list[Job]) -> list[dict]:
        return self.engine.run_batch(jobs)

    def batch_capacity(self) -> int:
        return self.engine.batch_capacity()

    def pid(self) -> int:
        return os.getpid()


def worker_count(spec: Spec, n_jobs: int, max_workers: int | None) -> int:
    import ray  # Ray on demand: farm.run also serves the plain loop, on machines without Ray

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
    """When the driver gives up on a batch holding unlearned jobs (None: no time limit applies). Their limits
    add up: a batch runs its models one after another, or stacked under the sum of their limits."""
    limits = [j.time_limit for j in jobs if j.role == "unlearned" and j.time_limit]
    if not limits:
        return None
    limit = sum(limits)
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
    import ray  # Ray on demand: farm.run also serves the plain loop, on machines without Ray
    from ray.exceptions import RayActorError, RayTaskError

    with prep.store.lease():  # one writer at a time; released (and own temporaries removed) on every exit
        started = time.perf_counter()
        sched = Scheduler(prep, progress)
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
        log.info("%d Ray workers (%g CPU, %g GPU each), up to %d models per stacked batch, %d jobs", n_workers,
                 res.cpus, res.gpus, k, len(prep.pending))
        sched.plan_stacks(k, n_workers)
        inflight: dict = {}
        try:
            while sched.queue or inflight:
                while idle and sched.queue:
                    jobs = sched.take()
                    if not jobs:  # the ready jobs wait for the rest of their stacks: wait for a result
                        break
                    actor = idle.pop()
                    inflight[actor.run.remote(jobs)] = (actor, jobs, time.monotonic())
                if not inflight:
                    if sched.queue:  # nothing running could release the rest of a waiting stack
                        raise sched.stalled()
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


