"""The spec's `targets` section: how precise the report's headline figures must be, and what a run may spend
to get there (`ufarm run` trains in rounds until every target is met or the budget is spent; docs/targets.md).

    targets:
      figures:                  # figure: its 95% half-width, or {se: standard error}
        lira_auc: 0.01
        f_ratio: {se: 0.05}
      budget:
        models: 400             # at most this many models in the store, every role counted
        device_hours: 2.0       # at most this much training time (markers' seconds x resources.gpus, or
                                # x resources.cpus on CPU runs), in hours
      max_growth: 4.0           # one round multiplies a role's count by at most this

A half-width h stands for a standard error h / 1.96 (the normal quantile the report's model counts use).
Which roles a figure grows: FIGURE_ROLES.  The figures are computed by evaluation.report.targets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

Z95 = 1.959963984540054  # the normal 97.5% quantile (evaluation.precision.Z95; a test pins them equal)

# figure -> the roles whose counts make it more precise (evaluation.report.targets computes each figure)
FIGURE_ROLES = {
    "lira_auc": ("shadow",),  # LiRA online AUC over the shadows
    "lira_tpr_at_1pct": ("shadow",),  # LiRA online TPR at 1% FPR
    "lira_tpr_at_0.1pct": ("shadow",),  # LiRA online TPR at 0.1% FPR
    "f": ("unlearned", "retrain"),  # the competition's F of each unlearning method, every model
    "f_ratio": ("unlearned", "retrain"),  # F / F_null at equal model counts, each method (the headline)
    "f_null": ("retrain",),  # F_null: F between two disjoint sets of retrained models
}
DEFAULT_MAX_GROWTH = 4.0
ROUNDS_FILE = "rounds.json"  # a precision-driven run's log in the store (farm.rounds)


class TargetsError(ValueError):
    """A `targets` section that cannot be run; the one-line message names the field."""


@dataclass(frozen=True)
class Budget:
    models: int | None = None  # models in the store, every role
    device_hours: float | None = None  # training time from the markers, in device-hours


@dataclass(frozen=True)
class Targets:
    figures: dict = field(default_factory=dict)  # figure -> {"half_width": h} or {"se": s}
    budget: Budget = Budget()
    max_growth: float = DEFAULT_MAX_GROWTH

    def se_target(self, figure: str) -> float:
        """The standard error the figure must reach."""
        t = self.figures[figure]
        return float(t["se"]) if "se" in t else float(t["half_width"]) / Z95

    def half_width(self, figure: str) -> float:
        """The 95% half-width the figure must reach."""
        return self.se_target(figure) * Z95


def _positive(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise TargetsError(f"{where} must be a positive number, got {value!r}")
    return float(value)


def _figure(name, value) -> dict:
    where = f"targets.figures.{name}"
    if name not in FIGURE_ROLES:
        raise TargetsError(f"{where}: {name!r} is not a figure ufarm evaluate reports with a precision; allowed: "
                           f"{', '.join(FIGURE_ROLES)}")
    if isinstance(value, dict):
        if len(value) != 1 or not set(value) <= {"se", "half_width"}:
            raise TargetsError(f"{where} must be a half-width or a mapping with one of se, half_width; "
                               f"got {value!r}")
        kind, v = next(iter(value.items()))
        return {kind: _positive(v, f"{where}.{kind}")}
    return {"half_width": _positive(value, where)}


def parse_targets(raw) -> Targets | None:
    """The typed section, or None when the spec has none (an empty mapping is none too)."""
    if raw is None or raw == {}:
        return None
    if isinstance(raw, Targets):
        return raw
    if not isinstance(raw, dict):
        raise TargetsError(f"targets must be a mapping with figures (and budget, max_growth), got {raw!r}")
    unknown = sorted(set(raw) - {"figures", "budget", "max_growth"})
    if unknown:
        raise TargetsError(f"targets: unknown field(s) {', '.join(unknown)}; allowed: figures, budget, max_growth")
    figures = raw.get("figures") or {}
    if not isinstance(figures, dict) or not figures:
        raise TargetsError(f"targets.figures must map at least one figure to its precision; allowed figures: "
                           f"{', '.join(FIGURE_ROLES)}")
    budget = raw.get("budget") or {}
    if isinstance(budget, Budget):
        budget = {"models": budget.models, "device_hours": budget.device_hours}
    if not isinstance(budget, dict) or set(budget) - {"models", "device_hours"}:
        raise TargetsError(f"targets.budget must be a mapping with models and/or device_hours, got {budget!r}")
    models = budget.get("models")
    if models is not None and (isinstance(models, bool) or not isinstance(models, int) or models < 1):
        raise TargetsError(f"targets.budget.models must be a positive integer, got {models!r}")
    hours = budget.get("device_hours")
    growth = _positive(raw.get("max_growth", DEFAULT_MAX_GROWTH), "targets.max_growth")
    if growth <= 1:
        raise TargetsError(f"targets.max_growth must be above 1 (a round must be able to add models), got {growth}")
    return Targets({str(k): _figure(k, v) for k, v in figures.items()},
                   Budget(models, None if hours is None else _positive(hours, "targets.budget.device_hours")), growth)


def targets_from_flags(existing: Targets | None, flags: list[str], budget_models: int | None,
                       budget_hours: float | None) -> Targets | None:
    """The spec's section with `ufarm run --target FIGURE=H|FIGURE=se:S`, `--budget-models N` and
    `--budget-hours H` laid over it (a flag wins over the spec's value for the same figure or budget)."""
    if not flags and budget_models is None and budget_hours is None:
        return existing
    figures = dict(existing.figures) if existing else {}
    for flag in flags:
        name, sep, value = flag.partition("=")
        if not sep or not value:
            raise TargetsError(f"--target {flag!r} must look like FIGURE=HALF_WIDTH or FIGURE=se:SE, e.g. "
                               "lira_auc=0.01")
        kind, _, number = value.rpartition(":")
        try:
            figures[name] = {kind or "half_width": float(number)}
        except ValueError:
            raise TargetsError(f"--target {flag!r}: {number!r} is not a number") from None
        if kind not in ("", "se", "half_width"):
            raise TargetsError(f"--target {flag!r}: use FIGURE=HALF_WIDTH or FIGURE=se:SE")
    budget = existing.budget if existing else Budget()
    raw = {"figures": figures, "max_growth": existing.max_growth if existing else DEFAULT_MAX_GROWTH,
           "budget": {"models": budget.models if budget_models is None else budget_models,
                      "device_hours": budget.device_hours if budget_hours is None else budget_hours}}
    return parse_targets(raw)
