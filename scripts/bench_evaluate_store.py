#!/usr/bin/env python
"""Benchmark of `ufarm evaluate` (evaluation.report.evaluate_store) on a synthetic run store.

Builds a store of 256 models x 70,000 examples x 2 queries in a temporary folder (conf only,
keep_logits false, written with farm.store.logits_table and RunStore.write_model): 192 shadows in
complementary pairs, 32 retrained and 32 unlearned models; 60,000 train examples (500 of them the
forget set) and 10,000 test examples.  Confidences are Gaussian per example, with a membership gap
(shadows), the forget set OUT for retrained models and partly remembered by the unlearned ones.

Then, each in a fresh child process so that its peak memory is its own (resource.getrusage ru_maxrss):
  baseline : read_conf of every model of the store (the I/O and decoding floor);
  evaluate : evaluate_store with its defaults (n_boot, max_examples) -> report in the store.
Prints both times, their ratio and both peaks.

    python scripts/bench_evaluate_store.py [--quick] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from farm.store import RunStore, examples_table, logits_table  # noqa: E402

HASH = "0000beef"


def build_store(uri: str, n_train: int, n_test: int, n_forget: int, n_shadow: int, n_retrain: int,
                n_unlearned: int, n_q: int = 2, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    n_e = n_train + n_test
    split = np.array(["train"] * n_train + ["test"] * n_test)
    labels = rng.integers(0, 2, n_e)
    forget = np.zeros(n_e, bool)
    forget[rng.choice(n_train, n_forget, replace=False)] = True
    manifest = {"format_version": 1, "spec": {"name": "synthetic", "queries": ["plain", "hflip"][:n_q]},
                "identity": "synthetic", "identity_fields": {"seed": seed},
                "dataset": {"name": "synthetic", "fingerprint": "0" * 64,
                            "splits": {"train": n_train, "val": 0, "test": n_test}},
                "n_examples": n_e, "n_classes": 2}
    store = RunStore(uri)
    store.init_run(manifest, examples_table(split, labels, None, forget))
    base = rng.normal(2.0, 1.5, n_e)  # per-example difficulty (logit-scaled confidence when OUT)
    gap = np.abs(rng.normal(1.0, 0.7, n_e))  # what training on the example adds
    train_ids = np.flatnonzero(split == "train")
    models = []
    for pair in range(n_shadow // 2):
        half = np.zeros(n_e, bool)
        half[rng.permutation(train_ids)[: n_train // 2]] = True
        models += [(f"shadow-{2 * pair:05d}", "shadow", half), (f"shadow-{2 * pair + 1:05d}", "shadow",
                                                                   (split == "train") & ~half)]
    retain = (split == "train") & ~forget
    models += [(f"retrain-{i:05d}", "retrain", retain) for i in range(n_retrain)]
    models += [(f"unlearned-synthetic-{HASH}-{i:05d}", "unlearned", split == "train") for i in range(n_unlearned)]
    for k, (mid, role, trained) in enumerate(models):
        r = np.random.default_rng([seed, k])
        remembered = trained.astype(np.float64)
        if role == "unlearned":
            remembered = np.where(forget, 0.3, remembered)  # forget set partly remembered
        mean = base + gap * remembered + r.normal(0, 0.3)  # a per-model offset too
        conf = mean[:, None] + r.normal(0, 0.7, (n_e, 1)) + r.normal(0, 0.3, (n_e, n_q))
        logits = np.zeros((n_e, n_q, 2), np.float32)  # 2 classes: conf = logit_y - logit_other
        logits[np.arange(n_e), :, labels] = conf.astype(np.float32)
        table = logits_table(labels, logits, trained, forget if role in ("retrain", "unlearned") else
                             np.zeros(n_e, bool), keep_logits=False)
        acc = {"retain": 0.9 + 0.01 * r.random(), "forget": 0.85, "test": 0.85 + 0.01 * r.random(),
               "train": 0.9, "val": None}
        store.write_model(mid, table, {"role": role, "seed": k, "parent": None,
                                       "method": "synthetic" if role == "unlearned" else None,
                                       "hparams": {"lr": 0.01} if role == "unlearned" else {},
                                       "accuracy": acc, "train_seconds": 2.0 if role == "unlearned" else 20.0,
                                       "seconds": 1.0})
    return {"models": len(models), "examples": n_e, "queries": n_q}


def child(kind: str, uri: str) -> None:
    t = time.perf_counter()
    if kind == "baseline":
        sc = RunStore(uri).read_conf()
        info = {"shape": list(sc.conf.shape)}
    else:
        from evaluation.report import evaluate_store, summary_lines

        rep = evaluate_store(uri, progress=True)
        info = {"summary": summary_lines(rep), "settings": rep["settings"]}
    seconds = time.perf_counter() - t
    print(json.dumps({"seconds": seconds, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      **info}))


def run_child(kind: str, uri: str) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, uri], check=True,
                         stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32 models x 5,000 examples")
    ap.add_argument("--keep", help="build the store in this folder and keep it")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.quick:
        sizes = dict(n_train=4000, n_test=1000, n_forget=100, n_shadow=16, n_retrain=8, n_unlearned=8)
    else:
        sizes = dict(n_train=60000, n_test=10000, n_forget=500, n_shadow=192, n_retrain=32, n_unlearned=32)
    with tempfile.TemporaryDirectory() as tmp:
        uri = args.keep or os.path.join(tmp, "run")
        t = time.perf_counter()
        info = build_store(uri, **sizes)
        print(f"[build] {info['models']} models ({sizes['n_shadow']} shadows, {sizes['n_retrain']} retrained, "
              f"{sizes['n_unlearned']} unlearned) x {info['examples']} examples x {info['queries']} queries, "
              f"{sizes['n_forget']} forget examples: {time.perf_counter() - t:.1f} s", flush=True)
        base = run_child("baseline", uri)
        print(f"[baseline] read_conf of every model: {base['seconds']:.2f} s, peak RSS {base['maxrss_mb']:.0f} MB",
              flush=True)
        ev = run_child("evaluate", uri)
        print(f"[evaluate] evaluate_store (settings {json.dumps({k: ev['settings'][k] for k in ('n_boot', 'max_examples')})}):"
              f" {ev['seconds']:.2f} s, peak RSS {ev['maxrss_mb']:.0f} MB")
        print(f"  ratio to the baseline read: {ev['seconds'] / base['seconds']:.1f}x time, "
              f"{ev['maxrss_mb'] / base['maxrss_mb']:.2f}x peak memory")
        for line in ev["summary"]:
            print(f"  {line}")


if __name__ == "__main__":
    main()
