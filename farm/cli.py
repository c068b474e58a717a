"""The `ufarm` command line: run, plan, status, demo, tune, evaluate, export, methods, presets.

Bad input ends with one line on stderr (`ufarm: error: ...`) and exit status 2, before anything is written.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from farm import __version__
from farm.data import DataError, load_dataset
from farm.export import add_parser as add_export
from farm.export import cmd_export
from farm.plan import make_plan
from farm.settings import Settings, SettingsError, redact
from farm.spec import SpecError, load_spec, preset_names, spec_from_dict
from farm.status import plan_summary, summarize
from farm.store import RunStore, StoreError
from farm.targets import TargetsError, targets_from_flags

DEFAULT_DEMO_STORE = "runs/digits-demo"
DEFAULT_CHUNK_EXAMPLES = 8192  # evaluation.report.DEFAULT_CHUNK_EXAMPLES (not imported: --help stays light)
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


def _add_store(p: argparse.ArgumentParser, *, positional: bool = False, default: str | None = None) -> None:
    """Every subcommand takes the store as --store URI; status, evaluate and export also as their first
    positional argument (their historical form)."""
    p.add_argument("--store", dest="store_opt", metavar="URI", default=default,
                   help="run store: a folder, file://... or s3://bucket/prefix"
                        + (f" (default: {default})" if default else ""))
    if positional:
        p.add_argument("store_pos", nargs="?", metavar="STORE", help="the run store (same as --store)")


def _add_executor(p: argparse.ArgumentParser, what: str = "train", executor_help: str | None = None) -> None:
    p.add_argument("--executor", choices=("ray", "local"), default=None,
                   help=executor_help or (f"ray (default): {what} with Ray actors on RAY_ADDRESS / --address, else a "
                                          f"local Ray; local: {what} in this process, without Ray"))
    p.add_argument("--local", action="store_true", help=argparse.SUPPRESS)  # deprecated alias of --executor local
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray started on demand)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    _add_executor(p)
    p.add_argument("--max-workers", type=int, help="at most this many Ray workers (default: as many as fit)")
    p.add_argument("--verify", action="store_true",
                   help="check every committed logits file's sha256 first and retrain models that fail it")
    p.add_argument("--target", action="append", metavar="FIGURE=H", default=None,
                   help="train in rounds until FIGURE's 95%% half-width is at most H (or FIGURE=se:S for a standard "
                        "error); repeatable; figures: lira_auc, lira_tpr_at_1pct, lira_tpr_at_0.1pct, f, f_ratio, "
                        "f_null (docs/targets.md)")
    p.add_argument("--budget-models", type=int, metavar="N", default=None,
                   help="with targets: at most N models in the store")
    p.add_argument("--budget-hours", type=float, metavar="H", default=None,
                   help="with targets: at most H device-hours of training (the models' timings)")
    p.add_argument("--wait-for-resources", type=float, metavar="SECONDS", default=None,
                   help="when no Ray node can hold one worker (resources.cpus/gpus), wait this long for an "
                        "autoscaler to add one before failing (default: 900 on an autoscaling cluster, else 0)")


def _sub(sub, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                          epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_evaluate(sub) -> None:
    p = _sub(sub, "evaluate", "LiRA/RMIA, the competition's forgetting score, tests and a report",
             "  ufarm evaluate --store runs/digits-demo\n"
             "  ufarm evaluate --store runs/a --method finetune --out report-finetune/\n"
             "  ufarm evaluate --store s3://bucket/runs/a --executor ray --address ray://head:10001")
    _add_store(p, positional=True)
    p.add_argument("--method", help="only this unlearning method (its name or <method>-<hparams hash>)")
    p.add_argument("--out", help="report folder or URI (default: <run>/report/)")
    p.add_argument("--n-boot", type=int, default=None,
                   help="draws behind the equal-count F and F_null (default 20; a multiple of 4 keeps their "
                        "jackknife groups equal)")
    p.add_argument("--max-examples", type=int, default=None, help="at most this many forget examples per statistic")
    p.add_argument("--rmia-a", type=float, default=None, help="RMIA's offline a (default 0.3)")
    p.add_argument("--rmia-gamma", type=float, default=None, help="RMIA's likelihood-ratio threshold (default 1)")
    p.add_argument("--verify", action="store_true",
                   help="first read every logits file whole, once, against its sha256 (every read also checks "
                        "the pages of the columns it uses against their CRC-32)")
    _add_executor(p, executor_help=(
        "local (default without --address or RAY_ADDRESS): every job in this process; ray (default with one): "
        "chunks of examples and unlearning methods as Ray tasks of 1 CPU (a local Ray when no address is given). "
        "The report is the same either way"))
    p.add_argument("--chunk-examples", type=int, default=None, metavar="N",
                   help=f"examples per membership job (default {DEFAULT_CHUNK_EXAMPLES}, a row group of the logits "
                        "files): a job holds its N examples of every shadow, so its memory follows shadows x N")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ufarm", description="Reference-model farm for judging machine unlearning.",
        epilog="examples:\n  ufarm demo\n  ufarm run digits-demo --store runs/digits-demo\n"
               "  ufarm evaluate --store runs/digits-demo\n\n`ufarm COMMAND --help` shows each command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"ufarm {__version__}")
    ap.add_argument("-v", "--verbose", action="count", default=0, help="more log lines (-v info, -vv debug)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = _sub(sub, "run", "train every model of SPEC that the store does not hold yet",
             "  ufarm run digits-demo --store runs/digits-demo\n"
             "  ufarm run my.yaml --store s3://bucket/runs/a --address ray://head:10001\n"
             "  ufarm run my.yaml --store runs/a --executor local    # no Ray\n"
             "  ufarm run digits-demo --store runs/d --target lira_auc=0.02 --target f_ratio=0.2 --budget-models 600")
    p.add_argument("spec", help="a YAML spec path or a preset name (ufarm presets)")
    _add_store(p)
    _add_run_options(p)
    p = _sub(sub, "plan", "what `ufarm run SPEC` would train, writing nothing",
             "  ufarm plan digits-demo\n  ufarm plan my.yaml --store runs/a    # with done models and a time estimate")
    p.add_argument("spec", help="a YAML spec path or a preset name")
    _add_store(p)
    p = _sub(sub, "status", "models per role: planned, done, missing, failed",
             "  ufarm status --store runs/digits-demo")
    _add_store(p, positional=True)
    p = _sub(sub, "demo", "run the digits-demo preset end to end, then evaluate it",
             "  ufarm demo\n  ufarm demo --store /tmp/demo --executor local")
    _add_store(p, default=DEFAULT_DEMO_STORE)
    _add_run_options(p)
    p = _sub(sub, "tune", "Ray Tune search over an unlearning method's hyper-parameters (docs/tune.md)",
             "  ufarm demo --store runs/digits-demo\n  ufarm tune digits-tune --store runs/digits-demo\n"
             "  ufarm tune search.yaml --store runs/a --restart")
    p.add_argument("spec", help="a tune spec (only its search; the run comes from the store) or a preset name")
    _add_store(p)
    _add_executor(p, what="train missing reference models")
    p.add_argument("--restart", action="store_true", help="start the search afresh instead of resuming it")
    _add_evaluate(sub)
    # on demand: `ufarm --help`, `status` and `presets` load neither torch nor Ray
    add_export(sub)
    p = _sub(sub, "methods", "the built-in unlearning methods: parameters, defaults, ranges and sources",
             "  ufarm methods\n  ufarm methods --json")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _sub(sub, "presets", "list the specs shipped with the package", "  ufarm presets")
    return ap


def store_of(args, required: bool = True) -> str | None:
    """The store named by --store or by the positional STORE (never two different ones)."""
    opt, pos = getattr(args, "store_opt", None), getattr(args, "store_pos", None)
    if opt and pos and opt != pos:
        raise SpecError(f"two stores given: {pos!r} and --store {opt!r}; give one")
    store = pos or opt
    if not store and required:
        raise SpecError(f"ufarm {args.command} needs a store: --store URI")
    return store


def executor_of(args) -> str:
    if getattr(args, "local", False):
        if args.executor == "ray":
            raise SpecError("--local and --executor ray contradict each other; give one")
        print("ufarm: warning: --local is deprecated and will be removed in the next release; use --executor local",
              file=sys.stderr)
        return "local"
    if args.executor is None and args.command == "evaluate":  # Ray only when a cluster is named
        return "ray" if args.address or Settings.from_env().ray_address else "local"
    return args.executor or "ray"


def cmd_evaluate(args) -> int:
    # on demand: `ufarm --help`, `status` and `presets` load neither torch nor Ray
    from evaluation.report import ReportSettings, evaluate_store, summary_lines

    if args.chunk_examples is not None and args.chunk_examples < 1:
        raise SpecError(f"--chunk-examples must be >= 1, got {args.chunk_examples}")
    kw = {k: v for k, v in (("n_boot", args.n_boot), ("max_examples", args.max_examples),
                            ("rmia_a", args.rmia_a), ("rmia_gamma", args.rmia_gamma),
                            ("chunk_examples", args.chunk_examples)) if v is not None}
    ReportSettings(**kw)  # bad values fail here, in one line, before a Ray starts
    if args.executor == "ray":
        # on demand: Ray (and farm.run) only for --executor ray
        from farm.run.evaluate_ray import ray_map

        kw["map_chunks"] = ray_map(args.address)
    rep = evaluate_store(args.store, out=args.out, method=args.method, progress=not args.no_progress,
                         verify=args.verify, **kw)
    print("\n".join(summary_lines(rep)))
    return 0


def _train(spec, args):
    """One `ufarm run` of ``spec`` on the chosen executor -> RunResult, saying what it plans and did."""
    # on demand: `ufarm --help`, `status` and `presets` load neither torch nor Ray
    from farm.run import prepare_run, run_local, run_ray

    prep = prepare_run(spec, args.store, verify=args.verify)
    print(f"ufarm: run {spec.name!r} in {prep.store.uri}: {len(prep.plan.jobs)} models planned, "
          f"{len(prep.done)} already done, {len(prep.pending)} to train", flush=True)
    if prep.beyond:  # a spec with lower counts (or other methods) than the store holds
        parts = ", ".join(f"{role} {n}" for role, n in sorted(prep.beyond.items()))
        print(f"ufarm: the store holds {sum(prep.beyond.values())} more models than this spec plans ({parts}); "
              "they stay, and ufarm evaluate uses every committed model", flush=True)
    progress = not args.no_progress
    workers = spec.resources.workers_per_model
    if workers > 1 and args.executor == "ray":
        # on demand: `ufarm --help`, `status` and `presets` load neither torch nor Ray
        from farm.run import check_cluster_fits, ensure_ray
        from farm.run.data_parallel import run_distributed

        if prep.pending:  # a request no node can ever hold would wait forever
            ensure_ray(args.address)
            check_cluster_fits(spec, args.wait_for_resources)
        result = run_distributed(prep, workers, use_gpu=spec.resources.gpus > 0, progress=progress,
                                 address=args.address)
    elif args.executor == "local":
        result = run_local(prep, progress=progress)
    else:
        result = run_ray(prep, address=args.address, max_workers=args.max_workers, progress=progress,
                         wait_for_resources=args.wait_for_resources)
    print(f"ufarm: trained {len(result.trained)} models in {result.seconds:.1f} s; "
          f"{len(result.failed)} failed; store: {prep.store.uri}", flush=True)
    for model_id, error in result.failed.items():
        print(redact(f"  failed {model_id}: {error}"))
    return result


def _run_to_targets(spec, args) -> int:
    """`ufarm run` of a spec with targets: rounds until they are met or the budget is spent (exit 0 or 3)."""
    # on demand: the figures' code loads scipy and scikit-learn, which a plain run does not need
    from evaluation.report.targets import read_figures
    from farm.rounds import STOP_FAILED, STOP_MET, run_to_targets, unlearn_keys

    def read(s):
        return read_figures(args.store, list(s.targets.figures), methods=list(unlearn_keys(s)))

    print(f"ufarm: training until {', '.join(f'{f} +- {spec.targets.half_width(f):.3g}' for f in spec.targets.figures)}"
          " (95% half-widths)", flush=True)
    run = run_to_targets(spec, RunStore(args.store), lambda s: _train(s, args), read)
    print(f"ufarm: stopped: {run.message} (rounds.json in the store)")
    return {STOP_MET: 0, STOP_FAILED: 1}.get(run.stop, 3)


def cmd_run(spec_arg: str, args) -> int:
    spec = load_spec(spec_arg)
    flags = (getattr(args, "target", None) or [], getattr(args, "budget_models", None),
             getattr(args, "budget_hours", None))
    if flags[0] or flags[1] is not None or flags[2] is not None:
        try:
            targets = targets_from_flags(spec.targets, *flags)
        except TargetsError as exc:
            raise SpecError(str(exc)) from None
        spec = spec_from_dict({**spec.to_dict(), "targets": targets})  # checked against the counts again
    if spec.targets is not None:
        return _run_to_targets(spec, args)
    result = _train(spec, args)
    if 0 < spec.count("shadow") < 4:
        print(f"ufarm: note: {spec.count('shadow')} shadows train, but ufarm evaluate's membership inference "
              "needs at least 4 (add pairs to this run later)")
    return 1 if result.failed else 0


def cmd_plan(args) -> int:
    """A dry run: the plan of SPEC per role, what the store already holds, and the model-seconds left."""
    spec = load_spec(args.spec)
    dataset = load_dataset(spec.dataset, spec.seed)
    plan = make_plan(spec, dataset.split, dataset.labels, dataset.groups)
    store = None
    if args.store:
        store = RunStore(args.store)
        store.check_reachable()
    s = plan_summary(plan.jobs, store)
    print(f"plan of {spec.name!r} on {dataset.name} ({len(dataset.labels)} examples, forget set "
          f"{int(plan.forget.sum())}){f' against {store.uri}' if store else ''}:")
    print(f"{'role':<10} {'planned':>8} {'done':>8} {'pending':>8} {'s/model':>9} {'s left':>9}")
    for role, row in s["roles"].items():
        each = "-" if row["seconds_each"] is None else f"{row['seconds_each']:.2f}"
        left = "-" if row["seconds_left"] is None else f"{row['seconds_left']:.0f}"
        print(f"{role:<10} {row['planned']:>8} {row['done']:>8} {row['pending']:>8} {each:>9} {left:>9}")
    known = [r["seconds_left"] for r in s["roles"].values() if r["seconds_left"] is not None]
    if known:
        print(f"about {sum(known):.0f} model-seconds left (one worker; from the timings of {s['timed_from']} "
              "committed models; roles without timings not counted)")
    print("nothing was written")
    return 0


def cmd_methods(args) -> int:
    # on demand: `ufarm --help`, `status` and `presets` load neither torch nor Ray
    from farm.train.methods import describe_methods

    methods = describe_methods()
    if args.json:
        print(json.dumps(methods, indent=2, default=str))
        return 0
    for name, m in methods.items():
        print(f"{name}: {m['doc']}  [{m['source']}]")
        for pname, p in m["space"].items():
            bounds = (f" in [{p['low']:g}, {p['high']:g}]{' (log)' if p.get('log') else ''}"
                      if p.get("low") is not None and p.get("high") is not None else "")
            choices = f" one of {p['choices']}" if p.get("choices") else ""
            grid = f"; tune grid {p['grid']}" if p.get("grid") else ""
            print(f"    {pname} ({p['type']}): default {p['default']!r}{bounds}{choices}{grid}")
    print("user methods: `module:function` or `path/file.py:function` in a spec (docs/methods.md)")
    return 0


def print_status(uri: str) -> dict:
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
    if s["targets"] is not None:
        print("precision targets (95% half-widths; models needed: the estimate from each standard error):")
        for line in s["targets"]:
            print(f"  {line}")
        if s["last_stop"]:
            print(f"last precision-driven run: {s['last_stop']}")
    return s


def cmd_demo(args) -> int:
    rc = cmd_run("digits-demo", args)
    print()
    s = print_status(args.store)
    markers = RunStore(args.store).markers()
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
    print(f"\nthe run is in {where}  (ufarm status --store {args.store})")
    if rc == 0:  # the demo ends with what users publish: the evaluation's headline figures
        # on demand: `ufarm --help`, `status` and `presets` load neither torch nor Ray
        from evaluation.report import evaluate_store, summary_lines

        print("\nevaluation (ufarm evaluate):")
        rep = evaluate_store(args.store, progress=not args.no_progress)
        print("\n".join(f"  {line}" for line in summary_lines(rep)))
    return rc


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="ufarm: %(message)s")
    ufarm_log = logging.getLogger("ufarm")
    ufarm_log.setLevel([logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)])
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
    except BrokenPipeError:  # `ufarm methods | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
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
    Settings.from_env()  # a bad environment setting fails here, in one line, before anything runs
    if hasattr(args, "split_args"):  # a command whose positional arguments say where the store is
        args.split_args(args)
    if hasattr(args, "store_opt"):
        args.store = store_of(args, required=args.command != "plan")
    if hasattr(args, "executor"):
        args.executor = executor_of(args)
    if args.command == "run":
        return cmd_run(args.spec, args)
    if args.command == "plan":
        return cmd_plan(args)
    if args.command == "status":
        print_status(args.store)
        return 0
    if args.command == "demo":
        return cmd_demo(args)
    if args.command == "evaluate":
        return cmd_evaluate(args)
    if args.command == "export":
        # on demand: `ufarm --help`, `status` and `presets` load neither torch nor Ray
        return cmd_export(args)
    if args.command == "tune":
        from farm.run.tune import cmd_tune  # imports Ray Tune: only for this command

        return cmd_tune(args)
    if args.command == "methods":
        return cmd_methods(args)
    if args.command == "presets":
        # on demand: `ufarm --help`, `status` and `presets` load neither torch nor Ray
        print("\n".join(preset_names()))
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
