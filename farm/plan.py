"""Expand a spec and its dataset into model jobs with stable ids, seeds and training sets.

Everything here is a pure function of (spec, dataset): the same spec gives the same jobs, ids, seeds,
forget set and shadow memberships on any machine, which is what lets a run resume and be extended.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from farm.spec import Spec, SpecError

# Shadow memberships (shadows x train examples) a plan may hold: each costs a mask byte and half an int64
# index, so this caps a plan's shadow sets at about 2 GB of memory
MAX_SHADOW_CELLS = 400_000_000


@dataclass(frozen=True)
class Job:
    model_id: str
    role: str  # original | retrain | shadow | unlearned
    index: int
    seed: int
    train_idx: np.ndarray = field(repr=False)  # example ids the model (or its parent) was trained on
    parent: str | None = None  # unlearned: the original it starts from
    method: str | None = None
    hparams: dict = field(default_factory=dict)
    time_limit: float | None = None  # unlearned: wall-clock seconds the method call may run (spec.unlearn)


@dataclass(frozen=True)
class Plan:
    spec: Spec
    forget: np.ndarray = field(repr=False)  # bool [N]: the run's forget set (train examples only)
    jobs: tuple[Job, ...]

    def by_id(self) -> dict[str, Job]:
        return {j.model_id: j for j in self.jobs}


def derive_seed(run_seed: int, model_id: str) -> int:
    """A 31-bit seed from the run seed and the model id: stable, and distinct per model."""
    digest = hashlib.sha256(f"{run_seed}:{model_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def select_forget(spec: Spec, split: np.ndarray, labels: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """The forget set as a bool mask over all examples; only train examples can be forgotten."""
    f = spec.forget
    train = split == "train"
    n_train = int(train.sum())
    if f.kind == "random":
        k = int(round(f.fraction * n_train))
        if k == 0:
            raise SpecError(f"forget.fraction {f.fraction} selects no example of the {n_train} train examples")
        rng = np.random.default_rng([spec.seed, 0xF0])
        chosen = rng.choice(np.flatnonzero(train), size=k, replace=False)
        mask = np.zeros(len(split), dtype=bool)
        mask[chosen] = True
        return mask
    if f.kind == "classes":
        present = set(np.unique(labels[train]).tolist())
        missing = [c for c in f.classes if c not in present]
        if missing:
            raise SpecError(f"forget.classes {missing} do not exist in the train split; classes present: "
                            f"{sorted(present)}")
        return train & np.isin(labels, f.classes)
    if groups is None:
        raise SpecError(f"forget.kind 'groups' needs a dataset with group ids; {spec.dataset.name!r} has none")
    present = set(np.unique(groups[train]).tolist())
    missing = [g for g in f.groups if g not in present]
    if missing:
        raise SpecError(f"forget.groups {missing} do not exist in the train split")
    return train & np.isin(groups, f.groups)


def shadow_membership(train_ids: np.ndarray, n_shadow: int, run_seed: int) -> np.ndarray:
    """bool [n_shadow, len(train_ids)]: which train examples each shadow is trained on.

    Shadows come in complementary pairs: shadow 2k takes a seeded random half of the train split and
    shadow 2k+1 the other half. Every train example is therefore IN for exactly half of any even number
    of shadows, and adding pairs later leaves the existing shadows unchanged. This is stricter than LiRA's
    masks (independent balanced subsets): the two shadows of a pair are dependent, which is why the report
    scores each target without itself and its partner.
    """
    n = len(train_ids)
    masks = np.zeros((n_shadow, n), dtype=bool)
    for pair in range(n_shadow // 2):
        order = np.random.default_rng([run_seed, 0x5AD0, pair]).permutation(n)
        masks[2 * pair, order[: n // 2]] = True
        masks[2 * pair + 1] = ~masks[2 * pair]
    return masks


def make_plan(spec: Spec, split: np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None) -> Plan:
    """Jobs in dependency order: originals first (unlearned jobs start from them), then the rest."""
    forget = select_forget(spec, split, labels, groups)
    train_ids = np.flatnonzero(split == "train").astype(np.int64)
    retain_ids = np.flatnonzero((split == "train") & ~forget).astype(np.int64)
    if len(retain_ids) == 0:
        raise SpecError("the forget set covers the whole train split: nothing is left to retain")
    n_shadow = spec.count("shadow")
    if n_shadow * len(train_ids) > MAX_SHADOW_CELLS:
        most = max(2, MAX_SHADOW_CELLS // max(1, len(train_ids)) // 2 * 2)
        raise SpecError(f"counts.shadow {n_shadow:,} is too many for {len(train_ids):,} train examples: a plan holds "
                        f"at most {MAX_SHADOW_CELLS:,} shadow memberships, so at most {most:,} shadows here")
    jobs: list[Job] = []

    def add(role: str, index: int, train_idx: np.ndarray, **kw) -> None:
        model_id = kw.pop("model_id", f"{role}-{index:05d}")
        jobs.append(Job(model_id, role, index, derive_seed(spec.seed, model_id), train_idx, **kw))

    originals = [f"original-{i:05d}" for i in range(spec.count("original"))]
    for i in range(len(originals)):
        add("original", i, train_ids)
    for i in range(spec.count("retrain")):
        add("retrain", i, retain_ids)
    masks = shadow_membership(train_ids, n_shadow, spec.seed)
    for i, mask in enumerate(masks):
        add("shadow", i, train_ids[mask])
    for u in spec.unlearn:
        for i in range(u.count):
            add("unlearned", i, train_ids, model_id=f"unlearned-{u.method_id}-{u.hparams_hash}-{i:05d}",
                parent=originals[i % len(originals)], method=u.method, hparams=dict(u.hparams),
                time_limit=float(u.time_limit))
    return Plan(spec=spec, forget=forget, jobs=tuple(jobs))
