import numpy as np
import pytest
from scipy import stats

from evaluation.rmia import rmia_leave_one_out, rmia_scores
from evaluation.twosample import benjamini_hochberg, per_example_tests
from evaluation.ulira import ulira_accuracy, ulira_attack
from evaluation_loops import bh_step_up_loop, rmia_loop


def test_rmia_matches_loop_and_loo():
    rng = np.random.default_rng(0)
    m, e, z = 8, 30, 40
    mask = rng.random((m, e)) < 0.5
    mask[:2] = False
    c = rng.normal(0, 1, (m, e)) + mask
    pop = rng.normal(0, 1, (m, z))
    got = rmia_scores(c[2], c[3:], mask[3:], pop[2], pop[3:], a=0.3)
    np.testing.assert_allclose(got, rmia_loop(c[2], c[3:], mask[3:], pop[2], pop[3:], 0.3, 1.0))
    loo = rmia_leave_one_out(c, mask, pop, a=0.3)
    for t in (0, 4):
        ref = rmia_scores(c[t], np.delete(c, t, 0), np.delete(mask, t, 0), pop[t], np.delete(pop, t, 0), a=0.3)
        np.testing.assert_allclose(loo[t], ref, atol=1e-12)


def test_rmia_detects_members():
    rng = np.random.default_rng(1)
    m, e = 32, 2000
    mask = np.zeros((m, e), bool)
    mask[np.argsort(rng.random((m, e)), axis=0)[: m // 2], np.arange(e)] = True
    c = rng.normal(0, 1, (m, e)) + 1.5 * mask
    pop = rng.normal(0, 1, (m, 500))
    s = rmia_leave_one_out(c, mask, pop)
    from evaluation.lira import roc_metrics
    assert roc_metrics(s.ravel(), mask.ravel())["auc"] > 0.75
    with pytest.raises(ValueError, match="at least 2 OUT"):
        rmia_leave_one_out(c, np.ones_like(mask), pop)


def test_two_sample_tests_match_scipy_loop():
    rng = np.random.default_rng(2)
    u = rng.normal(0, 1, (30, 20))
    r = rng.normal(0, 1, (25, 20))
    r[:, :5] += 2  # differ
    u[:, 19] = r[:30 - 5, 19].mean()  # constant group
    res = per_example_tests(u, r)
    for e in range(20):
        ks = stats.ks_2samp(u[:, e], r[:, e])
        mw = stats.mannwhitneyu(u[:, e], r[:, e], alternative="two-sided")
        assert res["ks_p"][e] == pytest.approx(ks.pvalue) and res["ks_stat"][e] == pytest.approx(ks.statistic)
        assert res["mw_p"][e] == pytest.approx(mw.pvalue) and res["mw_stat"][e] == pytest.approx(mw.statistic)
    assert res["ks_reject"][:5].all() and res["mw_reject"][:5].all()
    same = per_example_tests(u, u.copy())
    assert same["ks_fraction"] == 0 and same["mw_fraction"] == 0


def test_benjamini_hochberg_against_the_step_up_rule():
    rng = np.random.default_rng(3)
    for m in (1, 2, 10, 333):
        for q in (0.05, 0.2):
            p = np.concatenate([rng.uniform(0, 1, m), rng.uniform(0, 2e-3, m // 5 + 1), [0.05, 0.05]])
            p[::7] = p[1]  # ties between p-values
            np.testing.assert_array_equal(benjamini_hochberg(p, q), bh_step_up_loop(p.tolist(), q))
    assert not benjamini_hochberg(np.ones(5)).any() and benjamini_hochberg(np.zeros(0)).shape == (0,)
    assert benjamini_hochberg(np.array([0.04]), 0.05).all() and not benjamini_hochberg(np.array([0.06]), 0.05).any()


def test_ulira_gaussian_world():
    rng = np.random.default_rng(4)
    e = 400
    same = ulira_accuracy(rng.normal(0, 1, (40, e)), rng.normal(0, 1, (40, e)))
    assert abs(same - 0.5) < 0.03
    # unlearned ~ N(1, 1), retrained ~ N(0, 1): the ideal balanced accuracy is Phi(1/2)
    res = ulira_attack(rng.normal(1, 1, (60, e, 1)), rng.normal(0, 1, (60, e, 1)), folds=3)
    assert abs(res["accuracy"] - stats.norm.cdf(0.5)) < 0.03 and res["per_example_accuracy"].shape == (e,)
    sep = ulira_accuracy(rng.normal(0, 1, (8, 10)) + 100, rng.normal(0, 1, (8, 10)))
    assert sep == 1.0
    with pytest.raises(ValueError, match="at least 4 unlearned"):
        ulira_accuracy(rng.normal(0, 1, (3, 10)), rng.normal(0, 1, (8, 10)))
