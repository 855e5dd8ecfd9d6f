"""Statistics for comparing runs: seeded bootstrap intervals, McNemar's test, paired bootstrap.

All resampling is over samples (rows), with a ``numpy`` generator seeded explicitly, so the
same rows and seed always give the same interval. Nothing here imports torch.

* :func:`bootstrap_ci`: percentile bootstrap interval of any statistic of a list of rows
  (Efron & Tibshirani 1993, ch. 13). The statistic is recomputed on each resample, so corpus
  level metrics (CHAIR_i = hallucinated mentions / all mentions) are resampled correctly.
* :func:`mcnemar`: McNemar's test on paired right/wrong outcomes (McNemar 1947). With fewer than
  :data:`EXACT_BELOW` discordant pairs the exact two-sided binomial test (``scipy.stats.binomtest``,
  p = 1/2) is used; otherwise the chi-square statistic with continuity correction,
  ``(|b - c| - 1)^2 / (b + c)``, on one degree of freedom.
* :func:`paired_bootstrap`: the difference of a statistic between two runs on the same samples,
  resampling sample indices jointly; the interval is the percentile interval of the differences
  and the two-sided p-value is ``min(1, 2 * min(P(d <= 0), P(d >= 0)))`` over the resamples
  (the sign-flip share; Koehn 2004 style paired bootstrap).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

#: default number of bootstrap resamples
RESAMPLES = 1000
#: default confidence level of the intervals
LEVEL = 0.95
#: McNemar uses the exact binomial test when the discordant pairs are fewer than this
EXACT_BELOW = 25


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval (``low``/``high`` ``None`` when undefined)."""

    value: float
    low: float | None
    high: float | None
    level: float = LEVEL
    resamples: int = RESAMPLES
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PairedTest:
    """One method run against the plain run on the same samples.

    ``difference`` is method minus plain (in the metric's units) with its bootstrap interval;
    ``test`` is ``"mcnemar-exact"``, ``"mcnemar-chi2"`` or ``"paired-bootstrap"``;
    ``discordant`` holds McNemar's ``(plain right & method wrong, plain wrong & method right)``.
    """

    test: str
    p_value: float
    difference: float
    low: float | None
    high: float | None
    n: int
    statistic: float | None = None
    discordant: tuple[int, int] | None = None

    def significant(self, alpha: float = 0.05) -> bool:
        return self.p_value < alpha

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["discordant"] = list(self.discordant) if self.discordant is not None else None
        return out


def _check(resamples: int, level: float) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")


def _percentiles(values: np.ndarray, level: float) -> tuple[float | None, float | None]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None, None
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """``[resamples, n]`` indices drawn with replacement from ``range(n)`` (seeded)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(resamples, n))


def bootstrap_ci(rows: Sequence[T], statistic: Callable[[Sequence[T]], float], *, resamples: int = RESAMPLES,
                 level: float = LEVEL, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of ``statistic(rows)`` resampling the rows with replacement.

    A resample on which ``statistic`` raises ``ValueError``/``ZeroDivisionError``/``KeyError``
    is left out (e.g. a metric undefined on a resample with no positive label).
    """
    _check(resamples, level)
    if len(rows) == 0:
        raise ValueError("cannot bootstrap zero rows")
    value = float(statistic(rows))
    draws = resample_indices(len(rows), resamples, seed)
    stats = np.full(resamples, np.nan)
    for i, idx in enumerate(draws):
        try:
            stats[i] = float(statistic([rows[j] for j in idx]))
        except (ValueError, ZeroDivisionError, KeyError):
            continue
    low, high = _percentiles(stats, level)
    return Interval(value, low, high, level, resamples, seed)


def bootstrap_mean_ci(values: Sequence[float], *, scale: float = 1.0, resamples: int = RESAMPLES,
                      level: float = LEVEL, seed: int = 0) -> Interval:
    """:func:`bootstrap_ci` of ``scale * mean(values)``, vectorised (same draws for the same seed)."""
    _check(resamples, level)
    x = np.asarray(values, dtype=float)  # [N]
    if x.size == 0:
        raise ValueError("cannot bootstrap zero rows")
    draws = resample_indices(x.size, resamples, seed)  # [R, N]
    means = scale * x[draws].mean(axis=1)  # [R]
    low, high = _percentiles(means, level)
    return Interval(float(scale * x.mean()), low, high, level, resamples, seed)


def mcnemar(plain: Sequence[bool], method: Sequence[bool], *, scale: float = 100.0, resamples: int = RESAMPLES,
            level: float = LEVEL, seed: int = 0) -> PairedTest:
    """McNemar's test of paired right/wrong outcomes (same samples, same order).

    ``b`` = plain right and method wrong, ``c`` = plain wrong and method right. With
    ``b + c < EXACT_BELOW`` the p-value is the exact two-sided binomial test of ``c`` successes
    in ``b + c`` trials at 1/2 (``p = 1`` when there is no discordant pair); otherwise the
    continuity-corrected chi-square. ``difference`` = ``scale * (c - b) / n`` (accuracy points),
    with a paired bootstrap interval.
    """
    from scipy import stats as sps

    a = np.asarray(plain, dtype=bool)  # [N]
    m = np.asarray(method, dtype=bool)  # [N]
    if a.shape != m.shape:
        raise ValueError(f"paired outcomes must have the same length, got {a.size} and {m.size}")
    if a.size == 0:
        raise ValueError("cannot test zero pairs")
    b = int(np.sum(a & ~m))
    c = int(np.sum(~a & m))
    if b + c == 0:
        p, statistic, name = 1.0, 0.0, "mcnemar-exact"
    elif b + c < EXACT_BELOW:
        p = float(sps.binomtest(c, b + c, 0.5, alternative="two-sided").pvalue)
        statistic, name = None, "mcnemar-exact"
    else:
        statistic = (abs(b - c) - 1) ** 2 / (b + c)
        p = float(sps.chi2.sf(statistic, df=1))
        name = "mcnemar-chi2"
    diff = m.astype(float) - a.astype(float)  # [N] in {-1, 0, 1}
    interval = bootstrap_mean_ci(diff, scale=scale, resamples=resamples, level=level, seed=seed)
    return PairedTest(name, min(1.0, p), interval.value, interval.low, interval.high, int(a.size),
                      None if statistic is None else float(statistic), (b, c))


def paired_bootstrap(plain: Sequence[T], method: Sequence[T], statistic: Callable[[Sequence[T]], float], *,
                     resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> PairedTest:
    """Paired bootstrap of ``statistic(method) - statistic(plain)``; ``plain[i]`` and ``method[i]``
    are the rows of the same sample. Both runs are resampled with the same indices."""
    _check(resamples, level)
    if len(plain) != len(method):
        raise ValueError(f"paired rows must have the same length, got {len(plain)} and {len(method)}")
    if len(plain) == 0:
        raise ValueError("cannot test zero pairs")
    observed = float(statistic(method)) - float(statistic(plain))
    draws = resample_indices(len(plain), resamples, seed)
    diffs = np.full(resamples, np.nan)
    for i, idx in enumerate(draws):
        try:
            diffs[i] = float(statistic([method[j] for j in idx])) - float(statistic([plain[j] for j in idx]))
        except (ValueError, ZeroDivisionError, KeyError):
            continue
    finite = diffs[np.isfinite(diffs)]
    if finite.size == 0:
        return PairedTest("paired-bootstrap", 1.0, observed, None, None, len(plain))
    p = min(1.0, 2 * min(float(np.mean(finite <= 0)), float(np.mean(finite >= 0))))
    low, high = _percentiles(finite, level)
    return PairedTest("paired-bootstrap", p, observed, low, high, len(plain))
