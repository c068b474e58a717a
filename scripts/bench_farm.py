#!/usr/bin/env python
"""Farm benchmarks, each a ratio measured in one run on one machine:

1. batched: K models of the same preset trained together with stacked weights (farm.train.stacked) versus the
   same jobs one at a time in the same engine, including writing their logits (digits on CPU; with
   --dataset fashion-mnist the GPU setting: shadows, 5 epochs on half the train split; with --method
   finetune, unlearned models of one original through the method's stacked twin, farm.train.stacked_methods);
2. runner: the digits-demo preset's models trained through the Ray runner versus the same jobs in a plain
   in-process loop (at the runner's per-worker thread count, and at all cores), in models per minute,
   both from warm processes (torch imported; --cold-workers: Ray workers that import it on their own clock);
3. store: writing and reading the conf matrix of M models x E examples x Q queries through the run store
   (Parquet logits files + markers, checksums verified on read) versus raw .npy files of the same data.

    python scripts/bench_farm.py            # full sizes (digits-demo; 256 x 70,000 x 2)
    python scripts/bench_farm.py --quick    # small sizes, for a smoke test
    python scripts/bench_farm.py --only batched --method finetune   # stacked unlearning vs one at a time
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time

import numpy as np

N_ROUNDS = 3


def _cpu_busy(seconds: float = 0.5) -> float:
    """Fraction of all cores busy over the next `seconds` (Linux /proc/stat; 0 where it is missing)."""
    def sample():
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        time.sleep(seconds)
        return 0.0
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_until_idle(limit: float = 60.0) -> float:
    """Wait until less than a quarter of the cores are busy (at most `limit` s); returns the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit and _cpu_busy() > 0.25:
        pass
    return time.perf_counter() - t0


# What the benchmark's prestarted Ray workers import before the clock starts (Ray's preload_python_modules):
# torch, and torch._dynamo, which the first torch.optim optimiser imports.
WARM_MODULES = "torch,torch._dynamo"


def bench_runner(spec_name: str, quick: bool, epochs: int | None = None, cold_workers: bool = False) -> None:
    """Both executors start from warm processes, so the ratio is the farm's per-model overhead (scheduling,
    transfers, commits) and not Python's start-up: the loop runs in this process, which has imported torch
    and torch._dynamo before its clock starts; the runner's actors take the worker processes that the
    benchmark's local Ray prestarts with the same modules preloaded (WARM_MODULES). Both warm-ups are
    printed, not counted. epochs: train the preset's models for this many epochs instead (longer models).
    cold_workers: no preloading, so each actor imports torch on start and torch._dynamo on its first job,
    as in a plain `ufarm run` (the loop's process stays warm)."""
    from farm.run import ensure_ray, prepare_run, run_local, run_ray
    from farm.spec import load_spec, spec_from_dict

    spec = load_spec(spec_name)
    if quick or epochs:
        d = spec.to_dict()
        if quick:
            d["counts"] = {"original": 1, "retrain": 4, "shadow": 4}
            d["unlearn"] = []
        d["training"]["epochs"] = epochs or 3
        spec = spec_from_dict(d)
    import ray

    # read by the raylet that ensure_ray starts; a worker that fails an import only logs it
    os.environ["RAY_preload_python_modules"] = "" if cold_workers else WARM_MODULES
    t0 = time.perf_counter()
    import torch._dynamo  # noqa: F401

    print(f"  (loop process warm-up, not counted: import torch._dynamo {time.perf_counter() - t0:.1f} s)")
    executors = [("loop, 1 thread (the runner's per-worker threads)", "local", 1),
                 (f"loop, {os.cpu_count()} threads", "local", os.cpu_count()),
                 ("Ray runner", "ray", None)]
    rounds = 1 if quick else N_ROUNDS
    tmp = tempfile.mkdtemp(prefix="bench-farm-")
    rates: dict[str, list[float]] = {}
    try:
        for r in range(rounds):  # order rotated; a fresh local Ray each round, so its workers start prestarted
            for label, kind, threads in executors[r % len(executors):] + executors[:r % len(executors)]:
                prep = prepare_run(spec, f"{tmp}/{r}-{kind}-{threads}")
                if kind == "ray":
                    ray.shutdown()
                    t0 = time.perf_counter()
                    ensure_ray()
                    t1 = time.perf_counter()
                    waited = wait_until_idle()
                    print(f"  (Ray start-up, not counted: ray.init {t1 - t0:.1f} s, then {waited:.1f} s until its "
                          f"prestarted workers{'' if cold_workers else ' had imported torch and'} went idle)")
                t0 = time.perf_counter()
                if kind == "ray":
                    result = run_ray(prep, progress=False)
                else:
                    result = run_local(prep, progress=False, threads=threads)
                seconds = time.perf_counter() - t0
                assert not result.failed, result.failed
                rates.setdefault(label, []).append(len(result.trained) / seconds * 60)
                print(f"  round {r + 1}: {label:<50} {len(result.trained)} models in {seconds:6.1f} s = "
                      f"{rates[label][-1]:6.1f} models/min")
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    rate = {label: float(np.median(v)) for label, v in rates.items()}
    print(f"  median of {rounds} round(s), models/min: " + ", ".join(f"{k.split(' (')[0]} {v:.1f}" for k, v in rate.items()))
    for label, value in rate.items():
        if label != "Ray runner":
            print(f"  runner / {label}: {rate['Ray runner'] / value:.2f}x")


def warm_up_stacked(engine, k: int, n_train: int) -> float:
    """Two stacked training steps of K new models, a full batch and one of an epoch's last size (n_train
    examples per model), and one prediction chunk: the shapes of the timed run, so what a worker process
    pays once before its first stacked batch (Triton's compiling and autotuning per work class, cuDNN's
    algorithm search, the allocator's growth) happens here, as the one-at-a-time side's warm-up model
    pays it. Returns its seconds."""
    import dataclasses

    import torch

    from farm.train.stacked import PREDICT_PAIRS, StackedModels, predict_stacked_chunks, train_stacked

    t0 = time.perf_counter()
    cfg = dataclasses.replace(engine.spec.training, epochs=1)
    idx = np.arange(cfg.batch_size + (n_train % cfg.batch_size or cfg.batch_size))
    stack = StackedModels([engine.new_model() for _ in range(k)])
    train_stacked(stack, engine.images, engine.labels, [idx] * k, cfg,
                  [torch.Generator().manual_seed(i) for i in range(k)])
    chunk = max(1, min(cfg.eval_batch_size, PREDICT_PAIRS // k))
    predict_stacked_chunks(stack, engine.images[:chunk], engine.spec.queries, chunk, cfg.precision)
    return time.perf_counter() - t0


def bench_batched(preset: str, n_models: int, k: int, epochs: int | None, data: str | None = None,
                  n_baseline: int | None = None, gpu_kernels: str | None = None, method: str | None = None) -> None:
    """n_baseline: how many of the jobs the one-at-a-time baseline trains (its rate is per model, so a
    subset measures it; all n_models by default). method: time unlearned models of this built-in (the
    method's defaults, from one original trained first and not timed) instead of shadows."""
    import torch

    from farm.train.engine import Engine
    from farm.run import prepare_run
    from farm.spec import load_spec, spec_from_dict

    d = load_spec(preset).to_dict()
    d["counts"] = {"shadow": n_models + 2}  # even (complementary pairs); one is the warm-up
    d["unlearn"] = []
    if method:
        d["counts"] = {"original": 1}
        d["unlearn"] = [{"method": method, "count": n_models + 1}]
    d["outputs"] = {"keep_logits": False, "keep_weights": False}
    if epochs:
        d["training"]["epochs"] = epochs
    if data:
        d["dataset"]["path"] = data
    if gpu_kernels:
        d["resources"]["gpu_kernels"] = gpu_kernels
    d["resources"]["batch_models"] = k  # stacks of k, also for the methods "auto" would stack half as deep
    spec = spec_from_dict(d)
    tmp = tempfile.mkdtemp(prefix="bench-batched-")
    threads = None if torch.cuda.is_available() else os.cpu_count()
    try:
        times = {}
        for label in ("one at a time", f"stacked, K={k}"):
            prep = prepare_run(spec, f"{tmp}/{len(times)}")
            engine = Engine(prep.context(), threads=threads)
            pending = prep.pending
            if method:
                engine.run(pending[0])  # the original, not timed
                pending = pending[1:]
            engine.run(pending[0])  # warm-up (kernels, allocator), committed but not timed
            jobs = pending[1:n_models + 1]
            if label != "one at a time":
                from farm.train.stacked import default_layout

                print(f"  (stacked layout: {default_layout(engine.device.type)}, "
                      f"kernels {spec.resources.gpu_kernels})")
            if label != "one at a time" and torch.cuda.is_available() and not method:
                seconds = warm_up_stacked(engine, k, max(len(j.train_idx) for j in jobs))
                print(f"  (stacked warm-up at K={k}, not counted: {seconds:.1f} s)")
                print(f"  (batch_models: auto would stack {engine.batch_capacity()} models here)")
            if label == "one at a time":
                jobs = jobs[:n_baseline or n_models]
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if label == "one at a time":
                markers = [engine.run(j) for j in jobs]
            else:
                markers = [m for i in range(0, len(jobs), k) for m in engine.run_batch(jobs[i:i + k])]
            seconds = time.perf_counter() - t0
            times[label] = seconds / len(jobs)
            assert all(m["batched"] == (1 if label == "one at a time" else min(k, len(jobs))) for m in markers[:k])
            acc = np.mean([m["accuracy"]["test"] for m in markers])
            train = np.mean([m["train_seconds"] for m in markers])
            predict = np.mean([m["seconds"] for m in markers]) - train
            print(f"  {label:<16} {len(jobs)} models in {seconds:7.2f} s = {times[label]:.3f} s/model"
                  f" (train {train:.3f}, predict {predict:.3f}, commit {times[label] - train - predict:.3f}),"
                  f" mean test accuracy {acc:.4f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    one, stacked = times["one at a time"], times[f"stacked, K={k}"]
    print(f"  stacked / one at a time: {one / stacked:.2f}x the models per second "
          f"({stacked:.3f} s/model stacked, {one:.3f} s/model one at a time, writing logits included)")


def bench_store(n_models: int, n_examples: int, n_queries: int) -> None:
    """Baselines: (a) one raw .npy per model holding the same columns as the logits file (a structured
    array: example_id, query, conf, pred, trained_on, forgotten); (b) one .npy of the conf column alone."""
    from farm.store import RunStore, examples_table, logits_table

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n_examples)
    split = np.where(np.arange(n_examples) < n_examples * 6 // 7, "train", "test")
    tables, records, confs = [], [], []
    for m in range(n_models):  # the data, prepared outside the timed part
        logits = rng.normal(size=(n_examples, n_queries, 10)).astype(np.float32)
        table = logits_table(labels, logits, rng.random(n_examples) < 0.5, np.zeros(n_examples, bool), False)
        tables.append(table)
        rec = np.empty(table.num_rows, dtype=[(c, table.schema.field(c).type.to_pandas_dtype())
                                               for c in table.column_names])
        for c in table.column_names:
            rec[c] = table.column(c).to_numpy()
        records.append(rec)
        confs.append(np.ascontiguousarray(rec["conf"]))  # a plain array: np.save of a strided view is slow
    tmp = tempfile.mkdtemp(prefix="bench-store-")
    rounds = {}

    def timed(name, fn):
        os.sync()  # dirty pages of the previous phase must not be flushed on this phase's clock
        t0 = time.perf_counter()
        out = fn()
        rounds.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    try:
        for r in range(N_ROUNDS):  # rotate the order so no method always runs first (page cache, writeback)
            root = f"{tmp}/{r}"
            store = RunStore(f"{root}/store")
            store.init_run({"format_version": 1, "spec": {"name": "bench", "queries": ["plain"] * n_queries},
                            "identity": "bench", "identity_fields": {}, "dataset": {"name": "synthetic",
                            "fingerprint": "0" * 64}, "n_examples": n_examples, "n_classes": 10},
                           examples_table(split, labels, None, np.zeros(n_examples, bool)))
            os.makedirs(f"{root}/npy")
            writers = [
                ("npy same columns", lambda: [np.save(f"{root}/npy/m{m:05d}.npy", x) for m, x in enumerate(records)]),
                ("npy conf only", lambda: [np.save(f"{root}/npy/c{m:05d}.npy", x) for m, x in enumerate(confs)]),
                ("store", lambda: [store.write_model(f"shadow-{m:05d}", t, {"role": "shadow"})
                                   for m, t in enumerate(tables)]),
            ]
            readers = [
                ("npy same columns", lambda: np.stack([np.load(f"{root}/npy/m{m:05d}.npy")["conf"].reshape(
                    n_examples, n_queries) for m in range(n_models)])),
                ("npy conf only", lambda: np.stack([np.load(f"{root}/npy/c{m:05d}.npy").reshape(
                    n_examples, n_queries) for m in range(n_models)])),
                ("store", lambda: store.read_conf().conf),
            ]
            shift = r % 3
            for name, fn in writers[shift:] + writers[:shift]:
                timed(f"{name} write", fn)
            got = {name: timed(f"{name} read", fn) for name, fn in readers[shift:] + readers[:shift]}
            assert np.array_equal(got["store"], got["npy conf only"])
            shutil.rmtree(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t = {k: float(np.median(v)) for k, v in rounds.items()}
    print(f"  median of {N_ROUNDS} rounds, order rotated, os.sync() before each timed phase")
    for op in ("write", "read"):
        s, a, b = t[f"store {op}"], t[f"npy same columns {op}"], t[f"npy conf only {op}"]
        print(f"  {op:<5}: store {s:6.2f} s | npy same columns {a:6.2f} s -> {s / a:5.2f}x | "
              f"npy conf only {b:6.2f} s -> {s / b:5.2f}x")
    s = t["store write"] + t["store read"]
    a = t["npy same columns write"] + t["npy same columns read"]
    b = t["npy conf only write"] + t["npy conf only read"]
    print(f"  write + read: store {s:6.2f} s | npy same columns {a:6.2f} s -> {s / a:5.2f}x | "
          f"npy conf only {b:6.2f} s -> {s / b:5.2f}x")
    print("  (store read verifies every file's sha256 and also returns trained_on / forgotten)")


def bench_store_columns(n_examples: int, n_queries: int, repeats: int = 30) -> None:
    """Where a logits file's encoding time goes: each column alone with the store's encodings
    (farm.store.parquet_bytes), the file sizes, and the alternatives the store's choice was made against
    (plain layout; a dictionary for pred). Medians of `repeats` encodings, after one warm-up."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from farm.store import logits_table, parquet_bytes

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n_examples)
    logits = (rng.normal(size=(n_examples, n_queries, 10)) * 3).astype(np.float32)
    table = logits_table(labels, logits, rng.random(n_examples) < 0.5, np.zeros(n_examples, bool), False)

    def timed(fn):
        """(median ms of `repeats` calls after a warm-up, what the calls return)."""
        out = fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times)) * 1e3, out

    def encode(t, **kw):
        sink = pa.BufferOutputStream()
        pq.write_table(t, sink, write_statistics=False, **kw)
        return sink.getvalue()

    t, buf = timed(lambda: parquet_bytes(table))
    print(f"  whole file, the store's encodings: {t:.2f} ms, {buf.size / 1e6:.2f} MB")
    for name in table.column_names:
        one = table.select([name])
        t, buf = timed(lambda: parquet_bytes(one))
        print(f"    {name:<11} alone: {t:.2f} ms, {buf.size / 1e3:7.1f} KB")
    t, buf = timed(lambda: encode(table, compression="none", use_dictionary=False))
    print(f"  plain layout (no compression, no dictionary): {t:.2f} ms, {buf.size / 1e6:.2f} MB")
    pred = table.select(["pred"])
    t, buf = timed(lambda: encode(pred, compression="none", use_dictionary=True))
    print(f"  pred with a dictionary: {t:.2f} ms, {buf.size / 1e3:.1f} KB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes")
    ap.add_argument("--only", choices=("batched", "runner", "store"), help="run one benchmark")
    ap.add_argument("--dataset", default="digits-demo", help="preset for the batched benchmark "
                    "(fashion-mnist for the GPU figures)")
    ap.add_argument("--models", type=int, default=None, help="models in the batched benchmark")
    ap.add_argument("--data", help="dataset folder for the batched benchmark (e.g. a carried fashion-mnist copy)")
    ap.add_argument("--k", type=int, default=None, help="models per stacked batch")
    ap.add_argument("--method", help="batched benchmark: unlearned models of this built-in method (stacked "
                    "twins: every built-in) instead of shadows")
    ap.add_argument("--baseline-models", type=int, default=None,
                    help="models the one-at-a-time baseline trains (default: all; 16 on a GPU)")
    ap.add_argument("--runner-epochs", type=int, help="runner benchmark: train the demo's models this many "
                    "epochs instead of the preset's 15 (longer models, the same fixed per-worker costs)")
    ap.add_argument("--cold-workers", action="store_true", help="runner benchmark: Ray workers without "
                    "preloaded torch (each actor imports it on start, and torch._dynamo on its first job)")
    ap.add_argument("--gpu-kernels", choices=("deterministic", "autotuned"), help="resources.gpu_kernels")
    ap.add_argument("--layout", choices=("bmm", "grouped", "triton", "vmap"),
                    help="stacked SmallCNN layout (farm.train.stacked_cnn; default: farm.train.stacked's choice per device)")
    args = ap.parse_args()
    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
    if args.layout:
        import farm.train.stacked

        farm.train.stacked.LAYOUT = args.layout
    if args.only in (None, "batched"):
        gpu = torch.cuda.is_available()
        n = args.models or (8 if args.quick else 256 if gpu else 16)
        k = args.k or (256 if gpu else 8)
        base = min(n, args.baseline_models or (16 if gpu else n))
        what = f"{args.method} unlearned models" if args.method else "shadow models"
        print(f"[batched] {args.dataset}: {n} {what} stacked K={k} vs {base} of them one at a time "
              f"(+1 warm-up each)")
        bench_batched(args.dataset, n, k, 2 if args.quick else None, args.data, base, args.gpu_kernels,
                      args.method)
        if args.layout == "triton":
            from farm.train.stacked_triton import chosen_tiles

            for kernel, tile in chosen_tiles().items():
                print(f"  autotuned tile {kernel}: {tile}")
    if args.only in (None, "runner"):
        print("[runner] digits-demo models: Ray runner vs plain in-process loop"
              + (f" ({args.runner_epochs} epochs instead of 15)" if args.runner_epochs else ""))
        bench_runner("digits-demo", args.quick, args.runner_epochs, args.cold_workers)
    if args.only in (None, "store"):
        m, e = (16, 7000) if args.quick else (256, 70000)
        print(f"[store] conf matrix of {m} models x {e} examples x 2 queries: run store vs raw .npy")
        bench_store(m, e, 2)
        print(f"[store columns] one logits file of {e} examples x 2 queries: encoding time per column")
        bench_store_columns(e, 2)


if __name__ == "__main__":
    main()
