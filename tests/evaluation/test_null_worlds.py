"""Worlds with a known truth: every statistic of `ufarm evaluate` reads chance where nothing leaks and the
closed form where the gap is known, within the precision the report states; intervals hold their coverage
over repeated draws."""
import numpy as np
import pytest
from scipy import stats

from evaluation.lira import lira_leave_pair_out
from evaluation.precision import (DRAW_GROUPS, assign_groups, equal_count_f, jackknife_se, jackknife_stat,
                                  t_interval)
from evaluation.roc import roc_jackknife
from evaluation.report import evaluate_store
from evaluation.ulira import ulira_attack
from farm.store import RunStore
from synthetic_store import build_store


def _within(x, target, se, k=3.0):
    return abs(x - target) <= k * se


@pytest.fixture(scope="module")
def null_report(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("null") / "run")
    build_store(uri, seed=11)
    return evaluate_store(uri, n_boot=20, max_examples=None, progress=False)


def test_no_signal_reads_chance(null_report):
    rep = null_report
    lira = rep["lira"]
    assert lira["references"].startswith("leave-pair-out")
    for name, v in list(lira["modes"].items()) + [("rmia", lira["rmia"])]:
        assert _within(v["auc"], 0.5, v["auc_se"]), (name, v["auc"], v["auc_se"])
        assert v["auc_ci"][0] <= v["auc"] <= v["auc_ci"][1]
        assert v["tpr_at_fpr"]["0.01"] < 0.03  # TPR = FPR by chance
    vul = lira["vulnerability"]
    assert _within(vul["mean"], 0.5, vul["mean_se"]), vul
    n = lira["n_train_examples"]
    chance = vul["chance_fraction_ge_0.9"]
    assert vul["fraction_ge_0.9"] <= chance + 4 * np.sqrt(chance / n) + 1 / n
    (key, m), = rep["methods"].items()
    assert m["n_originals"] == 24 and "dependence" not in m
    ec = m["competition"]["equal_count"]
    assert ec["ratio_ci"][0] <= 1.0 <= ec["ratio_ci"][1], ec  # F / F_null reads 1
    assert _within(ec["ratio"], 1.0, ec["ratio_se"])
    for name in ("forget", "retain_control", "test_control"):
        assert m["two_sample"][name]["ks_fraction"] <= 0.05 and m["two_sample"][name]["mw_fraction"] <= 0.05
        assert abs(m["ulira"][name]["accuracy"] - 0.5) < 0.03, (name, m["ulira"][name])


def test_siblings_are_flagged_and_handled(tmp_path):
    """Unlearned models from 4 originals (6 each) whose shared part is 80% of the variance: still no
    leak, so the grouped U-LiRA and the tests on one model per original read chance."""
    uri = str(tmp_path / "run")
    build_store(uri, n_shadow=4, n_originals=4, sibling_share=0.8, seed=5)
    rep = evaluate_store(uri, n_boot=8, max_examples=None, progress=False)
    (key, m), = rep["methods"].items()
    assert m["n_originals"] == 4 and "24 unlearned models come from 4 original(s)" in m["dependence"]
    assert any("come from 4 original" in x for x in rep["messages"])
    for name in ("forget", "retain_control", "test_control"):
        assert abs(m["ulira"][name]["accuracy"] - 0.5) < 0.03, (name, m["ulira"][name])
    one = m["one_per_original"]
    assert one["n_unlearned"] == 4
    for name in ("forget", "retain_control", "test_control"):
        assert one["two_sample"][name]["ks_fraction"] <= 0.05
    # what the grouping prevents: folds that mix siblings recognise the original, on test examples too
    store = RunStore(uri)
    test = np.asarray(store.read_examples().column("split").to_numpy(zero_copy_only=False)).astype(str) == "test"
    u, r = store.read_conf(roles=("unlearned",)), store.read_conf(roles=("retrain",))
    assert ulira_attack(u.conf[:, test], r.conf[:, test], folds=2, seed=0)["accuracy"] > 0.55


def test_known_gap_matches_closed_form(tmp_path):
    """IN adds d to the confidence (unit noise): the likelihood-ratio attack separates one IN from one OUT
    draw with AUC Phi(d / sqrt(2))."""
    uri = str(tmp_path / "run")
    d = 1.0
    build_store(uri, n_train=1000, n_test=200, n_shadow=32, n_retrain=4, n_unlearned=4, n_originals=4, gap=d,
                seed=3)
    rep = evaluate_store(uri, n_boot=4, max_examples=50, progress=False)
    truth = float(stats.norm.cdf(d / np.sqrt(2)))
    for mode in ("online", "offline"):
        v = rep["lira"]["modes"][mode]
        assert abs(v["auc"] - truth) < 0.025, (mode, v["auc"], truth)
    assert rep["lira"]["vulnerability"]["mean"] > 0.7


def test_auc_interval_coverage_over_repeated_null_worlds():
    """95% two-way jackknife intervals of the leave-pair-out AUC contain 0.5 in at least 95% of no-signal
    worlds (the examples fixed, the shadows drawn anew); over target pairs alone they covered about 0.8."""
    hits, reps = 0, 100
    base = np.random.default_rng(999).normal(0, 1.5, 300)
    for seed in range(reps):
        rng = np.random.default_rng(seed)
        m, e = 8, 300
        mask = np.empty((m, e), bool)
        mask[0::2] = rng.random((m // 2, e)) < 0.5
        mask[1::2] = ~mask[0::2]
        conf = base + rng.normal(0, 1, (m, e))
        partner = np.arange(m) ^ 1
        scores = lira_leave_pair_out(conf, mask, partner, variance="global")
        groups, g = assign_groups(np.minimum(np.arange(m), partner), 10, seed)
        ex_groups, ge = assign_groups(np.arange(e), 10, seed + 1)
        fig = roc_jackknife(scores.ravel(), mask.ravel(), [(np.repeat(groups, e), g), (np.tile(ex_groups, m), ge)],
                            (0.01,), np.array([0.1]))
        lo, hi = t_interval(fig["auc"], fig["auc_se"], fig["dof"])
        hits += lo <= 0.5 <= hi
    assert hits / reps >= 0.92, hits / reps


def _median_gap(a, b):  # a cheap statistic of two model sets that depends on their size, like F
    return float(np.mean(np.abs(np.median(a, 0) - np.median(b, 0))))


def test_equal_count_and_jackknife_coverage_over_repeated_draws():
    """Equal-count means (4 groups, 20 draws) and the all-model jackknife (10 groups) hold 95% coverage of
    the statistic's expectation over repeated pools of 32 + 32 models."""
    e, n_r, n_u, n = 40, 32, 32, 12

    def pool(rng, k):
        return rng.normal(size=(k, e)) + rng.normal(scale=0.3, size=(k, 1))

    rng = np.random.default_rng(0)
    truth_null = np.mean([_median_gap(pool(rng, n), pool(rng, n)) for _ in range(2000)])
    truth_all = np.mean([_median_gap(pool(rng, n_u) + 0.1, pool(rng, n_r)) for _ in range(2000)])
    cover_null = cover_all = 0
    reps = 120
    for rep in range(reps):
        r, u = pool(rng, n_r), pool(rng, n_u) + 0.1
        gr, g = assign_groups(np.arange(n_r), DRAW_GROUPS, rep)
        res = equal_count_f(_median_gap, r, gr, g, n, 20, rep)
        lo, hi = t_interval(res["mean"], res["se"], g - 1)
        cover_null += lo <= truth_null <= hi
        gu, g10 = assign_groups(np.arange(n_u), 10, rep + 1)
        gr10, _ = assign_groups(np.arange(n_r), 10, rep + 2)
        est, reps_ = jackknife_stat(_median_gap, u, r, gu, gr10, g10)
        lo, hi = t_interval(est, jackknife_se(reps_), g10 - 1)
        cover_all += lo <= truth_all <= hi
    assert cover_null / reps >= 0.9, cover_null / reps
    assert cover_all / reps >= 0.9, cover_all / reps


def test_equal_count_draws_are_disjoint_and_leave_out_one_group():
    seen = []

    def record(a, b):
        seen.append((a.copy(), b.copy()))
        return float(len(seen))

    r = np.arange(20, dtype=float)[:, None] * np.ones((1, 3))
    gr, g = assign_groups(np.arange(20), 4, 0)
    res = equal_count_f(record, r, gr, g, 7, 8, 1)
    assert res["mean"] == pytest.approx(np.mean(np.arange(1, 9))) and res["n"] == 7
    for s, (a, b) in enumerate(seen):
        ia, ib = a[:, 0].astype(int), b[:, 0].astype(int)
        assert ia.size == ib.size == 7 and not set(ia) & set(ib)
        assert not (gr[ia] == s % g).any() and not (gr[ib] == s % g).any()
    with pytest.raises(ValueError, match="needs 16 retrained models outside each jackknife group"):
        equal_count_f(record, r, gr, g, 8, 4, 0)


def test_shadows_without_pairs_are_matched_at_random_and_said(tmp_path):
    """A broken pair (one shadow's marker gone): per-example random matching, named in the report, still
    reading chance where nothing leaks."""
    import os

    uri = str(tmp_path / "run")
    build_store(uri, n_shadow=10, n_retrain=4, n_unlearned=4, n_originals=4, seed=2)
    os.remove(os.path.join(uri, "models", "shadow-00009.json"))
    rep = evaluate_store(uri, n_boot=4, max_examples=20, progress=False)
    lira = rep["lira"]
    assert lira["n_usable_shadows"] == 9 and lira["references"].startswith("the shadows are not all in")
    assert any(x.startswith("LiRA: the shadows are not all in complementary pairs") for x in rep["messages"])
    v = lira["modes"]["online"]
    assert _within(v["auc"], 0.5, v["auc_se"]) and v["n_cells"] == 9 * 600 - 600  # 4 matched pairs per example
    assert "complementary pairs" in lira["rmia"]["message"]
    assert _within(lira["vulnerability"]["mean"], 0.5, lira["vulnerability"]["mean_se"])


def test_precision_helpers_against_direct_formulas():
    labels = np.array(["a", "a", "b", "c", "c", "c", "d", "e"])
    groups, g = assign_groups(labels, 3, 0)
    assert g == 3 and all(len(set(groups[labels == x])) == 1 for x in set(labels))  # labels stay whole
    assert sorted(np.bincount([groups[labels == x][0] for x in sorted(set(labels))])) == [1, 2, 2]
    reps = np.array([0.30, 0.28, 0.35, 0.31])
    want = np.sqrt(3 / 4 * sum((x - reps.mean()) ** 2 for x in reps))
    assert jackknife_se(reps) == pytest.approx(want) and np.isnan(jackknife_se(reps[:1]))
    lo, hi = t_interval(0.5, 0.1, 9, lo=0.0, hi=1.0)
    assert (lo, hi) == pytest.approx((0.5 - 0.1 * stats.t.ppf(0.975, 9), 0.5 + 0.1 * stats.t.ppf(0.975, 9)))
    assert t_interval(0.99, 0.1, 9, lo=0.0, hi=1.0)[1] == 1.0  # clipped, still containing the estimate
    from evaluation.precision import models_needed

    assert models_needed(64, 0.01, 0.01) == int(np.ceil(64 * 1.959963984540054 ** 2))
    assert models_needed(64, float("nan"), 0.01) is None
