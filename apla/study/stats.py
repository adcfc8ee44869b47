"""The statistics of the ablation study, over clips: each clip is one independent unit (runs of one clip share its
content and correlate; a clip's seeds, if more than one, are averaged first), and a comparison of two variants is
the list of their paired differences d_1..d_n, one per clip.

    sign_flip_test(d)     two-sided p of "the mean difference is 0": under the null each d_i is as likely -d_i,
                          so the 2^n sign patterns are equally likely; p = share of patterns whose |mean| >= the
                          observed |mean| (all patterns for n <= EXACT_MAX, else RESAMPLES random ones, seeded)
    bootstrap_ci(d)       percentile 95% interval of the mean over clips resampled with replacement (seeded)
    sign_test(d)          exact two-sided binomial test of "a gain is as likely as a loss" on the nonzero d_i:
                          for counts (frames right out of F), where a mean of tiny integers misleads
    holm(p)               Holm's step-down adjustment of a family of p-values (strong control of the family-wise
                          error rate): sort ascending, p_(i) * (m - i + 1), running maximum, capped at 1

Which tests form the family, and the one primary comparison left out of it, is the report's (apla.study.report).
"""
from __future__ import annotations

import itertools
import math

import numpy as np

SEED = 20240101  # every resampling of the study draws from this seed
EXACT_MAX = 16  # up to 2^16 sign patterns enumerated exactly
RESAMPLES = 100_000


def finite(d) -> np.ndarray:
    return np.asarray([x for x in d if x is not None and math.isfinite(x)], dtype=np.float64)


def sign_flip_test(d) -> float:
    """Two-sided permutation p-value of mean(d) = 0 (module doc); NaN for no data. The observed pattern counts
    among the patterns, so p >= 1 / 2^n (exact) or >= 1 / (RESAMPLES + 1) (sampled)."""
    d = finite(d)
    n = len(d)
    if n == 0:
        return math.nan
    observed = abs(d.mean()) - 1e-12 * max(1.0, abs(d).max())  # ties count as extreme
    if n <= EXACT_MAX:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))  # (2^n, n)
        return float((np.abs(signs @ d / n) >= observed).mean())
    rng = np.random.default_rng(SEED)
    signs = rng.choice((1.0, -1.0), size=(RESAMPLES, n))
    return float(((np.abs(signs @ d / n) >= observed).sum() + 1) / (RESAMPLES + 1))


def bootstrap_ci(d, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of d over RESAMPLES bootstrap resamples of the clips (seeded)."""
    d = finite(d)
    if len(d) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(SEED)
    means = d[rng.integers(0, len(d), size=(RESAMPLES, len(d)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def sign_test(d) -> tuple[int, int, float]:
    """(gains, losses, exact two-sided binomial p with p = 1/2) over the nonzero differences; ties are dropped."""
    d = finite(d)
    gains, losses = int((d > 0).sum()), int((d < 0).sum())
    n, k = gains + losses, min(gains, losses)
    if n == 0:
        return 0, 0, 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return gains, losses, min(1.0, 2 * tail)


def holm(pvalues) -> list[float]:
    """Holm-adjusted p-values, in the order given (NaN stays NaN and does not count in the family)."""
    p = np.asarray(pvalues, dtype=np.float64)
    ok = np.flatnonzero(np.isfinite(p))
    out = np.full(len(p), np.nan)
    m = len(ok)
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()
