"""The library-backed statistics (retention.study.stats, retention.study.analysis: SciPy and statsmodels)
against hand-worked values and against independent computations written here from the textbook formulas, on
cases that include the edges (k = 0, k = n, one seed, equal values, ties, censoring at the last step, S = 0,
separation); and the cluster-robust standard errors of the pooled regressions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from retention.study.analysis import Fact
from retention.study.analysis.regression import auc, logistic_regression, predictor_rows, single_feature_rows
from retention.study.analysis.survival import kaplan_meier, logrank
from retention.study.stats import newcombe, paired_interval, t_interval, t_quantile, wilson

Z = {0.9: 1.6448536, 0.95: 1.9599640, 0.99: 2.5758293}
"""Standard normal quantiles 0.5 + level / 2 (tables)."""
T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 9: 2.2622, 29: 2.0452}
"""Student t quantiles t(0.975, df) (tables)."""


def _rng() -> np.random.Generator:
    return np.random.default_rng(20240601)


# -- over seeds: t ------------------------------------------------------------------------------------------------


def _t_cdf_from_zero(x: float, df: int) -> float:
    """P(0 <= T <= x): Simpson's rule on the t density."""
    t = np.linspace(0.0, x, 4001)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = np.exp(log_c - (df + 1) / 2 * np.log1p(t * t / df))
    w = np.ones(len(t))
    w[1:-1:2], w[2:-1:2] = 4, 2
    return float((w * pdf).sum() * (t[1] - t[0]) / 3)


def test_t_quantile_matches_the_tables_and_the_integrated_density():
    for df, q in T975.items():
        assert t_quantile(0.975, df) == pytest.approx(q, abs=1e-4)
    assert (t_quantile(0.95, 10), t_quantile(0.995, 5)) == pytest.approx((1.8125, 4.0321), abs=1e-4)
    for p in (0.9, 0.95, 0.975, 0.995):
        for df in (1, 2, 3, 5, 10, 30, 100):
            assert _t_cdf_from_zero(t_quantile(p, df), df) == pytest.approx(p - 0.5, abs=1e-7)
    with pytest.raises(ValueError):
        t_quantile(0.4, 3)


def test_t_interval_by_hand_and_by_formula():
    # mean 0.7, sd 0.1, half = 4.3027 * 0.1 / sqrt(3) = 0.24842
    i = t_interval([0.6, 0.7, 0.8])
    assert (i.estimate, i.low, i.high, i.n) == pytest.approx((0.7, 0.45158, 0.94842, 3), abs=1e-5)
    rng = _rng()
    for df in T975:
        xs = list(rng.random(df + 1))
        mean, sd = np.mean(xs), np.std(xs, ddof=1)
        half = T975[df] * sd / math.sqrt(df + 1)
        got = t_interval(xs)
        assert (got.estimate, got.low, got.high) == pytest.approx((mean, mean - half, mean + half), abs=1e-4)
    same = t_interval([1.0, 1.0, 1.0])  # every seed kept everything: a zero-width interval, no warning
    assert (same.low, same.high) == (1.0, 1.0)
    assert t_interval([0.6, 0.7, 0.8], bounds=(0.0, 0.9)).high == 0.9
    one = t_interval([0.5])  # one seed: no interval
    assert one.estimate == 0.5 and math.isnan(one.low) and one.n == 1
    assert t_interval([float("nan"), 0.2, 0.4]).n == 2 and t_interval([]).n == 0


def test_paired_interval_by_hand():
    # differences 0.2, 0.22, 0.24: mean 0.22, sd 0.02, half 4.3027 * 0.02 / sqrt(3) = 0.049684
    d = paired_interval([0.9, 0.92, 0.94], [0.7, 0.7, 0.7])
    assert (d.estimate, d.low, d.high) == pytest.approx((0.22, 0.170316, 0.269684), abs=1e-5)
    assert d.excludes_zero
    # differences 1, 1: no spread, [1, 1]; differences 0.9, 1.1: mean 1, sd 0.141421,
    # half 12.7062 * 0.141421 / sqrt(2) = 1.27062, so [-0.27062, 2.27062] clipped to [-1, 1]
    assert paired_interval([1.0, 1.0], [0.0, 0.0]).high == 1.0
    wide = paired_interval([1.0, 1.0], [0.1, -0.1])
    assert (wide.estimate, wide.low, wide.high) == pytest.approx((1.0, -0.27062, 1.0), abs=1e-4)
    assert math.isnan(paired_interval([0.5, float("nan")], [0.4, 0.3]).low)
    with pytest.raises(ValueError):
        paired_interval([0.1], [0.1, 0.2])


# -- over probes: Wilson, Newcombe -------------------------------------------------------------------------------


def _wilson(k: int, n: int, z: float) -> tuple[float, float]:
    """Wilson's (1927) score interval, the closed form."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_wilson_by_hand_and_by_the_closed_form():
    # 8 of 10, z = 1.959964: centre (0.8 + 0.192073) / 1.384146 = 0.716740,
    # half 1.959964 * sqrt(0.016 + 0.0096036) / 1.384146 = 0.226581
    w = wilson(8, 10)
    assert (w.estimate, w.low, w.high, w.n) == pytest.approx((0.8, 0.490159, 0.943321, 10), abs=1e-5)
    for n in (1, 2, 5, 10, 37, 100):
        for k in range(n + 1):
            for level, z in Z.items():
                got = wilson(k, n, level)
                assert (got.low, got.high) == pytest.approx(_wilson(k, n, z), abs=1e-7)
                if k == 0:
                    assert got.low == 0.0
                if k == n:
                    assert got.high == 1.0
    assert math.isnan(wilson(0, 0).estimate)
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_newcombe_by_hand_and_from_two_wilson_intervals():
    # 8/10 - 4/10, Wilson(8, 10) = [0.490159, 0.943321], Wilson(4, 10) = [0.168180, 0.687326]:
    # low 0.4 - sqrt(0.309841^2 + 0.287326^2) = -0.022558, high 0.4 + sqrt(0.143321^2 + 0.231820^2) = 0.672544
    d = newcombe(8, 10, 4, 10)
    assert (d.estimate, d.low, d.high, d.n) == pytest.approx((0.4, -0.022558, 0.672544, 10), abs=1e-5)
    rng = _rng()
    cases = [(0, 10, 0, 10), (10, 10, 0, 10), (0, 5, 5, 5), (1, 1, 0, 1), (5, 5, 5, 5), (3, 7, 3, 7)]
    cases += [(int(rng.integers(0, n1 + 1)), int(n1), int(rng.integers(0, n2 + 1)), int(n2))
              for n1, n2 in rng.integers(1, 60, size=(30, 2))]
    for k1, n1, k2, n2 in cases:
        for level, z in Z.items():
            (l1, u1), (l2, u2) = _wilson(k1, n1, z), _wilson(k2, n2, z)
            p1, p2 = k1 / n1, k2 / n2
            low = p1 - p2 - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
            high = p1 - p2 + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
            got = newcombe(k1, n1, k2, n2, level)
            assert (got.estimate, got.low, got.high) == pytest.approx((p1 - p2, low, high), abs=1e-7)
    assert math.isnan(newcombe(1, 2, 0, 0).estimate)


# -- survival -----------------------------------------------------------------------------------------------------


def _km_cases() -> list[tuple[list[int], list[bool]]]:
    cases = [([10, 10, 20, 30, 30, 30], [True, True, False, True, False, False]),
             ([5, 5], [True, True]),  # all lost at once: S = 0
             ([5], [False]), ([5, 5, 7], [False, False, False]),  # nothing lost: S = 1
             ([3, 5, 5], [True, True, False]),  # a loss and a censoring at the last step
             ([3, 5], [True, True]), ([10, 20, 30], [False, True, True]),
             ([10, 10, 10, 20, 20, 30], [True, False, True, True, False, False])]
    rng = _rng()
    for n in (5, 20, 60):
        lost = rng.random(n) < 0.4
        times = np.where(lost, rng.choice([10, 20, 30], size=n), 30)
        cases.append(([int(t) for t in times], [bool(e) for e in lost]))
    return cases


def _product_limit(times, lost, z):
    """Per distinct time: at risk, lost, censored, S, Greenwood SE and log-log interval, by the definitions."""
    out, s, g = [], 1.0, 0.0
    for t in sorted(set(times)):
        n = sum(x >= t for x in times)
        d = sum(x == t and e for x, e in zip(times, lost))
        c = sum(x == t and not e for x, e in zip(times, lost))
        if d:
            s *= 1 - d / n
            g = g + d / (n * (n - d)) if n > d else math.inf
        if 0 < s < 1:
            se_ll = math.sqrt(g) / abs(math.log(s))
            low, high = s ** math.exp(z * se_ll), s ** math.exp(-z * se_ll)
        else:
            low = high = s
        out.append((t, n, d, c, s, s * math.sqrt(g) if math.isfinite(g) else 0.0, low, high))
    return out


def test_kaplan_meier_by_hand_and_by_the_product_limit():
    # The worked example of tests/test_analysis.py: S = 2/3 [0.194617, 0.904434] at 10,
    # 4/9 [0.066187, 0.784908] at 30 (Greenwood sums 1/12 and 1/4, log-log interval).
    km = kaplan_meier([10, 10, 20, 30, 30, 30], [True, True, False, True, False, False])
    assert (km[-1].survival, km[-1].se, km[-1].low, km[-1].high) == pytest.approx(
        (0.444444, 0.222222, 0.066187, 0.784908), abs=1e-6)
    for times, lost in _km_cases():
        for level, z in Z.items():
            got = kaplan_meier(times, lost, level)
            assert (got[0].step, got[0].at_risk, got[0].survival) == (0, len(times), 1.0)
            want = _product_limit(times, lost, z)
            assert [(k.step, k.at_risk, k.events, k.censored) for k in got[1:]] == [w[:4] for w in want]
            for k, w in zip(got[1:], want):
                assert (k.survival, k.se, k.low, k.high) == pytest.approx(w[4:], abs=1e-6)
    last = kaplan_meier([5, 5], [True, True])[-1]
    assert (last.survival, last.low, last.high) == (0.0, 0.0, 0.0)
    assert kaplan_meier([], []) == kaplan_meier([], [])[:1]


def _mantel(ta, la, tb, lb) -> tuple[float, float]:
    """The log-rank chi-square from its sums (observed minus expected losses of A; hypergeometric variance)
    and its p-value."""
    o_e = v = 0.0
    for t in sorted({t for t, e in [*zip(ta, la), *zip(tb, lb)] if e}):
        n1, n2 = sum(x >= t for x in ta), sum(x >= t for x in tb)
        d1 = sum(x == t and e for x, e in zip(ta, la))
        d, n = d1 + sum(x == t and e for x, e in zip(tb, lb)), n1 + n2
        o_e += d1 - d * n1 / n
        v += n1 * n2 * d * (n - d) / (n * n * (n - 1)) if n > 1 else 0.0
    chi2 = o_e**2 / v
    return chi2, math.erfc(math.sqrt(chi2 / 2))


def test_logrank_by_hand_and_by_its_sums():
    # tests/test_analysis.py: O - E = 0.8, V = 0.926667, chi2 = 0.690647, p = 0.405944
    chi2, p = logrank([10, 10, 20, 30, 30, 30], [True, True, False, True, False, False],
                      [20, 30, 30, 30], [True, False, False, False])
    assert (chi2, p) == pytest.approx((0.690647, 0.405944), abs=1e-6)
    rng = _rng()
    for n1, n2 in ((5, 5), (10, 20), (40, 30), (3, 50), (1, 8)):
        sides = []
        for n, rate in ((n1, 0.3), (n2, 0.6)):
            lost = rng.random(n) < rate
            lost[0] = True  # at least one loss
            times = np.where(lost, rng.choice([10, 20, 30], size=n), 30)
            sides += [[int(t) for t in times], [bool(e) for e in lost]]
        assert logrank(*sides) == pytest.approx(_mantel(*sides), abs=1e-9)
    assert all(math.isnan(x) for x in logrank([5], [False], [5], [False]))  # nothing lost
    assert all(math.isnan(x) for x in logrank([5, 6], [True, False], [], []))  # one side empty


# -- logistic regression ------------------------------------------------------------------------------------------


def _logit_case(rng, n: int, p: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(n, p)) * rng.uniform(0.5, 5, size=p) + rng.normal(size=p)
    eta = 0.3 + x @ rng.normal(scale=0.7, size=p)
    return x, (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(float)


def test_logistic_regression_by_the_score_equations_and_the_information():
    # 2x2 table 30/10 vs 15/25: slope ln 5 = 1.609438, Woolf's SE sqrt(1/30 + 1/10 + 1/15 + 1/25) = 0.489898
    x = np.array([1.0] * 40 + [0.0] * 40)[:, None]
    y = np.array([1.0] * 30 + [0.0] * 10 + [1.0] * 15 + [0.0] * 25)
    b1 = logistic_regression(x, y, ["x"], standardize=False).coefficients[1]
    assert (b1.estimate, b1.se, b1.low) == pytest.approx((1.609438, 0.489898, 1.609438 - 1.959964 * 0.489898),
                                                         abs=1e-6)
    rng = _rng()
    for n, p in ((40, 1), (200, 2), (500, 3), (60, 3)):
        x, y = _logit_case(rng, n, p)
        fit = logistic_regression(x, y, [f"x{j}" for j in range(p)], standardize=False, level=0.9)
        b = np.array([c.estimate for c in fit.coefficients])
        design = np.column_stack([np.ones(n), x])
        prob = 1 / (1 + np.exp(-(design @ b)))
        assert np.abs(design.T @ (y - prob)).max() < 1e-7  # the score is zero at the MLE
        se = np.sqrt(np.diag(np.linalg.inv(design.T @ (design * (prob * (1 - prob))[:, None]))))
        assert [c.se for c in fit.coefficients] == pytest.approx(se, rel=1e-6)
        assert [c.high - c.estimate for c in fit.coefficients] == pytest.approx(Z[0.9] * se, rel=1e-6)
        assert fit.log_likelihood == pytest.approx(float(np.sum(y * np.log(prob) + (1 - y) * np.log1p(-prob))),
                                                   rel=1e-9)
        std = logistic_regression(x, y, [f"x{j}" for j in range(p)], level=0.9)
        assert [c.estimate for c in std.coefficients[1:]] == pytest.approx(b[1:], rel=1e-6)
        assert [c.se for c in std.coefficients[1:]] == pytest.approx(se[1:], rel=1e-6)
    # Complete and quasi-complete separation: no estimate, and it is said.
    sep = logistic_regression(np.arange(10.0)[:, None], (np.arange(10) >= 5).astype(float), ["x"])
    assert sep.separated and not sep.converged and math.isnan(sep.coefficients[1].low)
    quasi = logistic_regression(np.array([0, 1, 2, 3, 4, 5, 5, 6, 7, 8.0])[:, None],
                                np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1.0]), ["x"])
    assert quasi.separated and math.isnan(quasi.coefficients[1].se)
    assert logistic_regression(np.arange(5.0)[:, None], np.ones(5), ["x"]).separated


def test_cluster_robust_errors_are_the_sandwich_over_clusters():
    rng = _rng()
    n, groups = 120, rng.integers(0, 15, size=120)
    x, y = _logit_case(rng, n, 2)
    fit = logistic_regression(x, y, ["a", "b"], standardize=False, groups=[f"case{g}" for g in groups])
    assert fit.clusters == 15
    b = np.array([c.estimate for c in fit.coefficients])
    design = np.column_stack([np.ones(n), x])
    prob = 1 / (1 + np.exp(-(design @ b)))
    bread = np.linalg.inv(design.T @ (design * (prob * (1 - prob))[:, None]))
    scores = np.array([design[groups == g].T @ (y - prob)[groups == g] for g in np.unique(groups)])
    k, g = design.shape[1], len(scores)
    cov = g / (g - 1) * (n - 1) / (n - k) * bread @ (scores.T @ scores) @ bread  # Stata's small-sample factor
    assert [c.se for c in fit.coefficients] == pytest.approx(np.sqrt(np.diag(cov)), rel=1e-6)
    one = logistic_regression(x, y, ["a", "b"], groups=["same"] * n)  # one cluster: no interval
    assert one.clusters == 1 and math.isnan(one.coefficients[1].low)
    assert not math.isnan(one.coefficients[1].estimate)
    # As many rows as parameters: no small-sample factor, so no interval (and no error).
    few = logistic_regression(np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]]), np.array([0.0, 1.0, 0.0]),
                              ["a", "b"], groups=["p", "q", "r"])
    assert few.clusters == 3 and math.isnan(few.coefficients[1].se)


def _repeated_facts(cells: int, n: int = 40, seed: int = 3) -> list[Fact]:
    """``n`` edited facts (case ids), each in ``cells`` grid cells of one seed with the same outcome there."""
    rng = np.random.default_rng(seed)
    margins = rng.normal(size=n)
    survived = rng.random(n) < 1 / (1 + np.exp(-(0.5 + margins)))
    return [Fact(study="s", cell=f"k={c}", arm="baseline", seed=0, run=f"run{c}", case_id=f"case{i}",
                 set="edited", steps=(0, 10), passed={"top1": (True, bool(survived[i]))}, t0={}, final={},
                 features={"margin_t0": float(margins[i]), "edited": 1.0})
            for c in range(cells) for i in range(n)]


def test_a_fact_repeated_across_cells_widens_the_pooled_interval():
    facts = _repeated_facts(4)
    (row,) = [r for r in single_feature_rows(facts) if r["feature"] == "margin_t0"]
    x = np.array([[f.features["margin_t0"]] for f in facts])
    y = np.array([float(f.passed["top1"][-1]) for f in facts])
    naive = logistic_regression(x, y, ["margin_t0"]).coefficients[1]
    once = logistic_regression(x[:40], y[:40], ["margin_t0"]).coefficients[1]  # each fact counted once
    width = row["per_sd_high"] - row["per_sd_low"]
    assert row["per_sd"] == pytest.approx(naive.per_sd[0])
    # Four copies of each fact make the naive interval half as wide as one copy's; clustering undoes that.
    assert width > 1.5 * (naive.per_sd[2] - naive.per_sd[1])
    assert width == pytest.approx(once.per_sd[2] - once.per_sd[1], rel=0.2)
    coef, models = predictor_rows(facts)
    (model,) = [m for m in models if m["model"] == "edited"]
    (slope,) = [c for c in coef if c["model"] == "edited" and c["feature"] == "margin_t0"]
    assert model["clusters"] == 40 and model["n"] == 160
    assert slope["per_sd_high"] - slope["per_sd_low"] == pytest.approx(width, rel=1e-6)


# -- AUC ----------------------------------------------------------------------------------------------------------


def test_auc_by_hand_and_by_counting_pairs():
    # positives {2, 3} vs negatives {1, 3}: (2>1) 1, (2<3) 0, (3>1) 1, (3=3) 0.5 -> 2.5 / 4 = 0.625;
    # Hanley-McNeil: Q1 = 0.625/1.375 = 0.454545, Q2 = 2 * 0.625^2 / 1.625 = 0.480769,
    # var = (0.234375 + 0.063920 + 0.090144) / 4 = 0.097110, se 0.311625: [0.014227, 1 (clipped)]
    assert auc([2, 3, 1, 3], [True, True, False, False]) == pytest.approx((0.625, 0.014227, 1.0), abs=1e-6)
    assert auc([1, 2, 3, 4], [False, False, True, True])[0] == 1.0
    assert auc([1, 2, 3, 4], [True, True, False, False])[0] == 0.0
    assert auc([1, 1, 1, 1], [True, False, True, False])[0] == 0.5  # all tied
    assert all(math.isnan(v) for v in auc([1, 2], [True, True]))
    rng = _rng()
    for n in (10, 50, 200):
        scores = rng.integers(0, 6, size=n).astype(float)  # many ties
        outcomes = rng.random(n) < 0.3 + 0.1 * scores
        pos, neg = scores[outcomes], scores[~outcomes]
        pairs = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
        assert auc(list(scores), list(outcomes))[0] == pytest.approx(pairs, abs=1e-12)
