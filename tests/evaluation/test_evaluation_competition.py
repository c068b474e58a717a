import math

import numpy as np
import pytest

from evaluation.competition import (double_thresholds, epsilon_table, final_score, forgetting_quality,
                                    forgetting_quality_from_epsilons, forgetting_quality_null,
                                    per_example_epsilons, single_thresholds)
from evaluation_loops import epsilons_loop, forgetting_quality_loop


def _world(rng, n=24, e=12, shift=0.4):
    base = rng.normal(0, 2, e)
    u = rng.normal(0, 1, (n, e)) * rng.uniform(0.5, 2, e) + base
    r = rng.normal(shift, 1, (n, e)) * rng.uniform(0.5, 2, e) + base
    return u, r


def test_matches_per_example_loop_on_random_inputs():
    rng = np.random.default_rng(1)
    u, r = _world(rng, n=24, e=10)
    np.testing.assert_array_equal(per_example_epsilons(u, r), epsilons_loop(u, r))


def test_matches_loop_with_unequal_counts_and_edge_cases():
    rng = np.random.default_rng(2)
    u, r = _world(rng, n=16, e=9)
    r = np.concatenate([r, r[:3] + 0.1])  # 16 unlearned, 19 retrained
    u[:, 0] = r[:16, 0]  # identical samples
    u[:, 1], r[:, 1] = np.round(u[:, 1]), np.round(r[:, 1])  # ties
    u[:, 2] = 1.5  # a group with zero range -> ratio < 0.01 -> 50
    u[:, 3], r[:, 3] = 2.0, 2.0  # both constant and equal
    u[:, 4] = r[:16, 4] + 100  # perfectly separated
    u[:, 5] = 0.25 * np.arange(16)
    r[:, 5] = 0.25 * np.arange(19) - 1.0  # values on a binary grid
    got = per_example_epsilons(u, r)
    np.testing.assert_array_equal(got, epsilons_loop(u, r))
    assert got[2] == 50 and got[4] == 50 and got[3] == 0


def test_exhaustive_is_an_upper_bound():
    rng = np.random.default_rng(3)
    u, r = _world(rng, n=20, e=15, shift=0.8)
    grid = per_example_epsilons(u, r)
    ex = per_example_epsilons(u, r, exhaustive=True)
    assert (ex >= grid).all() and (ex > grid).any()


def test_float32_rates_change_eps_by_less_than_1e5():
    # the released code averages the rates in float32; emulate that and compare
    rng = np.random.default_rng(4)
    u, r = _world(rng, n=30, e=8)
    n = 30
    k = np.arange(n + 1)
    f32 = (k.astype(np.float32) / np.float32(n)).astype(np.float32)
    f64 = k / n
    assert np.max(np.abs(f32.astype(np.float64) - f64)) < 1e-7
    t64 = epsilon_table(n, n)
    fpr = f32[None, :]
    fnr = (np.float32(1) - f32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        e32 = np.fmax(np.log(1 - 1e-5 - fpr) - np.log(fnr), np.log(1 - 1e-5 - fnr) - np.log(fpr))
    finite = np.isfinite(t64) & np.isfinite(e32) & (t64 > 0)
    assert np.max(np.abs(np.maximum(e32, 0)[finite] - t64[finite])) < 1e-5


def test_single_grid_is_torchs_float32_linspace():
    # values printed by torch 2.14 CPU: torch.linspace(torch.tensor(lo, dtype=float64), hi, n)
    lo, hi = 0.1234567891234, 7.3456789123
    g = single_thresholds(lo, hi)
    assert g.size == math.ceil((hi - lo) * 100) == 723
    assert g[0] == np.float32(lo) and g[-1] == np.float32(hi)
    assert (np.diff(g) > 0).all() and (g.astype(np.float32) == g).all()
    assert single_thresholds(1.0, 1.0).size == 0
    np.testing.assert_array_equal(single_thresholds(0.3, 0.30001), [np.float32(0.3)])


def test_double_grid_matches_scalar_linspace_calls():
    lo, hi = -1.2345678, 0.987654321
    w = hi - lo
    right, left = double_thresholds(lo, hi, w)
    assert right.size in (400, 401)
    min_ = lo + w - 2.0
    max_ = hi + 2.0
    np.testing.assert_array_equal(right, np.linspace(min_, max_, num=int(np.ceil((max_ - min_) * 100))))
    for k in (0, 1, 57, right.size - 1):
        row = np.linspace(right[k] - w - 2.0, right[k] - w + 2.0, num=400)
        np.testing.assert_array_equal(left[:, k], row)


def test_forgetting_quality_buckets_match_loop():
    rng = np.random.default_rng(5)
    eps = np.concatenate([rng.uniform(0, 8, 200), [0, 0.5, 1.0, 2.0, 49.9, 50, 2.5, 3.0]])
    for n in (2, 3, 10, 512):
        assert forgetting_quality_from_epsilons(eps, n) == forgetting_quality_loop(eps, n)


def test_forgetting_quality_and_final_score():
    rng = np.random.default_rng(6)
    u, r = _world(rng, n=16, e=6)
    f = forgetting_quality(u, r)
    assert f == forgetting_quality_loop(epsilons_loop(u, r), 16)
    assert final_score(f, [0.9, 0.8], 0.7, 0.85, 0.75) == pytest.approx(f * (0.85 / 0.85) * (0.7 / 0.75))


def test_identical_and_separated_worlds():
    rng = np.random.default_rng(7)
    r = rng.normal(0, 1, (40, 5))
    assert forgetting_quality(r.copy(), r) == 1.0  # identical samples: eps = 0 everywhere
    assert forgetting_quality(r + 50, r) == 0.0  # separated: eps = 50


def test_null_calibration():
    rng = np.random.default_rng(8)
    r = rng.normal(0, 1, (24, 6))
    res = forgetting_quality_null(r, n_splits=5, seed=1)
    assert res["n_per_half"] == 12 and 0 <= res["f_null"] <= 1 and res["splits"].shape == (5,)
    # the mean over splits, each split an independent computation on disjoint halves
    rng1 = np.random.default_rng(1)
    want = []
    for _ in range(5):
        perm = rng1.permutation(24)
        want.append(forgetting_quality(r[np.sort(perm[:12])], r[np.sort(perm[12:])]))
    assert res["f_null"] == pytest.approx(np.mean(want)) and res["sd"] == pytest.approx(np.std(want, ddof=1))
    assert forgetting_quality_null(r, n_splits=3, n_per_side=5)["n_per_half"] == 5
    with pytest.raises(ValueError, match="n_per_side"):
        forgetting_quality_null(r, n_per_side=13)


@pytest.mark.parametrize("bad, msg", [
    (lambda u, r: (u[:1], r), "at least 2"),
    (lambda u, r: (u, r[:1]), "at least 2"),
    (lambda u, r: (u[:, :3], r), "examples"),
    (lambda u, r: (u[0], r), "shape"),
    (lambda u, r: (np.where(np.eye(*u.shape, dtype=bool), np.nan, u), r), "NaN"),
])
def test_bad_input(bad, msg):
    rng = np.random.default_rng(9)
    u, r = _world(rng, n=4, e=5)
    with pytest.raises(ValueError, match=msg):
        per_example_epsilons(*bad(u, r))
