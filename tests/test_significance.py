"""The statistics module against scipy and closed forms on known samples."""

import math

import pytest
from scipy import stats

from hf_geocomp.errors import GeoCompError
from hf_geocomp.eval.significance import bootstrap_ci, cohens_dz, compare, holm, paired_t, wilcoxon

A = [0.61, 0.58, 0.64, 0.60, 0.63, 0.59]
B = [0.57, 0.56, 0.60, 0.59, 0.58, 0.57]


def test_paired_t_matches_scipy_and_its_interval_is_the_t_interval():
    r = paired_t(A, B)
    ref = stats.ttest_rel(A, B)
    assert r["n"] == 6 and math.isclose(r["t"], ref.statistic) and math.isclose(r["p"], ref.pvalue)
    d = [x - y for x, y in zip(A, B)]
    mean, sd = sum(d) / 6, stats.tstd(d)
    half = 2.5705818366147395 * sd / math.sqrt(6)  # t(0.975, 5)
    assert math.isclose(r["ci_low"], mean - half, rel_tol=1e-9) and math.isclose(r["ci_high"], mean + half, rel_tol=1e-9)
    # the interval excludes zero exactly when p < 0.05
    assert (r["ci_low"] > 0) == (r["p"] < 0.05)


def test_degenerate_pairs_give_no_test():
    assert paired_t([1.0, 2.0], [1.0, 2.0])["p"] is None
    assert paired_t([1.0], [0.5])["p"] is None
    assert wilcoxon([1.0, 2.0], [1.0, 2.0]) is None
    assert bootstrap_ci([1.0, 2.0], [0.0, 1.0]) is None  # constant difference
    with pytest.raises(GeoCompError, match="as many runs on each side, got 2 and 3"):
        paired_t([1, 2], [1, 2, 3])


def test_wilcoxon_matches_scipy():
    d = [x - y for x, y in zip(A, B)]
    assert math.isclose(wilcoxon(A, B), stats.wilcoxon(d).pvalue)


def test_bootstrap_interval_brackets_the_mean_and_is_reproducible():
    lo, hi = bootstrap_ci(A, B)
    mean = sum(x - y for x, y in zip(A, B)) / 6
    assert lo < mean < hi and (lo, hi) == bootstrap_ci(A, B)
    t = paired_t(A, B)
    assert abs(lo - t["ci_low"]) < 0.02 and abs(hi - t["ci_high"]) < 0.02  # close to the t interval here


def test_effect_size():
    d = [x - y for x, y in zip(A, B)]
    assert math.isclose(cohens_dz(A, B), (sum(d) / 6) / stats.tstd(d))
    assert cohens_dz([1.0, 2.0], [0.0, 1.0]) is None


def test_holm_on_a_worked_example():
    # p = (0.01, 0.04, 0.03, 0.005), m = 4: sorted 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 -> max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, None, 0.9])[1] is None and holm([0.5, None, 0.9])[0] == 1.0


def test_compare_is_one_flat_row():
    row = compare(A, B)
    assert set(row) == {"n", "mean_diff", "ci_low", "ci_high", "p_value", "p_wilcoxon", "boot_low", "boot_high",
                        "effect_dz"}
    assert all(not isinstance(v, (list, dict)) for v in row.values())
