"""evaluate_store's work as jobs that a map runs: in this process one after the other (serial_map), or on Ray
workers (farm.run.evaluate_ray), with the same results to the bit.

* Membership: the examples are cut into chunks of ``chunk_examples`` (row groups of the logits files hold
  8192 examples, so a chunk of that size reads whole row groups).  A job reads its chunk's rows of every
  shadow (conf and trained_on only, each page against its CRC-32; the files' footers, which grow with their
  row groups, are read once by the driver and shared by every job) and computes what is per example:
  the LiRA scores of every mode, RMIA's likelihood ratios, the vulnerability and its jackknife replicates,
  the Gaussian check's p-values (membership.chunk_scores).  What pools over examples is reduced by the
  driver: variance="global" first sends jobs that return each example's sums of squared deviations, which
  the driver pools (lira.pooled_spreads, the same sums in the same order as a single process), then the
  scoring jobs; RMIA's count against each target's population (jobs over blocks of targets) and each
  attack's ROC with its jackknife (jobs over buckets of scores, evaluation.roc) run over the stacked scores
  (membership.membership_from_chunks).  A job's memory follows its chunk: shadows x chunk examples, or as
  many cells.
* Unlearning: read jobs for the retrained models, each method's unlearned models and the originals (their
  NaN / inf only), reading ``chunk_examples`` at a time and keeping the forget and control examples only (a
  few MB come back).  The slow part, the forgetting scores (an epsilon search per forget example) behind
  F_null's draws, F's jackknife replicates and the equal-count F's draws, runs as one stat_job per score;
  the rest of each method's section (its epsilons, tests, U-LiRA) in the caller.
* NaN or infinite conf: every job lists the models that hold any in its rows; a shadow found there is left
  out and the membership jobs run again without it (as a single process leaves it out before scoring).

A job's result also carries its process's peak memory (peak_rss_mb), for benchmarks; the report never does.
"""
from __future__ import annotations

import resource
from dataclasses import dataclass

import numpy as np

from ..lira import lira_group_ssd, pooled_spreads
from .membership import (MIN_SHADOWS, ChunkScores, ChunkSetup, Map, MembershipResult, chunk_scores, chunk_setup,
                         membership_from_chunks, serial_map, shadow_setup, stack_chunks, too_few_shadows, unscored)
from .store_io import (ModelSet, RunContents, UnlearnedGroup, merge_nonfinite, model_set, read_footers,
                       read_membership, read_rows, read_selected, verify_job)
from .unlearning import FNullResult, MethodFigure, MethodModels, RetrainedPool, headline_f_null, method_section
from .utility import accuracy_summary, cost_section

__all__ = ["DEFAULT_CHUNK_EXAMPLES", "FORGET_EMPTY", "ExampleSelection", "select_examples", "chunk_ranges",
           "MembershipJob", "MembershipPart", "membership_job", "membership_by_chunks", "ReadJob", "ReadPart",
           "read_job", "stat_job", "stat_map", "MethodPart", "UnlearningResult", "unlearning_by_jobs", "peak_rss_mb",
           "steady_heap", "serial_map", "verify_by_jobs"]

DEFAULT_CHUNK_EXAMPLES = 8192  # = farm.store's row group: a chunk reads whole row groups
VERIFY_MODELS_PER_JOB = 16  # whole files checked per verify job: a few requests at once, a job of seconds
FORGET_EMPTY = "the store's forget set is empty: no unlearning statistic can be computed"


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports ru_maxrss in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def steady_heap() -> None:
    """Let the allocator keep freed blocks of a few MB for reuse, as it does in a process that has run a while.

    glibc's malloc serves blocks above a threshold (128 KiB in a fresh process) by mmap and gives the heap's
    free top back to the system once it exceeds twice that; freeing an mmapped block raises the threshold to
    that block's size (up to 32 MiB). Until then, a job that allocates and frees arrays of a few MB in a loop
    (the epsilon searches, several per forget example; a chunk's per-example arrays) page-faults on every
    allocation: the unlearning work of a 96-model store (then one job) took 36.64 s in a fresh process (21.69 s
    of it system time, 9.2 million page faults) and 10.14 s after this. Freeing one 24 MiB block raises the
    threshold at once; with another allocator it is one allocation and one free. Changes no value computed."""
    block = np.empty(24 << 20, np.uint8)  # not touched: mmap and munmap, no page is written
    del block


# ------------------------------------------------------------------------------------ examples
@dataclass(frozen=True)
class ExampleSelection:
    """Indices into the run's examples: the train and test splits (membership inference), and the forget
    examples and control samples the unlearning statistics use."""
    train: np.ndarray
    test: np.ndarray
    forget: np.ndarray
    controls: dict[str, np.ndarray]  # "retain_control", "test_control"


def _sample(idx: np.ndarray, k: int | None, rng) -> np.ndarray:
    if k is None or idx.size <= k:
        return idx
    return np.sort(rng.choice(idx, k, replace=False))


def select_examples(split: np.ndarray, forget: np.ndarray, max_examples: int | None, seed: int) -> ExampleSelection:
    """At most ``max_examples`` forget examples (a seeded sample), and control samples of as many retain and
    test examples."""
    test = np.flatnonzero(split == "test")
    rng = np.random.default_rng([seed, 0xE7A1])
    forget_sel = _sample(np.flatnonzero(forget), max_examples, rng)
    n_ctrl = forget_sel.size if max_examples is None else min(forget_sel.size, max_examples)
    controls = {"retain_control": _sample(np.flatnonzero((split == "train") & ~forget), n_ctrl, rng),
                "test_control": _sample(test, n_ctrl, rng)}
    return ExampleSelection(np.flatnonzero(split == "train"), test, forget_sel, controls)


def chunk_ranges(n_examples: int, chunk: int) -> list[tuple[int, int]]:
    """[start, stop) of every chunk of ``chunk`` examples, in order (none for no examples)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return [(s, min(s + chunk, n_examples)) for s in range(0, n_examples, chunk)]


# ------------------------------------------------------------------------------------ membership
@dataclass(frozen=True)
class MembershipJob:
    """One chunk of examples [start, stop) of the shadows: ``kind`` "scan" only lists NaN / inf, "sums" returns
    variance="global"'s per-example sums, "scores" everything per example (with ``setup``)."""
    shadows: ModelSet
    start: int
    stop: int
    train: np.ndarray  # positions (from start) of the chunk's train examples
    test: np.ndarray  # positions of its test examples
    kind: str
    setup: ChunkSetup | None = None


@dataclass
class MembershipPart:
    nonfinite: list[dict]  # the shadows with NaN / inf in the chunk (nothing else is computed then)
    sums: tuple | None = None  # lira_group_ssd of the chunk's train examples
    scores: ChunkScores | None = None
    peak_rss_mb: float = 0.0


def membership_job(job: MembershipJob, footers: dict[str, bytes] | None = None) -> MembershipPart:
    """Read the chunk's rows of every shadow and compute what ``job.kind`` asks for.  ``footers``: the shadows'
    files' footers (store_io.read_footers), one object that every chunk's job shares."""
    steady_heap()
    rows = read_rows(job.shadows, job.start, job.stop, footers=footers)
    part = MembershipPart(rows.nonfinite)
    if not rows.nonfinite and job.kind != "scan":
        conf_tr = np.ascontiguousarray(rows.conf[:, job.train])
        member = np.ascontiguousarray(rows.trained_on[:, job.train])
        if job.kind == "sums":
            part.sums = lira_group_ssd(conf_tr, member)
        else:
            pop = np.ascontiguousarray(rows.conf[:, job.test]) if job.test.size else None
            part.scores = chunk_scores(conf_tr, member, pop, job.setup)
    del rows
    part.peak_rss_mb = peak_rss_mb()
    return part


@dataclass(frozen=True)
class _Plan:
    """What every pass over the chunks shares."""
    run: RunContents
    sel: ExampleSelection
    ranges: list[tuple[int, int]]
    rmia_a: float
    workers: int | None
    footers: dict[str, bytes]  # read once by the driver; a map puts what every job shares once (Ray's ray_map)

    def jobs(self, ids: list[str], kind: str, setup=None, pooled=None) -> list[tuple]:
        shadows = model_set(self.run, ids)
        out = []
        for start, stop in self.ranges:
            t0, t1 = np.searchsorted(self.sel.train, [start, stop])
            z0, z1 = np.searchsorted(self.sel.test, [start, stop])
            cs = chunk_setup(setup, slice(t0, t1), pooled, self.rmia_a, self.workers) if kind == "scores" else None
            out.append((MembershipJob(shadows, start, stop, self.sel.train[t0:t1] - start, self.sel.test[z0:z1] - start,
                                      kind, cs), self.footers))
        return out


def membership_by_chunks(run: RunContents, sel: ExampleSelection, *, chunk: int, seed: int, rmia_a: float,
                         rmia_gamma: float, map_jobs: Map = serial_map, workers: int | None = None,
                         status=lambda s: None) -> tuple[MembershipResult, list[dict]]:
    """The membership section by chunks of examples -> (result, shadows left out for NaN / inf)."""
    shadows = run.by_role.get("shadow", [])
    header: dict = {"n_shadows": len(shadows), "n_train_examples": int(sel.train.size)}
    if len(shadows) < MIN_SHADOWS:
        return too_few_shadows(header, len(shadows)), []
    status("reading the shadows' membership")
    footers = read_footers(model_set(run, shadows))
    member_all = read_membership(run, shadows, footers)[:, sel.train]
    plan = _Plan(run, sel, chunk_ranges(len(run.split), chunk), rmia_a, workers, footers)
    ids, nonfinite, pooled = list(shadows), [], None
    n_q = len(run.manifest["spec"]["queries"])
    while True:
        member = member_all[[shadows.index(i) for i in ids]]
        setup = shadow_setup(ids, member, seed)
        kind = "scan" if setup.message else ("sums" if setup.variance == "global" and pooled is None else "scores")
        status({"scan": "reading shadows", "sums": "LiRA's pooled spreads", "scores": "LiRA, RMIA by chunks"}[kind])
        parts = map_jobs(membership_job, plan.jobs(ids, kind, setup, pooled))
        bad = merge_nonfinite([p.nonfinite for p in parts])
        if bad:  # left out; the others are scored again without them
            nonfinite, left_out = bad, {b["model_id"] for b in bad}
            ids, pooled = [i for i in ids if i not in left_out], None
            continue
        if kind == "sums":
            pooled = pooled_spreads(*(np.concatenate(a) for a in zip(*(p.sums for p in parts))))
            continue
        break
    if nonfinite:
        header["note"] = f"{len(shadows) - len(ids)} shadow(s) left out for NaN or infinite conf (see nonfinite)"
    if kind == "scan":
        res = unscored(len(ids), n_q, setup)
    else:
        scores = stack_chunks([p.scores for p in parts])
        del parts
        res = membership_from_chunks(ids, member, n_q, setup, scores, int(sel.test.size) or None,
                                     run.forget[sel.train], run.example_ids[sel.train], rmia_a=rmia_a,
                                     rmia_gamma=rmia_gamma, map_jobs=map_jobs, cells_per_job=len(ids) * chunk,
                                     status=status)
    return MembershipResult({**header, **res.section}, res.curves, res.per_example, res.notes), nonfinite


# ------------------------------------------------------------------------------------ --verify
def verify_by_jobs(run: RunContents, map_jobs: Map = serial_map) -> None:
    """``--verify``: every logits file the evaluation reads, read whole once and checked against its marker's
    sha256, in jobs of VERIFY_MODELS_PER_JOB models (a StoreError naming the first that fails).  The jobs
    after it read only the columns they use, each page against its CRC-32, as without it."""
    ids = run.models_read()
    map_jobs(verify_job, [(model_set(run, ids[i:i + VERIFY_MODELS_PER_JOB]),)
                          for i in range(0, len(ids), VERIFY_MODELS_PER_JOB)])


# ------------------------------------------------------------------------------------ unlearning
@dataclass(frozen=True)
class ReadJob:
    """Some models (the retrained ones, the originals, or one method's unlearned ones) on the forget and control
    examples, read ``chunk`` examples at a time; ``with_examples`` False: only their NaN / inf are listed."""
    models: ModelSet
    forget: np.ndarray
    controls: dict[str, np.ndarray]
    n_examples: int
    chunk: int
    with_examples: bool = True


@dataclass
class ReadPart:
    models: MethodModels  # the usable models (no NaN / inf anywhere)
    nonfinite: list[dict]
    peak_rss_mb: float = 0.0


def read_job(job: ReadJob) -> ReadPart:
    """Read the job's models on its examples (read_selected)."""
    steady_heap()
    selections = {"forget": job.forget, **job.controls} if job.with_examples else {}
    if not job.models.model_ids:
        empty = np.zeros((0, job.forget.size, 1), np.float32)
        return ReadPart(MethodModels([], [], empty, {name: np.zeros((0, idx.size, 1), np.float32)
                                                     for name, idx in job.controls.items()}), [], peak_rss_mb())
    conf, kept = read_selected(job.models, job.n_examples, job.chunk, selections)
    forget = kept.pop("forget", np.zeros((len(conf.model_ids), 0, 0), np.float32))
    return ReadPart(MethodModels(conf.model_ids, conf.markers, forget, kept), conf.nonfinite, peak_rss_mb())


def stat_job(stat, a: np.ndarray, b: np.ndarray) -> float:
    """stat(a, b) as a job of its own: one forgetting score behind F_null, F's interval or the equal-count F."""
    steady_heap()
    return stat(a, b)


def stat_map(map_jobs: Map):
    """A StatMap (evaluation.precision) that runs each pair's statistic as a stat_job of ``map_jobs``."""
    def map_stat(stat, pairs):
        return map_jobs(stat_job, [(stat, a, b) for a, b in pairs])
    return map_stat


@dataclass(frozen=True)
class MethodPart:
    section: dict  # with utility and cost
    figure: MethodFigure | None  # None when nothing was computed (an empty forget set)
    notes: list[str]
    nonfinite: list[dict]
    markers: list[dict]  # of the usable unlearned models


@dataclass
class UnlearningResult:
    retrained_nonfinite: list[dict]
    originals_nonfinite: list[dict]
    f_null: FNullResult
    methods: list[MethodPart]  # in the order of run.groups


def _method(group: UnlearnedGroup, read: ReadPart, retrained: MethodModels, pool: RetrainedPool,
            example_ids_forget: np.ndarray, seed: int) -> MethodPart:
    """One method's section, utility and cost."""
    unlearned = read.models
    if unlearned.forget.shape[1] == 0:
        return MethodPart({"method": group.method, "message": FORGET_EMPTY}, None, [], read.nonfinite,
                          unlearned.markers)
    res = method_section(group.key, group.method, group.hparams, unlearned, retrained, pool, example_ids_forget,
                         seed)
    cost, cost_notes = cost_section(group.key, unlearned.ids, unlearned.markers, retrained.markers)
    utility = {"unlearned": accuracy_summary(unlearned.markers), "retrained": accuracy_summary(retrained.markers)}
    return MethodPart({**res.section, "utility": utility, "cost": cost}, res.figure, res.notes + cost_notes,
                      read.nonfinite, unlearned.markers)


def unlearning_by_jobs(run: RunContents, sel: ExampleSelection, *, chunk: int, n_boot: int, seed: int,
                       map_jobs: Map = serial_map) -> UnlearningResult:
    """The headline F_null and every method's section.  One map call reads the retrained models, the originals
    (for their NaN / inf only) and each method's unlearned models; then, method by method, the forgetting scores
    behind F_null, F's jackknife and the equal-count F run as stat_jobs (the slow part: each is an epsilon search
    per forget example), and the rest of each section here."""
    groups = list(run.groups.values())
    originals = run.by_role.get("original", [])

    def read(ids: list[str], with_examples: bool = True) -> tuple:
        return (ReadJob(model_set(run, ids), sel.forget, sel.controls, len(run.split), chunk, with_examples),)

    jobs = [read(run.by_role.get("retrain", []))] + [read(g.model_ids) for g in groups]
    if originals:
        jobs.append(read(originals, False))
    parts = map_jobs(read_job, jobs)
    retrained = parts[0].models
    pool = RetrainedPool(np.asarray(retrained.forget[..., 0], np.float64), n_boot, seed,
                         map_stat=stat_map(map_jobs))
    f_null = headline_f_null(pool, sel.forget.size)
    example_ids = run.example_ids[sel.forget]
    methods = [_method(g, part, retrained, pool, example_ids, seed) for g, part in zip(groups, parts[1:])]
    return UnlearningResult(parts[0].nonfinite, parts[-1].nonfinite if originals else [], f_null, methods)
