"""Models too big for one GPU: one model trained data-parallel across several Ray Train workers
(TorchTrainer, DistributedDataParallel), committed to the store under the same contract as any model.

Selected by `resources.workers_per_model > 1`. Jobs then run one after another, each across all its
workers. Semantics match single-worker training: every epoch one seeded permutation of the model's
training set (the same on all ranks) is cut into global batches of training.batch_size, and rank r takes
the r-th slice of each global batch; DDP averages the gradients, so a step sees the same global batch a
single worker would (augmentation draws differ per rank). Rank 0 predicts every example and commits.
"""
from __future__ import annotations

import tempfile
import time
import traceback

import numpy as np
import torch

from farm.plan import Job
from farm.train.engine import Engine
from farm.train.loops import augment_batch, autocast, predict_logits, set_determinism

from .prepare import PreparedRun, RunResult
from .ray_executor import ensure_ray, keep_credentials_out_of_tune
from .scheduler import Scheduler, log

PLAN_ROLES = ("original", "retrain", "shadow")


def _train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray  # Ray on demand: farm.run also serves the plain loop, on machines without Ray
    import ray.train
    import ray.train.torch as rt

    ctx, job = ray.get(config["ctx"]), config["job"]
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    engine = Engine(ctx, device=str(rt.get_device()), threads=config["threads"])
    cfg = ctx.spec.training
    start = time.perf_counter()
    gen = set_determinism(job.seed)  # same init on every rank; DDP also broadcasts rank 0's weights
    model = rt.prepare_model(engine.new_model())
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    idx = torch.tensor(job.train_idx, dtype=torch.long)
    steps = int(np.ceil(len(idx) / cfg.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    for _ in range(cfg.epochs):
        order = idx[torch.randperm(len(idx), generator=gen)]
        for s in range(steps):
            batch = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            mine = batch[rank::world].to(engine.device)  # this rank's share of the global batch
            opt.zero_grad(set_to_none=True)
            if len(mine) == 0:  # a short last batch: still join DDP's all-reduce, with a zero gradient
                (model(engine.images[:1]).sum() * 0.0).backward()
            else:
                x, y = engine.images[mine], engine.labels[mine]
                if cfg.augment:
                    x = augment_batch(x, gen)
                # weighted by the share, DDP's gradient average is the mean over the global batch
                with autocast(engine.device, cfg.precision):
                    out = model(x)
                (loss_fn(out.float(), y) * (len(mine) * world / len(batch))).backward()
            opt.step()
            sched.step()
    if rank == 0:
        net = model.module if hasattr(model, "module") else model
        net.eval()
        train_seconds = time.perf_counter() - start
        logits = predict_logits(net, engine.images, ctx.spec.queries, cfg.eval_batch_size, cfg.precision)
        engine.commit(job, net, logits, train_seconds, time.perf_counter() - start,
                      extra={"data_parallel_workers": world})
    ray.train.report({"done": 1})


def run_distributed(prep: PreparedRun, workers: int, *, use_gpu: bool, progress: bool = True,
                    address: str | None = None) -> RunResult:
    """Train the pending original/retrain/shadow jobs one at a time, each across `workers` workers."""
    import ray  # Ray on demand: farm.run also serves the plain loop, on machines without Ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    with prep.store.lease():  # one writer at a time, for every job of the run
        started = time.perf_counter()
        sched = Scheduler(prep, progress)
        if not prep.pending:
            return sched.finish(started)
        ensure_ray(address)
        keep_credentials_out_of_tune()  # Ray Train's v1 path (RAY_TRAIN_V2_ENABLED=0) runs through Tune
        res = prep.spec.resources
        ctx_ref = ray.put(prep.context())
        left = [j for j in list(sched.queue) + sched.waiting if j.role not in PLAN_ROLES]
        if left:  # unlearned models fit one worker by construction of the use case; they stay pending
            log.warning("%d unlearned models are left for a run with resources.workers_per_model: 1", len(left))
        sched.queue = type(sched.queue)(j for j in sched.queue if j.role in PLAN_ROLES)
        sched.waiting = []
        # Ray Train's own bookkeeping, not the run store; removed when the run ends, however it ends
        with tempfile.TemporaryDirectory(prefix="ufarm-train-") as storage:
            while sched.queue:
                job: Job = sched.queue.popleft()
                trainer = TorchTrainer(
                    _train_loop,
                    train_loop_config={"ctx": ctx_ref, "job": job, "threads": max(1, int(res.cpus))},
                    scaling_config=ScalingConfig(
                        num_workers=workers, use_gpu=use_gpu,
                        resources_per_worker={"CPU": res.cpus, **({"GPU": res.gpus} if use_gpu else {})}),
                    run_config=RunConfig(name=job.model_id, storage_path=storage),
                )
                try:
                    trainer.fit()
                except Exception as exc:  # reported like any failing job; the others go on
                    sched.raised(job, exc, traceback.format_exc())
                else:
                    sched.succeeded(job)
        return sched.finish(started)
