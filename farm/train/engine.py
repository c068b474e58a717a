"""The training engine: one object that holds the dataset on its device and turns a Job into a committed
model in the store (train or unlearn, predict every example under every query, write logits, then marker).

No Ray here: a Ray actor wraps an Engine (farm.run), and a plain loop or a machine without Ray uses it
directly.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import torch

from farm.train.stacked import StackedModels, can_stack, has_batchnorm, predict_stacked, train_stacked
from farm.train.methods import get_method
from farm.train.stacked_methods import STACKED_METHODS, following_global, stack_key
from farm.train.models import build_model
from farm.plan import Job
from farm.spec import DEFAULT_UNLEARN_TIME_LIMIT, Spec
from farm.store import RunStore, logits_table
from farm.train.timelimit import TimeLimitExceeded, call_with_time_limit, grace_seconds
from farm.train.loops import (accuracy, compiled, configure_gpu_kernels, in_memory_format, make_loader,
                              method_autocast, predict_logits, set_determinism, train_model)


AUTO_CPU_BATCH = 8  # measured on 2 cores: stacking 8 digits CNNs beats one at a time (docs/benchmarks.md)
AUTO_MAX_BATCH = 256
COMMIT_THREADS = min(8, os.cpu_count() or 1)


class MethodOutputError(RuntimeError):
    """An unlearning method returned something that is not a usable model of the original's shape."""


class MethodError(RuntimeError):
    """An unlearning method raised; the message names the model and the method, the cause is chained."""


class MethodTimeoutError(MethodError):
    """An unlearning method ran past its spec'd time limit (unlearn[].time_limit) and was interrupted."""


STUCK_EXIT_CODE = 1  # a method that cannot be interrupted past its time limit ends its process with this
STUCK_MARK = "could not be interrupted"  # in the failure record _stuck writes; the Ray driver looks for it


@dataclass
class RunContext:
    """Everything a worker needs, shipped once per worker (through Ray's object store on a cluster)."""
    spec: Spec
    store_uri: str
    images: np.ndarray = field(repr=False)  # float32 [N, C, H, W]
    labels: np.ndarray = field(repr=False)  # int64 [N]
    split: np.ndarray = field(repr=False)  # str [N]
    forget: np.ndarray = field(repr=False)  # bool [N]
    n_classes: int = 10


def _models_named(jobs: list[Job]) -> str:
    """How an error names the models of one method call: "model ID", or "models ID, ID (stacked)"."""
    if len(jobs) == 1:
        return f"model {jobs[0].model_id}"
    return f"models {', '.join(j.model_id for j in jobs)} (stacked)"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


class Engine:
    def __init__(self, ctx: RunContext, device: str | None = None, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.ctx = ctx
        self.spec = ctx.spec
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        configure_gpu_kernels(self.device, ctx.spec.resources.gpu_kernels)
        # a copy (object-store arrays are read-only), in the memory format the models read
        self.images = in_memory_format(torch.tensor(ctx.images, device=self.device), ctx.spec.resources.memory_format)
        self.labels = torch.from_numpy(ctx.labels.astype(np.int64)).to(self.device)
        self.store = RunStore(ctx.store_uri)
        self._stack_size: int | None = None  # stack_size(), measured on first use
        self._stacking: tuple[bool, bool] | None = None  # stacking(), found on first use
        split = ctx.split
        self.masks = {"train": split == "train", "val": split == "val", "test": split == "test",
                      "retain": (split == "train") & ~ctx.forget, "forget": ctx.forget}

    def new_model(self) -> torch.nn.Module:
        _, c, h, _ = self.ctx.images.shape
        model = build_model(self.spec.model, in_channels=c, n_classes=self.ctx.n_classes, image_size=h)
        resources = self.spec.resources
        return compiled(in_memory_format(model.to(self.device), resources.memory_format), resources.compile)

    def run(self, job: Job) -> dict:
        """Train (or unlearn) the job's model and commit it to the store; returns its marker."""
        start = time.perf_counter()
        gen = set_determinism(job.seed)
        if job.role == "unlearned":
            model = self._unlearn(job)
        else:
            model = self.new_model()
            train_model(model, self.images, self.labels, job.train_idx, self.spec.training, gen)
        train_seconds = time.perf_counter() - start
        cfg = self.spec.training
        logits = predict_logits(model, self.images, self.spec.queries, cfg.eval_batch_size, cfg.precision)
        return self.commit(job, model, logits, train_seconds, time.perf_counter() - start)

    def run_batch(self, jobs: list[Job]) -> list[dict]:
        """Train several jobs at once with stacked weights (farm.train.stacked) and commit each as its own
        model: models trained from scratch, or unlearned models of one stackable built-in method and
        hyper-parameters (farm.train.stacked_methods). Runs them one at a time when they cannot share a stack
        (stack_key: a mix, another method) or the architecture cannot stack. Models with BatchNorm stack only
        with models of the same training-set size (farm.train.stacked). The stacked kernels' rounding depends
        on how many models share them: the scheduler fixes the batches (farm.run.scheduler.plan_stacks)."""
        stackable, batchnorm = self.stacking()
        key = stack_key(jobs[0])
        if not stackable or key is None or any(stack_key(j) != key for j in jobs):
            return [self.run(j) for j in jobs]
        if batchnorm and len({len(j.train_idx) for j in jobs}) > 1:
            by_size: dict[int, list[Job]] = {}
            for j in jobs:
                by_size.setdefault(len(j.train_idx), []).append(j)
            done = {j.model_id: m for group in by_size.values() for j, m in zip(group, self.run_batch(group))}
            return [done[j.model_id] for j in jobs]
        passes = STACKED_METHODS[jobs[0].method].passes if jobs[0].role == "unlearned" else 1
        size = len(jobs)
        if passes > 1 and self.spec.resources.batch_models == "auto":
            # "auto" sized the batch from a training step's memory; a step of this method holds `passes`
            # forward passes' activations, so its stacks hold 1/passes as many models
            size = math.ceil(len(jobs) / passes)
        return [m for i in range(0, len(jobs), size) for m in self._stack(jobs[i:i + size])]

    def _stack(self, jobs: list[Job]) -> list[dict]:
        """One stack of jobs that share a stack_key, trained or unlearned, then committed (a job alone runs
        as run() runs it)."""
        if len(jobs) == 1:
            return [self.run(jobs[0])]
        start = time.perf_counter()
        stack = self._unlearn_stack(jobs) if jobs[0].role == "unlearned" else self._train_stack(jobs)
        return self._commit_stack(jobs, stack, start)

    def stacking(self) -> tuple[bool, bool]:
        """(can_stack, has_batchnorm) of this run's architecture, from one model built on first use."""
        if self._stacking is None:
            model = self.new_model()
            self._stacking = (can_stack(model), has_batchnorm(model))
        return self._stacking

    def stack_size(self) -> int:
        """Models per stacked batch in this run: resources.batch_models, or for "auto" what batch_capacity
        picks here (measured once)."""
        if self._stack_size is None:
            k = self.spec.resources.batch_models
            self._stack_size = self.batch_capacity() if k == "auto" else int(k)
        return self._stack_size

    def _train_stack(self, jobs: list[Job]) -> StackedModels:
        models, gens = [], []
        for job in jobs:  # each model initialised and ordered exactly as run() would do it alone
            gens.append(set_determinism(job.seed))
            models.append(self.new_model())
        stack = StackedModels(models)
        train_stacked(stack, self.images, self.labels, [j.train_idx for j in jobs], self.spec.training, gens)
        return stack

    def _unlearn_stack(self, jobs: list[Job]) -> StackedModels:
        """K unlearned models of one built-in method and hyper-parameters, stepped together by its stacked
        twin: each model starts as run() would start it alone (seeded, its original's weights, its own
        loaders, the method's per-model preparation) and keeps its own random draws. The time limit is the
        sum of the models' limits: the stack does the work of all of them."""
        method = get_method(jobs[0].method)
        hparams = method.resolve(jobs[0].hparams)
        twin = STACKED_METHODS[method.name]

        def unlearn() -> StackedModels:
            models, retains, forgets, gens, prepared = [], [], [], [], []
            for job in jobs:
                set_determinism(job.seed)
                model = self._parent_model(job)
                retain, forget, _ = self._loaders(job)
                prepared.append(twin.prepare(model, retain, forget, hparams) or {})
                gens.append(following_global(self.device))
                models.append(model)
                retains.append(retain)
                forgets.append(forget)
            stack = StackedModels(models)
            twin.run(stack, retains, forgets, gens, prepared, **hparams)
            return stack

        limit = sum(j.time_limit or DEFAULT_UNLEARN_TIME_LIMIT for j in jobs)
        return self._call_method(jobs, unlearn, limit)

    def _commit_stack(self, jobs: list[Job], stack: StackedModels, start: float) -> list[dict]:
        """Predict with the stacked models and commit each as its own model; its time is its share of the
        stack's."""
        train_seconds = (time.perf_counter() - start) / stack.k
        cfg = self.spec.training
        logits = predict_stacked(stack, self.images, self.spec.queries, cfg.eval_batch_size, cfg.precision)
        seconds = (time.perf_counter() - start) / stack.k
        # modules only where weights are stored (originals, keep_weights): K deep copies cost time otherwise
        need_weights = self.spec.outputs.keep_weights or any(j.role == "original" for j in jobs)
        trained = stack.unstack() if need_weights else [None] * len(jobs)
        # The commits (confidence, Parquet encoding, sha256, writes) release the GIL: run them side by side.
        with ThreadPoolExecutor(max_workers=min(len(jobs), COMMIT_THREADS)) as pool:
            futures = [pool.submit(self.commit, job, model, logits[i], train_seconds, seconds, batched=len(jobs))
                       for i, (job, model) in enumerate(zip(jobs, trained))]
            return [f.result() for f in futures]

    def batch_capacity(self) -> int:
        """How many models one stacked batch should hold here ("auto" in the spec): AUTO_CPU_BATCH on a CPU
        (1 for models with BatchNorm, whose stacking was not measured faster there); on a GPU, what 70% of the
        free memory holds, from the peak memory of a probe step of 4 models."""
        stackable, batchnorm = self.stacking()
        if not stackable:
            return 1
        if self.device.type != "cuda":
            return 1 if batchnorm else AUTO_CPU_BATCH
        probe = 4
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        stack = StackedModels([self.new_model() for _ in range(probe)])
        idx = np.arange(min(len(self.ctx.labels), self.spec.training.batch_size))
        cfg = dataclasses.replace(self.spec.training, epochs=1)
        train_stacked(stack, self.images, self.labels, [idx] * probe, cfg, [torch.Generator() for _ in range(probe)])
        per_model = max(1, (torch.cuda.max_memory_allocated(self.device) - base) / probe)
        del stack
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(max(1, min(AUTO_MAX_BATCH, 0.7 * free // per_model)))

    def commit(self, job: Job, model: torch.nn.Module | None, logits: np.ndarray, train_seconds: float,
               seconds: float, batched: int = 1, extra: dict | None = None) -> dict:
        """Check the outputs, then write weights (when kept), the logits file and the marker."""
        if not np.isfinite(logits).all():
            bad = int((~np.isfinite(logits)).any(axis=(1, 2)).sum())
            by = f": method {job.method!r}" if job.method else ""
            raise MethodOutputError(f"model {job.model_id}{by} produced NaN or infinite logits for {bad} examples")
        trained_on = np.zeros(len(self.ctx.labels), dtype=bool)
        trained_on[job.train_idx] = True
        forgotten = self.ctx.forget if job.role in ("retrain", "unlearned") else np.zeros_like(trained_on)
        table = logits_table(self.ctx.labels, logits, trained_on, forgotten, self.spec.outputs.keep_logits)
        weights = None
        if job.role == "original" or self.spec.outputs.keep_weights:
            assert model is not None, "weights are kept for this model but no module was passed"
            buf = io.BytesIO()
            # plain strides whatever resources.memory_format: a store's weights do not depend on it
            torch.save({k: v.cpu().contiguous() for k, v in model.state_dict().items()}, buf)
            weights = buf.getvalue()
        pred = logits[:, 0].argmax(-1)
        acc = {name: accuracy(pred, self.ctx.labels, mask) for name, mask in self.masks.items()}
        marker = {
            "role": job.role, "seed": job.seed, "parent": job.parent, "method": job.method,
            "hparams": job.hparams, "train_examples": int(len(job.train_idx)),
            "train_seconds": round(train_seconds, 4), "seconds": round(seconds, 4), "batched": batched,
            "accuracy": acc, "device": device_name(self.device),
        }
        if job.role == "unlearned":
            marker.update(self._timing(train_seconds))
        marker.update(extra or {})
        return self.store.write_model(job.model_id, table, marker, weights)

    def _parent_model(self, job: Job) -> torch.nn.Module:
        """A new model (drawing its initialisation from the global generator, as run() always did) holding
        the job's original's weights."""
        model = self.new_model()
        # checked against the sha256 in the parent's marker (a StoreError naming the parent on a mismatch);
        # weights_only: a weights file planted in a store must not run code when it is loaded
        weights = self.store.read_weights(job.parent, self.store.marker(job.parent))
        model.load_state_dict(torch.load(io.BytesIO(weights), map_location=self.device, weights_only=True))
        return model

    def _loaders(self, job: Job) -> tuple:
        """The job's retain, forget and validation loaders, each seeded from the job's seed; retain and forget
        augment their batches when the job's hparams say `augment: true` (validation never does)."""
        bs = self.spec.training.batch_size
        augment = job.hparams.get("augment", False)
        return tuple(make_loader(self.images, self.labels, np.flatnonzero(self.masks[name]), bs, shuffle,
                                 job.seed + offset, augment=augment and shuffle)
                     for name, shuffle, offset in (("retain", True, 0), ("forget", True, 1), ("val", False, 2)))

    def _call_method(self, jobs: list[Job], fn, limit: float):
        """fn() under the time limit and under the autocast the jobs' `precision` hparam asks for (one setting:
        the jobs share their hparams); its failures as MethodError / MethodTimeoutError naming the models.
        The whole method runs under it (farm.train.loops.method_autocast), backward passes included: these
        reverse the forward's casts whether or not autocast is on (tested), so only the forward passes
        change (bf16 matmuls and convolutions)."""
        job, who = jobs[0], _models_named(jobs)

        def call():
            with method_autocast(self.device, job.hparams.get("precision", "fp32")):
                return fn()

        try:
            return call_with_time_limit(call, limit, on_stuck=lambda: self._stuck(jobs, limit))
        except TimeLimitExceeded as exc:
            raise MethodTimeoutError(f"{who}: method {job.method!r} {exc} (unlearn time_limit)") from None
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            raise MethodError(f"{who}: method {job.method!r} raised {type(exc).__name__}: {exc}") from exc
        except BaseException as exc:  # sys.exit() and the like: a failed model, not the end of the run
            raise MethodError(f"{who}: method {job.method!r} tried to end the process "
                              f"({type(exc).__name__}{f': {exc}' if str(exc) else ''}); a method must return "
                              "the model") from exc

    def _unlearn(self, job: Job) -> torch.nn.Module:
        model = self._parent_model(job)
        method = get_method(job.method)
        hparams = method.resolve(job.hparams)
        retain, forget, val = self._loaders(job)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        limit = job.time_limit or DEFAULT_UNLEARN_TIME_LIMIT
        out = self._call_method([job], lambda: method.fn(model, retain, forget, val, **hparams), limit)
        if not isinstance(out, torch.nn.Module):
            raise MethodOutputError(f"model {job.model_id}: method {job.method!r} returned {type(out).__name__}, "
                                    "not a torch.nn.Module")
        out_shapes = {k: tuple(v.shape) for k, v in out.state_dict().items()}
        if out_shapes != shapes:
            raise MethodOutputError(f"model {job.model_id}: method {job.method!r} returned a model of another "
                                    "shape than the original")
        # a method may return another module than the one it was given (a copy, say): compile that one too
        return compiled(out.to(self.device).eval(), self.spec.resources.compile)

    def _stuck(self, jobs: list[Job], limit: float) -> None:
        """Called from the time limit's watchdog when a method cannot be interrupted: record the failure of
        every model of the call and end this process (under Ray the worker is replaced, see docs/methods.md)."""
        message = (f"{_models_named(jobs)}: method {jobs[0].method!r} still ran {grace_seconds(limit):g} s after its "
                   f"time limit of {limit:g} s and {STUCK_MARK}; its process was ended")
        try:
            for job in jobs:
                self.store.write_failure(job.model_id, {
                    "role": job.role, "error": message, "traceback": "", "attempts": 0, "worker_deaths": 0,
                    "failed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        finally:
            sys.stderr.write(f"ufarm: error: {message}\n")
            sys.stderr.flush()
            os._exit(STUCK_EXIT_CODE)

    def _timing(self, seconds: float) -> dict:
        """An unlearned model's time next to the mean train_seconds of the run's committed retrain models
        (looked up once per engine), and whether it is over the spec's time_cutoff fraction."""
        if getattr(self, "_retrain_mean", None) is None:
            times = [m["train_seconds"] for m in self.store.markers().values()
                     if m.get("role") == "retrain" and m.get("train_seconds")]
            self._retrain_mean = sum(times) / len(times) if times else None
        mean, cutoff = self._retrain_mean, self.spec.time_cutoff
        ratio = seconds / mean if mean else None
        return {"retrain_seconds_mean": round(mean, 4) if mean else None,
                "time_ratio": round(ratio, 4) if ratio is not None else None, "time_cutoff": cutoff,
                "over_time_cutoff": bool(ratio > cutoff) if ratio is not None and cutoff else None}

