import numpy as np
import pytest
from scipy import stats

from evaluation.lira import lira_leave_one_out, lira_scores, roc_curve, roc_metrics
from evaluation.scores import logit_scaled_confidence
from evaluation_loops import auc_pairs, lira_loop, roc_loop


def _shadows(rng, m=12, e=40, q=2, gap=1.0):
    mask = rng.random((m, e)) < 0.5
    mask[:2] = True
    mask[2:4] = False
    conf = rng.normal(0, 1, (m, e, q)) + gap * mask[..., None]
    conf[:, 0, :] = 0.5  # a group with zero range
    conf[:, 1, :] = np.round(conf[:, 1, :])  # ties
    return conf, mask


@pytest.mark.parametrize("mode", ["online", "offline", "global"])
def test_lira_scores_match_loop(mode):
    conf, mask = _shadows(np.random.default_rng(0))
    for t in (0, 5):
        oth = np.arange(len(conf)) != t
        got = lira_scores(conf[t], conf[oth], mask[oth], mode=mode)
        np.testing.assert_allclose(got, lira_loop(conf[t], conf[oth], mask[oth], mode), rtol=1e-9, atol=1e-9)
    got = lira_scores(conf[3, :, 0], conf[4:, :, 0], mask[4:], mode=mode)
    np.testing.assert_allclose(got, lira_loop(conf[3, :, 0], conf[4:, :, 0], mask[4:], mode), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode", ["online", "offline", "global"])
def test_leave_one_out_matches_refit(mode):
    conf, mask = _shadows(np.random.default_rng(1), m=9)
    loo = lira_leave_one_out(conf, mask, mode=mode, chunk=7, workers=2)
    for t in range(len(conf)):
        oth = np.arange(len(conf)) != t
        ref = lira_scores(conf[t], conf[oth], mask[oth], mode=mode)
        np.testing.assert_allclose(loo[t], ref, rtol=1e-9, atol=1e-9)


def test_leave_one_out_global_variance_and_single_query():
    conf, mask = _shadows(np.random.default_rng(2), m=10, q=1)
    s = lira_leave_one_out(conf[..., 0], mask, mode="online", variance="global")
    assert s.shape == (10, 40) and np.isfinite(s).all()


def test_global_variance_pools_centred_groups():
    rng = np.random.default_rng(3)
    conf, mask = _shadows(rng, m=10, q=1)
    x = conf[0, :, 0]
    sh, mk = conf[1:, :, 0], mask[1:]
    got = lira_scores(x, sh, mk, mode="offline", variance="global")
    dev = [sh[~mk[:, e], e] - sh[~mk[:, e], e].mean() for e in range(sh.shape[1])]
    sd = np.sqrt(np.mean(np.concatenate(dev) ** 2))
    mu = np.array([np.median(sh[~mk[:, e], e]) for e in range(sh.shape[1])])
    np.testing.assert_allclose(got, stats.norm.logcdf(x, mu, sd + 1e-30), rtol=1e-9)


def test_gaussian_world_auc():
    # IN ~ N(mu, 1), OUT ~ N(0, 1) for every example: the ideal AUC is Phi(mu / sqrt 2) for the
    # global attack; online LiRA with many shadows gets close to the same value
    rng = np.random.default_rng(4)
    mu, m, e = 1.0, 64, 3000
    mask = np.zeros((m, e), bool)
    mask[np.argsort(rng.random((m, e)), axis=0)[: m // 2], np.arange(e)] = True
    conf = rng.normal(0, 1, (m, e)) + mu * mask
    ideal = stats.norm.cdf(mu / np.sqrt(2))
    g = roc_metrics(lira_leave_one_out(conf, mask, mode="global").ravel(), mask.ravel())
    assert abs(g["auc"] - ideal) < 0.01
    on = roc_metrics(lira_leave_one_out(conf, mask, mode="online").ravel(), mask.ravel())
    assert abs(on["auc"] - ideal) < 0.02
    off = roc_metrics(lira_leave_one_out(conf, mask, mode="offline").ravel(), mask.ravel())
    assert abs(off["auc"] - ideal) < 0.02


def test_roc_metrics_against_brute_force():
    rng = np.random.default_rng(5)
    s = np.round(rng.normal(0, 1, 400), 1)  # many ties
    y = rng.random(400) < 0.4
    s[y] += 0.5
    fpr, tpr, _ = roc_curve(s, y)
    pts = roc_loop(s, y)
    np.testing.assert_allclose(np.c_[fpr, tpr], pts)
    res = roc_metrics(s, y, fprs=(0.01, 0.1, 0.5))
    assert res["auc"] == pytest.approx(auc_pairs(s, y), abs=1e-12)
    assert res["accuracy"] == pytest.approx(np.max((pts[:, 1] + 1 - pts[:, 0]) / 2))
    for a, v in res["tpr_at_fpr"].items():
        assert v == pts[pts[:, 0] < a][-1, 1]


def test_roc_edge_cases():
    y = np.array([True, True, False, False])
    assert roc_metrics(np.array([3.0, 2.0, 1.0, 0.0]), y)["auc"] == 1.0
    res = roc_metrics(np.zeros(4), y)
    assert res["auc"] == 0.5 and res["accuracy"] == 0.5 and res["tpr_at_fpr"][1e-3] == 0.0
    with pytest.raises(ValueError, match="at least 1 member"):
        roc_metrics(np.zeros(3), np.zeros(3, bool))


def test_too_few_shadows_and_bad_input():
    conf, mask = _shadows(np.random.default_rng(6), m=6)
    mask[:, 7] = False
    with pytest.raises(ValueError, match="at least 1 IN"):
        lira_scores(conf[0], conf[1:], mask[1:])
    with pytest.raises(ValueError, match="at least 2 IN"):
        lira_leave_one_out(conf, mask)
    lira_leave_one_out(conf, mask, mode="offline")  # offline needs OUT shadows only
    bad = conf.copy()
    bad[2, 3, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        lira_leave_one_out(bad, mask, mode="offline")
    with pytest.raises(ValueError, match="mode"):
        lira_scores(conf[0], conf[1:], mask[1:], mode="bogus")
    with pytest.raises(ValueError, match="shape"):
        lira_scores(conf[0, :5], conf[1:], mask[1:])


def test_logit_scaled_confidence():
    rng = np.random.default_rng(7)
    logits = rng.normal(0, 3, (5, 7, 4))
    labels = rng.integers(0, 4, (5, 7))
    got = logit_scaled_confidence(logits, labels)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    py = np.take_along_axis(p, labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(got, np.log(py) - np.log(1 - py), rtol=1e-9)
