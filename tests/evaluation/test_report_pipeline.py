"""The report's numbers after it was split into sections: the ROC helpers (roc_curve now sklearn's) against
the hand-written sweeps they replaced and against brute force, and a synthetic store's report against
independent computations and against the figures the report gave before it was split (same store, same seed)."""
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy import stats

from evaluation.competition import forgetting_quality
from evaluation.lira import lira_leave_pair_out, roc_curve, roc_metrics
from evaluation.precision import jackknife_se
from evaluation.roc import roc_jackknife
from evaluation.report import evaluate_store
from evaluation.rmia import rmia_leave_pair_out
from evaluation.ulira import ulira_attack
from evaluation_loops import bh_step_up_loop, pair_vulnerability_loop, roc_loop
from farm.store import RunStore
from synthetic_store import build_store


# ---------------------------------------------------------------- the implementations the helpers replaced
def sweep_roc(scores, member):
    """The former evaluation.lira.roc_curve: one sort, a point after every distinct score from the top."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(member, dtype=bool)
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), s.size - 1]
    tps = np.cumsum(y_sorted)[last]
    fps = (last + 1) - tps
    return np.r_[0.0, fps / (y.size - y.sum())], np.r_[0.0, tps / y.sum()], np.r_[np.inf, s_sorted[last]]


def sweep_roc_jackknife(scores, member, groupings, fprs, grid):
    """The former evaluation.precision.roc_jackknife: every replicate counted on the full set's sorted order."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(member, dtype=bool)
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), s.size - 1]

    def figures(keep):
        tp = np.cumsum(y_sorted & keep)[last]
        fp = np.cumsum(~y_sorted & keep)[last]
        tpr, fpr = np.r_[0.0, tp / tp[-1]], np.r_[0.0, fp / fp[-1]]
        auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
        at = [float(tpr[np.flatnonzero(fpr < a)[-1]]) for a in fprs]
        return np.r_[auc, at, tpr[np.searchsorted(fpr, grid, side="right") - 1]]

    full = figures(np.ones(s.size, dtype=bool))
    var = np.zeros_like(full)
    for group, n_groups in groupings:
        g_sorted = np.asarray(group)[order]
        var += jackknife_se(np.array([figures(g_sorted != g) for g in range(n_groups)])) ** 2
    return full, np.sqrt(var)


def _scores(rng, n, ties=True):
    s = rng.normal(0, 1, n)
    y = rng.random(n) < 0.45
    s[y] += 0.6
    return (np.round(s, 1) if ties else s), y


# ---------------------------------------------------------------------------------------- helpers
def test_roc_curve_equals_the_sweep_it_replaced():
    rng = np.random.default_rng(21)
    for n, ties in ((7, True), (400, True), (3000, False), (5000, True)):
        s, y = _scores(rng, n, ties)
        for got, want in zip(roc_curve(s, y), sweep_roc(s, y)):
            np.testing.assert_array_equal(got, want)
    # infinite scores (sklearn refuses them; their ranks give the curve): one point per distinct score, as the
    # brute force says; the former sweep gave every infinite score its own point (inf - inf is NaN, not 0)
    s, y = _scores(rng, 300)
    s[:5], s[5:8] = np.inf, -np.inf
    fpr, tpr, thresholds = roc_curve(s, y)
    np.testing.assert_array_equal(np.c_[fpr, tpr], roc_loop(s, y))
    np.testing.assert_array_equal(thresholds[1:], np.unique(s)[::-1])


def test_roc_jackknife_equals_the_sweep_it_replaced():
    rng = np.random.default_rng(22)
    fprs, grid = (1e-3, 1e-2, 0.2), np.logspace(-4, 0, 81)
    for n, ties in ((600, True), (4000, False), (4000, True)):
        s, y = _scores(rng, n, ties)
        groupings = [(rng.integers(0, 10, n), 10), (rng.integers(0, 4, n), 4)]
        full, se = sweep_roc_jackknife(s, y, groupings, fprs, grid)
        m = roc_metrics(s, y, fprs)
        # one bucket, buckets of ~10% of the cells, buckets of a handful (ties span bucket edges' choice)
        for cells_per_bucket in (None, n // 10, 7):
            fig = roc_jackknife(s, y, groupings, fprs, grid, cells_per_bucket=cells_per_bucket)
            # the AUC is summed exactly in counts and divided once, the sweep summed rates: equal to rounding
            assert fig["auc"] == pytest.approx(full[0], rel=1e-13) and fig["auc_se"] == pytest.approx(se[0], rel=1e-9)
            assert fig["auc"] == pytest.approx(m["auc"], rel=1e-13)
            # TPRs are read off the same counts: exactly equal
            assert list(fig["tpr_at_fpr"].values()) == full[1:4].tolist() and fig["tpr_at_fpr"] == m["tpr_at_fpr"]
            assert list(fig["tpr_at_fpr_se"].values()) == se[1:4].tolist()
            np.testing.assert_array_equal(fig["grid_tpr"], full[4:])
            np.testing.assert_array_equal(fig["grid_tpr_se"], se[4:])
            assert fig["dof"] == 3
    # infinite scores: one curve point per distinct score, as sklearn's curve (on ranks) has it
    s, y = _scores(rng, 500)
    s[:5], s[5:8] = np.inf, -np.inf
    for cells_per_bucket in (None, 40):
        fig, m = roc_jackknife(s, y, [], fprs, grid, cells_per_bucket=cells_per_bucket), roc_metrics(s, y, fprs)
        assert fig["auc"] == pytest.approx(m["auc"], rel=1e-13) and fig["tpr_at_fpr"] == m["tpr_at_fpr"]


def test_roc_buckets_bound_a_job_and_give_the_same_figures_to_the_bit():
    """A job holds about cells_per_bucket cells (equal scores stay in one bucket); the figures do not depend on
    the buckets at all, since counts are exact integers."""
    from evaluation.roc import roc_buckets
    rng = np.random.default_rng(23)
    s, y = _scores(rng, 20000, ties=False)
    groupings = [(rng.integers(0, 10, s.size), 10), (rng.integers(0, 5, s.size), 5)]
    buckets = roc_buckets(s, y, groupings, (0.01,), np.linspace(0, 1, 11), 10)
    sizes = [b.scores.size for b in buckets]
    assert len(sizes) == 10 and sum(sizes) == s.size and max(sizes) < 1.5 * s.size / 10
    assert all(a.scores.min() > b.scores.max() for a, b in zip(buckets, buckets[1:]))  # highest first, disjoint
    one = roc_jackknife(s, y, groupings, (0.01,), np.linspace(0, 1, 11))
    many = roc_jackknife(s, y, groupings, (0.01,), np.linspace(0, 1, 11), cells_per_bucket=2000)
    assert json.dumps({k: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v for k, v in one.items()}) == \
        json.dumps({k: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v for k, v in many.items()})
    s_tied = np.round(s)  # a handful of distinct scores: each bucket holds whole ties
    tied = roc_buckets(s_tied, y, groupings, (0.01,), np.linspace(0, 1, 11), 10)
    assert all(np.intersect1d(a.scores, b.scores).size == 0 for a in tied for b in tied if a is not b)
    with pytest.raises(ValueError, match="NaN"):
        roc_jackknife(np.r_[s[:10], np.nan], y[:11], [], (0.01,), np.linspace(0, 1, 11))


# ----------------------------------------------------------------------- a report, number by number
# What the report gave before it was split into sections (then one module, evaluation/report.py), on the store
# below; held to 1e-9 rather than bitwise because libm can differ between machines
PINNED = {
    ("lira", "online_auc"): 0.65669375, ("lira", "online_auc_se"): 0.013777644432331034,
    ("lira", "offline_tpr_1pct"): 0.0575, ("lira", "global_auc"): 0.61941796875,
    ("lira", "rmia_auc"): 0.698934375, ("lira", "rmia_auc_se"): 0.011515410475608459,
    ("lira", "vulnerability_mean"): 0.6575, ("lira", "vulnerability_mean_se"): 0.02373903255540687,
    ("method", "f"): 0.121875, ("method", "f_se"): 0.011646915246777778,
    ("method", "f_over_f_null"): 0.5877192982456141, ("method", "f_null"): 0.35624999999999996,
    ("method", "ks_fraction"): 0.7, ("method", "mw_fraction"): 0.825, ("method", "ulira_accuracy"): 0.775,
    ("method", "final_score"): 0.121875,
}


@pytest.fixture(scope="module")
def gap_report(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("gap") / "run")
    build_store(uri, n_train=400, n_test=100, n_forget=40, n_shadow=8, n_retrain=8, n_unlearned=8, n_originals=8,
                gap=0.7, n_q=2, unlearned_shift=1.5, seed=3)
    return uri, evaluate_store(uri, n_boot=4, max_examples=None, progress=False)


def test_report_equals_the_figures_before_the_split(gap_report):
    _, rep = gap_report
    lira, (m,) = rep["lira"], rep["methods"].values()
    c = m["competition"]
    got = {("lira", "online_auc"): lira["modes"]["online"]["auc"],
           ("lira", "online_auc_se"): lira["modes"]["online"]["auc_se"],
           ("lira", "offline_tpr_1pct"): lira["modes"]["offline"]["tpr_at_fpr"]["0.01"],
           ("lira", "global_auc"): lira["modes"]["global"]["auc"],
           ("lira", "rmia_auc"): lira["rmia"]["auc"], ("lira", "rmia_auc_se"): lira["rmia"]["auc_se"],
           ("lira", "vulnerability_mean"): lira["vulnerability"]["mean"],
           ("lira", "vulnerability_mean_se"): lira["vulnerability"]["mean_se"],
           ("method", "f"): c["forgetting_quality"], ("method", "f_se"): c["se"],
           ("method", "f_over_f_null"): c["equal_count"]["ratio"], ("method", "f_null"): rep["f_null"]["f_null"],
           ("method", "ks_fraction"): m["two_sample"]["forget"]["ks_fraction"],
           ("method", "mw_fraction"): m["two_sample"]["forget"]["mw_fraction"],
           ("method", "ulira_accuracy"): m["ulira"]["accuracy"], ("method", "final_score"): c["final_score"]}
    for k, want in PINNED.items():
        assert got[k] == pytest.approx(want, rel=1e-9, abs=1e-15), k


def test_report_equals_independent_computation(gap_report):
    uri, rep = gap_report
    store = RunStore(uri)
    ex = store.read_examples()
    split = np.asarray(ex.column("split").to_numpy(zero_copy_only=False)).astype(str)
    forget = np.asarray(ex.column("forget").to_numpy(zero_copy_only=False), dtype=bool)
    train = split == "train"
    sh = store.read_conf(roles=("shadow",))
    conf, member = sh.conf[:, train], sh.trained_on[:, train]
    partner = np.array([1, 0, 3, 2, 5, 4, 7, 6])
    lira = rep["lira"]
    assert lira["variance"] == "global"  # 3 references per side after leaving a pair out
    for mode in ("online", "offline", "global"):
        s = lira_leave_pair_out(conf, member, partner, mode=mode, variance="global").ravel()
        fpr, tpr = roc_loop(s, member.ravel()).T
        got = lira["modes"][mode]
        assert got["auc"] == float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
        assert got["tpr_at_fpr"]["0.01"] == tpr[fpr < 0.01][-1]
        if mode == "online":
            online = s.reshape(member.shape)
    rs = rmia_leave_pair_out(conf, member, partner, sh.conf[:, split == "test"]).ravel()
    fpr, tpr = roc_loop(rs, member.ravel()).T
    assert lira["rmia"]["auc"] == float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    vul = pq.read_table(os.path.join(uri, "report", "per_example_lira.parquet")).column("vulnerability").to_numpy()
    want = pair_vulnerability_loop(online, member, np.broadcast_to(partner[:, None], member.shape))
    np.testing.assert_allclose(vul, want, rtol=0, atol=1e-12)

    (m,) = rep["methods"].values()
    u = store.read_conf(roles=("unlearned",))
    r = store.read_conf(roles=("retrain",))
    u0, r0 = u.conf[:, forget, 0].astype(np.float64), r.conf[:, forget, 0].astype(np.float64)
    assert m["competition"]["forgetting_quality"] == forgetting_quality(u0, r0)
    ks_p = [stats.ks_2samp(u0[:, e], r0[:, e]).pvalue for e in range(u0.shape[1])]
    mw_p = [stats.mannwhitneyu(u0[:, e], r0[:, e], alternative="two-sided").pvalue for e in range(u0.shape[1])]
    assert m["two_sample"]["forget"]["ks_fraction"] == pytest.approx(bh_step_up_loop(ks_p, 0.05).mean(), abs=1e-12)
    assert m["two_sample"]["forget"]["mw_fraction"] == pytest.approx(bh_step_up_loop(mw_p, 0.05).mean(), abs=1e-12)
    parents = [store.markers()[i]["parent"] for i in u.model_ids]
    ul = ulira_attack(u.conf[:, forget], r.conf[:, forget], folds=2, seed=0, groups_unlearned=parents)
    assert m["ulira"]["accuracy"] == ul["accuracy"]
    assert m["utility"]["unlearned"]["retain"] == {"mean": 0.9, "std": 0.0, "n": 8} and m["cost"]["ratio"] == 1.0
