"""Bootstrap intervals, McNemar and the paired bootstrap, against hand-worked numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from innersight.eval.stats import (
    EXACT_BELOW,
    bootstrap_ci,
    bootstrap_mean_ci,
    mcnemar,
    paired_bootstrap,
)


def _pairs(b: int, c: int, same_right: int, same_wrong: int) -> tuple[list[bool], list[bool]]:
    """Outcomes with b (plain right, method wrong), c (plain wrong, method right) and agreements."""
    plain = [True] * b + [False] * c + [True] * same_right + [False] * same_wrong
    method = [False] * b + [True] * c + [True] * same_right + [False] * same_wrong
    return plain, method


def test_mcnemar_exact_on_a_hand_worked_table():
    # 2x2 table: plain right & method right 5, plain right & method wrong 1 (b),
    # plain wrong & method right 6 (c), both wrong 3. b + c = 7 < 25: exact binomial.
    plain, method = _pairs(b=1, c=6, same_right=5, same_wrong=3)
    test = mcnemar(plain, method)
    # two-sided exact p = 2 * P(X <= 1 | n=7, 1/2) = 2 * (C(7,0) + C(7,1)) / 2^7 = 16/128
    assert test.test == "mcnemar-exact"
    assert test.p_value == pytest.approx(16 / 128)
    assert test.discordant == (1, 6)
    assert test.difference == pytest.approx(100 * (6 - 1) / 15)
    assert test.n == 15 and not test.significant()


def test_mcnemar_chi_square_with_continuity_correction():
    plain, method = _pairs(b=10, c=30, same_right=50, same_wrong=10)
    test = mcnemar(plain, method)
    # (|10 - 30| - 1)^2 / 40 = 9.025; chi-square(1) tail = erfc(sqrt(9.025 / 2))
    assert test.test == "mcnemar-chi2" and 10 + 30 >= EXACT_BELOW
    assert test.statistic == pytest.approx(9.025)
    assert test.p_value == pytest.approx(math.erfc(math.sqrt(9.025 / 2)), rel=1e-9)
    assert test.significant() and test.difference == pytest.approx(20.0)
    assert test.low is not None and test.high is not None and test.low < 20.0 < test.high


def test_mcnemar_without_discordant_pairs_is_p_one():
    plain, method = _pairs(b=0, c=0, same_right=7, same_wrong=3)
    test = mcnemar(plain, method)
    assert test.p_value == 1.0 and test.difference == 0.0 and (test.low, test.high) == (0.0, 0.0)


def test_mcnemar_rejects_unpaired_input():
    with pytest.raises(ValueError, match="same length"):
        mcnemar([True, False], [True])
    with pytest.raises(ValueError, match="zero pairs"):
        mcnemar([], [])


def test_bootstrap_interval_is_seeded_and_has_the_binomial_width():
    rng = np.random.default_rng(1)
    outcomes = (rng.random(400) < 0.5).astype(float)
    a = bootstrap_mean_ci(outcomes, scale=100, seed=3)
    b = bootstrap_mean_ci(outcomes, scale=100, seed=3)
    c = bootstrap_mean_ci(outcomes, scale=100, seed=4)
    assert a == b and (a.low, a.high) != (c.low, c.high)
    assert a.value == pytest.approx(100 * outcomes.mean())
    # normal approximation: 2 * 1.96 * sqrt(p (1 - p) / n) = 9.8 points at p = 1/2, n = 400
    assert 8.5 < a.high - a.low < 11.0
    assert a.low < a.value < a.high


def test_generic_bootstrap_equals_the_vectorised_mean_on_the_same_draws():
    values = [0.0, 1.0, 0.25, 0.5, 1.0, 0.0, 0.75, 1.0]
    generic = bootstrap_ci(values, lambda rows: 100 * sum(rows) / len(rows), resamples=300, seed=7)
    fast = bootstrap_mean_ci(values, scale=100, resamples=300, seed=7)
    assert generic.low == pytest.approx(fast.low) and generic.high == pytest.approx(fast.high)


def test_bootstrap_of_constant_rows_is_a_point():
    interval = bootstrap_ci([{"x": 2.0}] * 5, lambda rows: sum(r["x"] for r in rows) / len(rows))
    assert (interval.value, interval.low, interval.high) == (2.0, 2.0, 2.0)


def test_bootstrap_skips_resamples_where_the_metric_is_undefined():
    def ratio(rows):  # undefined (ZeroDivisionError) on a resample without a positive
        return sum(r for r in rows) / sum(1 for r in rows if r)

    interval = bootstrap_ci([0, 0, 0, 1], ratio, resamples=200, seed=0)
    assert interval.low is not None and interval.high is not None


def test_paired_bootstrap_of_identical_and_shifted_runs():
    rng = np.random.default_rng(0)
    plain = [{"s": float(v)} for v in rng.random(50)]

    def mean(rows):
        return sum(r["s"] for r in rows) / len(rows)

    same = paired_bootstrap(plain, plain, mean, resamples=200)
    assert same.difference == 0.0 and same.p_value == 1.0 and (same.low, same.high) == (0.0, 0.0)
    shifted = paired_bootstrap(plain, [{"s": r["s"] + 0.2} for r in plain], mean, resamples=200)
    # every resample keeps the pairs together, so every resampled difference is exactly 0.2
    assert shifted.difference == pytest.approx(0.2)
    assert shifted.low == pytest.approx(0.2) and shifted.high == pytest.approx(0.2)
    assert shifted.p_value == 0.0 and shifted.test == "paired-bootstrap"


def test_unpaired_bootstrap_would_be_wider_than_paired():
    """Pairing removes the between-sample spread: a small consistent gain is significant paired."""
    rng = np.random.default_rng(2)
    base = rng.random(200)
    plain = [{"s": float(v)} for v in base]
    method = [{"s": float(v) + 0.01 + 0.005 * rng.standard_normal()} for v in base]

    def mean(rows):
        return sum(r["s"] for r in rows) / len(rows)

    paired = paired_bootstrap(plain, method, mean, resamples=400, seed=1)
    separate = bootstrap_ci(plain, mean, resamples=400, seed=1)
    assert paired.significant()
    assert (paired.high - paired.low) < (separate.high - separate.low) / 5
