import numpy as np
import pytest
from scipy import stats

from evaluation.lira import (gaussian_check, lira_leave_one_out, lira_leave_pair_out, lira_scores, random_partners,
                             roc_metrics)
from evaluation.rmia import rmia_leave_pair_out
from evaluation.ulira import group_folds, ulira_attack
from evaluation.lira import pair_vulnerability, pair_vulnerability_null  # re-exported from evaluation.vulnerability
from evaluation_loops import (lira_pair_loop, normal_rejections_loop, pair_vulnerability_loop, rmia_pair_loop,
                              ulira_grouped_loop)


def _pairs(rng, m, e):
    """Complementary pairs: shadow 2k+1 is IN exactly where shadow 2k is OUT."""
    mask = np.empty((m, e), bool)
    mask[0::2] = rng.random((m // 2, e)) < 0.5
    mask[1::2] = ~mask[0::2]
    return mask, np.arange(m) ^ 1


def _with_ties(rng, mask, q=2, gap=1.0):
    conf = rng.normal(0, 1, mask.shape + (q,)) + gap * mask[..., None]
    conf[:, 0, :] = 0.5  # a group with zero range
    conf[:, 1, :] = np.round(conf[:, 1, :])  # ties
    conf[:, 2, :] = np.where(mask[:, 2, None], 1.0, conf[:, 2, :])  # constant IN group
    return conf


def _random_world(rng, m=11, e=40, q=2):
    mask = rng.random((m, e)) < 0.5
    mask[:2] = True
    mask[2:4] = False
    partner = random_partners(mask, seed=3)
    partner[:, 5] = -1  # an example that is not scored at all
    mask[4:, 6] = False  # 2 IN shadows only ...
    partner[:, 6] = -1   # ... and not scored, so the online count check skips it
    return _with_ties(rng, mask, q), mask, partner


@pytest.mark.parametrize("mode", ["online", "offline", "global"])
def test_leave_pair_out_matches_refit_complementary(mode):
    rng = np.random.default_rng(0)
    mask, partner = _pairs(rng, 10, 40)
    conf = _with_ties(rng, mask)
    got = lira_leave_pair_out(conf, mask, partner, mode=mode, chunk=7, workers=2)
    for t in range(len(conf)):
        oth = (np.arange(len(conf)) != t) & (np.arange(len(conf)) != partner[t])
        ref = lira_scores(conf[t], conf[oth], mask[oth], mode=mode)
        np.testing.assert_allclose(got[t], ref, rtol=1e-10, atol=1e-10)
    if mode != "global":
        glob = lira_leave_pair_out(conf, mask, partner, mode=mode, variance="global", chunk=9)
        ref = lira_pair_loop(conf, mask, np.broadcast_to(partner[:, None], mask.shape), mode, "global")
        np.testing.assert_allclose(glob, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["online", "offline", "global"])
def test_leave_pair_out_matches_refit_random_partners(mode):
    conf, mask, partner = _random_world(np.random.default_rng(1))
    got = lira_leave_pair_out(conf, mask, partner, mode=mode, chunk=6)
    ref = np.full(got.shape, np.nan)
    for t in range(len(conf)):
        for e in range(conf.shape[1]):
            p = partner[t, e]
            if p >= 0:
                oth = (np.arange(len(conf)) != t) & (np.arange(len(conf)) != p)
                ref[t, e] = lira_scores(conf[t, e:e + 1], conf[oth, e:e + 1], mask[oth, e:e + 1], mode=mode)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)  # NaN exactly where partner is -1
    assert np.isnan(got[:, 5]).all() and np.isnan(got[:, 6]).all()
    for variance in ("per_example", "global"):
        got = lira_leave_pair_out(conf, mask, partner, mode=mode, variance=variance, workers=1)
        np.testing.assert_allclose(got, lira_pair_loop(conf, mask, partner, mode, variance), rtol=1e-10, atol=1e-10)


def test_random_partners_properties():
    rng = np.random.default_rng(2)
    mask = rng.random((9, 300)) < 0.3
    p = random_partners(mask, seed=5)
    assert p.shape == mask.shape and p.dtype == np.int64
    np.testing.assert_array_equal(p, random_partners(mask, seed=5))
    for e in range(mask.shape[1]):
        n_in = int(mask[:, e].sum())
        matched = [t for t in range(9) if p[t, e] >= 0]
        assert len(matched) == 2 * min(n_in, 9 - n_in)
        for t in matched:
            assert p[p[t, e], e] == t and mask[p[t, e], e] != mask[t, e]
    # every IN/OUT matching is equally likely: 2 IN x 2 OUT has 2 matchings
    two = np.array([True, True, False, False])[:, None].repeat(4000, 1)
    first = random_partners(two, seed=7)[0]
    assert set(first.tolist()) == {2, 3} and abs((first == 2).mean() - 0.5) < 0.03


def test_null_world_pair_out_is_unbiased_and_one_out_is_not():
    # no membership signal, per-example means differ; 12000 examples: the per-example statistics are
    # correlated within an example (shared references), the mean's sd is about 0.003 at M = 8
    for m in (8, 16):
        rng = np.random.default_rng(10 + m)
        e = 12000
        mask, partner = _pairs(rng, m, e)
        conf = rng.normal(0, 1.5, (1, e)) + rng.normal(0, 1, (m, e))
        lpo = lira_leave_pair_out(conf, mask, partner)
        assert abs(roc_metrics(lpo.ravel(), mask.ravel())["auc"] - 0.5) < 0.015
        assert abs(np.nanmean(pair_vulnerability(lpo, mask, partner)) - 0.5) < 0.01
        if m == 8:  # a target IN has 3 IN and 4 OUT references, a target OUT 4 IN and 3 OUT
            assert roc_metrics(lira_leave_one_out(conf, mask).ravel(), mask.ravel())["auc"] < 0.49


def test_known_gap_world():
    # IN ~ N(mu_e + d, 1), OUT ~ N(mu_e, 1): comparing one IN and one OUT draw gives Phi(d / sqrt 2)
    rng = np.random.default_rng(4)
    d, m, e = 1.0, 64, 2000
    mask, partner = _pairs(rng, m, e)
    conf = rng.normal(0, 1.5, (1, e)) + rng.normal(0, 1, (m, e)) + d * mask
    s = lira_leave_pair_out(conf, mask, partner, variance="global")
    assert abs(roc_metrics(s.ravel(), mask.ravel())["auc"] - stats.norm.cdf(d / np.sqrt(2))) < 0.02


def test_pair_vulnerability_matches_loop():
    rng = np.random.default_rng(5)
    mask = rng.random((10, 60)) < 0.5
    partner = random_partners(mask, seed=1)
    partner[:, 0] = -1  # no pair: NaN
    # an asymmetric partner: 0 -> o, o -> -1 (the pair {0, o} still counts once)
    o = next(t for t in range(10) if mask[t, 1] != mask[0, 1])
    partner[:, 1] = -1
    partner[0, 1] = o
    scores = np.round(rng.normal(0, 1, mask.shape) + mask, 1)  # ties
    got = pair_vulnerability(scores, mask, partner)
    np.testing.assert_array_equal(got, pair_vulnerability_loop(scores, mask, partner))
    assert np.isnan(got[0]) and got[1] in (0.0, 0.5, 1.0)
    comp_mask, comp = _pairs(rng, 8, 30)
    s = rng.normal(0, 1, comp_mask.shape)
    np.testing.assert_array_equal(pair_vulnerability(s, comp_mask, comp),
                                  pair_vulnerability_loop(s, comp_mask, np.broadcast_to(comp[:, None], s.shape)))
    s[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN score"):
        pair_vulnerability(s, comp_mask, comp)


def test_pair_vulnerability_null_matches_pmf_sum():
    for n in (1, 4, 7, 10, 32):
        for thr in (0.0, 0.3, 0.5, 0.7, 0.75, 0.9, 1.0, 1.2):
            direct = sum(stats.binom.pmf(k, n, 0.5) for k in range(n + 1) if k / n >= thr)
            assert pair_vulnerability_null(n, thr) == pytest.approx(direct, abs=1e-14)
    assert pair_vulnerability_null(10, 0.7) == pytest.approx(176 / 1024)
    with pytest.raises(ValueError, match="n_pairs"):
        pair_vulnerability_null(0, 0.5)


def test_rmia_leave_pair_out_matches_loop():
    rng = np.random.default_rng(6)
    mask, partner = _pairs(rng, 8, 30)
    conf = rng.normal(0, 1, (8, 30, 2)) + mask[..., None]
    pop = rng.normal(0, 1, (8, 25, 2))
    for pc, a, gamma in ((pop, 0.3, 1.0), (None, 0.5, 1.2), (pop[..., 0], 1.0, 0.8)):
        c = conf if pc is None or pc.ndim == 3 else conf[..., 0]
        got = rmia_leave_pair_out(c, mask, partner, pc, a=a, gamma=gamma)
        np.testing.assert_allclose(got, rmia_pair_loop(c, mask, partner, pc, a, gamma), atol=1e-12)
    # per-example partners with constant rows are accepted; -1 gives a NaN row
    got = rmia_leave_pair_out(conf, mask, np.broadcast_to(partner[:, None], mask.shape), pop)
    np.testing.assert_array_equal(got, rmia_leave_pair_out(conf, mask, partner, pop))
    with pytest.raises(ValueError, match="varies across examples"):
        rmia_leave_pair_out(conf, mask, random_partners(mask, seed=0), pop)


def test_rmia_leave_pair_out_null_and_signal():
    rng = np.random.default_rng(7)
    m, e = 16, 2000
    mask, partner = _pairs(rng, m, e)
    base = rng.normal(0, 1.5, (1, e))
    conf = base + rng.normal(0, 1, (m, e))
    pop = rng.normal(0, 1.5, (1, 500)) + rng.normal(0, 1, (m, 500))
    s = rmia_leave_pair_out(conf, mask, partner, pop)
    assert abs(roc_metrics(s.ravel(), mask.ravel())["auc"] - 0.5) < 0.02
    s = rmia_leave_pair_out(conf + 1.5 * mask, mask, partner, pop)
    res = roc_metrics(s.ravel(), mask.ravel())
    assert res["auc"] > 0.7 and res["tpr_at_fpr"][1e-2] > 0


def test_ulira_groups_never_split_and_match_loop():
    rng = np.random.default_rng(8)
    for seed in range(20):
        ids = rng.integers(0, 9, 40)
        _, ids = np.unique(ids, return_inverse=True)
        parts = group_folds(np.random.default_rng(seed), ids, ids.max() + 1, 3)
        assert sorted(np.concatenate(parts).tolist()) == list(range(40))
        fold_of = np.empty(40, int)
        for k, part in enumerate(parts):
            fold_of[part] = k
        for g in range(ids.max() + 1):
            assert len(set(fold_of[ids == g].tolist())) == 1
    parents = np.array(["a", "b", "c", "d", "e"])[rng.integers(0, 5, 14)]
    parents[:5] = ["a", "b", "c", "d", "e"]
    u = rng.normal(0.3, 1, (14, 25))
    r = rng.normal(0, 1, (9, 25))
    res = ulira_attack(u, r, folds=2, seed=4, groups_unlearned=parents)
    ref = ulira_grouped_loop(u, r, parents, np.arange(9), 2, 4)
    np.testing.assert_allclose(res["per_example_accuracy"], ref, atol=1e-12)
    assert res["n_groups_unlearned"] == 5 and res["n_groups_retrained"] == 9
    # without groups: unchanged, and the same as one group per model
    plain = ulira_attack(u, r, folds=2, seed=4)
    same = ulira_attack(u, r, folds=2, seed=4, groups_unlearned=np.arange(14))
    np.testing.assert_array_equal(plain["per_example_accuracy"], same["per_example_accuracy"])
    assert plain["n_groups_unlearned"] == 14
    with pytest.raises(ValueError, match="needs at least 4 distinct groups of unlearned models .*got 2"):
        ulira_attack(u, r, groups_unlearned=np.array([0, 1] * 7))
    with pytest.raises(ValueError, match="needs at least 4 distinct groups of retrained models .*got 3"):
        ulira_attack(u, r, groups_unlearned=parents, groups_retrained=np.arange(9) % 3)
    with pytest.raises(ValueError, match="with 3 folds needs at least 6 distinct groups of unlearned models .*got 5"):
        ulira_attack(u, r, folds=3, groups_unlearned=parents)
    with pytest.raises(ValueError, match="one label per unlearned model"):
        ulira_attack(u, r, groups_unlearned=parents[:5])


def test_ulira_groups_remove_the_parent_bias():
    # null world: unlearned = parent effect + noise, with the marginal variance of the retrained models
    rng = np.random.default_rng(9)
    e, var_parent = 400, 0.9
    parents = np.repeat(np.arange(4), 8)
    u = rng.normal(0, np.sqrt(var_parent), (4, e))[parents] + rng.normal(0, np.sqrt(1 - var_parent), (32, e))
    r = rng.normal(0, 1, (32, e))
    grouped = ulira_attack(u, r, groups_unlearned=parents)["accuracy"]
    assert abs(grouped - 0.5) < 0.03
    assert ulira_attack(u, r)["accuracy"] > 0.55


def test_gaussian_check():
    rng = np.random.default_rng(11)
    mask, _ = _pairs(rng, 32, 2000)  # 16 IN and 16 OUT per example
    g = gaussian_check(rng.normal(0, 1, (32, 2000, 2)), mask)
    assert g["n_tested"] == 2000 and g["min_group_size"] == 8
    assert g["expected_either_by_chance"] == pytest.approx(0.0975)
    assert abs(g["fraction_either_rejected"] - 0.0975) < 0.03
    x = rng.exponential(1, (32, 2000))
    h = gaussian_check(x, mask)
    assert h["fraction_either_rejected"] > 0.5
    # unequal groups across examples, some too small, one constant group
    mask = rng.random((30, 300)) < rng.uniform(0.1, 0.9, 300)
    x = rng.standard_t(3, (30, 300))
    x[:, 0] = 1.0
    h = gaussian_check(x, mask, alpha=0.1)
    rin, rout = normal_rejections_loop(x, mask, 0.1)
    assert h["n_tested"] == len(rin) < 299
    assert h["fraction_in_rejected"] == rin.mean() and h["fraction_out_rejected"] == rout.mean()
    assert h["fraction_either_rejected"] == pytest.approx((rin | rout).mean())
    small = gaussian_check(x, np.arange(30)[:, None].repeat(300, 1) < 5)  # 5 IN shadows: not tested
    assert small["n_tested"] == 0 and np.isnan(small["fraction_either_rejected"])


def test_bad_partners():
    rng = np.random.default_rng(12)
    mask, partner = _pairs(rng, 6, 10)
    conf = rng.normal(0, 1, (6, 10))
    same = partner.copy()
    same[2] = 4  # shadows 2 and 4 have the same membership on some examples
    assert (mask[2] == mask[4]).any()
    with pytest.raises(ValueError, match="partner 4 of shadow 2 has the same membership on example"):
        lira_leave_pair_out(conf, mask, same)
    with pytest.raises(ValueError, match=r"partner\[3, 0\] = 3"):
        p = partner.copy()
        p[3] = 3
        lira_leave_pair_out(conf, mask, p)
    with pytest.raises(ValueError, match=r"partner\[0, 0\] = 6"):
        lira_leave_pair_out(conf, mask, np.r_[6, partner[1:]])
    with pytest.raises(ValueError, match="partner must have shape"):
        lira_leave_pair_out(conf, mask, partner[:4])
    with pytest.raises(ValueError, match="integer"):
        lira_leave_pair_out(conf, mask, partner.astype(float))
    with pytest.raises(ValueError, match="same membership"):
        rmia_leave_pair_out(conf, mask, same)
    few = np.zeros((4, 10), bool)
    few[0] = True  # 1 IN shadow per example
    few[[0, 2], 3:] = [[False], [True]]  # from example 3 on, shadow 2 is the only IN one
    with pytest.raises(ValueError, match=r"at least 2 IN shadows \(leave-pair-out removes one of each\) for every "
                                         r"example; example 3 has 1 \(and 7 examples are short\)"):
        p = np.full((4, 10), -1)
        p[1, 3:], p[2, 3:] = 2, 1  # examples 0-2 (1 IN shadow too) have no scored cell: not checked
        lira_leave_pair_out(conf[:4], few, p)
    off = lira_leave_pair_out(conf[:4], few, p, mode="offline")  # offline needs OUT shadows only
    assert np.isfinite(off[[1, 2], 3:]).all() and np.isnan(off[:, :3]).all()
