"""Precision-driven runs: train in rounds until every targeted figure is as precise as the spec's `targets`
ask, or the budget is spent (docs/targets.md).

Each round trains what the current counts plan (resuming what is committed), reads only the targeted figures
(evaluation.report.targets: the report's own values and standard errors), and sizes the next round from
them.  A figure's variance s^2 from n models is a part that shrinks as 1/models plus a floor f^2 that more
models do not shrink (for the attacks' figures, the examples' part of their jackknife: the example set is
finite), so it needs about n * (s^2 - f^2) / (s_target^2 - f^2) models (evaluation.precision.models_needed,
with s_target = half-width / 1.96), and none can help when f >= s_target: the run then stops.  A round
grows each role to the most any unmet figure needs, at most `max_growth` times its count and at least one
step (a pair of shadows, one model); both budgets then scale the additions down together.  Originals grow
with the unlearned models while every method has at most one unlearned model per original, so unlearned
models stay independent draws and no committed model changes its parent.  The round log is the store's
`rounds.json`; a run started again continues from the store's counts.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

from evaluation.precision import models_needed
from farm.spec import ROLES, Spec, planned_models, spec_from_dict
from farm.store import RunStore
from farm.targets import FIGURE_ROLES, ROUNDS_FILE, Z95, Targets

STOP_MET, STOP_BUDGET, STOP_FAILED, STOP_UNREACHABLE = "met", "budget", "failed", "unreachable"


@dataclass(frozen=True)
class FigureStatus:
    """A targeted figure's reading against its target, and the models it needs."""
    figure: str
    method: str | None
    value: float
    se: float
    se_target: float
    met: bool
    needed: dict  # role -> models the estimate asks for (None: unknown yet, grow by max_growth)
    message: str | None = None
    se_floor: float = 0.0  # the part of se that more models do not shrink

    @property
    def unreachable(self) -> bool:
        """More models cannot meet the target: the part of the SE they do not shrink is already above it."""
        return not self.met and any(n == -1 for n in self.needed.values())

    @property
    def half_width(self) -> float:
        return self.se * Z95

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TargetRun:
    """What a precision-driven run did: one entry per round, why it stopped and what it says about it."""
    rounds: list
    stop: str
    message: str


def unlearn_keys(spec: Spec) -> dict[str, int]:
    """<method label>-<hparams hash> (the report's method key) -> index in spec.unlearn."""
    return {f"{u.method_id}-{u.hparams_hash}": i for i, u in enumerate(spec.unlearn)}


def assess(readings, targets: Targets) -> list[FigureStatus]:
    """Each reading (evaluation.report.targets.Reading) against its target: met when its SE is at most the
    target's; the models needed per role the figure grows (-1: unreachable, the SE's floor is above the
    target; a floor that could not be measured counts as none)."""
    out = []
    for r in readings:
        want = targets.se_target(r.figure)
        met = bool(math.isfinite(r.se) and r.se <= want)
        floor = r.se_floor if math.isfinite(r.se_floor) else 0.0
        needed = {}
        for role in FIGURE_ROLES[r.figure]:
            n = r.models.get(role, 0)
            needed[role] = models_needed(n, r.se, want, z=1.0, floor=floor) if n > 0 and not met else (
                n if met else None)
        out.append(FigureStatus(r.figure, r.method, float(r.value), float(r.se), want, met, needed, r.message,
                                floor))
    return out


def current_counts(spec: Spec) -> dict:
    """{"original": n, "retrain": n, "shadow": n, "unlearn": [n per spec.unlearn entry]}."""
    return {**{r: spec.count(r) for r in ROLES[:3]}, "unlearn": [u.count for u in spec.unlearn]}


def with_counts(spec: Spec, counts: dict) -> Spec:
    """The spec with these counts (roles at 0 left out, as a spec writes them)."""
    unlearn = tuple(dataclasses.replace(u, count=n) for u, n in zip(spec.unlearn, counts["unlearn"]))
    return dataclasses.replace(spec, counts={r: counts[r] for r in ROLES[:3] if counts[r] > 0}, unlearn=unlearn)


def resume_counts(spec: Spec, manifest: dict | None) -> Spec:
    """The spec with each count raised to the one the store's last run used (its manifest's spec), so a
    precision-driven run started again continues where it stopped instead of planning fewer models."""
    if not manifest or not isinstance(manifest.get("spec"), dict):
        return spec
    try:
        old = spec_from_dict(manifest["spec"])
    except ValueError:  # an older or damaged manifest spec: start from this spec's counts
        return spec
    counts = current_counts(spec)
    for r in ROLES[:3]:
        counts[r] = max(counts[r], old.count(r))
    old_u = {(u.method, u.hparams_hash): u.count for u in old.unlearn}
    counts["unlearn"] = [max(n, old_u.get((u.method, u.hparams_hash), 0)) for u, n in zip(spec.unlearn,
                                                                                          counts["unlearn"])]
    return with_counts(spec, counts)


def _wanted(spec: Spec, statuses: list[FigureStatus]) -> dict:
    """The counts the unmet figures ask for, each role capped at max_growth times its count and at least
    one step above it."""
    cur, growth = current_counts(spec), spec.targets.max_growth
    keys = unlearn_keys(spec)
    want = {**cur, "unlearn": list(cur["unlearn"])}

    def ask(n_now: int, n_needed: int | None, step: int) -> int:
        top = max(n_now + step, int(math.floor(n_now * growth / step)) * step)
        need = top if n_needed is None else -(-n_needed // step) * step
        return min(top, max(n_now + step, need))

    for st in (s for s in statuses if not s.met and not s.unreachable):
        for role, n_needed in st.needed.items():
            if role == "unlearned":
                for i in ([keys[st.method]] if st.method in keys else range(len(spec.unlearn))):
                    want["unlearn"][i] = max(want["unlearn"][i], ask(cur["unlearn"][i], n_needed, 1))
            else:
                want[role] = max(want[role], ask(cur[role], n_needed, 2 if role == "shadow" else 1))
    return want


def _scaled(spec: Spec, want: dict, s: float) -> dict:
    """Counts a fraction s of the way from the spec's to ``want`` (shadows in pairs); originals follow the
    unlearned models while every method has at most one per original."""
    cur = current_counts(spec)
    out = {r: cur[r] + int(math.floor(s * (want[r] - cur[r]))) for r in ROLES[:3]}
    out["shadow"] -= (out["shadow"] - cur["shadow"]) % 2
    out["unlearn"] = [c + int(math.floor(s * (w - c))) for c, w in zip(cur["unlearn"], want["unlearn"])]
    if spec.unlearn and all(n <= cur["original"] for n in cur["unlearn"]):
        out["original"] = max(out["original"], *out["unlearn"])
    return out


def device_share(spec: Spec) -> float:
    """The devices one worker holds: resources.gpus on GPU runs (GPU-hours), else resources.cpus (core-hours)."""
    return spec.resources.gpus if spec.resources.gpus > 0 else spec.resources.cpus


def _cost_hours(spec: Spec, counts: dict, markers: dict) -> float:
    """Device-hours of the models ``counts`` plan beyond those committed, at each role's mean `seconds` in
    the store (all roles' mean for a role with none yet)."""
    share = device_share(spec)
    times: dict[str, list] = {}
    for m in markers.values():
        if isinstance(m.get("seconds"), (int, float)):
            times.setdefault(m.get("role"), []).append(float(m["seconds"]))
    every = [t for ts in times.values() for t in ts]
    mean_all = sum(every) / len(every) if every else 0.0
    cur = current_counts(spec)
    added = {r: counts[r] - cur[r] for r in ROLES[:3]}
    added["unlearned"] = sum(counts["unlearn"]) - sum(cur["unlearn"])
    seconds = sum(n * (sum(times[r]) / len(times[r]) if times.get(r) else mean_all) for r, n in added.items())
    return seconds * share / 3600


def spent_hours(spec: Spec, markers: dict) -> float:
    """Device-hours the committed models took: their markers' seconds times the device share each held
    (resources.gpus on GPU runs, resources.cpus otherwise)."""
    share = device_share(spec)
    return sum(float(m["seconds"]) for m in markers.values() if isinstance(m.get("seconds"), (int, float))) \
        * share / 3600


def next_counts(spec: Spec, statuses: list[FigureStatus], markers: dict) -> tuple[dict | None, str]:
    """The next round's counts -> (counts, "") or (None, which budget stops the run)."""
    want = _wanted(spec, statuses)
    if want == current_counts(spec):
        return None, "no target that more models can improve is left"
    budget, in_store = spec.targets.budget, len(markers)

    def fits(counts: dict) -> bool:
        total = planned_models(with_counts(spec, counts))
        if budget.models is not None and max(total, in_store + total - planned_models(spec)) > budget.models:
            return False
        return budget.device_hours is None or \
            spent_hours(spec, markers) + _cost_hours(spec, counts, markers) <= budget.device_hours

    lo, hi = 0.0, 1.0
    if not fits(_scaled(spec, want, 1.0)):
        for _ in range(40):  # the largest fraction of the additions that both budgets allow
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if fits(_scaled(spec, want, mid)) else (lo, mid)
        hi = lo
    counts = _scaled(spec, want, hi)
    if counts == current_counts(spec):
        which = [f"{budget.models} models" if budget.models is not None else None,
                 f"{budget.device_hours:g} device-hours" if budget.device_hours is not None else None]
        return None, "the budget (" + " and ".join(w for w in which if w) + ") allows no further model"
    return counts, ""


def figure_line(st: FigureStatus) -> str:
    """lira_auc 0.612 +- 0.031 (target +- 0.020): met | needs shadow 112"""
    name = _name(st)
    target = st.se_target * Z95
    if not math.isfinite(st.value) or not math.isfinite(st.se):
        return f"{name}: not yet measurable ({st.message or 'too few models'}); target +- {target:.4g}"
    need = ", ".join(f"{role} {n}" for role, n in st.needed.items() if n is not None)
    verdict = "met" if st.met else f"needs {need or 'more models'}"
    if st.unreachable:
        verdict = (f"out of reach of more models: the part of its SE they do not shrink (the examples') is "
                   f"+- {st.se_floor * Z95:.2g} alone")
    return f"{name} {st.value:.4g} +- {st.half_width:.2g} (target +- {target:.2g}): {verdict}"


def write_log(store: RunStore, spec: Spec, rounds: list, stop: str | None, message: str) -> None:
    """The store's rounds.json: the targets, one entry per round of this run, and why it stopped."""
    log = {"targets": dataclasses.asdict(spec.targets), "rounds": rounds, "stop": stop, "message": message}
    store.write_bytes(ROUNDS_FILE, json.dumps(log, indent=2, default=str).encode())


def run_to_targets(spec: Spec, store: RunStore, train: Callable[[Spec], object], read: Callable,
                   say: Callable[[str], None] = print) -> TargetRun:
    """Rounds of ``train(spec)`` (a farm.run RunResult) and ``read(spec)`` (the targeted readings) until every
    target is met, a budget stops the next round, or a model fails."""
    spec = resume_counts(spec, store.read_manifest())
    rounds: list = []
    while True:
        result = train(spec)
        markers = store.intact_models()
        entry = {"round": len(rounds) + 1, "counts": current_counts(spec), "models_in_store": len(markers),
                 "trained": len(result.trained), "device_hours": round(spent_hours(spec, markers), 6)}
        if result.failed:
            rounds.append(entry)
            msg = f"{len(result.failed)} model(s) failed; run the same command again to retry them and go on"
            write_log(store, spec, rounds, STOP_FAILED, msg)
            return TargetRun(rounds, STOP_FAILED, msg)
        statuses = assess(read(spec), spec.targets)
        entry["figures"] = [st.to_dict() for st in statuses]
        rounds.append(entry)
        say(f"round {entry['round']}: {_counts_text(entry['counts'], spec)}; {len(markers)} models, "
            f"{entry['device_hours']:.3g} device-hours")
        for st in statuses:
            say(f"  {figure_line(st)}")
        if all(st.met for st in statuses):
            msg = f"every target met after {len(rounds)} round(s)"
            write_log(store, spec, rounds, STOP_MET, msg)
            return TargetRun(rounds, STOP_MET, msg)
        if all(st.met or st.unreachable for st in statuses):
            out = ", ".join(_name(st) for st in statuses if st.unreachable)
            msg = (f"more models cannot meet {out}: the part of the standard error they do not shrink is above the "
                   "target (a larger example set, or a wider target, can)")
            write_log(store, spec, rounds, STOP_UNREACHABLE, msg)
            return TargetRun(rounds, STOP_UNREACHABLE, msg)
        counts, why = next_counts(spec, statuses, markers)
        if counts is None:
            unmet = ", ".join(_name(st) for st in statuses if not st.met)
            msg = f"{why}; not met: {unmet}"
            write_log(store, spec, rounds, STOP_BUDGET, msg)
            return TargetRun(rounds, STOP_BUDGET, msg)
        write_log(store, spec, rounds, None, "running")
        spec = with_counts(spec, counts)


def _name(st: FigureStatus) -> str:
    return st.figure + (f"[{st.method}]" if st.method else "")


def _counts_text(counts: dict, spec: Spec) -> str:
    parts = [f"{counts[r]} {r}" for r in ROLES[:3] if counts[r]]
    parts += [f"{n} {u.method_id}" for u, n in zip(spec.unlearn, counts["unlearn"])]
    return ", ".join(parts)
