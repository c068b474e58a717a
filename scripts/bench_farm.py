#!/usr/bin/env python
"""Farm benchmarks, each a ratio measured in one run on one machine:

1. runner: the digits-demo preset's models trained through the Ray runner versus the same jobs in a plain
   in-process loop (at the runner's per-worker thread count, and at all cores), in models per minute;
2. store: writing and reading the conf matrix of M models x E examples x Q queries through the run store
   (Parquet logits files + markers, checksums verified on read) versus raw .npy files of the same data.

    python scripts/bench_farm.py            # full sizes (digits-demo; 256 x 70,000 x 2)
    python scripts/bench_farm.py --quick    # small sizes, for a smoke test
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time

import numpy as np


def bench_runner(spec_name: str, quick: bool) -> None:
    from farm.runner import ensure_ray, prepare_run, run_local, run_ray
    from farm.spec import load_spec, spec_from_dict

    spec = load_spec(spec_name)
    if quick:
        d = spec.to_dict()
        d["counts"] = {"original": 1, "retrain": 4, "shadow": 4}
        d["unlearn"] = []
        d["training"]["epochs"] = 3
        spec = spec_from_dict(d)
    tmp = tempfile.mkdtemp(prefix="bench-farm-")
    results = {}
    try:
        for label, kind, threads in (("loop, 1 thread (the runner's per-worker threads)", "local", 1),
                                     (f"loop, {os.cpu_count()} threads", "local", os.cpu_count()),
                                     ("Ray runner", "ray", None)):
            store = f"{tmp}/{len(results)}"
            prep = prepare_run(spec, store)
            if kind == "ray":
                t0 = time.perf_counter()
                ensure_ray()
                print(f"  (Ray start-up, once per session, not counted: {time.perf_counter() - t0:.1f} s)")
            t0 = time.perf_counter()
            if kind == "ray":
                result = run_ray(prep, progress=False)
            else:
                result = run_local(prep, progress=False, threads=threads)
            seconds = time.perf_counter() - t0
            assert not result.failed, result.failed
            results[label] = len(result.trained) / seconds * 60
            print(f"  {label:<52} {len(result.trained)} models in {seconds:6.1f} s = {results[label]:6.1f} models/min")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ray_rate = results["Ray runner"]
    for label, rate in results.items():
        if label != "Ray runner":
            print(f"  runner / {label}: {ray_rate / rate:.2f}x")


def bench_store(n_models: int, n_examples: int, n_queries: int) -> None:
    """Baselines: (a) one raw .npy per model holding the same columns as the logits file (a structured
    array: example_id, query, conf, pred, trained_on, forgotten); (b) one .npy of the conf column alone."""
    from farm.store import RunStore, examples_table, logits_table

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n_examples)
    split = np.where(np.arange(n_examples) < n_examples * 6 // 7, "train", "test")
    tables, records = [], []
    for m in range(n_models):  # the data, prepared outside the timed part
        logits = rng.normal(size=(n_examples, n_queries, 10)).astype(np.float32)
        table = logits_table(labels, logits, rng.random(n_examples) < 0.5, np.zeros(n_examples, bool), False)
        tables.append(table)
        rec = np.empty(table.num_rows, dtype=[(c, table.schema.field(c).type.to_pandas_dtype())
                                               for c in table.column_names])
        for c in table.column_names:
            rec[c] = table.column(c).to_numpy()
        records.append(rec)
    tmp = tempfile.mkdtemp(prefix="bench-store-")
    times = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        times[name] = time.perf_counter() - t0
        return out

    try:
        store = RunStore(f"{tmp}/store")
        store.init_run({"format_version": 1, "spec": {"name": "bench", "queries": ["plain"] * n_queries},
                        "identity": "bench", "identity_fields": {}, "dataset": {"name": "synthetic",
                        "fingerprint": "0" * 64}, "n_examples": n_examples, "n_classes": 10},
                       examples_table(split, labels, None, np.zeros(n_examples, bool)))
        os.makedirs(f"{tmp}/npy")
        timed("npy write, same columns", lambda: [np.save(f"{tmp}/npy/m{m:05d}.npy", r) for m, r in enumerate(records)])
        timed("npy write, conf only", lambda: [np.save(f"{tmp}/npy/c{m:05d}.npy", r["conf"])
                                               for m, r in enumerate(records)])
        timed("store write", lambda: [store.write_model(f"shadow-{m:05d}", t, {"role": "shadow"})
                                      for m, t in enumerate(tables)])
        npy = timed("npy read, same columns", lambda: np.stack(
            [np.load(f"{tmp}/npy/m{m:05d}.npy")["conf"].reshape(n_examples, n_queries) for m in range(n_models)]))
        timed("npy read, conf only", lambda: np.stack(
            [np.load(f"{tmp}/npy/c{m:05d}.npy").reshape(n_examples, n_queries) for m in range(n_models)]))
        got = timed("store read", store.read_conf)
        assert np.array_equal(got.conf, npy)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for op in ("write", "read"):
        s, a, b = times[f"store {op}"], times[f"npy {op}, same columns"], times[f"npy {op}, conf only"]
        print(f"  {op:<5}: store {s:6.2f} s | npy same columns {a:6.2f} s -> {s / a:5.2f}x | "
              f"npy conf only {b:6.2f} s -> {s / b:5.2f}x")
    s = times["store write"] + times["store read"]
    a = times["npy write, same columns"] + times["npy read, same columns"]
    b = times["npy write, conf only"] + times["npy read, conf only"]
    print(f"  write + read: store {s:6.2f} s | npy same columns {a:6.2f} s -> {s / a:5.2f}x | "
          f"npy conf only {b:6.2f} s -> {s / b:5.2f}x")
    print("  (store read verifies every file's sha256 and also returns trained_on / forgotten)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes")
    ap.add_argument("--only", choices=("runner", "store"), help="run one benchmark")
    args = ap.parse_args()
    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
    if args.only in (None, "runner"):
        print("[runner] digits-demo models: Ray runner vs plain in-process loop")
        bench_runner("digits-demo", args.quick)
    if args.only in (None, "store"):
        m, e = (16, 7000) if args.quick else (256, 70000)
        print(f"[store] conf matrix of {m} models x {e} examples x 2 queries: run store vs raw .npy")
        bench_store(m, e, 2)


if __name__ == "__main__":
    main()
