"""Evaluate a run store: membership inference over the shadows, the competition's forgetting score and
two-sample tests per unlearning method, utility and cost; write report.json, report.md and figures.

``evaluate_store(uri, out=None, method=None, *, n_boot, max_examples, seed, progress, rmia_a, rmia_gamma)``

This module reads the store and writes the report; the statistics of each section live apart and take
numpy arrays:
* evaluation.membership_report: LiRA (online, offline, global) and RMIA over the shadows with leave-pair-out
  references, per-example vulnerability from within-pair comparisons with its chance level, a jackknife over
  target pairs for every figure's precision (and the ROC band), LiRA's Gaussian check.
* evaluation.unlearning_report, per unlearning method and hyper-parameters (model ids
  ``unlearned-<method>-<hash>-NNNNN``), on the forget set (at most ``max_examples``, a seeded sample) and on
  control samples of retain and test examples: F with a jackknife interval over whole originals, F and F_null
  at equal model counts (means over ``n_boot`` draws; their ratio is the headline), the final score, KS and
  Mann-Whitney with Benjamini-Hochberg, U-LiRA with folds grouped by original, the number of originals and
  the tests on one model per original.
* here: utility (mean accuracy per split and role, from the markers) and cost (unlearning over retraining time).

Models whose conf column holds NaN or infinite values are listed by model id and left out of every statistic.
Memory: one role is held at a time as float32, LiRA works in chunks of examples, and the unlearning
statistics only hold the forget and control examples.
"""
from __future__ import annotations

import functools
import io
import json
import math
import re
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from farm.store import RunStore, StoreError

from .competition import DELTA
from .membership_report import FPRS, membership_section
from .precision import DRAW_GROUPS, assign_groups
from .render import figures, markdown, safe_name, summary_lines
from .unlearning_report import BH_Q, equal_count_n, f_null_section, method_section

__all__ = ["ReportError", "evaluate_store", "summary_lines", "DEFAULT_N_BOOT", "DEFAULT_MAX_EXAMPLES"]

DEFAULT_N_BOOT = 20  # draws of the equal-count F and F_null (4 groups of 5 for their jackknife)
DEFAULT_MAX_EXAMPLES = 1000
DEFAULT_RMIA_A = 0.3  # RMIA's offline approximation Pr_in ~ a Pr_out + 1 - a (the paper's value for CIFAR-10)
DEFAULT_RMIA_GAMMA = 1.0  # RMIA's likelihood-ratio threshold against the population
CI = 0.95
SPLITS = ("retain", "forget", "test", "val", "train")
_UNLEARNED_ID = re.compile(r"^unlearned-(?P<method>.+)-(?P<hash>[^-]+)-(?P<index>\d+)$")


class ReportError(StoreError, ValueError):
    """The store cannot be evaluated as asked (not a run store, too few models, unknown method)."""


# ------------------------------------------------------------------------------------------ output
class _Output:
    """Writes report files through a RunStore, so local folders and s3:// behave the same."""

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


def _clean(obj):
    """JSON-safe: numpy scalars and arrays to Python, NaN and infinities to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


# ------------------------------------------------------------------------------------- helpers
@dataclass
class _Group:
    key: str  # <method>-<hash>
    method: str
    hparams_hash: str
    hparams: dict
    model_ids: list


def _unlearned_groups(markers: dict) -> dict[str, _Group]:
    groups: dict[str, _Group] = {}
    for mid in sorted(markers):
        mk = markers[mid]
        if mk.get("role") != "unlearned":
            continue
        m = _UNLEARNED_ID.match(mid)
        method = mk.get("method") or (m.group("method") if m else "unknown")
        h = m.group("hash") if m else "nohash"
        key = f"{method}-{h}"
        g = groups.setdefault(key, _Group(key, method, h, dict(mk.get("hparams") or {}), []))
        g.model_ids.append(mid)
    return groups


def _load(store: RunStore, model_ids: list[str], nonfinite: list[dict], example_ids: np.ndarray):
    """read_conf for the given models; models with NaN / inf conf are recorded and dropped."""
    sc = store.read_conf(model_ids=model_ids)
    keep = []
    for k, mid in enumerate(sc.model_ids):
        c = sc.conf[k]
        bad = ~np.isfinite(c)
        if bad.any():
            rows = np.flatnonzero(bad.any(axis=1))
            nonfinite.append({"model_id": mid, "role": str(sc.roles[k]), "n_nan": int(np.isnan(c).sum()),
                              "n_inf": int(np.isinf(c).sum()), "n_examples": int(rows.size),
                              "first_example_ids": [int(example_ids[i]) for i in rows[:5]]})
        else:
            keep.append(k)
    ids = [sc.model_ids[k] for k in keep]
    markers = [sc.markers[k] for k in keep]
    if len(keep) == len(sc.model_ids):
        return ids, markers, sc.conf, sc.trained_on
    keep = np.asarray(keep, dtype=np.int64)
    return ids, markers, sc.conf[keep], sc.trained_on[keep]


def _acc_summary(markers: list[dict]) -> dict:
    out = {}
    for split in SPLITS:
        vals = [float(mk["accuracy"][split]) for mk in markers
                if isinstance(mk.get("accuracy"), dict) and mk["accuracy"].get(split) is not None]
        if vals:
            out[split] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)}
    return out


def _seconds(markers: list[dict]) -> list[float]:
    return [float(mk["train_seconds"]) for mk in markers if mk.get("train_seconds") is not None]


def _parquet_bytes(columns: dict) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


# ------------------------------------------------------------------------------------ sections
def _lira_section(store, shadow_ids, train_idx, test_idx, forget_mask_train, example_ids, nonfinite,
                  messages, bar, seed, rmia_a, rmia_gamma) -> tuple[dict, dict, bytes | None]:
    """Read the shadows and run evaluation.membership_report -> (json section, curves, per-example parquet)."""
    sec: dict = {"n_shadows": len(shadow_ids), "n_train_examples": int(train_idx.size)}
    if len(shadow_ids) < 4:
        msg = (f"LiRA needs at least 4 shadow models (in complementary pairs, so every train example keeps >= 1 IN "
               f"and >= 1 OUT reference after leaving out the target and its partner); the store has {len(shadow_ids)}")
        sec["message"] = msg
        messages.append(msg)
        return sec, {}, None
    bar.set_postfix_str("reading shadows")
    ids, _, conf, trained_on = _load(store, shadow_ids, nonfinite, example_ids)
    if len(ids) < len(shadow_ids):
        sec["note"] = f"{len(shadow_ids) - len(ids)} shadow(s) left out for NaN or infinite conf (see nonfinite)"
    conf_tr = conf[:, train_idx]  # [M, T, Q] float32
    pop = conf[:, test_idx] if test_idx.size else None
    member = trained_on[:, train_idx]
    del conf, trained_on
    body, curves, per_example = membership_section(ids, conf_tr, member, pop, forget_mask_train,
                                                   example_ids[train_idx], seed=seed, rmia_a=rmia_a,
                                                   rmia_gamma=rmia_gamma, status=bar.set_postfix_str)
    sec.update(body)
    if "message" in body:
        messages.append(body["message"])
    if "message" in body.get("rmia", {}):
        messages.append(body["rmia"]["message"])
    if not sec.get("references", "leave-pair-out").startswith("leave-pair-out"):
        messages.append(f"LiRA: {sec['references']}")
    return sec, curves, (_parquet_bytes(per_example) if per_example is not None else None)


# ------------------------------------------------------------------------------------------ main
def _headline_f_null(n_forget: int, n_r: int, retrained_groups, f_null_at, n_draws: int, messages: list) -> dict:
    """F_null at the largest count the retrained models allow (the methods' sections carry F_null at their own
    count, usually the same)."""
    if n_forget == 0:
        return {"message": "the store's forget set is empty"}
    g = min(DRAW_GROUPS, n_r)
    n = equal_count_n(retrained_groups(g), g) if g >= 2 else n_r // 2
    if n < 3 or n_draws < 2:
        enough = next(k for k in range(4, 64) if (k - -(-k // DRAW_GROUPS)) // 2 >= 3)  # outside the largest group
        msg = (f"F_null needs at least 3 retrained models per side in every draw (here {n}: train at least {enough} "
               f"retrained models) and at least 2 draws (--n-boot, here {n_draws})")
        messages.append(msg)
        return {"message": msg}
    return {k: v for k, v in f_null_at(n, g).items() if k != "draws"}


def _cost(key: str, u_ids, u_markers, r_markers, messages: list) -> dict:
    """Mean unlearning time over mean retraining time, and the models over the spec's time cut-off."""
    su, sr = _seconds(u_markers), _seconds(r_markers)
    if not (su and sr and np.mean(sr) > 0):
        msg = f"{key}: cost needs train_seconds in the markers of unlearned and retrained models"
        messages.append(msg)
        return {"message": msg}
    cost = {"unlearn_seconds_mean": float(np.mean(su)), "retrain_seconds_mean": float(np.mean(sr)),
            "ratio": float(np.mean(su) / np.mean(sr))}
    # the spec's time_cutoff (a fraction of the mean retraining time; the challenge rejected slower methods)
    cutoff = next((mk["time_cutoff"] for mk in u_markers if mk.get("time_cutoff")), None)
    if cutoff:
        over = [mid for mid, mk in zip(u_ids, u_markers)
                if mk.get("train_seconds") is not None and mk["train_seconds"] / np.mean(sr) > cutoff]
        cost.update(time_cutoff=float(cutoff), over_time_cutoff=over, fraction_over_time_cutoff=len(over) / len(u_ids))
    return cost


def _sample(idx: np.ndarray, k: int | None, rng) -> np.ndarray:
    if k is None or idx.size <= k:
        return idx
    return np.sort(rng.choice(idx, k, replace=False))


def evaluate_store(uri: str, out: str | None = None, method: str | None = None, *, n_boot: int = DEFAULT_N_BOOT,
                   max_examples: int | None = DEFAULT_MAX_EXAMPLES, seed: int = 0, progress: bool = True,
                   rmia_a: float = DEFAULT_RMIA_A, rmia_gamma: float = DEFAULT_RMIA_GAMMA) -> dict:
    """Evaluate the run store at ``uri`` and write report.json, report.md, per-example Parquet files and
    PNG figures to ``out`` (default ``<run>/report/``; a local folder or s3://).  ``method`` restricts
    the unlearning part to one method (its name, or ``<method>-<hparams hash>``).  ``max_examples``
    caps the forget examples (and each control sample) of the per-example unlearning statistics (a
    seeded sample; None = all).  ``n_boot`` is the number of draws behind the equal-count F and F_null.
    ``rmia_a`` and ``rmia_gamma`` set RMIA's offline a and its threshold gamma.  Returns the report as a dict,
    plus ``out`` and ``files``.

    Raises ReportError (a StoreError and a ValueError) when the store is not a run store, the method
    is unknown, or the store has too few models for any statistic.
    """
    t0 = time.perf_counter()
    if n_boot < 0:
        raise ReportError(f"n_boot must be >= 0, got {n_boot}")
    if not (0.0 <= rmia_a <= 1.0) or not (rmia_gamma > 0 and math.isfinite(rmia_gamma)):
        raise ReportError(f"rmia_a must lie in [0, 1] and rmia_gamma be a positive number, got {rmia_a}, {rmia_gamma}")
    if max_examples is not None and max_examples < 1:
        raise ReportError(f"max_examples must be >= 1 (or None for all), got {max_examples}")
    store = RunStore(uri)
    store.check_reachable()
    manifest = store.read_manifest()
    if manifest is None:
        raise ReportError(f"{store.uri} is not a run store (no manifest.json)")
    ex = store.read_examples()
    example_ids = ex.column("example_id").to_numpy().astype(np.int64)
    split = np.asarray(ex.column("split").to_numpy(zero_copy_only=False)).astype(str)
    forget = np.asarray(ex.column("forget").to_numpy(zero_copy_only=False), dtype=bool)
    markers = store.markers()
    sizes = store.logits_sizes()
    intact = {mid: mk for mid, mk in markers.items() if sizes.get(mid) == mk.get("bytes")}  # as intact_models()
    broken = sorted(set(markers) - set(intact))
    by_role: dict[str, list] = {}
    for mid in sorted(intact):
        by_role.setdefault(intact[mid].get("role", "unknown"), []).append(mid)
    groups = _unlearned_groups(intact)
    if method is not None:
        chosen = {k: g for k, g in groups.items() if method in (g.method, k)}
        if not chosen:
            have = ", ".join(sorted({g.method for g in groups.values()} | set(groups))) or "no unlearned models"
            raise ReportError(f"unknown method {method!r}: store {store.uri} has {have}")
        groups = chosen
    shadows, retrain = by_role.get("shadow", []), by_role.get("retrain", [])
    can_lira = len(shadows) >= 4
    can_unlearn = len(retrain) >= 2 and any(len(g.model_ids) >= 2 for g in groups.values())
    if not can_lira and not can_unlearn:
        raise ReportError(
            f"store {store.uri} has too few models to evaluate: membership inference needs at least 4 shadows "
            f"(it has {len(shadows)}); the competition score needs at least 2 unlearned models of one method and "
            f"2 retrained models (it has {', '.join(f'{k}: {len(g.model_ids)}' for k, g in groups.items()) or 'no unlearned'}"
            f" and {len(retrain)} retrained)")

    output = _Output(store, out)
    messages: list[str] = []
    nonfinite: list[dict] = []
    train_idx = np.flatnonzero(split == "train")
    test_idx = np.flatnonzero(split == "test")
    retain_idx = np.flatnonzero((split == "train") & ~forget)
    forget_idx = np.flatnonzero(forget)
    rng = np.random.default_rng([seed, 0xE7A1])
    forget_sel = _sample(forget_idx, max_examples, rng)
    n_ctrl = forget_sel.size if max_examples is None else min(forget_sel.size, max_examples)
    ctrl = {"retain_control": _sample(retain_idx, n_ctrl, rng), "test_control": _sample(test_idx, n_ctrl, rng)}

    n_stages = 3 + len(groups)
    bar = tqdm(total=n_stages, desc="ufarm evaluate", unit="stage", disable=not progress, dynamic_ncols=True)
    try:
        lira_sec, curves, lira_pe = _lira_section(store, shadows, train_idx, test_idx, forget[train_idx],
                                                  example_ids, nonfinite, messages, bar, seed, rmia_a, rmia_gamma)
        bar.update(1)
        # retrained models: only the forget and control examples are kept
        bar.set_postfix_str("reading retrained models")
        r_ids, r_markers = [], []
        r_sel = {"forget": np.zeros((0, forget_sel.size, 1), np.float32),
                 **{name: np.zeros((0, idx.size, 1), np.float32) for name, idx in ctrl.items()}}
        if retrain:
            r_ids, r_markers, rc, _ = _load(store, retrain, nonfinite, example_ids)
            r_sel = {"forget": rc[:, forget_sel], **{name: rc[:, idx] for name, idx in ctrl.items()}}
            del rc
        if forget_sel.size == 0:
            msg = "the store's forget set is empty: no unlearning statistic can be computed"
            messages.append(msg)
        r_f0 = np.asarray(r_sel["forget"][..., 0], np.float64)
        n_r = r_f0.shape[0]
        retrained_groups = functools.cache(lambda g: assign_groups(np.arange(n_r), g, [seed, 0x6E, g])[0])

        @functools.cache
        def f_null_at(n: int, g: int) -> dict:
            bar.set_postfix_str(f"F_null at {n} models per side")
            gr = retrained_groups(g) if g >= 2 else np.zeros(n_r, np.int64)
            return f_null_section(r_f0, n, gr, g, n_boot, seed)

        f_null = _headline_f_null(forget_sel.size, n_r, retrained_groups, f_null_at, n_boot, messages)
        bar.update(1)
        methods: dict = {}
        method_figs: dict = {}
        utility: dict = {}
        for role in ("original", "retrain", "shadow"):
            ids = by_role.get(role, [])
            if role == "original" and ids:
                _load(store, ids, nonfinite, example_ids)  # only to report NaN / inf conf by model id
        bad_ids = {b["model_id"] for b in nonfinite}
        for role in ("original", "retrain", "shadow"):
            ms = [intact[i] for i in by_role.get(role, []) if i not in bad_ids]
            if ms:
                utility[role] = _acc_summary(ms)
        for key, g in groups.items():
            bar.set_postfix_str(f"reading {key}")
            u_ids, u_markers, u_conf, _ = _load(store, g.model_ids, nonfinite, example_ids)
            if forget_sel.size == 0:
                methods[key] = {"method": g.method, "message": msg}
                bar.update(1)
                continue
            u_ctrl = {name: u_conf[:, idx] for name, idx in ctrl.items()}
            u_forget = u_conf[:, forget_sel]
            del u_conf
            sec, fig, notes = method_section(
                key, g.method, g.hparams, u_ids, u_markers, u_forget, u_ctrl, r_markers, r_sel["forget"],
                {k: v for k, v in r_sel.items() if k != "forget"}, retrained_groups, f_null_at, n_boot, seed,
                example_ids[forget_sel], status=bar.set_postfix_str)
            messages += notes
            sec["utility"] = {"unlearned": _acc_summary(u_markers), "retrained": _acc_summary(r_markers)}
            sec["cost"] = _cost(key, u_ids, u_markers, r_markers, messages)
            methods[key] = sec
            method_figs[key] = fig
            if u_markers:
                utility[f"unlearned:{key}"] = _acc_summary(u_markers)
            bar.update(1)
        bar.set_postfix_str("figures and report")
        if lira_pe is not None:
            output.write("per_example_lira.parquet", lira_pe)
        for key, fig in method_figs.items():
            if "per_example" in fig:
                output.write(f"per_example_{safe_name(key)}.parquet", _parquet_bytes(fig["per_example"]))
        for name, png in figures(curves, method_figs, f_null, utility, CI):
            output.write(name, png)
        bar.update(1)
    finally:
        bar.close()

    for b in nonfinite:
        messages.insert(0, f"model {b['model_id']} ({b['role']}) has {b['n_nan']} NaN and {b['n_inf']} infinite "
                           f"conf values; left out of every statistic")
    if broken:
        messages.append(f"{len(broken)} model(s) have a marker but a missing or truncated logits file and were "
                        f"left out: {', '.join(broken[:5])}{' ...' if len(broken) > 5 else ''}")
    rep = {
        "store": store.uri,
        "spec": manifest.get("spec", {}).get("name"),
        "queries": manifest.get("spec", {}).get("queries"),
        "n_examples": int(manifest.get("n_examples", len(split))),
        "splits": {s: int((split == s).sum()) for s in ("train", "val", "test")},
        "n_forget": int(forget.sum()),
        "models": {**{r: len(v) for r, v in by_role.items() if r != "unlearned"},
                   **{f"unlearned:{k}": len(g.model_ids) for k, g in groups.items()}},
        "nonfinite": nonfinite,
        "messages": messages,
        "lira": lira_sec,
        "f_null": f_null,
        "methods": methods,
        "utility": utility,
        "settings": {"n_boot": n_boot, "max_examples": max_examples, "seed": seed, "delta": DELTA,
                     "rmia_a": rmia_a, "rmia_gamma": rmia_gamma,
                     "bh_q": BH_Q, "fprs": list(FPRS), "method": method,
                     "forget_examples_used": int(forget_sel.size),
                     "control_examples": {k: int(v.size) for k, v in ctrl.items()}},
    }
    rep["seconds"] = time.perf_counter() - t0
    rep["files"] = list(output.files) + ["report.json", "report.md"]
    rep = _clean(rep)
    output.write("report.md", markdown(rep).encode())
    output.write("report.json", json.dumps(rep, indent=2, sort_keys=False).encode())
    rep["out"] = output.where
    return rep
