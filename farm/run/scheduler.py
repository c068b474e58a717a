"""Job bookkeeping shared by every executor: ready queue, parents, retries, failures, progress.

Scheduling rules (the same for every executor):
- a job that raises is retried up to spec.max_retries times, then reported by id with its error in
  <run>/failed/<model_id>.json while the other jobs go on;
- with Ray, a worker that dies mid-job (process killed, node lost) is replaced and its job re-queued;
  that does not count as a retry, up to MAX_WORKER_DEATHS deaths of the same job;
- unlearned jobs wait for their original; if the original fails, they fail with that reason.
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from collections import deque
from datetime import datetime, timezone

from farm.plan import Job
from farm.train.stacked_methods import stack_key

from .prepare import PreparedRun, RunResult

MAX_WORKER_DEATHS = 3
log = logging.getLogger("ufarm")


class Scheduler:
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
        self.stacks: dict[str, tuple[str, ...]] = {}  # model id -> the ids of its stack (plan_stacks)
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

    def plan_stacks(self, k: int, workers: int) -> None:
        """Fix which jobs share a stacked batch, from the plan alone: the pending jobs of each stack_key
        (trained from scratch, or unlearned by one stackable method with the same hyper-parameters), in
        plan order, cut into stacks of min(k, ceil(n / workers)) models, n being that key's pending jobs,
        so that the workers share them evenly. The stacked kernels' rounding depends on how many models
        share them, so a model's stack decides its bits: fixed here, it does not depend on which job
        happened to finish first."""
        self.stacks = {}
        if k <= 1:
            return
        by_key: dict[tuple, list[str]] = {}
        for job in self.prep.pending:
            key = stack_key(job)
            if key is not None:
                by_key.setdefault(key, []).append(job.model_id)
        for ids in by_key.values():
            size = max(1, min(k, math.ceil(len(ids) / workers)))
            for start in range(0, len(ids), size):
                stack = tuple(ids[start:start + size])
                self.stacks.update(dict.fromkeys(stack, stack))

    def take(self) -> list[Job]:
        """The next ready unit in queue order (the queue is not empty): a job alone, or its whole stack
        (plan_stacks) once every member not yet finished or failed is ready; [] when every ready job waits
        for the rest of its stack (members whose originals are still training)."""
        head = self._members(self.queue[0])
        if [j.model_id for j in itertools.islice(self.queue, len(head))] == head:  # the usual case, O(k)
            return [self.queue.popleft() for _ in head]
        ready = {j.model_id: j for j in self.queue}
        for job in self.queue:
            members = self._members(job)
            if all(m in ready for m in members):
                taken = set(members)
                self.queue = deque(j for j in self.queue if j.model_id not in taken)
                return [ready[m] for m in members]
        return []

    def stalled(self) -> RuntimeError:
        """The error of an executor whose queue holds jobs that cannot start (take() gives []) while nothing
        it runs could release them."""
        return RuntimeError("the scheduler has queued jobs but none can start: " +
                            ", ".join(j.model_id for j in list(self.queue)[:5]))

    def _members(self, job: Job) -> list[str]:
        """The ids of the job's stack still to make (itself only after its stack raised), in plan order."""
        members = (job.model_id,) if job.model_id in self.solo else self.stacks.get(job.model_id, (job.model_id,))
        return [m for m in members if m not in self.done and m not in self.result.failed]

    def batch_raised(self, jobs: list[Job], error: BaseException, tb: str) -> None:
        if len(jobs) == 1:
            return self.raised(jobs[0], error, tb)
        log.warning("a batch of %d models raised (%s); retrying them one at a time", len(jobs), one_line(error))
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
            log.warning("%s raised (%s); retry %d of %d", job.model_id, one_line(error), n,
                        self.prep.spec.max_retries)
            self.queue.append(job)
        else:
            self.fail(job, one_line(error), tb)

    def worker_died(self, job: Job, error: BaseException) -> None:
        n = self.deaths[job.model_id] = self.deaths.get(job.model_id, 0) + 1
        if n <= MAX_WORKER_DEATHS:
            log.warning("worker running %s died (%s); re-queued", job.model_id, one_line(error))
            self.queue.appendleft(job)
        else:
            self.fail(job, f"its worker died {n} times: {one_line(error)}", "")

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


def one_line(error: BaseException) -> str:
    lines = [ln for ln in str(error).strip().splitlines() if ln.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}".strip()

