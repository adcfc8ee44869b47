"""apla.study.stats: the tests the study's report uses, against hand-worked cases."""
import math

import numpy as np

from apla.study import stats


def test_sign_test_counts_gains_and_losses_exactly():
    # 4 clips gain one frame, none loses, 8 ties: p = 2 * (1/2)^4 = 0.125 (the case a t-interval called significant)
    assert stats.sign_test([1, 1, 1, 1] + [0] * 8) == (4, 0, 0.125)
    gains, losses, p = stats.sign_test([1] * 9 + [-1])
    assert (gains, losses) == (9, 1) and math.isclose(p, 2 * 11 / 1024)


def test_sign_flip_test_exact_and_sampled():
    # n = 3, d = (1, 2, 3): only the all-plus and all-minus patterns reach |mean| = 2 -> p = 2/8
    assert stats.sign_flip_test([1.0, 2.0, 3.0]) == 0.25
    assert stats.sign_flip_test([1.0, -1.0, 1.0, -1.0]) == 1.0
    big = np.random.default_rng(0).normal(1.0, 1.0, size=30)  # sampled patterns: a clear effect, a small p
    assert stats.sign_flip_test(big) < 1e-3
    assert stats.sign_flip_test(np.r_[big, -big]) > 0.9


def test_bootstrap_interval_holds_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(1)
    small, large = rng.normal(2.0, 1.0, 10), rng.normal(2.0, 1.0, 200)
    for d in (small, large):
        lo, hi = stats.bootstrap_ci(d)
        assert lo < d.mean() < hi
    assert np.diff(stats.bootstrap_ci(large)) < np.diff(stats.bootstrap_ci(small))


def test_holm_step_down():
    # m = 4: sorted 0.01, 0.02, 0.03, 0.5 -> 0.04, 0.06, 0.06 (running max), 0.5
    assert np.allclose(stats.holm([0.03, 0.5, 0.01, 0.02]), [0.06, 0.5, 0.04, 0.06])
    out = stats.holm([0.01, math.nan])
    assert out[0] == 0.01 and math.isnan(out[1])
