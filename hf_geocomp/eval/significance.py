"""Paired comparisons of two methods over seeds: the one statistics module every study uses.

A comparison pairs the runs of two methods that share a seed (same calibration subset,
same training seed), so the quantity tested is the per-seed difference ``d = a - b``:

* paired t-test (``scipy.stats.ttest_rel``) and its 95% confidence interval of the mean of d;
* Wilcoxon signed-rank test (``scipy.stats.wilcoxon``), which does not assume normal d;
* a percentile bootstrap interval of the mean of d (``scipy.stats.bootstrap``, fixed seed);
* the paired effect size Cohen's d_z = mean(d) / sd(d);
* Holm's step-down correction of the p-values of several comparisons in one table.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from ..errors import GeoCompError


def _diffs(a: Sequence[float], b: Sequence[float]) -> list[float]:
    if len(a) != len(b):
        raise GeoCompError(f"a paired comparison needs as many runs on each side, got {len(a)} and {len(b)}.")
    return [float(x) - float(y) for x, y in zip(a, b)]


def paired_t(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict:
    """Paired t-test of ``a - b``: ``t``, two-sided ``p`` and the ``level`` interval of the mean difference.

    With fewer than two pairs, or identical pairs, ``p`` is None (nothing to test).
    """
    from scipy import stats

    d = _diffs(a, b)
    n = len(d)
    mean = statistics.mean(d) if d else math.nan
    out = {"n": n, "mean_diff": mean, "t": None, "p": None, "ci_low": None, "ci_high": None}
    if n < 2 or all(x == d[0] for x in d):
        return out
    sd = statistics.stdev(d)
    res = stats.ttest_rel(list(map(float, a)), list(map(float, b)))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    out.update(t=float(res.statistic), p=float(res.pvalue), ci_low=mean - half, ci_high=mean + half)
    return out


def wilcoxon(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value of ``a - b`` (None when every difference is zero)."""
    from scipy import stats

    d = _diffs(a, b)
    if len(d) < 1 or all(x == 0 for x in d):
        return None
    return float(stats.wilcoxon(d).pvalue)


def bootstrap_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95, resamples: int = 9999,
                 seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of ``a - b`` (None below two pairs or for constant d)."""
    import numpy as np
    from scipy import stats

    d = np.asarray(_diffs(a, b))
    if len(d) < 2 or np.all(d == d[0]):
        return None
    res = stats.bootstrap((d,), np.mean, confidence_level=level, n_resamples=resamples, method="percentile",
                          random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def cohens_dz(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Paired effect size mean(d) / sd(d) (None when sd is zero or there are fewer than two pairs)."""
    d = _diffs(a, b)
    if len(d) < 2:
        return None
    sd = statistics.stdev(d)
    return statistics.mean(d) / sd if sd > 0 else None


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values, in the input order (None entries are left out and kept None).

    The k-th smallest of m p-values becomes max over j <= k of min(1, (m - j + 1)·p_(j)).
    """
    idx = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])
    m, out, running = len(idx), [None] * len(pvalues), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        out[i] = running
    return out


def compare(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict:
    """Every statistic above for one pair of methods, as one flat dict for a results row."""
    t = paired_t(a, b, level)
    boot = bootstrap_ci(a, b, level)
    return {"n": t["n"], "mean_diff": t["mean_diff"], "ci_low": t["ci_low"], "ci_high": t["ci_high"],
            "p_value": t["p"], "p_wilcoxon": wilcoxon(a, b), "boot_low": boot[0] if boot else None,
            "boot_high": boot[1] if boot else None, "effect_dz": cohens_dz(a, b)}
