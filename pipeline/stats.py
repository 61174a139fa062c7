"""The statistics every report uses, written once: bootstrap intervals over prompts, paired differences,
win rates, t intervals over seeds, and verdicts read off an interval.

Conventions (shared by the evaluation, the rounds, the sweep and ``bench/claims.py``):

* An *interval* is a dict ``{"mean", "ci_low", "ci_high"}`` (plus ``"per_seed"`` where there are seeds);
  that is the JSON schema of every stored result.
* Evaluation arrays are ``(prompts, samples)``: samples of one prompt are correlated, so intervals come from
  a bootstrap over *prompts* (rows), never over images. Trailing axes are averaged per row first.
* Two models evaluated with the same seeds are compared *paired*: the difference is taken per (prompt,
  seed), averaged per prompt, and that per-prompt difference is bootstrapped. This removes the variance
  the two evaluations share (prompt difficulty, the initial noise), so it is far tighter than comparing
  two unpaired intervals.
* The bootstrap is ``scipy.stats.bootstrap`` with a fixed seed, so the same data gives the same interval.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats as _scipy_stats

LEVEL = 0.95
METHOD = "percentile"  # or "BCa" (bias-corrected and accelerated; undefined on degenerate data)
N_RESAMPLES = 9999
SEED = 0

VERDICTS = ("reproduces", "contradicted", "inconclusive")


def describe(method: str = METHOD, level: float = LEVEL) -> str:
    """The interval method in words, for report headers."""
    return (f"{level:.0%} {method} bootstrap over prompts (scipy.stats.bootstrap, {N_RESAMPLES} resamples, "
            f"seed {SEED})")


def _per_row(values) -> np.ndarray:
    """Row means of an array with one row per prompt (any trailing shape) as float64."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 0:
        v = v.reshape(1)
    if v.shape[0] == 0:
        raise ValueError("no values: an interval needs at least one prompt")
    return v.reshape(v.shape[0], -1).mean(axis=1)


def bootstrap_ci(values, *, level: float = LEVEL, method: str = METHOD, n_resamples: int = N_RESAMPLES,
                 seed: int = SEED) -> tuple[float, float]:
    """Bootstrap CI of the mean over rows (prompts) of ``values``: one row per prompt, any trailing shape
    (averaged per row first). Deterministic for a fixed ``seed``. With one row, or all rows equal, the interval
    is that value (there is nothing to resample)."""
    rows = _per_row(values)
    if len(rows) < 2 or np.ptp(rows) == 0:
        m = float(rows.mean())
        return m, m
    res = _scipy_stats.bootstrap((rows,), np.mean, vectorized=True, n_resamples=n_resamples,
                                 confidence_level=level, method=method, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def mean_ci(values, **kw) -> dict:
    """``{"mean", "ci_low", "ci_high"}`` of per-prompt values (see :func:`bootstrap_ci`)."""
    rows = _per_row(values)
    lo, hi = bootstrap_ci(rows, **kw)
    return {"mean": float(rows.mean()), "ci_low": lo, "ci_high": hi}


def paired_delta(policy, reference, **kw) -> dict:
    """Policy minus reference on the same (prompt, seed) samples: ``(prompts, samples)`` arrays (or
    ``(prompts,)``). The mean is that of the per-prompt mean differences; the interval is a bootstrap over
    prompts of them."""
    p, r = np.asarray(policy, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if p.shape != r.shape:
        raise ValueError(f"paired_delta: policy {p.shape} and reference {r.shape} are not the same samples")
    return mean_ci(p - r, **kw)


def paired_over_seeds(runs: Sequence, baseline, **kw) -> dict:
    """Paired difference of several training seeds of one arm (``runs``: one ``(prompts, samples)`` array per
    seed) against a baseline (one array, shared by every seed, or one per seed): the per-prompt difference is
    averaged over seeds and samples, then bootstrapped over prompts. ``per_seed`` holds each seed's mean
    difference (the spread between seeds)."""
    runs = [np.asarray(x, dtype=np.float64) for x in runs]
    bases = ([np.asarray(b, dtype=np.float64) for b in baseline] if isinstance(baseline, (list, tuple))
             else [np.asarray(baseline, dtype=np.float64)] * len(runs))
    if len(bases) != len(runs) or not runs:
        raise ValueError(f"paired_over_seeds: {len(runs)} runs against {len(bases)} baselines")
    diff = np.mean([_per_row(x - y) for x, y in zip(runs, bases)], axis=0)
    return {**mean_ci(diff, **kw), "per_seed": [float((x - y).mean()) for x, y in zip(runs, bases)]}


def _wins(policy, reference) -> np.ndarray:
    p, r = np.asarray(policy, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if p.shape != r.shape:
        raise ValueError(f"win_rate: policy {p.shape} and reference {r.shape} are not the same samples")
    return (p > r) + 0.5 * (p == r)


def win_rate(policy, reference) -> float:
    """Paired by (prompt, seed): the share of samples the policy scores higher on, ties counting ½."""
    return float(_wins(policy, reference).mean())


def win_rate_ci(policy, reference, **kw) -> dict:
    """The win rate (ties ½) with a bootstrap interval over prompts of the per-prompt win rate."""
    return mean_ci(_wins(policy, reference), **kw)


def t_interval(values: Sequence[float], *, level: float = LEVEL) -> dict:
    """Mean and Student-t interval of independent values (one per seed): mean ± t_{n−1} · s / √n; NaN bounds
    with fewer than two values. ``per_seed`` holds the values."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    mean = float(v.mean())
    if len(v) < 2:
        half = float("nan")
    else:
        half = float(_scipy_stats.t.ppf(1 - (1 - level) / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "per_seed": [float(x) for x in v]}


def t_band(curves, *, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pointwise t interval of curves stacked on axis 0 (one per seed): ``(mean, low, high)``, each the length
    of a curve; with one curve the band is the curve itself."""
    c = np.asarray(curves, dtype=np.float64)
    mean = c.mean(axis=0)
    if len(c) < 2:
        return mean, mean.copy(), mean.copy()
    half = _scipy_stats.t.ppf(1 - (1 - level) / 2, len(c) - 1) * c.std(axis=0, ddof=1) / math.sqrt(len(c))
    return mean, mean - half, mean + half


def verdict(interval: dict, direction: int) -> str:
    """What an interval says about a claim that the quantity is > 0 (``direction`` +1) or < 0 (−1):
    ``reproduces`` when it excludes 0 on the claimed side, ``contradicted`` when it excludes 0 on the other
    side, else (or when a bound is not finite) ``inconclusive``."""
    if direction not in (1, -1):
        raise ValueError(f"direction={direction!r}: expected +1 or -1")
    lo, hi = float(interval["ci_low"]), float(interval["ci_high"])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive"
    if lo > 0:
        return "reproduces" if direction > 0 else "contradicted"
    if hi < 0:
        return "reproduces" if direction < 0 else "contradicted"
    return "inconclusive"
