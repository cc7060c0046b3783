"""Paired bootstrap confidence intervals for evaluation metrics.

Two methods scored on the same few hundred questions differ by less than sampling noise more
often than not (on the testbed at 3 bits every method is within a point of full precision), so
the report states each figure with an interval and compares methods *paired*: every resample
draws the same questions for both, which cancels the per-question difficulty both share.

Every metric here is a ratio of per-sample sums (`eval.metrics.breakdown`): accuracy is
`sum(correct) / n`, KL is `sum(kl_i) / sum(answer_tokens_i)`. A resample is a vector of
multiplicities `w [n]` (how often each sample was drawn, summing to n), so a resampled metric
is `(w @ sums) / (w @ counts)`: `draws` makes `[R, n]` of them once and every metric and
comparison reuses them. Intervals are percentile intervals of the resampled statistic.
"""

from __future__ import annotations

import dataclasses

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate and its (low, high) confidence bounds."""

    estimate: float
    low: float
    high: float

    def as_list(self) -> list[float]:
        return [self.estimate, self.low, self.high]


def draws(n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """`[resamples, n]` float64 multiplicities of n samples drawn with replacement."""
    if n < 1:
        raise ValueError(f"bootstrap needs at least one sample, got n={n}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def _check(sums, counts, weights) -> tuple[np.ndarray, np.ndarray]:
    sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
    if sums.ndim != 1 or sums.shape != counts.shape or sums.shape[0] != weights.shape[1]:
        raise ValueError(f"sums {sums.shape} and counts {counts.shape} must be [n] arrays with "
                         f"n = {weights.shape[1]}, the resamples' sample count")
    if not (np.all(np.isfinite(sums)) and np.all(np.isfinite(counts))):
        raise ValueError("bootstrap input holds NaN or inf")
    if counts.sum() <= 0:
        raise ValueError("bootstrap counts sum to zero: nothing was scored")
    return sums, counts


def resampled(sums, counts, weights: np.ndarray) -> np.ndarray:
    """`[R]` the ratio `sum(sums) / sum(counts)` under each resample (NaN where a resample drew
    no counted sample)."""
    sums, counts = _check(sums, counts, weights)
    den = weights @ counts
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (weights @ sums) / den, np.nan)


def _interval(estimate: float, values: np.ndarray, level: float) -> Interval:
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    values = values[np.isfinite(values)]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return Interval(float(estimate), float(low), float(high))


def interval(sums, counts, weights: np.ndarray, level: float = LEVEL) -> Interval:
    """The ratio metric of `sums / counts` with its percentile bootstrap interval."""
    s, c = _check(sums, counts, weights)
    return _interval(s.sum() / c.sum(), resampled(s, c, weights), level)


def compare(a, b, weights: np.ndarray, level: float = LEVEL) -> dict:
    """Paired comparison of two ratio metrics on the same samples.

    a, b: `(sums, counts)` of two models scored on the same n samples in the same order.
    Returns `difference` (a - b) and `ratio` (a / b, None when b's estimate is 0) as Intervals,
    and `share_a_lower`, the fraction of resamples in which a's metric is below b's.
    """
    ra, rb = resampled(*a, weights), resampled(*b, weights)
    est_a = float(np.sum(a[0]) / np.sum(a[1]))
    est_b = float(np.sum(b[0]) / np.sum(b[1]))
    out = {"difference": _interval(est_a - est_b, ra - rb, level),
           "share_a_lower": float(np.mean(ra < rb)), "ratio": None}
    if est_b != 0:
        with np.errstate(invalid="ignore", divide="ignore"):
            out["ratio"] = _interval(est_a / est_b, ra / rb, level)
    return out
