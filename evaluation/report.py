"""Evaluate a run store: membership inference over the shadows, the competition's forgetting score and
two-sample tests per unlearning method, utility and cost; write report.json, report.md and figures
(evaluation.render draws the figures and report.md).

``evaluate_store(uri, out=None, method=None, *, n_boot, max_examples, seed, progress) -> dict``

What is computed (each statistic only where the store has enough usable models; otherwise the report
carries a message saying how many are needed):

* LiRA leave-one-out over the shadows (evaluation.lira.lira_leave_one_out, online / offline / global,
  every query), on the train split: every shadow in turn is the target, the others the reference.
  Pooled ROC metrics (roc_metrics over all (shadow, train example) pairs, member = shadow_in) and
  the per-example vulnerability: for each train example, the AUC of its leave-one-out scores of the
  IN targets against the OUT targets (rank form, ties count 1/2), from the strongest mode available
  (online, else offline, else global).  RMIA (offline, leave-one-out, population z = the test split)
  beside it.  Needs: online >= 2 IN and >= 2 OUT shadows per train example (4 shadows in
  complementary pairs), offline and RMIA >= 2 OUT, global >= 2 shadows.
* Per unlearning method and hyper-parameters (model ids ``unlearned-<method>-<hash>-NNNNN``), on the
  forget set (at most ``max_examples`` of it, a seeded sample), against the retrained models, with
  the plain query (query 0): the competition's per-example epsilons, F (with a percentile bootstrap
  interval that resamples unlearned and retrained models ``n_boot`` times), F_null (two disjoint
  halves of the retrained models, evaluation.competition.forgetting_quality_null) and the ratios
  F / F_null and F_matched / F_null (F_matched: n = floor(N_r / 2) unlearned against n retrained
  models, the same model count as F_null), the final score with the markers' mean retain and test
  accuracies; KS and Mann-Whitney per example with Benjamini-Hochberg at q = 0.05 on the forget set
  and on control samples of retain and test examples; the U-LiRA attack accuracy (every query).
  Needs: competition and tests >= 2 unlearned and >= 2 retrained; F_null >= 4 retrained;
  U-LiRA >= 4 of each.
* Utility (mean accuracy per split and role, from the markers) and cost (mean unlearning time over
  mean retraining time, markers' train_seconds).

Models whose conf column holds NaN or infinite values are listed by model id in the report and left
out of every statistic (never averaged).  Memory: one role is held at a time as float32, the
leave-one-out LiRA works in chunks of examples, and the competition statistics only hold the forget
and control examples; about 1.5 GB for 256 models x 70,000 examples x 2 queries.
"""
from __future__ import annotations

import io
import json
import math
import re
import time
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata
from tqdm import tqdm

from farm.store import RunStore, StoreError

from .competition import (DELTA, final_score, forgetting_quality, forgetting_quality_from_epsilons,
                          forgetting_quality_null, per_example_epsilons)
from .lira import lira_leave_one_out, roc_curve, roc_metrics
from .render import figures, markdown, safe_name, summary_lines
from .rmia import rmia_leave_one_out
from .twosample import per_example_tests
from .ulira import ulira_attack

__all__ = ["ReportError", "evaluate_store", "summary_lines", "DEFAULT_N_BOOT", "DEFAULT_MAX_EXAMPLES"]

DEFAULT_N_BOOT = 20
DEFAULT_MAX_EXAMPLES = 1000
FPRS = (1e-3, 1e-2)
BH_Q = 0.05
N_LEAKING = 6
PER_EXAMPLE_VARIANCE_MIN_REFS = 32
CI = 0.95
LIRA_MODES = ("online", "offline", "global")
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


def _accs(markers: list[dict], split: str) -> list[float]:
    return [float(mk["accuracy"][split]) for mk in markers
            if isinstance(mk.get("accuracy"), dict) and mk["accuracy"].get(split) is not None]


def _seconds(markers: list[dict]) -> list[float]:
    return [float(mk["train_seconds"]) for mk in markers if mk.get("train_seconds") is not None]


def _downsample_roc(fpr: np.ndarray, tpr: np.ndarray, n_points: int = 200) -> dict:
    """At most ~n_points of the ROC, log-spaced in FPR (what a log-log figure needs)."""
    pos = fpr[fpr > 0]
    lo = pos.min() if pos.size else 1.0
    grid = np.unique(np.r_[0.0, np.logspace(np.log10(lo), 0.0, n_points)])
    idx = np.unique(np.clip(np.searchsorted(fpr, grid, side="right") - 1, 0, fpr.size - 1))
    idx = np.unique(np.r_[idx, fpr.size - 1])
    return {"fpr": fpr[idx], "tpr": tpr[idx]}


def per_example_auc(scores: np.ndarray, member: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Per example e, P(score of an IN target > score of an OUT target) + P(tie)/2 over the
    leave-one-out targets: (sum of the IN ranks - n_in (n_in + 1) / 2) / (n_in n_out), ranks of
    scores[:, e] with ties averaged.  NaN where an example has no IN or no OUT target."""
    m, e = scores.shape
    out = np.full(e, np.nan)
    for start in range(0, e, chunk):
        sl = slice(start, min(start + chunk, e))
        r = rankdata(scores[:, sl], axis=0)
        mk = member[:, sl]
        n_in = mk.sum(0).astype(np.float64)
        n_out = m - n_in
        with np.errstate(invalid="ignore", divide="ignore"):
            out[sl] = (np.where(mk, r, 0.0).sum(0) - n_in * (n_in + 1) / 2) / (n_in * n_out)
    return out


def _min(a: np.ndarray) -> int:
    return int(a.min()) if a.size else 0


def _parquet_bytes(columns: dict) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


def _interval(values: np.ndarray) -> tuple[float, float]:
    if values.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [(1 - CI) / 2, (1 + CI) / 2])
    return float(lo), float(hi)


# -------------------------------------------------------------------------------------- LiRA
def _lira_section(store, shadow_ids, train_idx, test_idx, forget_mask_train, example_ids, nonfinite,
                  messages, bar) -> tuple[dict, dict, bytes | None]:
    """-> (json section, curves for the figure, per-example parquet bytes)."""
    sec: dict = {"n_shadows": len(shadow_ids), "n_train_examples": int(train_idx.size)}
    curves: dict = {}
    if len(shadow_ids) < 2:
        msg = (f"LiRA needs at least 4 shadow models (in complementary pairs, so every train example has "
               f">= 2 IN and >= 2 OUT shadows for leave-one-out); the store has {len(shadow_ids)}")
        sec["message"] = msg
        messages.append(msg)
        return sec, curves, None
    bar.set_postfix_str("reading shadows")
    ids, _, conf, trained_on = _load(store, shadow_ids, nonfinite, example_ids)
    dropped = len(shadow_ids) - len(ids)
    conf_tr = conf[:, train_idx]  # [M, T, Q] float32
    pop = conf[:, test_idx] if test_idx.size else None
    member = trained_on[:, train_idx]
    del conf, trained_on
    m = len(ids)
    sec.update(n_usable_shadows=m, n_queries=int(conf_tr.shape[2]))
    if dropped:
        sec["note"] = f"{dropped} shadow(s) left out for NaN or infinite conf (see nonfinite)"
    n_in = member.sum(0)
    n_out = m - n_in
    need = {
        "online": (_min(n_in) >= 2 and _min(n_out) >= 2,
                   f"LiRA online needs at least 2 IN and 2 OUT shadows for every train example "
                   f"(leave-one-out keeps >= 1 of each as reference; 4 shadows in complementary pairs suffice); "
                   f"with {m} usable shadows, {int(((n_in < 2) | (n_out < 2)).sum())} of {member.shape[1]} "
                   f"train examples have fewer (min IN {int(_min(n_in))}, min OUT {int(_min(n_out))})"),
        "offline": (_min(n_out) >= 2,
                    f"LiRA offline needs at least 2 OUT shadows for every train example; with {m} usable shadows, "
                    f"{int((n_out < 2).sum())} train examples have fewer"),
        "global": (m >= 2 and n_in.sum() > 0 and n_out.sum() > 0,
                   f"LiRA global needs at least 2 shadows with both members and non-members; {m} usable"),
    }
    # LiRA's paper fits one global variance per side below 64 shadows: per-example spreads of a few
    # references are too noisy (with 1 reference per side they are 0 and the online test flips)
    refs = min(_min(n_in), _min(n_out)) - 1
    variance = "per_example" if refs >= PER_EXAMPLE_VARIANCE_MIN_REFS else "global"
    sec["variance"] = variance
    sec["variance_rule"] = (f"per_example when every train example keeps >= {PER_EXAMPLE_VARIANCE_MIN_REFS} IN and "
                            f"OUT references after leaving the target out, else global (here {max(refs, 0)})")
    vul_scores = None
    sec["modes"] = {}
    for mode in LIRA_MODES:
        ok, msg = need[mode]
        if not ok:
            sec["modes"][mode] = {"message": msg}
            messages.append(msg)
            continue
        bar.set_postfix_str(f"LiRA {mode} leave-one-out")
        scores = lira_leave_one_out(conf_tr, member, mode=mode, variance=variance)
        flat_s, flat_m = scores.ravel(), member.ravel()
        metrics = roc_metrics(flat_s, flat_m, FPRS)
        fpr, tpr, _ = roc_curve(flat_s, flat_m)
        curves[f"LiRA {mode}"] = _downsample_roc(fpr, tpr)
        del fpr, tpr, flat_s
        sec["modes"][mode] = {**metrics, "roc": curves[f"LiRA {mode}"]}
        if vul_scores is None:
            vul_scores = (mode, scores)
        else:
            del scores
    # RMIA
    bar.set_postfix_str("RMIA leave-one-out")
    if pop is None:
        msg = "RMIA needs population samples from the test split; the store has no test examples"
        sec["rmia"] = {"message": msg}
        messages.append(msg)
    elif not (m >= 3 and _min(n_out) >= 2):
        msg = (f"RMIA leave-one-out needs at least 2 OUT shadows for every train example; with {m} usable "
               f"shadows, {int((n_out < 2).sum())} train examples have fewer")
        sec["rmia"] = {"message": msg}
        messages.append(msg)
    else:
        rs = rmia_leave_one_out(conf_tr, member, pop)
        metrics = roc_metrics(rs.ravel(), member.ravel(), FPRS)
        fpr, tpr, _ = roc_curve(rs.ravel(), member.ravel())
        curves["RMIA"] = _downsample_roc(fpr, tpr)
        sec["rmia"] = {**metrics, "roc": curves["RMIA"], "a": 0.3, "gamma": 1.0,
                       "population": f"{int(test_idx.size)} test examples"}
        del rs, fpr, tpr
    per_example = None
    if vul_scores is not None:
        bar.set_postfix_str("per-example vulnerability")
        mode, scores = vul_scores
        auc = per_example_auc(scores, member)
        del scores
        order = np.argsort(-np.nan_to_num(auc, nan=-1.0), kind="stable")[:10]
        fin = auc[np.isfinite(auc)]
        sec["vulnerability"] = {
            "score": f"LiRA {mode}",
            "definition": "per train example: AUC of its leave-one-out scores, IN targets vs OUT targets",
            "mean": float(fin.mean()) if fin.size else float("nan"),
            "quantiles": {str(q): float(np.quantile(fin, q)) for q in (0.5, 0.9, 0.99)} if fin.size else {},
            "fraction_auc_ge_0.9": float((fin >= 0.9).mean()) if fin.size else float("nan"),
            "mean_forget": float(np.nanmean(auc[forget_mask_train])) if forget_mask_train.any() else float("nan"),
            "mean_retain": float(np.nanmean(auc[~forget_mask_train])) if (~forget_mask_train).any() else float("nan"),
            "most_vulnerable": [{"example_id": int(example_ids[train_idx[i]]), "auc": float(auc[i])} for i in order],
        }
        per_example = _parquet_bytes({"example_id": example_ids[train_idx].astype(np.int32),
                                      "forget": forget_mask_train, "vulnerability_auc": auc,
                                      "n_in": n_in.astype(np.int32), "n_out": n_out.astype(np.int32)})
    return sec, curves, per_example


# -------------------------------------------------------------------------------- unlearning
def _f_null_section(r_f0: np.ndarray, n_boot: int, seed: int, messages: list) -> dict:
    n_r = r_f0.shape[0]
    if n_r < 4:
        msg = (f"F_null needs at least 4 retrained models (two disjoint halves of >= 2); "
               f"the store has {n_r} usable")
        messages.append(msg)
        return {"message": msg}
    res = forgetting_quality_null(r_f0, n_boot=n_boot, seed=seed)
    if res["n_per_half"] < 3:
        messages.append(f"F_null compares two halves of {res['n_per_half']} retrained models; with 2 models per "
                        "half the competition's buckets are empty (ceil(ln(N - 1)) = 0), so F_null = 0 whatever "
                        "the models; F_null is informative from 6 retrained models (3 per half)")
    return {"f_null": res["f_null"], "ci_low": res["ci_low"], "ci_high": res["ci_high"],
            "n_per_half": res["n_per_half"], "n_boot": n_boot, "ci": CI}


def _method_section(g: _Group, u_ids, u_markers, u_conf, r_markers, r_sel, forget_sel, ctrl, f_null,
                    n_boot, seed, messages, bar, example_ids) -> tuple[dict, dict]:
    """-> (json section, figure data)."""
    n_u, n_r = len(u_ids), r_sel["forget"].shape[0]
    sec: dict = {"method": g.method, "hparams_hash": g.hparams_hash, "hparams": g.hparams,
                 "n_unlearned": n_u, "n_retrained": n_r, "forget_examples_used": int(forget_sel.size)}
    fig: dict = {}
    u_f = u_conf[:, forget_sel]  # [N_u, F, Q]
    u_f0 = np.ascontiguousarray(u_f[..., 0], dtype=np.float64)
    r_f = r_sel["forget"]
    r_f0 = np.ascontiguousarray(r_f[..., 0], dtype=np.float64)
    # utility and cost
    sec["utility"] = {"unlearned": _acc_summary(u_markers), "retrained": _acc_summary(r_markers)}
    su, sr = _seconds(u_markers), _seconds(r_markers)
    if su and sr and np.mean(sr) > 0:
        sec["cost"] = {"unlearn_seconds_mean": float(np.mean(su)), "retrain_seconds_mean": float(np.mean(sr)),
                       "ratio": float(np.mean(su) / np.mean(sr))}
        # the spec's time_cutoff (a fraction of the mean retraining time; the challenge rejected slower methods)
        cutoff = next((mk["time_cutoff"] for mk in u_markers if mk.get("time_cutoff")), None)
        if cutoff:
            over = [mid for mid, mk in zip(u_ids, u_markers)
                    if mk.get("train_seconds") is not None and mk["train_seconds"] / np.mean(sr) > cutoff]
            sec["cost"].update(time_cutoff=float(cutoff), over_time_cutoff=over,
                               fraction_over_time_cutoff=len(over) / len(u_ids))
    else:
        msg = f"{g.key}: cost needs train_seconds in the markers of unlearned and retrained models"
        sec["cost"] = {"message": msg}
        messages.append(msg)
    # competition
    if n_u < 2 or n_r < 2:
        msg = (f"{g.key}: the competition score and the two-sample tests need at least 2 unlearned and 2 "
               f"retrained models; usable: {n_u} unlearned, {n_r} retrained")
        messages.append(msg)
        sec["competition"] = {"message": msg}
        sec["two_sample"] = {"message": msg}
    else:
        bar.set_postfix_str(f"{g.key}: epsilons")
        eps = per_example_epsilons(u_f0, r_f0, DELTA)
        f = forgetting_quality_from_epsilons(eps, n_u)
        comp: dict = {"forgetting_quality": f, "delta": DELTA}
        rng = np.random.default_rng([seed, 0xB007])
        boot = np.empty(n_boot)
        for b in tqdm(range(n_boot), desc=f"{g.key} F bootstrap", leave=False, disable=bar.disable):
            iu = rng.integers(0, n_u, n_u)
            ir = rng.integers(0, n_r, n_r)
            boot[b] = forgetting_quality(u_f0[iu], r_f0[ir])
        comp["ci_low"], comp["ci_high"] = _interval(boot)
        comp["n_boot"], comp["ci"] = n_boot, CI
        comp["epsilon"] = {"mean": float(eps.mean()), "median": float(np.median(eps)),
                           "max": float(eps.max()), "fraction_at_cap": float((eps >= 50).mean()),
                           "quantiles": {str(q): float(np.quantile(eps, q)) for q in (0.1, 0.5, 0.9)}}
        if n_r >= 4:
            n = n_r // 2
            n_um = min(n, n_u)
            rng2 = np.random.default_rng([seed, 0x3A7C])
            su_idx = np.sort(rng2.choice(n_u, n_um, replace=False))
            sr_idx = np.sort(rng2.choice(n_r, n, replace=False))
            comp["f_matched"] = forgetting_quality(u_f0[su_idx], r_f0[sr_idx])
            comp["f_matched_models"] = {"unlearned": int(n_um), "retrained": int(n)}
        if "f_null" in f_null:
            fn = f_null["f_null"]
            comp["f_null"] = fn
            comp["f_over_f_null"] = f / fn if fn > 0 else float("nan")
            if "f_matched" in comp:
                comp["f_matched_over_f_null"] = comp["f_matched"] / fn if fn > 0 else float("nan")
        else:
            comp["f_null_message"] = f_null["message"]
        ra_u, ta_u = _accs(u_markers, "retain"), _accs(u_markers, "test")
        ra_r, ta_r = _accs(r_markers, "retain"), _accs(r_markers, "test")
        try:
            comp["final_score"] = final_score(f, ra_u, ta_u, ra_r, ta_r)
            comp["accuracies"] = {"retain_unlearned": float(np.mean(ra_u)), "test_unlearned": float(np.mean(ta_u)),
                                  "retain_retrained": float(np.mean(ra_r)), "test_retrained": float(np.mean(ta_r))}
        except ValueError as exc:
            msg = f"{g.key}: no final score: {exc}"
            comp["final_score_message"] = msg
            messages.append(msg)
        sec["competition"] = comp
        fig["eps"] = eps
        fig["f"] = comp
        # most leaking forget examples (ties by the KS statistic below)
        bar.set_postfix_str(f"{g.key}: two-sample tests")
        tests = per_example_tests(u_f0, r_f0, BH_Q)
        order = np.lexsort((-tests["ks_stat"], -eps))[:N_LEAKING]
        sec["most_leaking"] = [{"example_id": int(example_ids[forget_sel[i]]), "epsilon": float(eps[i]),
                                "ks_p": float(tests["ks_p"][i]), "mw_p": float(tests["mw_p"][i])} for i in order]
        fig["leaking"] = [(int(example_ids[forget_sel[i]]), float(eps[i]), u_f0[:, i], r_f0[:, i]) for i in order]
        two = {"q": BH_Q, "forget": {"n_examples": int(forget_sel.size), "ks_fraction": tests["ks_fraction"],
                                     "mw_fraction": tests["mw_fraction"]}}
        for name, idx in ctrl.items():
            if idx.size == 0:
                two[name] = {"message": f"no {name.split('_')[0]} examples to sample"}
                continue
            t = per_example_tests(np.asarray(u_conf[:, idx, 0], np.float64), r_sel[name], BH_Q)
            two[name] = {"n_examples": int(idx.size), "ks_fraction": t["ks_fraction"],
                         "mw_fraction": t["mw_fraction"]}
        sec["two_sample"] = two
        fig["per_example"] = {"example_id": example_ids[forget_sel].astype(np.int32), "epsilon": eps,
                              "ks_p": tests["ks_p"], "mw_p": tests["mw_p"],
                              "ks_reject": tests["ks_reject"], "mw_reject": tests["mw_reject"]}
    # U-LiRA
    if n_u < 4 or n_r < 4:
        msg = (f"{g.key}: U-LiRA needs at least 4 unlearned and 4 retrained models (2 folds of >= 2); "
               f"usable: {n_u} unlearned, {n_r} retrained")
        messages.append(msg)
        sec["ulira"] = {"message": msg}
    else:
        bar.set_postfix_str(f"{g.key}: U-LiRA")
        ul = ulira_attack(u_f, r_f, folds=2, seed=seed)
        sec["ulira"] = {"accuracy": ul["accuracy"], "folds": 2, "queries": int(u_f.shape[2])}
        if "per_example" in fig:
            fig["per_example"]["ulira_accuracy"] = ul["per_example_accuracy"]
    return sec, fig


# ------------------------------------------------------------------------------------------ main
def _sample(idx: np.ndarray, k: int | None, rng) -> np.ndarray:
    if k is None or idx.size <= k:
        return idx
    return np.sort(rng.choice(idx, k, replace=False))


def evaluate_store(uri: str, out: str | None = None, method: str | None = None, *, n_boot: int = DEFAULT_N_BOOT,
                   max_examples: int | None = DEFAULT_MAX_EXAMPLES, seed: int = 0, progress: bool = True) -> dict:
    """Evaluate the run store at ``uri`` and write report.json, report.md, per-example Parquet files and
    PNG figures to ``out`` (default ``<run>/report/``; a local folder or s3://).  ``method`` restricts
    the unlearning part to one method (its name, or ``<method>-<hparams hash>``).  ``max_examples``
    caps the forget examples (and each control sample) of the per-example unlearning statistics (a
    seeded sample; None = all).  Returns the report as a dict, plus ``out`` and ``files``.

    Raises ReportError (a StoreError and a ValueError) when the store is not a run store, the method
    is unknown, or the store has too few models for any statistic.
    """
    t0 = time.perf_counter()
    if n_boot < 0:
        raise ReportError(f"n_boot must be >= 0, got {n_boot}")
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
    can_lira = len(shadows) >= 2
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
                                                  example_ids, nonfinite, messages, bar)
        bar.update(1)
        # retrained models: only the forget and control examples are kept
        bar.set_postfix_str("reading retrained models")
        r_ids, r_markers, r_sel = [], [], {"forget": np.zeros((0, forget_sel.size, 1), np.float32)}
        if retrain:
            r_ids, r_markers, rc, _ = _load(store, retrain, nonfinite, example_ids)
            r_sel = {"forget": rc[:, forget_sel]}
            for name, idx in ctrl.items():
                r_sel[name] = np.asarray(rc[:, idx, 0], dtype=np.float64)
            del rc
        if forget_sel.size == 0:
            msg = "the store's forget set is empty: no unlearning statistic can be computed"
            messages.append(msg)
        bar.set_postfix_str("F_null")
        f_null = _f_null_section(np.asarray(r_sel["forget"][..., 0], np.float64), n_boot, seed, messages) \
            if forget_sel.size else {"message": msg}
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
            keep_idx = np.r_[forget_sel, ctrl["retain_control"], ctrl["test_control"]]
            u_small = u_conf[:, keep_idx]  # only what the statistics need
            del u_conf
            nf = forget_sel.size
            nr = ctrl["retain_control"].size
            local_ctrl = {"retain_control": np.arange(nf, nf + nr),
                          "test_control": np.arange(nf + nr, keep_idx.size)}
            sec, fig = _method_section(g, u_ids, u_markers, u_small, r_markers, r_sel, np.arange(nf), local_ctrl,
                                       f_null, n_boot, seed, messages, bar, example_ids[forget_sel])
            sec["forget_examples_used"] = int(nf)
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
