"""Benchmark: the time of one `ufarm tune` trial (K unlearned models made and scored) against the time of
retraining the same number of models, both measured in this one run, in this process, with the same thread
count, on a scratch store.

    .venv/bin/python scripts/bench_tune.py                      # digits-tune: finetune defaults, K from the spec
    .venv/bin/python scripts/bench_tune.py --models 16 --hparams '{"lr": 0.1, "epochs": 4}'

Steps: train the spec's originals (not timed), retrain K models from scratch on the retain set (timed:
the baseline), then one trial exactly as a Tune trial runs it (farm.run.tune.score_hparams: K unlearned models
committed to the store, then F, F_null ratio, accuracy ratios and final score; timed). Prints the ratio.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from farm.train.methods import get_method  # noqa: E402
from farm.run import prepare_run, run_local  # noqa: E402
from farm.spec import load_spec, load_spec_dict  # noqa: E402
from farm.run.tune import (is_search_only, merge_search, param_space, parse_tune, prepare_setup,  # noqa: E402
                           score_hparams, trial_hparams)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="digits-tune", help="a spec with a tune section (default: digits-tune)")
    ap.add_argument("--models", type=int, help="K: models per trial and retrained models (default: tune.models)")
    ap.add_argument("--hparams", default=None, help="JSON hparams of the trial (default: the method's defaults)")
    ap.add_argument("--store", help="scratch store (default: a temporary folder)")
    ap.add_argument("--run", default="digits-demo", help="the run a search-only spec completes from "
                                                         "(default: digits-demo)")
    args = ap.parse_args()

    raw = load_spec_dict(args.spec)
    spec = merge_search(raw, load_spec_dict(args.run)) if is_search_only(raw) else load_spec(args.spec)
    ts = parse_tune(spec)
    k = args.models or ts.models
    ts = dataclasses.replace(ts, models=k)
    threads = max(1, int(ts.resources.cpus))
    store = args.store or tempfile.mkdtemp(prefix="bench-tune-")
    base = dataclasses.replace(spec, unlearn=(), counts={"original": spec.count("original"), "retrain": k})

    # originals (the trial starts from them; not timed)
    prep = prepare_run(dataclasses.replace(base, counts={"original": spec.count("original")}), store)
    run_local(prep, progress=False, threads=threads)
    # baseline: retrain K models from scratch
    prep = prepare_run(base, store)
    t0 = time.perf_counter()
    res = run_local(prep, progress=False, threads=threads)
    retrain_s = time.perf_counter() - t0
    assert not res.failed, res.failed
    n_retrained = len(res.trained)

    # one trial, as a Tune trial runs it (its reference: the K retrained models above)
    setup = prepare_setup(spec if k == spec.count("retrain") else
                             dataclasses.replace(spec, counts={**spec.counts, "retrain": k}), ts, store,
                             local=True, progress=False)
    setup.threads = threads
    method = get_method(ts.method)
    searched, fixed = param_space(ts, method)
    hp = json.loads(args.hparams) if args.hparams else {n: v for n, v in method.defaults.items() if n in searched}
    hparams = trial_hparams(method, hp, fixed, 0)
    t0 = time.perf_counter()
    metrics = score_hparams(setup, hparams)
    trial_s = time.perf_counter() - t0
    assert metrics["models_trained"] == k, "the trial reused models: use a fresh --store"

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores visible, torch {torch.__version__}, "
          f"{threads} thread(s) per model, device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"spec {spec.name}: method {ts.method} {json.dumps(hparams)}, K = {k}")
    print(f"retrain {n_retrained} models (spec training: {spec.training.epochs} epochs): {retrain_s:8.2f} s")
    print(f"one trial: {k} unlearned models + scoring:            {trial_s:8.2f} s")
    print(f"ratio trial / retraining:                              {trial_s / retrain_s:8.3f}")
    print(f"trial metrics: final {metrics['final_score']:.4f}, F {metrics['forgetting_quality']:.4f}, "
          f"F/F_null {metrics['f_over_f_null']:.3f}, per-model time ratio {metrics['time_ratio']:.3f}")
    print(json.dumps({"k": k, "retrain_seconds": round(retrain_s, 3), "trial_seconds": round(trial_s, 3),
                      "ratio": round(trial_s / retrain_s, 4)}))
    if not args.store:
        shutil.rmtree(store, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
