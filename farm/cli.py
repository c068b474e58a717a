"""The `ufarm` command line: run, status, demo (and evaluate, tune where installed).

Bad input ends with one line on stderr (`ufarm: error: ...`) and exit status 2, before anything is written.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from farm.data import DataError
from farm.settings import SettingsError, redact
from farm.spec import SpecError, load_spec
from farm.store import RunStore, StoreError

DEFAULT_DEMO_STORE = "runs/digits-demo"
USER_ERRORS = (SpecError, DataError, StoreError, SettingsError)
INTERRUPTED = "ufarm: interrupted; models already committed stay, re-run the same command to resume"


class _RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


def _terminated(signum, frame):
    """SIGTERM ends a run like Ctrl-C: the executors stop their workers, committed models stay."""
    raise KeyboardInterrupt


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray started on demand)")
    p.add_argument("--max-workers", type=int, help="at most this many Ray workers (default: as many as fit)")
    p.add_argument("--local", action="store_true", help="train in a plain in-process loop, without Ray")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verify", action="store_true",
                   help="check every committed logits file's sha256 first and retrain models that fail it")
    p.add_argument("--wait-for-resources", type=float, metavar="SECONDS", default=None,
                   help="when no Ray node can hold one worker (resources.cpus/gpus), wait this long for an "
                        "autoscaler to add one before failing (default: 900 on an autoscaling cluster, else 0)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ufarm", description="Reference-model farm for judging machine unlearning.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train every model of SPEC that the store does not hold yet")
    p.add_argument("spec", help="a YAML spec path or a preset name (ufarm presets)")
    p.add_argument("--store", required=True, help="run store URI: a folder, file://... or s3://bucket/prefix")
    _add_run_options(p)
    p = sub.add_parser("status", help="models per role: planned, done, missing, failed")
    p.add_argument("store", help="run store URI")
    p = sub.add_parser("demo", help="run the digits-demo preset end to end and summarize it")
    p.add_argument("--store", default=DEFAULT_DEMO_STORE, help=f"run store URI (default: {DEFAULT_DEMO_STORE})")
    _add_run_options(p)
    p = sub.add_parser("tune", help="Ray Tune search over an unlearning method's hyper-parameters (docs/tune.md)")
    p.add_argument("spec", help="a YAML spec with a tune section, or a preset name (e.g. digits-tune)")
    p.add_argument("--store", required=True, help="run store URI holding the run's originals and retrain models")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray started on demand)")
    p.add_argument("--restart", action="store_true", help="start the search afresh instead of resuming it")
    p.add_argument("--local", action="store_true", help="train missing reference models in-process, not with Ray")
    p.add_argument("--no-progress", action="store_true", help="no Tune status tables or progress bars")
    sub.add_parser("presets", help="list the specs shipped with the package")
    p = sub.add_parser("evaluate", help="LiRA/RMIA, the competition's forgetting score, tests and a report")
    p.add_argument("store", help="run store URI")
    p.add_argument("--method", help="only this unlearning method (its name or <method>-<hparams hash>)")
    p.add_argument("--out", help="report folder or URI (default: <run>/report/)")
    p.add_argument("--n-boot", type=int, default=None,
                   help="draws behind the equal-count F and F_null (default 20; a multiple of 4 keeps their "
                        "jackknife groups equal)")
    p.add_argument("--max-examples", type=int, default=None, help="at most this many forget examples per statistic")
    p.add_argument("--rmia-a", type=float, default=None, help="RMIA's offline a (default 0.3)")
    p.add_argument("--rmia-gamma", type=float, default=None, help="RMIA's likelihood-ratio threshold (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def cmd_evaluate(args) -> int:
    from evaluation.report import evaluate_store, summary_lines

    kw = {k: v for k, v in (("n_boot", args.n_boot), ("max_examples", args.max_examples),
                            ("rmia_a", args.rmia_a), ("rmia_gamma", args.rmia_gamma)) if v is not None}
    rep = evaluate_store(args.store, out=args.out, method=args.method, progress=not args.no_progress, **kw)
    print("\n".join(summary_lines(rep)))
    return 0


def cmd_run(spec_arg: str, args) -> int:
    from farm.run import prepare_run, run_local, run_ray

    spec = load_spec(spec_arg)
    prep = prepare_run(spec, args.store, verify=args.verify)
    print(f"ufarm: run {spec.name!r} in {prep.store.uri}: {len(prep.plan.jobs)} models planned, "
          f"{len(prep.done)} already done, {len(prep.pending)} to train", flush=True)
    progress = not args.no_progress
    workers = spec.resources.workers_per_model
    if workers > 1 and not args.local:
        from farm.run.data_parallel import run_distributed
        from farm.run import check_cluster_fits, ensure_ray

        if prep.pending:  # a request no node can ever hold would wait forever
            ensure_ray(args.address)
            check_cluster_fits(spec, args.wait_for_resources)
        result = run_distributed(prep, workers, use_gpu=spec.resources.gpus > 0, progress=progress,
                                 address=args.address)
    elif args.local:
        result = run_local(prep, progress=progress)
    else:
        result = run_ray(prep, address=args.address, max_workers=args.max_workers, progress=progress,
                         wait_for_resources=args.wait_for_resources)
    print(f"ufarm: trained {len(result.trained)} models in {result.seconds:.1f} s; "
          f"{len(result.failed)} failed; store: {prep.store.uri}", flush=True)
    for model_id, error in result.failed.items():
        print(redact(f"  failed {model_id}: {error}"))
    if 0 < spec.count("shadow") < 4:
        print(f"ufarm: note: {spec.count('shadow')} shadows train, but ufarm evaluate's membership inference "
              "needs at least 4 (add pairs to this run later)")
    return 1 if result.failed else 0


def print_status(uri: str) -> dict:
    from farm.status import summarize

    s = summarize(RunStore(uri))
    m = s["manifest"]
    print(f"run store: {s['store']}")
    print(f"spec: {s['spec']}   dataset: {m['dataset']['name']} ({m['n_examples']} examples, "
          f"{m['n_classes']} classes; splits {m['dataset']['splits']})")
    print(f"{'role':<10} {'planned':>8} {'done':>8} {'missing':>8} {'failed':>8}")
    total = {"planned": 0, "done": 0, "missing": 0, "failed": 0}
    for role, row in s["roles"].items():
        print(f"{role:<10} {row['planned']:>8} {row['done']:>8} {row['missing']:>8} {row['failed']:>8}")
        for k in total:
            total[k] += row[k]
    print(f"{'total':<10} {total['planned']:>8} {total['done']:>8} {total['missing']:>8} {total['failed']:>8}")
    for model_id, error in s["failed"].items():
        print(f"failed {model_id}: {error}")
    if s["other_models"]:
        print(f"{len(s['other_models'])} more models in the store are not in this spec's plan "
              "(Tune trials, or methods and counts of earlier specs of this run)")
    return s


def cmd_demo(args) -> int:
    rc = cmd_run("digits-demo", args)
    print()
    s = print_status(args.store)
    from farm.store import RunStore as _Store

    markers = _Store(args.store).markers()
    print("\nmean accuracy per role (plain query):")
    for role in s["roles"]:
        accs = [mk["accuracy"] for mk in markers.values() if mk["role"] == role]
        if accs:
            parts = []
            for split in ("retain", "forget", "test"):
                vals = [a[split] for a in accs if a.get(split) is not None]
                parts.append(f"{split} {sum(vals) / len(vals):.3f}")
            print(f"  {role:<10} " + "  ".join(parts))
    where = args.store if "://" in args.store else os.path.abspath(args.store)
    print(f"\nthe run is in {where}  (ufarm status {args.store})")
    if rc == 0:  # the demo ends with what users publish: the evaluation's headline figures
        from evaluation.report import evaluate_store, summary_lines

        print("\nevaluation (ufarm evaluate):")
        rep = evaluate_store(args.store, progress=not args.no_progress)
        print("\n".join(f"  {line}" for line in summary_lines(rep)))
    return rc


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="ufarm: %(message)s")
    ufarm_log = logging.getLogger("ufarm")
    if not any(isinstance(f, _RedactFilter) for f in ufarm_log.filters):
        ufarm_log.addFilter(_RedactFilter())
    old_sigterm = None
    if threading.current_thread() is threading.main_thread():
        old_sigterm = signal.signal(signal.SIGTERM, _terminated)
    try:
        return _dispatch(args)
    except USER_ERRORS as exc:
        print(redact(f"ufarm: error: {exc}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    finally:
        if old_sigterm is not None:
            signal.signal(signal.SIGTERM, old_sigterm)
        runner = sys.modules.get("farm.run")  # not imported: no Ray was started
        try:  # a local Ray that this command started stops with it, on every way out
            if runner is not None:
                runner.shutdown_ray()
        except KeyboardInterrupt:
            pass


def _dispatch(args) -> int:
    if args.command == "run":
        return cmd_run(args.spec, args)
    if args.command == "status":
        print_status(args.store)
        return 0
    if args.command == "demo":
        return cmd_demo(args)
    if args.command == "evaluate":
        return cmd_evaluate(args)
    if args.command == "tune":
        from farm.run.tune import cmd_tune

        return cmd_tune(args)
    if args.command == "presets":
        from farm.spec import preset_names

        print("\n".join(preset_names()))
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
