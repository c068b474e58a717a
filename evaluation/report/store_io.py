"""The report's only contact with the run store: what a run holds (manifest, examples, the intact models by
role, the unlearned models grouped by method and hyper-parameters), the conf of chosen models with those
holding NaN or infinite values set apart, and the writer of the report's files (a local folder or s3://,
through RunStore, so both behave the same).
"""
from __future__ import annotations

import io
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from farm.store import RunStore, StoreError

__all__ = ["ReportError", "UnlearnedGroup", "RunContents", "Conf", "open_run", "unlearned_groups", "read_conf",
           "ReportWriter", "parquet_bytes", "nonfinite_entries", "merge_nonfinite", "ModelSet", "model_set", "Rows",
           "read_rows", "read_selected", "read_membership", "verify_job", "read_footers"]

UNLEARNED_ID = re.compile(r"^unlearned-(?P<method>.+)-(?P<hash>[^-]+)-(?P<index>\d+)$")


class ReportError(StoreError, ValueError):
    """The store cannot be evaluated as asked (not a run store, too few models, unknown method)."""


@dataclass(frozen=True)
class UnlearnedGroup:
    """The unlearned models of one method and hyper-parameters (model ids ``unlearned-<method>-<hash>-NNNNN``)."""
    key: str  # <method>-<hash>
    method: str
    hparams_hash: str
    hparams: dict
    model_ids: list[str]


@dataclass(frozen=True)
class RunContents:
    """A run store's manifest, examples and intact models (a marker and a logits file of the marker's size)."""
    store: RunStore
    manifest: dict
    example_ids: np.ndarray  # int64[E]
    split: np.ndarray  # str[E]: train, val or test
    forget: np.ndarray  # bool[E]
    markers: dict[str, dict]  # model id -> marker, intact models only
    by_role: dict[str, list[str]]  # role -> sorted model ids
    groups: dict[str, UnlearnedGroup]  # the unlearned models asked for, by <method>-<hash>
    broken: list[str]  # models with a marker but a missing or truncated logits file

    def models_read(self) -> list[str]:
        """Every model an evaluation reads: the intact models of every role but the unlearned ones, which
        count only in the groups asked for."""
        ids = [m for role, ms in self.by_role.items() if role != "unlearned" for m in ms]
        return sorted(ids + [m for g in self.groups.values() for m in g.model_ids])


def unlearned_groups(markers: dict[str, dict]) -> dict[str, UnlearnedGroup]:
    """The unlearned models among ``markers`` by method and hyper-parameters hash, in model id order."""
    found: dict[str, tuple[str, str, dict, list]] = {}
    for mid in sorted(markers):
        mk = markers[mid]
        if mk.get("role") != "unlearned":
            continue
        m = UNLEARNED_ID.match(mid)
        method = mk.get("method") or (m.group("method") if m else "unknown")
        h = m.group("hash") if m else "nohash"
        found.setdefault(f"{method}-{h}", (method, h, dict(mk.get("hparams") or {}), []))[3].append(mid)
    return {key: UnlearnedGroup(key, *fields) for key, fields in found.items()}


def open_run(uri: str, method: str | None = None) -> RunContents:
    """Read what the run at ``uri`` holds; ``method`` (a method name or ``<method>-<hash>``) keeps that method's
    unlearned models only.  Raises ReportError when ``uri`` is not a run store or has no such method."""
    store = RunStore(uri)
    store.check_reachable()
    manifest = store.read_manifest()
    if manifest is None:
        raise ReportError(f"{store.uri} is not a run store (no manifest.json)")
    ex = store.read_examples()
    markers, intact = store.catalog()  # damaged entries of models/ and logits/ named in one warning line
    by_role: dict[str, list[str]] = {}
    for mid in sorted(intact):
        by_role.setdefault(intact[mid].get("role", "unknown"), []).append(mid)
    groups = unlearned_groups(intact)
    if method is not None:
        chosen = {k: g for k, g in groups.items() if method in (g.method, k)}
        if not chosen:
            have = ", ".join(sorted({g.method for g in groups.values()} | set(groups))) or "no unlearned models"
            raise ReportError(f"unknown method {method!r}: store {store.uri} has {have}")
        groups = chosen
    return RunContents(
        store=store, manifest=manifest,
        example_ids=ex.column("example_id").to_numpy().astype(np.int64),
        split=np.asarray(ex.column("split").to_numpy(zero_copy_only=False)).astype(str),
        forget=np.asarray(ex.column("forget").to_numpy(zero_copy_only=False), dtype=bool),
        markers=intact, by_role=by_role, groups=groups, broken=sorted(set(markers) - set(intact)))


@dataclass(frozen=True)
class Conf:
    """The conf of the models read, except those holding NaN or infinite values, which ``nonfinite`` lists."""
    model_ids: list[str]
    markers: list[dict]
    conf: np.ndarray  # float32[M, E, Q]
    trained_on: np.ndarray  # bool[M, E]
    nonfinite: list[dict]  # per model left out: model_id, role, n_nan, n_inf, n_examples, first_example_ids


def nonfinite_entries(conf: np.ndarray, model_ids: list[str], roles, example_ids: np.ndarray) -> list[dict]:
    """The models among conf[M, E, Q] that hold NaN or infinite values: model_id, role, n_nan, n_inf, n_examples
    and the first 5 example ids (``example_ids``: those of the E examples), in model order."""
    out = []
    for k, mid in enumerate(model_ids):
        c = conf[k]
        bad = ~np.isfinite(c)
        if bad.any():
            rows = np.flatnonzero(bad.any(axis=1))
            out.append({"model_id": mid, "role": str(roles[k]), "n_nan": int(np.isnan(c).sum()),
                        "n_inf": int(np.isinf(c).sum()), "n_examples": int(rows.size),
                        "first_example_ids": [int(example_ids[i]) for i in rows[:5]]})
    return out


def merge_nonfinite(parts: list[list[dict]]) -> list[dict]:
    """nonfinite_entries of consecutive ranges of examples (in order) -> the entries of all of them, in the
    order the models first appear."""
    merged: dict[str, dict] = {}
    for part in parts:
        for e in part:
            m = merged.setdefault(e["model_id"], {**e, "n_nan": 0, "n_inf": 0, "n_examples": 0,
                                                  "first_example_ids": []})
            m["n_nan"] += e["n_nan"]
            m["n_inf"] += e["n_inf"]
            m["n_examples"] += e["n_examples"]
            m["first_example_ids"] = (m["first_example_ids"] + e["first_example_ids"])[:5]
    return list(merged.values())


def read_conf(run: RunContents, model_ids: list[str]) -> Conf:
    """RunStore.read_conf of ``model_ids``; models with NaN or infinite conf are listed and left out."""
    sc = run.store.read_conf(model_ids=model_ids)
    nonfinite = nonfinite_entries(sc.conf, sc.model_ids, sc.roles, run.example_ids)
    bad = {b["model_id"] for b in nonfinite}
    keep = [k for k, mid in enumerate(sc.model_ids) if mid not in bad]
    ids = [sc.model_ids[k] for k in keep]
    markers = [sc.markers[k] for k in keep]
    if len(keep) == len(sc.model_ids):
        return Conf(ids, markers, sc.conf, sc.trained_on, nonfinite)
    keep = np.asarray(keep, dtype=np.int64)
    return Conf(ids, markers, sc.conf[keep], sc.trained_on[keep], nonfinite)


# ------------------------------------------------------------------------------------ reads by chunks of examples
@dataclass(frozen=True)
class ModelSet:
    """Some models of a run, as a worker opens them: the store's URI, their ids and their markers (from the
    driver's catalog, so a worker reads no marker again)."""
    uri: str
    model_ids: list[str]
    markers: dict[str, dict]


def model_set(run: RunContents, model_ids: list[str]) -> ModelSet:
    return ModelSet(run.store.uri, list(model_ids), {m: run.markers[m] for m in model_ids})


def _per_model(model_ids: list[str], read) -> list:
    """read(model_id) for every model, in order, a few at once: on S3 each read is a request or a few."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(read, model_ids))


def verify_job(models: ModelSet) -> None:
    """Every logits file of ``models`` read whole and checked against its marker's sha256
    (RunStore.check_logits: a StoreError naming the first model that fails)."""
    store = RunStore(models.uri)
    _per_model(models.model_ids, lambda mid: store.check_logits(mid, models.markers[mid]))


@dataclass(frozen=True)
class Rows:
    """The conf and membership of a ModelSet's models on a range of examples, with the models that hold NaN or
    infinite values there (nonfinite_entries of the range; merge_nonfinite joins ranges)."""
    conf: np.ndarray  # float32[M, C, Q]
    trained_on: np.ndarray | None  # bool[M, C] (None when not read)
    nonfinite: list[dict]


def read_footers(models: ModelSet) -> dict[str, bytes]:
    """Each model's logits file footer (RunStore.read_footer), read once for the many ranges read_rows reads."""
    store = RunStore(models.uri)
    return dict(zip(models.model_ids, _per_model(models.model_ids,
                                                 lambda mid: store.read_footer(mid, models.markers[mid]))))


def read_rows(models: ModelSet, start: int, stop: int, trained_on: bool = True,
              footers: dict[str, bytes] | None = None) -> Rows:
    """Examples [start, stop) of every model of ``models``: only the row groups that hold them, and only the
    columns used, conf and (``trained_on``) trained_on, each page against its CRC-32; ``footers``
    (read_footers) saves reading each file's footer again."""
    sc = RunStore(models.uri).read_conf(model_ids=models.model_ids, examples=(start, stop), markers=models.markers,
                                        flags=("trained_on",) if trained_on else (), footers=footers)
    return Rows(sc.conf, sc.trained_on, nonfinite_entries(sc.conf, sc.model_ids, sc.roles, sc.example_ids))


def read_selected(models: ModelSet, n_examples: int, chunk: int, selections: dict[str, np.ndarray]
                  ) -> tuple[Conf, dict[str, np.ndarray]]:
    """Every row of ``models``, ``chunk`` examples at a time (so memory follows the chunk): the models with NaN
    or infinite conf anywhere are listed and left out, and the others' conf is kept on the sorted example
    indices of each selection -> (Conf without conf and trained_on arrays, selection name -> float32[M, n, Q])."""
    kept: dict[str, list[np.ndarray]] = {name: [] for name in selections}
    parts = []
    footers = read_footers(models)
    for start in range(0, n_examples, chunk):
        stop = min(start + chunk, n_examples)
        rows = read_rows(models, start, stop, trained_on=False, footers=footers)
        parts.append(rows.nonfinite)
        for name, idx in selections.items():
            lo, hi = np.searchsorted(idx, [start, stop])
            kept[name].append(rows.conf[:, idx[lo:hi] - start])
    nonfinite = merge_nonfinite(parts)
    bad = {b["model_id"] for b in nonfinite}
    keep = np.array([k for k, mid in enumerate(models.model_ids) if mid not in bad], dtype=np.int64)
    ids = [models.model_ids[k] for k in keep]
    empty = np.zeros((len(models.model_ids), 0, 0), np.float32)
    out = {name: (np.concatenate(v, axis=1) if v else empty)[keep] for name, v in kept.items()}
    return Conf(ids, [models.markers[m] for m in ids], empty[keep], np.zeros((keep.size, 0), bool), nonfinite), out


def read_membership(run: RunContents, model_ids: list[str], footers: dict[str, bytes] | None = None) -> np.ndarray:
    """bool[M, E]: the trained_on column of each model (only that column is read; ``footers``: read_footers)."""
    n_e = int(run.manifest["n_examples"])
    n_q = len(run.manifest["spec"]["queries"])
    out = np.empty((len(model_ids), n_e), bool)
    rows = {mid: k for k, mid in enumerate(model_ids)}

    def load(mid):
        t = run.store.read_logits(mid, run.markers[mid], columns=["trained_on"],
                                  footer=None if footers is None else footers.get(mid))
        col = t.column("trained_on").to_numpy(zero_copy_only=False)
        if col.size != n_e * n_q:
            raise StoreError(f"model {mid}: logits file has {col.size} rows, the run has {n_e} x {n_q}")
        out[rows[mid]] = col[::n_q]

    _per_model(model_ids, load)
    return out


class ReportWriter:
    """Writes report files into ``out`` (a folder or s3:// URI), by default ``<run>/report/``, and lists them."""

    def __init__(self, store: RunStore, out: str | None):
        if out is None:
            self.store, self.prefix = store, "report/"
            base = store.uri if store.is_s3 else store.root
            self.where = f"{base}/report"
        else:
            self.store, self.prefix = RunStore(out), ""
            self.where = self.store.uri if self.store.is_s3 else self.store.root
        self.files: list[str] = []

    def write(self, name: str, data: bytes) -> None:
        self.store.write_bytes(self.prefix + name, data)
        self.files.append(name)


def parquet_bytes(columns: dict) -> bytes:
    """A Parquet file of the given columns (name -> 1-D array)."""
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()
