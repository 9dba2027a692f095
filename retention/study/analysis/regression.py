"""What predicts survival: logistic regression of "survived" on per-fact features, one feature at a time
(slope, AIC, AUC), and survival per relation.

Logistic regression of "survived" (never lost up to the last measured step, the Kaplan–Meier event) on
per-fact features (statsmodels' ``Logit``, Newton–Raphson on standardised features), with Wald intervals. A
regression that pools facts over a study's grid cells and seeds counts one fact (case id) once per run, so its
standard errors are cluster-robust, clustered by case id (``cov_type="cluster"``). Features constant in the
data or collinear with earlier ones are dropped and named; complete or quasi-complete separation is detected
and reported instead of a number.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
import statsmodels.api as sm
from scipy import stats

from retention.study.analysis.facts import Fact, by_arm, protocols_of
from retention.study.stats import LEVEL, wilson

EDITED_PREDICTORS = ("margin_t0", "relative_update", "update_norm", "layer", "subject_tokens", "k",
                     "log_subject_freq", "log_target_freq", "log_alternative_freq", "n_edit", "steps", "log10_lr")
INTRINSIC_PREDICTORS = ("margin_t0", "subject_tokens", "log_subject_freq", "log_target_freq",
                        "log_alternative_freq", "steps", "log10_lr")
BOTH_PREDICTORS = ("edited", "margin_t0", "subject_tokens", "log_subject_freq", "log_target_freq", "steps",
                   "log10_lr")


@dataclass(frozen=True)
class Coefficient:
    """A fitted log-odds coefficient per unit of its feature, and per standard deviation (``sd``)."""

    name: str
    estimate: float
    se: float
    low: float
    high: float
    sd: float
    """The feature's standard deviation in the data (NaN for the intercept)."""

    @property
    def per_sd(self) -> tuple[float, float, float]:
        """(estimate, low, high) per standard deviation of the feature."""
        k = 1.0 if math.isnan(self.sd) else self.sd
        return self.estimate * k, self.low * k, self.high * k

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly above or below zero."""
        return not math.isnan(self.low) and (self.low > 0 or self.high < 0)


@dataclass
class LogitFit:
    """A logistic regression's coefficients and what limits them."""

    coefficients: list[Coefficient]
    n: int
    events: int
    """Observations with y = 1."""
    converged: bool
    separated: bool
    """Complete or quasi-complete separation: the maximum-likelihood estimate does not exist."""
    log_likelihood: float
    dropped: dict[str, str] = field(default_factory=dict)
    """Feature -> why it was left out (constant, collinear)."""
    clusters: int = 0
    """Clusters of the cluster-robust standard errors (0: model-based standard errors)."""


def _complete_rows(x, y, names: Sequence[str], groups: Sequence | None,
                   ) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray | None, dict[str, str]]:
    """``x`` without the features missing for more than half the rows, then without the rows holding a NaN;
    with ``y``, the kept names, the rows' group codes (None without groups) and the features left out."""
    x = np.asarray(x, dtype=float).reshape(len(y), -1)
    y = np.asarray(y, dtype=float)
    missing = np.isnan(x).mean(axis=0) if len(y) else np.zeros(x.shape[1])
    dropped: dict[str, str] = {name: f"not recorded for {missing[j]:.0%} of the facts"
                               for j, name in enumerate(names) if missing[j] > 0.5}
    use = [j for j, name in enumerate(names) if name not in dropped]
    x, names = x[:, use], [names[j] for j in use]
    keep = ~np.isnan(x).any(axis=1) & ~np.isnan(y)
    codes = None
    if groups is not None:
        if len(groups) != len(keep):
            raise ValueError(f"logistic_regression: {len(groups)} groups for {len(keep)} rows")
        codes = np.unique([str(g) for g in groups], return_inverse=True)[1].reshape(-1)[keep]
    return x[keep], y[keep], names, codes, dropped


def _independent_columns(x: np.ndarray, names: Sequence[str], sds: np.ndarray, means: np.ndarray,
                         dropped: dict[str, str]) -> list[int]:
    """The columns that vary and are not collinear with the columns kept before them; the others are named in
    ``dropped`` with the reason."""
    n, cols = len(x), []
    for j, name in enumerate(names):
        if not n or sds[j] == 0 or not np.isfinite(sds[j]):
            dropped[name] = "constant"
            continue
        z = (x[:, cols + [j]] - means[cols + [j]]) / sds[cols + [j]]
        if np.linalg.matrix_rank(np.column_stack([np.ones(n), z]), tol=1e-8 * math.sqrt(n)) < len(cols) + 2:
            dropped[name] = "collinear with " + ", ".join(names[c] for c in cols)
            continue
        cols.append(j)
    return cols


def _unfitted(labels: Sequence[str], n: int, events: int, dropped: dict[str, str], clusters: int) -> LogitFit:
    """A fit without estimates: no rows, no variation in the outcome, or a singular design."""
    nan = [Coefficient(lbl, math.nan, math.nan, math.nan, math.nan, math.nan) for lbl in labels]
    return LogitFit(nan, n, events, False, True, math.nan, dropped, clusters)


def logistic_regression(x: np.ndarray, y: np.ndarray, names: Sequence[str], standardize: bool = True,
                        level: float = LEVEL, max_iter: int = 100, tol: float = 1e-10,
                        groups: Sequence | None = None) -> LogitFit:
    """Maximum-likelihood logistic regression of ``y`` (0/1) on the columns of ``x`` with an intercept
    (statsmodels' ``Logit``, Newton–Raphson), with Wald intervals: model-based standard errors (the inverse
    Fisher information), or with ``groups`` (one label per row, e.g. the fact's case id) cluster-robust ones
    (``cov_type="cluster"``; rows of one group are not independent; fewer than two groups, or no more rows
    than parameters, leave no interval). With ``standardize`` the fit runs on z-scored columns (better
    conditioned) and slopes are reported per unit and, through ``sd``, per standard deviation; the intercept is
    then the log-odds at the features' means. A feature missing (NaN) for more than half the rows is left out
    (runs that did not record it); then rows with a NaN are left out.

    On a two-by-two table the slope is the log odds ratio, log((1/3) / (3/1)) = -2.197:

    >>> fit = logistic_regression([[0]] * 4 + [[1]] * 4, [1, 1, 1, 0, 1, 0, 0, 0], ["x"], standardize=False)
    >>> [(c.name, round(c.estimate, 3)) for c in fit.coefficients]
    [('(intercept)', 1.099), ('x', -2.197)]
    """
    x, y, names, codes, dropped = _complete_rows(x, y, names, groups)
    n = len(y)
    sds = x.std(axis=0, ddof=1) if n > 1 else np.zeros(x.shape[1])
    means = x.mean(axis=0) if n else np.zeros(x.shape[1])
    cols = _independent_columns(x, names, sds, means, dropped)
    scale = sds[cols] if standardize else np.ones(len(cols))
    shift = means[cols] if standardize else np.zeros(len(cols))
    design = np.column_stack([np.ones(n), (x[:, cols] - shift) / scale]) if n else np.zeros((0, len(cols) + 1))
    events = int(y.sum())
    labels = ["(intercept)" + (" at the means" if standardize else "")] + [names[j] for j in cols]
    clusters = len(np.unique(codes)) if codes is not None else 0
    if n == 0 or events in (0, n):
        return _unfitted(labels, n, events, dropped, clusters)
    # The small-sample factor G / (G - 1) * (n - 1) / (n - k) needs two clusters and more rows than parameters.
    clustered = clusters >= 2 and n > design.shape[1]
    robust = {"cov_type": "cluster", "cov_kwds": {"groups": codes}} if clustered else {}
    with warnings.catch_warnings():  # separation and non-convergence warn; both are judged below
        warnings.simplefilter("ignore")
        try:
            res = sm.Logit(y, design).fit(method="newton", maxiter=max_iter, tol=tol, disp=0, **robust)
        except np.linalg.LinAlgError:
            res = None
    if res is None:
        return _unfitted(labels, n, events, dropped, clusters)
    beta, converged = np.asarray(res.params), bool(res.mle_retvals["converged"])
    # Under (quasi-)separation Newton's steps run off to ever larger slopes instead of converging.
    separated = not converged or bool(np.max(np.abs(beta[1:]), initial=0) > 15) or bool(
        np.max(np.abs(beta), initial=0) > 30)
    se, (low, high) = np.asarray(res.bse), np.asarray(res.conf_int(1 - level)).T
    if separated or (codes is not None and not clustered):
        se = low = high = np.full(len(beta), math.nan)
    coefficients = []
    for i, label in enumerate(labels):
        unit = 1.0 if i == 0 else float(scale[i - 1])
        sd = math.nan if i == 0 else float(sds[cols[i - 1]])
        coefficients.append(Coefficient(label, *(float(v[i] / unit) for v in (beta, se, low, high)), sd))
    return LogitFit(coefficients, n, events, converged, separated, float(res.llf), dropped, clusters)


def auc(scores: Sequence[float], outcomes: Sequence[bool], level: float = LEVEL) -> tuple[float, float, float]:
    """Area under the ROC curve of ``scores`` for ``outcomes``: the Mann–Whitney probability that a random
    positive scores above a random negative, ties counting half (``scipy.stats.mannwhitneyu``'s U / (n1 n0)),
    with Hanley & McNeil's (1982) interval (no library has their standard error; its formula is here); NaN
    when either class is empty.

    >>> auc([1, 2, 3, 4], [False, False, True, True])
    (1.0, 1.0, 1.0)
    >>> print(", ".join(f"{v:.3f}" for v in auc([2, 3, 1, 3], [True, True, False, False])))
    0.625, 0.014, 1.000
    """
    pos = [s for s, o in zip(scores, outcomes) if o]
    neg = [s for s, o in zip(scores, outcomes) if not o]
    if not pos or not neg:
        return math.nan, math.nan, math.nan
    a = float(stats.mannwhitneyu(pos, neg).statistic) / (len(pos) * len(neg))
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (len(pos) - 1) * (q1 - a * a) + (len(neg) - 1) * (q2 - a * a)) / (len(pos) * len(neg))
    half = NormalDist().inv_cdf(0.5 + level / 2) * math.sqrt(max(var, 0.0))
    return a, max(0.0, a - half), min(1.0, a + half)


def predictor_rows(facts: Sequence[Fact], level: float = LEVEL) -> tuple[list[dict], list[dict]]:
    """Logistic regressions of survival per study, arm and protocol, pooled over grid cells and seeds (the
    grid's doses, such as K or n_edit, are features; arms of one seed share their facts, so they are not
    pooled): edited facts, intrinsic facts, and both with an ``edited`` indicator; standard errors clustered
    by case id (a fact recurs in every cell of its seed). Returns (coefficient rows, model rows)."""
    coef_rows, model_rows = [], []
    models = (("edited", "edited", EDITED_PREDICTORS), ("intrinsic", "intrinsic", INTRINSIC_PREDICTORS),
              ("edited vs intrinsic", None, BOTH_PREDICTORS))
    for (study, arm), group in by_arm(facts).items():
        for protocol, (label, only, names) in ((p, m) for p in protocols_of(group) for m in models):
            chosen = [(f, o) for f in group if (only is None or f.set == only) and (o := f.outcome(protocol))]
            if not chosen:
                continue
            x = np.array([[float(f.features.get(n, math.nan)) for n in names] for f, _ in chosen])
            y = np.array([0.0 if lost else 1.0 for _, (_, lost) in chosen])
            fit = logistic_regression(x, y, names, level=level, groups=[f.case_id for f, _ in chosen])
            slopes = max(1, len(fit.coefficients) - 1)
            model_rows.append({"study": study, "arm": arm, "protocol": protocol, "model": label, "n": fit.n,
                               "survived": fit.events, "clusters": fit.clusters,
                               "events_per_feature": min(fit.events, fit.n - fit.events) / slopes,
                               "converged": fit.converged, "separated": fit.separated,
                               "log_likelihood": fit.log_likelihood,
                               "dropped": "; ".join(f"{k} ({v})" for k, v in fit.dropped.items())})
            for c in fit.coefficients:
                b, lo, hi = c.per_sd
                coef_rows.append({"study": study, "arm": arm, "protocol": protocol, "model": label,
                                  "feature": c.name, "estimate": c.estimate,
                                  "se": c.se, "ci_low": c.low, "ci_high": c.high, "sd": c.sd,
                                  "per_sd": b, "per_sd_low": lo, "per_sd_high": hi,
                                  "odds_ratio_per_sd": math.exp(min(b, 700.0)) if not math.isnan(b) else math.nan,
                                  "excludes_zero": c.excludes_zero, "n": fit.n, "separated": fit.separated})
    return coef_rows, model_rows


def relation_rows(facts: Sequence[Fact]) -> list[dict]:
    """Survival (never lost) per study, arm, protocol, set and relation, with Wilson intervals."""
    counts: dict[tuple[str, str, str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    for f in facts:
        for protocol in f.passed:
            o = f.outcome(protocol)
            if o is None:
                continue
            c = counts[(f.study, f.arm, protocol, f.set, str(f.features.get("relation") or "?"))]
            c[0] += not o[1]
            c[1] += 1
    rows = []
    for (study, arm, protocol, name, relation), (k, n) in sorted(counts.items()):
        w = wilson(k, n)
        rows.append({"study": study, "arm": arm, "protocol": protocol, "set": name, "relation": relation,
                     "survived": k, "facts": n, "rate": w.estimate, "wilson_low": w.low, "wilson_high": w.high})
    return rows


def single_feature_rows(facts: Sequence[Fact], level: float = LEVEL) -> list[dict]:
    """One feature at a time: per study, arm, protocol and set, the logistic slope of survival on each
    predictor alone (per SD, Wald interval clustered by case id), its AIC, and the AUC [Hanley–McNeil] of the
    feature as a score for survival; the comparison 'does the t=0 margin predict survival better than K' reads
    off these rows."""
    rows = []
    for (study, arm), group in by_arm(facts).items():
        for protocol in protocols_of(group):
            for name, names in (("edited", EDITED_PREDICTORS), ("intrinsic", INTRINSIC_PREDICTORS)):
                chosen = [(f, o) for f in group if f.set == name and (o := f.outcome(protocol))]
                for feature in names:
                    rows_f = [(v, not o[1], f.case_id) for f, o in chosen
                              if not math.isnan(v := float(f.features.get(feature, math.nan)))]
                    if len({v for v, _, _ in rows_f}) < 2:
                        continue
                    values, kept, cases = zip(*rows_f)
                    fit = logistic_regression(np.array(values)[:, None], np.array(kept, dtype=float),
                                              [feature], level=level, groups=cases)
                    slope = [c for c in fit.coefficients if c.name == feature]
                    b, lo, hi = slope[0].per_sd if slope else (math.nan,) * 3
                    a, a_lo, a_hi = auc(values, kept, level)
                    rows.append({"study": study, "arm": arm, "protocol": protocol, "set": name, "feature": feature,
                                 "n": fit.n, "survived": fit.events, "per_sd": b, "per_sd_low": lo,
                                 "per_sd_high": hi, "separated": fit.separated,
                                 "aic": 4 - 2 * fit.log_likelihood if not fit.separated else math.nan,
                                 "auc": a, "auc_low": a_lo, "auc_high": a_hi})
    return rows
