"""The plain in-process executor: no Ray; used on machines without Ray (the GPU benchmark machine) and as
the benchmark baseline. Gives bit-identical models to the Ray executor on the CPU (with stacked batches,
when both cut the same stacks: Scheduler.plan_stacks)."""
from __future__ import annotations

import logging
import time
import traceback

from farm.train.engine import Engine

from .prepare import PreparedRun, RunResult
from .scheduler import Scheduler

log = logging.getLogger("ufarm")


def run_local(prep: PreparedRun, progress: bool = True, device: str | None = None,
              threads: int | None = None) -> RunResult:
    """The plain in-process loop: no Ray; used on machines without Ray and as the benchmark baseline."""
    with prep.store.lease():  # one writer at a time; released (and own temporaries removed) on every exit
        started = time.perf_counter()
        sched = Scheduler(prep, progress)
        # the same thread count as a Ray worker gets, so both executors give bit-identical models on CPU
        threads = threads or max(1, int(prep.spec.resources.cpus))
        engine = Engine(prep.context(), device=device, threads=threads) if prep.pending else None
        k = 1 if engine is None else engine.stack_size()
        log.info("plain loop: %d threads, up to %d models per stacked batch, %d jobs", threads, k, len(prep.pending))
        sched.plan_stacks(k, workers=1)
        while sched.queue:
            jobs = sched.take()
            if not jobs:  # the originals of a waiting stack's members train before it, in this one loop
                raise sched.stalled()
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
