"""Run specs: YAML files (or presets shipped in farm/presets) loaded into typed, validated dataclasses.

Every validation error is a SpecError whose one-line message names the field, the value and what is
allowed, so the CLI can print it as is and exit before anything is written.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from farm.targets import FIGURE_ROLES, Targets, TargetsError, parse_targets

DATASETS = ("digits", "fashion-mnist", "cifar10", "arrays")
ARCHS = ("small-cnn", "resnet18")
PRECISIONS = ("fp32", "bf16", "auto")
GPU_KERNELS = ("deterministic", "autotuned")
MEMORY_FORMATS = ("contiguous", "channels_last")
FORGET_KINDS = ("random", "classes", "groups")
QUERIES = ("plain", "hflip", "shift")  # shift:DX,DY with integer pixel offsets
ROLES = ("original", "retrain", "shadow", "unlearned")
# hparams of an unlearn entry that the farm consumes rather than the method (besides `seed`): augmented
# retain and forget batches, and the precision the method runs in (farm.train.engine)
FARM_HPARAMS = ("augment", "precision")
# The most models one role (or one unlearn entry) may plan: a plan is built in memory before anything runs,
# so a count beyond any real run must be refused at once, not planned until memory runs out.
MAX_MODELS_PER_ROLE = 1_000_000
DEFAULT_UNLEARN_TIME_LIMIT = 3600.0  # seconds of wall-clock time one unlearning method call may take


class SpecError(ValueError):
    """A spec (or a value in it) that cannot be run; the message is one line and names the field."""


def is_file_ref(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def method_label(name: str) -> str:
    """A file-name-safe label for a method reference, used in model ids: a built-in's name; for
    `pkg.mod:fn` -> `pkg.mod.fn`; for `path/to/file.py:fn` -> `file.fn`. Distinct files with the same stem
    still give distinct model ids, because the hparams hash covers the full reference."""
    if ":" not in name:  # a built-in's name
        return re.sub(r"[^A-Za-z0-9_.]+", "_", name)
    target, func = name.rsplit(":", 1)
    if is_file_ref(target):
        target = os.path.splitext(os.path.basename(target))[0]
    return re.sub(r"[^A-Za-z0-9_.]+", "_", f"{target}.{func}").strip("._") or "user"


@dataclass(frozen=True)
class DatasetSpec:
    name: str = "digits"
    path: str | None = None  # folder or file for fashion-mnist / cifar10 / arrays
    test_fraction: float = 0.2  # only for datasets without an official test split (digits, arrays)
    val_fraction: float = 0.5  # fraction of the held-out (test) examples that become the val split
    image_shape: tuple[int, ...] | None = None  # arrays from Parquet: [C, H, W] of the flattened images


@dataclass(frozen=True)
class ForgetSpec:
    kind: str = "random"
    fraction: float = 0.1  # kind=random: fraction of the train split
    classes: tuple[int, ...] = ()  # kind=classes
    groups: tuple[int, ...] = ()  # kind=groups: group ids (e.g. subject ids) of the arrays dataset


@dataclass(frozen=True)
class ModelSpec:
    arch: str = "small-cnn"
    width: int = 16  # channels of the first conv layer of small-cnn


@dataclass(frozen=True)
class TrainingSpec:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = False  # random crop (pad 2) and horizontal flip
    eval_batch_size: int = 1024
    # fp32, or bf16 autocast (weights and optimiser stay float32); auto: bf16 on a GPU, fp32 on a CPU
    precision: str = "fp32"


@dataclass(frozen=True)
class UnlearnSpec:
    method: str
    count: int
    hparams: dict = field(default_factory=dict)
    # wall-clock seconds one call of the method may run; past it the model fails (docs/methods.md)
    time_limit: float = DEFAULT_UNLEARN_TIME_LIMIT

    @property
    def hparams_hash(self) -> str:
        blob = json.dumps({"method": self.method, "hparams": self.hparams}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]

    @property
    def method_id(self) -> str:
        """The method as it appears in model ids: file-name safe (method_label)."""
        return method_label(self.method)


@dataclass(frozen=True)
class OutputSpec:
    keep_logits: bool = True  # store the full logits vector next to conf
    keep_weights: bool = False  # store weights of non-original models too (originals always)


@dataclass(frozen=True)
class ResourceSpec:
    cpus: float = 1.0  # per model (per actor)
    gpus: float = 0.0  # per model; fractions pack several actors on one GPU
    batch_models: int | str = 1  # models trained together with stacked weights per worker, or "auto"
    workers_per_model: int = 1  # > 1: each model trained data-parallel across this many Ray Train workers
    # GPU only: "deterministic" kernels (the same bits on the same card and software) or cuDNN's "autotuned"
    # ones (faster for some shapes, not bit-reproducible). CPU runs are deterministic either way.
    gpu_kernels: str = "deterministic"
    # how weights and images lie in memory: NCHW ("contiguous") or NHWC ("channels_last", which tensor-core
    # convolutions read without transposing); the same models up to float rounding
    memory_format: str = "contiguous"
    # torch.compile every model's forward pass (Module.compile): fewer, fused kernels for models that run one
    # at a time, paid for by compiling once per worker process; the same models up to float rounding
    compile: bool = False


TUNE_SEARCHES = ("grid", "random", "optuna")
TUNE_SCHEDULERS = ("fifo", "asha")


@dataclass(frozen=True)
class TuneResources:
    cpus: float = 1.0  # per trial
    gpus: float = 0.0  # per trial; fractions pack several trials on one GPU


@dataclass(frozen=True)
class TuneSpec:
    """The `tune` section: a Ray Tune search over one unlearning method's hyper-parameters (docs/tune.md).
    Checked here field by field; farm.run.tune.space checks `params` against the method's declared space."""
    method: str = "finetune"  # default: the spec's first unlearn method, else finetune
    params: dict = field(default_factory=dict)  # name -> list (grid/choice) | {low, high, log} | scalar (fixed)
    models: int = 32  # K: unlearned models per trial
    search: str = "grid"
    samples: int = 8  # trials of a random / optuna search
    scheduler: str = "fifo"
    grace_models: int = 4  # ASHA: models every trial makes before it can be stopped
    report_every: int = 0  # models between reports to Tune; 0: once at the end (fifo), grace_models (asha)
    max_concurrent: int = 0  # 0: as many trials as the cluster's resources fit
    resources: TuneResources = TuneResources()
    storage_path: str | None = None  # default <run>/tune
    name: str | None = None  # the search's folder; default <method>-<search>
    seed: int = 0  # random/optuna sampler seed; non-zero also makes new replicates (a `seed` hparam)
    baseline: bool = True  # also score the method's default hyper-parameters, for comparison

    @property
    def search_name(self) -> str:
        return self.name or f"{method_label(self.method)}-{self.search}"


@dataclass(frozen=True)
class Spec:
    name: str = "unnamed"
    seed: int = 0
    dataset: DatasetSpec = DatasetSpec()
    forget: ForgetSpec = ForgetSpec()
    model: ModelSpec = ModelSpec()
    training: TrainingSpec = TrainingSpec()
    counts: dict = field(default_factory=dict)  # role -> count for original, retrain, shadow
    unlearn: tuple[UnlearnSpec, ...] = ()
    queries: tuple[str, ...] = ("plain",)
    outputs: OutputSpec = OutputSpec()
    resources: ResourceSpec = ResourceSpec()
    max_retries: int = 2
    # unlearned models slower than this fraction of the mean retrain time are marked over_time_cutoff
    time_cutoff: float | None = None
    tune: TuneSpec | None = None  # the `ufarm tune` section (docs/tune.md)
    targets: Targets | None = None  # precision targets and a budget: `ufarm run` trains in rounds (docs/targets.md)

    def count(self, role: str) -> int:
        return int(self.counts.get(role, 0))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self) -> dict:
        """What a store's models depend on. Counts, methods, resources and retries are left out, so a run
        can be extended with more models or methods on the same store; anything else is another run."""
        d = self.to_dict()
        for key in ("name", "counts", "unlearn", "resources", "max_retries", "time_cutoff", "tune", "targets"):
            d.pop(key)
        d["dataset"].pop("path")  # the data fingerprint covers where it came from
        return d

    def identity_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- loading

def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files("farm.presets").iterdir()
                  if p.name.endswith(".yaml"))


def load_spec(spec: str | Path | dict) -> Spec:
    """A spec from a dict, a YAML path, or the name of a preset shipped in farm/presets."""
    return spec_from_dict(load_spec_dict(spec))


def load_spec_dict(spec: str | Path | dict) -> dict:
    """The raw mapping of a spec (a dict, a YAML path or a preset's name), before any checks of its fields."""
    if isinstance(spec, dict):
        return spec
    text = str(spec)
    path = Path(text)
    if path.is_file():
        raw = _parse_yaml(lambda: path.read_text(), text)
    elif text in preset_names():
        raw = _parse_yaml(lambda: resources.files("farm.presets").joinpath(f"{text}.yaml").read_text(), text)
    elif text.endswith((".yaml", ".yml")) or "/" in text:
        raise SpecError(f"spec file {text!r} does not exist")
    else:
        raise SpecError(f"unknown preset {text!r}; presets: {', '.join(preset_names())} (or give a YAML path)")
    if not isinstance(raw, dict):
        raise SpecError(f"spec {text!r} must be a YAML mapping, got {type(raw).__name__}")
    return raw


def _parse_yaml(read, text: str):
    """The YAML document read() returns; a file that cannot be read or parsed is a one-line SpecError."""
    import yaml  # here, not at the top: the engine runs from dict specs on machines without PyYAML

    try:
        return yaml.safe_load(read())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
        raise SpecError(f"spec {text!r} is not valid YAML: {problem}{where}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"spec {text!r} cannot be read: {type(exc).__name__}: {exc}".splitlines()[0]) from None


def _reject_nonfinite(value, where: str) -> None:
    """Every number anywhere in a spec (hparams and the tune section included) must be finite: YAML's .inf
    and .nan would otherwise pass range checks (NaN compares false) and reach training."""
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(f"{where or 'spec'} must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for k, v in value.items():
            _reject_nonfinite(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _reject_nonfinite(v, f"{where}[{i}]")


def _build(cls, raw: Any, where: str):
    """Construct a flat dataclass from a mapping, naming unknown keys and converting simple types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"{where} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(fields)}")
    values = {}
    for name, value in raw.items():
        default = fields[name].default
        if value == "auto" and name == "batch_models":  # the one field that takes a word or a number
            values[name] = value
            continue
        values[name] = _coerce(value, default, f"{where}.{name}")
    return cls(**values)


def _coerce(value, default, where):
    if value is None:
        return None
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise SpecError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{where} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{where} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, tuple) or (default is None and isinstance(value, list)):
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"{where} must be a list, got {value!r}")
        return tuple(value)
    return value


def _at_least(value, where: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SpecError(f"{where} must be an integer >= {low}, got {value!r}")
    return value


def _tune_section(raw, unlearn: list) -> TuneSpec | None:
    """The typed `tune` section, or None when the spec has none (an empty mapping is none too)."""
    if raw is None or raw == {}:
        return None
    if isinstance(raw, TuneSpec):
        return raw
    if not isinstance(raw, dict):
        raise SpecError(f"tune must be a mapping (see docs/tune.md), got {raw!r}")
    raw = dict(raw)
    res = raw.pop("resources", None) or {}
    if isinstance(res, TuneResources):
        res = dataclasses.asdict(res)
    if not isinstance(res, dict) or set(res) - {"cpus", "gpus"}:
        raise SpecError(f"tune.resources must be a mapping with cpus and/or gpus, got {res!r}")
    if raw.get("method") is None:
        raw["method"] = unlearn[0].method if unlearn else "finetune"
    params = raw.get("params")
    if params is not None and not isinstance(params, dict):
        raise SpecError(f"tune.params must be a mapping of hyper-parameter to values, got {params!r}")
    ts = _build(TuneSpec, {**raw, "params": dict(params or {})}, "tune")
    ts = dataclasses.replace(ts, method=str(ts.method), resources=_build(TuneResources, res, "tune.resources"))
    _at_least(ts.models, "tune.models", 2)
    _at_least(ts.samples, "tune.samples", 1)
    _at_least(ts.grace_models, "tune.grace_models", 2)
    for name in ("report_every", "max_concurrent", "seed"):
        _at_least(getattr(ts, name), f"tune.{name}", 0)
    if ts.search not in TUNE_SEARCHES:
        raise SpecError(f"tune.search {ts.search!r} is unknown; allowed: {', '.join(TUNE_SEARCHES)}")
    if ts.scheduler not in TUNE_SCHEDULERS:
        raise SpecError(f"tune.scheduler {ts.scheduler!r} is unknown; allowed: {', '.join(TUNE_SCHEDULERS)}")
    if ts.name is not None and (not isinstance(ts.name, str) or not ts.name or "/" in ts.name):
        raise SpecError(f"tune.name must be a folder name without '/', got {ts.name!r}")
    if ts.storage_path is not None and not isinstance(ts.storage_path, str):
        raise SpecError(f"tune.storage_path must be a path or s3:// URI, got {ts.storage_path!r}")
    r = ts.resources
    if not r.cpus > 0:
        raise SpecError(f"tune.resources.cpus must be a positive number, got {r.cpus!r}")
    if r.gpus < 0 or (r.gpus > 1 and r.gpus != int(r.gpus)):
        raise SpecError(f"tune.resources.gpus must be a fraction in [0, 1] or a whole number, got {r.gpus}")
    return ts


def spec_from_dict(raw: dict) -> Spec:
    raw = copy.deepcopy(raw)
    _reject_nonfinite(raw, "")
    allowed = {f.name for f in dataclasses.fields(Spec)}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise SpecError(f"spec: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    unlearn_raw = raw.get("unlearn") or []
    if not isinstance(unlearn_raw, (list, tuple)):  # a tuple: the round trip of Spec.to_dict
        raise SpecError(f"unlearn must be a list of {{method, count, hparams}}, got {unlearn_raw!r}")
    unlearn = []
    for i, item in enumerate(unlearn_raw):
        if not isinstance(item, dict) or "method" not in item:
            raise SpecError(f"unlearn[{i}] must be a mapping with a method, got {item!r}")
        extra = sorted(set(item) - {"method", "count", "hparams", "time_limit"})
        if extra:
            raise SpecError(f"unlearn[{i}]: unknown field(s) {', '.join(extra)}; "
                            "allowed: method, count, hparams, time_limit")
        hp = item.get("hparams") or {}
        if not isinstance(hp, dict):
            raise SpecError(f"unlearn[{i}].hparams must be a mapping, got {hp!r}")
        count = item.get("count", 1)
        limit = item.get("time_limit")
        limit = DEFAULT_UNLEARN_TIME_LIMIT if limit is None else _coerce(limit, 0.0, f"unlearn[{i}].time_limit")
        unlearn.append(UnlearnSpec(method=str(item["method"]), count=count, hparams=dict(hp), time_limit=limit))
    counts = raw.get("counts") or {}
    if not isinstance(counts, dict):
        raise SpecError(f"counts must be a mapping of role to count, got {counts!r}")
    seed = raw.get("seed", 0)
    max_retries = raw.get("max_retries", 2)
    spec = Spec(
        name=str(raw.get("name", "unnamed")),
        seed=_coerce(seed, 0, "seed"),
        dataset=_build(DatasetSpec, raw.get("dataset"), "dataset"),
        forget=_build(ForgetSpec, raw.get("forget"), "forget"),
        model=_build(ModelSpec, raw.get("model"), "model"),
        training=_build(TrainingSpec, raw.get("training"), "training"),
        counts=dict(counts),
        unlearn=tuple(unlearn),
        queries=tuple(raw.get("queries") or ("plain",)),
        outputs=_build(OutputSpec, raw.get("outputs"), "outputs"),
        resources=_build(ResourceSpec, raw.get("resources"), "resources"),
        max_retries=_coerce(max_retries, 0, "max_retries"),
        time_cutoff=_coerce(raw.get("time_cutoff"), 0.0, "time_cutoff"),
        tune=_tune_section(raw.get("tune"), unlearn),
        targets=_targets_section(raw.get("targets")),
    )
    validate(spec)
    return spec


# ------------------------------------------------------------------------------------------- validation

def _targets_section(raw) -> Targets | None:
    try:
        return parse_targets(raw)
    except TargetsError as exc:
        raise SpecError(str(exc)) from None


def planned_models(spec: Spec) -> int:
    """Models the spec's counts plan, every role and unlearning method."""
    return sum(spec.count(r) for r in ROLES[:3]) + sum(u.count for u in spec.unlearn)


def _validate_targets(spec: Spec) -> None:
    """Every targeted figure has models to start from, and the budget holds the first round."""
    t = spec.targets
    for name in t.figures:
        roles = FIGURE_ROLES[name]
        if "shadow" in roles and spec.count("shadow") < 4:
            raise SpecError(f"targets.figures.{name} is measured over shadows: set counts.shadow to at least 4 "
                            f"to start from (got {spec.count('shadow')})")
        if "unlearned" in roles and not spec.unlearn:
            raise SpecError(f"targets.figures.{name} is measured per unlearning method: the spec's unlearn lists none")
        if "retrain" in roles and spec.count("retrain") < 2:
            raise SpecError(f"targets.figures.{name} needs retrained models: set counts.retrain to at least 2 to "
                            f"start from (got {spec.count('retrain')})")
    if t.budget.models is not None and t.budget.models < planned_models(spec):
        raise SpecError(f"targets.budget.models: {t.budget.models} is below the {planned_models(spec)} models the "
                        "spec's counts plan for the first round")


def _positive_int(value, where):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SpecError(f"{where} must be a positive integer, got {value!r}")


def check_farm_hparam(name: str, value: Any, where: str) -> Any:
    """value, if it is one the farm's hparam `name` allows (FARM_HPARAMS); a SpecError naming `where` if not."""
    if name == "augment" and not isinstance(value, bool):
        raise SpecError(f"{where} must be true or false, got {value!r}")
    if name == "precision" and value not in PRECISIONS:
        raise SpecError(f"{where} {value!r} is unknown; allowed: {', '.join(PRECISIONS)}")
    return value


def validate(spec: Spec) -> None:
    """Checks that need no data. Checks against the data (a forget class that does not exist, a group id
    that no example has) happen in farm.plan once the dataset is loaded."""
    for section in ("dataset", "forget", "model", "training", "outputs", "resources"):
        for f in dataclasses.fields(getattr(spec, section)):
            value = getattr(getattr(spec, section), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise SpecError(f"{section}.{f.name} must be a finite number, got {value!r}")
    d = spec.dataset
    if d.name not in DATASETS:
        raise SpecError(f"dataset.name {d.name!r} is unknown; allowed: {', '.join(DATASETS)}")
    if not 0.0 < d.test_fraction < 1.0:
        raise SpecError(f"dataset.test_fraction must lie in (0, 1), got {d.test_fraction}")
    if not 0.0 <= d.val_fraction < 1.0:
        raise SpecError(f"dataset.val_fraction must lie in [0, 1), got {d.val_fraction}")
    if d.name in ("cifar10", "arrays") and not d.path:
        raise SpecError(f"dataset.path is required for dataset {d.name!r}")
    f = spec.forget
    if f.kind not in FORGET_KINDS:
        raise SpecError(f"forget.kind {f.kind!r} is unknown; allowed: {', '.join(FORGET_KINDS)}")
    if f.kind == "random" and not 0.0 < f.fraction < 1.0:
        raise SpecError(f"forget.fraction must lie in (0, 1), got {f.fraction}")
    if f.kind == "classes" and not f.classes:
        raise SpecError("forget.classes must list at least one class when forget.kind is 'classes'")
    if f.kind == "groups" and not f.groups:
        raise SpecError("forget.groups must list at least one group id when forget.kind is 'groups'")
    for c in f.classes:
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise SpecError(f"forget.classes holds {c!r}; classes are non-negative integers")
    if spec.model.arch not in ARCHS:
        raise SpecError(f"model.arch {spec.model.arch!r} is unknown; allowed: {', '.join(ARCHS)}")
    _positive_int(spec.model.width, "model.width")
    t = spec.training
    _positive_int(t.epochs, "training.epochs")
    _positive_int(t.batch_size, "training.batch_size")
    _positive_int(t.eval_batch_size, "training.eval_batch_size")
    if t.precision not in PRECISIONS:
        raise SpecError(f"training.precision {t.precision!r} is unknown; allowed: {', '.join(PRECISIONS)}")
    if not t.lr > 0:
        raise SpecError(f"training.lr must be positive, got {t.lr}")
    if not 0 <= t.momentum < 1:
        raise SpecError(f"training.momentum must lie in [0, 1), got {t.momentum}")
    if t.weight_decay < 0:
        raise SpecError(f"training.weight_decay must be >= 0, got {t.weight_decay}")
    for role, n in spec.counts.items():
        if role not in ROLES[:3]:
            raise SpecError(f"counts.{role} is not a role; allowed: original, retrain, shadow "
                            "(unlearned models are counted per method under unlearn)")
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise SpecError(f"counts.{role} must be a positive integer (leave the role out to train none), got {n!r}")
        if n > MAX_MODELS_PER_ROLE:
            raise SpecError(f"counts.{role} must be at most {MAX_MODELS_PER_ROLE:,} models, got {n:,}")
    if spec.count("shadow") % 2:
        raise SpecError(f"counts.shadow must be even (shadows come in complementary pairs so every train "
                        f"example is IN for exactly half of them; ufarm evaluate's membership inference needs "
                        f"at least 4), got {spec.count('shadow')}")
    seen = set()
    for i, u in enumerate(spec.unlearn):
        if isinstance(u.count, bool) or not isinstance(u.count, int) or u.count <= 0:
            raise SpecError(f"unlearn[{i}].count must be a positive integer, got {u.count!r}")
        if u.count > MAX_MODELS_PER_ROLE:
            raise SpecError(f"unlearn[{i}].count must be at most {MAX_MODELS_PER_ROLE:,} models, got {u.count:,}")
        if isinstance(u.time_limit, bool) or not isinstance(u.time_limit, (int, float)) \
                or not math.isfinite(u.time_limit) or not u.time_limit > 0:
            raise SpecError(f"unlearn[{i}].time_limit must be a finite number of seconds > 0, got {u.time_limit!r}")
        for name in FARM_HPARAMS:
            if name in u.hparams:
                check_farm_hparam(name, u.hparams[name], f"unlearn[{i}].hparams.{name}")
        key = (u.method, u.hparams_hash)
        if key in seen:
            raise SpecError(f"unlearn[{i}] repeats method {u.method!r} with the same hparams")
        seen.add(key)
    if spec.unlearn and spec.count("original") == 0:
        raise SpecError("unlearn needs originals to start from: set counts.original to at least 1")
    if not spec.counts and not spec.unlearn:
        raise SpecError("the spec plans no models: set counts (original, retrain, shadow) or unlearn")
    if not spec.queries or spec.queries[0] != "plain":
        raise SpecError(f"queries must start with 'plain' (query 0 is the plain input), got {list(spec.queries)}")
    for q in spec.queries:
        parse_query(q)
    r = spec.resources
    if r.cpus <= 0:
        raise SpecError(f"resources.cpus must be positive, got {r.cpus}")
    if r.gpus < 0 or (r.gpus > 1 and r.gpus != int(r.gpus)):
        raise SpecError(f"resources.gpus must be a fraction in [0, 1] or a whole number, got {r.gpus}")
    if r.batch_models != "auto" and (isinstance(r.batch_models, bool) or not isinstance(r.batch_models, int)
                                     or r.batch_models < 1):
        raise SpecError(f"resources.batch_models must be a positive integer or 'auto', got {r.batch_models!r}")
    if r.gpu_kernels not in GPU_KERNELS:
        raise SpecError(f"resources.gpu_kernels {r.gpu_kernels!r} is unknown; allowed: {', '.join(GPU_KERNELS)}")
    if r.memory_format not in MEMORY_FORMATS:
        raise SpecError(f"resources.memory_format {r.memory_format!r} is unknown; allowed: "
                        f"{', '.join(MEMORY_FORMATS)}")
    _positive_int(r.workers_per_model, "resources.workers_per_model")
    if isinstance(spec.max_retries, bool) or not isinstance(spec.max_retries, int) or spec.max_retries < 0:
        raise SpecError(f"max_retries must be a non-negative integer, got {spec.max_retries!r}")
    if spec.time_cutoff is not None and not (math.isfinite(spec.time_cutoff) and spec.time_cutoff > 0):
        raise SpecError(f"time_cutoff must be a positive fraction of the mean retrain time, got {spec.time_cutoff}")
    if isinstance(spec.seed, bool) or not isinstance(spec.seed, int) or spec.seed < 0:
        raise SpecError(f"seed must be a non-negative integer, got {spec.seed!r}")
    if spec.targets is not None:
        _validate_targets(spec)


def parse_query(q: str) -> tuple[str, int, int]:
    """'plain' -> ('plain', 0, 0); 'hflip' -> ('hflip', 0, 0); 'shift:DX,DY' -> ('shift', DX, DY)."""
    if q in ("plain", "hflip"):
        return q, 0, 0
    if isinstance(q, str) and q.startswith("shift:"):
        try:
            dx, dy = (int(v) for v in q[len("shift:"):].split(","))
        except ValueError:
            raise SpecError(f"query {q!r} must look like shift:DX,DY with integers") from None
        return "shift", dx, dy
    raise SpecError(f"query {q!r} is unknown; allowed: plain, hflip, shift:DX,DY")
