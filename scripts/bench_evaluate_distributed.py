#!/usr/bin/env python
"""Benchmark: `ufarm evaluate --executor ray` (evaluate_store's jobs as Ray tasks) against one process.

On the synthetic stores of scripts/bench_evaluate_store.py (its build_store).

Default: the 256-model x 70,000-example store of bench_evaluate_store.py (192 shadows, 32 retrained, 32
unlearned; 60,000 train examples, 500 of them forget, 10,000 test; 2 queries).  Each evaluation runs in a
fresh child process so that its peak memory is its own (ru_maxrss): the single process (evaluate_store as
`ufarm evaluate` runs it by default), then the distributed one on a local Ray of --cpus CPUs started in its
child (the Ray start is timed apart).  Every Ray task also returns its own peak memory (_with_peak).  Checks
that the two reports are identical (report.json but its seconds, per-example Parquet tables, figures) and
prints the ratio of the times.

--scaling: stores whose models and examples double alternately (e.g. 32 x 8,750 -> 32 x 17,500 -> 64 x 17,500
-> ... -> 256 x 70,000), each evaluated on Ray in a fresh child: time, the driver's peak and the workers'
peaks, those that ran membership jobs (chunks of --chunk-examples examples of every shadow: their memory
follows shadows x chunk, not the store) and those that ran the ROC jobs (buckets of one attack's scores and
blocks of RMIA's targets, each about as many cells as a membership job).  Prints a markdown table.

    python scripts/bench_evaluate_distributed.py [--quick] [--scaling] [--cpus 2] [--chunk-examples 8192]
                                                 [--n-boot 20] [--models M --examples E [--forget F]] [--keep DIR]
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

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_evaluate_store import build_store  # noqa: E402

FULL = dict(n_train=60000, n_test=10000, n_forget=500, n_shadow=192, n_retrain=32, n_unlearned=32)
QUICK = dict(n_train=4000, n_test=1000, n_forget=60, n_shadow=16, n_retrain=8, n_unlearned=8)


def sizes_for(models: int, examples: int, n_forget: int) -> dict:
    """bench_evaluate_store's proportions: 3/4 shadows, 1/8 retrained, 1/8 unlearned; 6/7 train, 1/7 test."""
    n_test = examples // 7
    return dict(n_train=examples - n_test, n_test=n_test, n_forget=n_forget, n_shadow=models * 3 // 4,
                n_retrain=models // 8, n_unlearned=models // 8)


# ------------------------------------------------------------------------------------ children
def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        return next(int(ln.split()[1]) for ln in fh if ln.startswith(field + ":")) / 1024


def _with_peak(fn):
    """fn, returning also its worker's peak memory during the job and its pid (pickled by value: this script is
    __main__).  Where Linux lets a process reset its high-water mark (writing 5 to /proc/self/clear_refs), the
    peak is the job's own: VmHWM during the job, less the pages of Ray's shared object store the worker had
    mapped when the job began (RssShmem: earlier jobs' results and arguments, which Linux counts in every
    worker that touched them; Ray's own measure of a worker's memory is RSS - SHR).  Otherwise the worker's
    lifetime peak (ru_maxrss), which charges each kind of job with the largest the worker ran before it."""
    def run(*args):
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            shared = _status_mb("RssShmem")
        except (OSError, StopIteration):
            shared = None
        out = fn(*args)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if shared is None else \
            _status_mb("VmHWM") - shared
        return out, peak, os.getpid()
    return run


def _measured(base, peaks: dict, seconds: dict):
    """A map that records, per job function, the largest worker peak seen after one of its jobs and the wall
    time of its map calls (from submission to the last result)."""
    def map_chunks(fn, args):
        t = time.perf_counter()
        outs = base(_with_peak(fn), args)
        seconds[fn.__name__] = seconds.get(fn.__name__, 0.0) + time.perf_counter() - t
        for _, peak, pid in outs:
            peaks.setdefault(fn.__name__, {})[pid] = max(peak, peaks.get(fn.__name__, {}).get(pid, 0.0))
        return [o[0] for o in outs]
    return map_chunks


def child(kind: str, uri: str, out: str, cpus: int, chunk: int, n_boot: int) -> None:
    info: dict = {}
    kw = dict(out=out, progress=False, n_boot=n_boot, chunk_examples=chunk)
    if kind == "ray":
        t = time.perf_counter()
        import ray

        from farm.run.evaluate_ray import ray_map

        ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR")
        base = ray_map()
        info["ray_start_seconds"] = time.perf_counter() - t
        peaks: dict = {}
        seconds: dict = {}
        kw["map_chunks"] = _measured(base, peaks, seconds)
    from evaluation.report import evaluate_store

    t = time.perf_counter()
    evaluate_store(uri, **kw)
    info["seconds"] = time.perf_counter() - t
    info["maxrss_mb"] = _peak_mb()
    if kind == "ray":
        info["workers"] = {name: max(p.values()) for name, p in peaks.items()}
        info["n_workers"] = len({pid for p in peaks.values() for pid in p})
        info["job_seconds"] = seconds
    print(json.dumps(info))


def run_child(kind: str, uri: str, out: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, uri, out, "--cpus", str(args.cpus),
           "--chunk-examples", str(args.chunk_examples), "--n-boot", str(args.n_boot)]
    res = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ comparison
def differences(a: str, b: str) -> list[str]:
    """Files of two report folders that differ (report.json without its seconds; report.md without its time)."""
    names = sorted(set(os.listdir(a)) | set(os.listdir(b)))
    bad = []
    for name in names:
        pa_, pb = os.path.join(a, name), os.path.join(b, name)
        if not (os.path.exists(pa_) and os.path.exists(pb)):
            bad.append(f"{name} (in one only)")
            continue
        da, db = open(pa_, "rb").read(), open(pb, "rb").read()
        if name == "report.json":
            da, db = ({k: v for k, v in json.loads(d).items() if k != "seconds"} for d in (da, db))
        elif name == "report.md":
            da, db = ([ln for ln in d.decode().splitlines() if "computed in" not in ln] for d in (da, db))
        if da != db:
            bad.append(name)
    return bad


def compare(uri: str, tmp: str, args) -> None:
    one = run_child("single", uri, os.path.join(tmp, "single"), args)
    print(f"[single] evaluate_store in one process: {one['seconds']:.2f} s, peak RSS {one['maxrss_mb']:.0f} MB",
          flush=True)
    dist = run_child("ray", uri, os.path.join(tmp, "ray"), args)
    w = dist["workers"]
    print(f"[ray] Ray start (local, {args.cpus} CPUs) {dist['ray_start_seconds']:.2f} s; evaluate_store with Ray "
          f"tasks: {dist['seconds']:.2f} s, driver peak RSS {dist['maxrss_mb']:.0f} MB, {dist['n_workers']} "
          f"workers, peak RSS per worker: " + ", ".join(f"{k} {v:.0f} MB" for k, v in sorted(w.items())), flush=True)
    print("  wall time of each kind of job's map calls (the unlearning read and forgetting-score jobs run beside the others): "
          + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(dist["job_seconds"].items())), flush=True)
    diff = differences(os.path.join(tmp, "single"), os.path.join(tmp, "ray"))
    print(f"  reports identical: {'yes' if not diff else 'NO, ' + ', '.join(diff)}")
    print(f"  single / distributed: {one['seconds'] / dist['seconds']:.2f}x "
          f"({one['seconds'] / (dist['seconds'] + dist['ray_start_seconds']):.2f}x counting the Ray start)")
    print()
    print("| run | seconds | peak RSS driver (MB) | peak RSS per worker (MB) |")
    print("|---|---|---|---|")
    print(f"| single process | {one['seconds']:.1f} | {one['maxrss_mb']:.0f} | - |")
    print(f"| Ray, {args.cpus} CPUs (+ {dist['ray_start_seconds']:.1f} s start) | {dist['seconds']:.1f} | "
          f"{dist['maxrss_mb']:.0f} | {max(w.values()):.0f} |")
    if diff:
        sys.exit(1)


def _roc_peak(workers: dict) -> float:
    """The largest peak of the workers that ran ROC jobs: buckets of scores, and RMIA's blocks of targets."""
    return max(workers.get("roc_bucket_job", 0), workers.get("rmia_counts_rows", 0))


def scaling(tmp: str, args) -> None:
    steps = [(8, 1000), (8, 2000), (16, 2000)] if args.quick else \
        [(32, 8750), (32, 17500), (64, 17500), (64, 35000), (128, 35000), (128, 70000), (256, 70000)]
    rows = []
    for models, examples in steps:
        uri = os.path.join(tmp, f"s{models}x{examples}")
        sizes = sizes_for(models, examples, 60 if args.quick else args.forget)
        t = time.perf_counter()
        build_store(uri, **sizes)
        built = time.perf_counter() - t
        r = run_child("ray", uri, uri + "-report", args)
        w = r["workers"]
        rows.append((models, sizes["n_shadow"], examples, r, w))
        print(f"[{models} models x {examples} examples] built in {built:.1f} s; evaluate_store on Ray "
              f"{r['seconds']:.1f} s, driver {r['maxrss_mb']:.0f} MB, membership-job workers "
              f"{w.get('membership_job', 0):.0f} MB, ROC-job workers {_roc_peak(w):.0f} MB", flush=True)
    print()
    print(f"chunk of {args.chunk_examples} examples, local Ray of {args.cpus} CPUs, n_boot {args.n_boot}")
    print()
    print("| models | shadows | examples | shadows x chunk (M cells) | shadows x train (M cells) | seconds | "
          "driver peak (MB) | membership-job worker peak (MB) | unlearning-job worker peak (MB) | "
          "ROC-job worker peak (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for models, shadows, examples, r, w in rows:
        train = examples - examples // 7
        print(f"| {models} | {shadows} | {examples} | {shadows * min(args.chunk_examples, examples) / 1e6:.2f} | "
              f"{shadows * train / 1e6:.2f} | {r['seconds']:.1f} | {r['maxrss_mb']:.0f} | "
              f"{w.get('membership_job', 0):.0f} | {max(w.get('read_job', 0), w.get('stat_job', 0)):.0f} | "
              f"{_roc_peak(w):.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny stores (32 models x 5,000 examples; scaling 8 to 16 "
                                                         "models x 1,000 to 2,000 examples), chunks of 1,000, "
                                                         "n_boot 4")
    ap.add_argument("--scaling", action="store_true", help="stores doubling in models and examples, on Ray")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (default 2)")
    ap.add_argument("--chunk-examples", type=int, default=None, help="examples per membership job (default 8192; "
                                                                     "1000 with --quick)")
    ap.add_argument("--n-boot", type=int, default=None, help="evaluate_store's n_boot (default 20, its default; 4 "
                                                              "with --quick)")
    ap.add_argument("--models", type=int, help="another store size: this many models (3/4 shadows, 1/8 retrained, "
                                                "1/8 unlearned) ...")
    ap.add_argument("--examples", type=int, help="... x this many examples (6/7 train, 1/7 test) ...")
    ap.add_argument("--forget", type=int, default=500, help="... with this many forget examples (default 500; also "
                                                             "those of every --scaling store)")
    ap.add_argument("--keep", help="build the stores in this folder and keep them")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.chunk_examples is None:
        args.chunk_examples = 1000 if args.quick else 8192
    if args.n_boot is None:
        args.n_boot = 4 if args.quick else 20
    if args.child:
        child(args.child[0], args.child[1], args.child[2], args.cpus, args.chunk_examples, args.n_boot)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or tmp
        os.makedirs(folder, exist_ok=True)
        if args.scaling:
            scaling(folder, args)
            return
        sizes = QUICK if args.quick else FULL
        if args.models and args.examples:
            sizes = sizes_for(args.models, args.examples, args.forget)
        uri = os.path.join(folder, "run")
        t = time.perf_counter()
        build_store(uri, **sizes)
        n = sizes["n_shadow"] + sizes["n_retrain"] + sizes["n_unlearned"]
        print(f"[build] {n} models ({sizes['n_shadow']} shadows, {sizes['n_retrain']} retrained, "
              f"{sizes['n_unlearned']} unlearned) x {sizes['n_train'] + sizes['n_test']} examples x 2 queries: "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        compare(uri, folder, args)


if __name__ == "__main__":
    main()
