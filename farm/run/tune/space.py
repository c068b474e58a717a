"""The search space of `ufarm tune`: the spec's `tune` section checked against the method's declared
hyper-parameters and translated into Ray Tune's space (grid, choice, ranges), and the hparams a trial's
models are made with."""
from __future__ import annotations

from ray import tune

from farm.spec import FARM_HPARAMS, Spec, SpecError, TuneSpec, check_farm_hparam
from farm.train.methods import Method, get_method


def parse_tune(spec: Spec) -> TuneSpec:
    """The spec's tune section, checked against the method's space (the fields themselves are checked by
    farm.spec); a SpecError naming the field otherwise."""
    if spec.tune is None:
        raise SpecError("the spec has no tune section (see docs/tune.md)")
    ts = spec.tune
    method = get_method(ts.method)
    if ts.search == "optuna":
        try:
            import optuna  # noqa: F401  (only to say early that it is missing)
        except ImportError:
            raise SpecError("tune.search 'optuna' needs the optuna package (pip install optuna); "
                            "or use grid or random") from None
    param_space(ts, method)  # checks every value against the method's declared space
    if spec.count("original") == 0:
        raise SpecError("tune needs originals to start from: set counts.original to at least 1")
    if spec.count("retrain") < 2:
        raise SpecError(f"tune needs a retrained reference: set counts.retrain to at least 2 (4 or more for "
                        f"F_null), got {spec.count('retrain')}")
    return ts


def param_space(ts: TuneSpec, method: Method) -> tuple[dict, dict]:
    """(searched, fixed): the Tune search space of the searched parameters and the fixed hparams."""
    names = ts.params or {k: None for k, p in method.space.items() if p.grid}
    if not names:
        raise SpecError(f"tune.params is empty and method {method.name!r} declares no grid; name the "
                        "hyper-parameters to search with their values")
    searched, fixed = {}, {}
    for name, value in names.items():
        where = f"tune.params.{name}"
        p = None if name in FARM_HPARAMS else method.space.get(name)
        if name in FARM_HPARAMS:  # the farm's own (augment, precision): fixed or searched like the method's
            check = lambda v, w, name=name: check_farm_hparam(name, v, w)  # noqa: E731
        elif p is not None:
            check = p.check
        elif method.open_space:
            check = lambda v, w: v  # noqa: E731
        else:
            raise SpecError(f"{where}: method {method.name!r} has no hyper-parameter {name!r}; allowed: "
                            f"{', '.join((*method.space, *FARM_HPARAMS))}")
        if value is None:
            if p is None:
                raise SpecError(f"{where}: give the values to search ({name!r} has no declared grid or range)")
            if ts.search == "grid":
                if not p.grid:
                    raise SpecError(f"{where}: {method.name!r} declares no grid for {name!r}; list the values")
                value = list(p.grid)
            else:
                value = {"low": p.low, "high": p.high, "log": p.log} if p.type in ("int", "float") \
                    else list(p.choices or (True, False))
        if isinstance(value, list):
            if not value:
                raise SpecError(f"{where} lists no values")
            vals = [check(v, f"{where}[{i}]") for i, v in enumerate(value)]
            searched[name] = tune.grid_search(vals) if ts.search == "grid" else tune.choice(vals)
        elif isinstance(value, dict):
            if ts.search == "grid":
                raise SpecError(f"{where}: a grid search needs a list of values, got the range {value!r}")
            if set(value) - {"low", "high", "log"} or "low" not in value or "high" not in value:
                raise SpecError(f"{where} must be {{low, high, log}}, got {value!r}")
            lo, hi = check(value["low"], f"{where}.low"), check(value["high"], f"{where}.high")
            if not lo < hi:
                raise SpecError(f"{where}: low must be below high, got {value!r}")
            is_int = (p is not None and p.type == "int")
            if value.get("log"):
                if lo <= 0:
                    raise SpecError(f"{where}: a log range needs low > 0, got {lo}")
                searched[name] = tune.lograndint(lo, hi + 1) if is_int else tune.loguniform(lo, hi)
            else:
                searched[name] = tune.randint(lo, hi + 1) if is_int else tune.uniform(lo, hi)
        else:
            fixed[name] = check(value, where)
    if not searched:
        raise SpecError("tune.params fixes every value; list several values (or a range) for at least one")
    return searched, fixed


def trial_hparams(method: Method, config: dict, fixed: dict, seed: int) -> dict:
    """The hparams a trial's models are made with (and hashed by): plain Python values of the right type."""
    out = dict(fixed)
    for k, v in config.items():
        v = v.item() if hasattr(v, "item") else v
        p = None if k in FARM_HPARAMS else method.space.get(k)
        out[k] = p.check(v, f"hparams.{k}") if p is not None else v
        if isinstance(out[k], float):
            out[k] = float(f"{out[k]:.6g}")  # stable, readable ids for sampled floats
    if seed:
        out["seed"] = seed
    return dict(sorted(out.items()))
