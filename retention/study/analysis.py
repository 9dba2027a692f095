"""Why edits survive (issue 16): per-fact survival, its predictors, a matched comparison of edited and intrinsic
facts, and where the ``top1`` protocol disagrees with ``prob``; read from the per-probe records of run folders.

A *fact* is one case id of one run: an edited fact (probe group ``edit``, its rewrite prompt, target = the new
object) or an intrinsic one (group ``control``, target = the true object). Under a protocol a fact that passed
at t=0 is *lost* at the first measured step where it no longer passes, and *censored* at the run's last
measured step if it never failed (a fact that fails, then passes again, stays lost: the first loss counts).
The loss happened somewhere between the previous measurement and that step; the step is what is recorded.

- Survival: Kaplan–Meier (1958) of the loss steps, pooled over the runs and seeds of a condition
  (``scipy.stats.ecdf`` on ``scipy.stats.CensoredData``), with Greenwood's (1926) variance and the log-log
  interval (Kalbfleisch & Prentice 1980: ``S ** exp(+-z * se)`` with ``se = sqrt(sum d / (n (n - d))) / |log
  S|``; R's ``conf.type = "log-log"``, SciPy's ``confidence_interval(method="log-log")``), and the log-rank
  test (Mantel 1966; ``scipy.stats.logrank``) of edited against intrinsic facts. Facts are treated as
  independent, which facts of one run are not quite (they share the fine-tuning), so the intervals are
  narrower than a seed-level interval.
- Predictors: logistic regression of "survived" (never lost up to the last measured step, the Kaplan–Meier
  event) on per-fact features (statsmodels' ``Logit``, Newton–Raphson on standardised features), with Wald
  intervals. A regression that pools facts over a study's grid cells and seeds counts one fact (case id) once
  per run, so its standard errors are cluster-robust, clustered by case id (``cov_type="cluster"``).
  Features constant in the data or collinear with earlier ones are dropped and named; complete or
  quasi-complete separation is detected and reported instead of a number.
- Matched comparison: edited vs intrinsic retention (passing at the final step, of those passing at t=0, as in
  the report) within quantile bins of the t=0 target log-prob or margin, Wilson intervals per set and bin,
  Newcombe's interval for the difference (:mod:`retention.study.stats`).
- Protocol sensitivity: probes that lost ``top1`` but kept ``prob``; the new top-1 token classified (a function
  word from :data:`FUNCTION_WORDS`, punctuation or space, the start of the alternative, other) and the
  target's rank before and after (``target_rank`` of the probe records, when the run recorded it).
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist, median
from typing import Any

import numpy as np
import statsmodels.api as sm
import yaml
from scipy import stats

from retention.io import atomic_write_text
from retention.study.report import RunResult, _csv, load_results
from retention.study.spec import cell_label
from retention.study.stats import LEVEL, newcombe, wilson
from retention.summary import save_figure

log = logging.getLogger(__name__)

SETS = {"edited": "edit", "intrinsic": "control"}
"""Fact set -> the probe group of its one probe per fact (the edited rewrite prompt, the control fact)."""
FUNCTION_WORDS = frozenset("""
a an the this that these those some any no every each all both either neither
of in on at to for from by with about as into onto upon over under after before between through during
and or but nor so yet if than then because while although though whether
is are was were be been being am has have had do does did will would shall should can could may might must
it its it's he him his she her hers they them their theirs we us our you your i me my mine who whom whose
which what where when why how there here not also very just only more most such same other one
""".split())
"""Function words (closed-class English words) for classifying a new top-1 token."""
EDITED_PREDICTORS = ("margin_t0", "relative_update", "update_norm", "layer", "subject_tokens", "k",
                     "log_subject_freq", "log_target_freq", "log_alternative_freq", "n_edit", "steps", "log10_lr")
INTRINSIC_PREDICTORS = ("margin_t0", "subject_tokens", "log_subject_freq", "log_target_freq",
                        "log_alternative_freq", "steps", "log10_lr")
BOTH_PREDICTORS = ("edited", "margin_t0", "subject_tokens", "log_subject_freq", "log_target_freq", "steps",
                   "log10_lr")
MATCH_BY = ("target_logprob_t0", "margin_t0")


# -- facts ------------------------------------------------------------------------------------------------------


@dataclass
class Fact:
    """One fact of one run: its outcomes at every measured step and its features."""

    study: str
    cell: str
    arm: str
    seed: int
    run: str
    case_id: str
    set: str
    """``edited`` or ``intrinsic``."""
    steps: tuple[int, ...]
    passed: dict[str, tuple[bool | None, ...]]
    """Protocol -> outcome at each of ``steps`` (None: not measured then)."""
    t0: dict
    """The probe record at t=0."""
    final: dict
    """The probe record at the last measured step."""
    features: dict[str, Any] = field(default_factory=dict)

    @property
    def condition(self) -> tuple[str, str, str]:
        return self.study, self.cell, self.arm

    def outcome(self, protocol: str) -> tuple[int, bool] | None:
        """(step, lost) under ``protocol``; None when the fact did not pass at t=0 (it is not at risk)."""
        return first_loss(self.steps, self.passed.get(protocol, ()))

    def kept_final(self, protocol: str) -> bool | None:
        """Passing at the last step, given passing at t=0 (the report's retention); None when not at risk."""
        passes = self.passed.get(protocol, ())
        if not passes or passes[0] is not True:
            return None
        return passes[-1] is True


def first_loss(steps: Sequence[int], passes: Sequence[bool | None]) -> tuple[int, bool] | None:
    """``(step, True)``: the first measured step after t=0 where the probe no longer passes; ``(last step,
    False)``: still passing at every measured step (censored there); None: it did not pass at t=0."""
    if not passes or passes[0] is not True:
        return None
    for step, ok in zip(steps[1:], passes[1:]):
        if ok is False:
            return step, True
    return steps[-1], False


def read_probes(folder: str | Path) -> dict[int, list[dict]]:
    """A run folder's ``probes/step_<N>.jsonl``: step -> probe records."""
    out = {}
    for path in sorted(Path(folder, "probes").glob("step_*.jsonl")):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        out[int(path.stem.split("_")[1])] = rows
    return out


def run_facts(probes: dict[int, list[dict]], **labels: Any) -> list[Fact]:
    """The edited and intrinsic facts of one run's probe records (``labels``: study, cell, arm, seed, run)."""
    steps = tuple(sorted(probes))
    if not steps or steps[0] != 0:
        return []
    by_case: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for step in steps:
        for row in probes[step]:
            for name, group in SETS.items():
                if row.get("group") == group:
                    by_case[(name, str(row["case_id"]))].setdefault(step, row)
    facts = []
    for (name, case_id), rows in by_case.items():
        if 0 not in rows:
            continue
        protocols = list(rows[0]["passed"])
        passed = {p: tuple(rows[s]["passed"].get(p) if s in rows else None for s in steps) for p in protocols}
        facts.append(Fact(case_id=case_id, set=name, steps=steps, passed=passed, t0=rows[0],
                          final=rows.get(steps[-1], rows[0]), **labels))
    return facts


# -- Kaplan-Meier and log-rank -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KMStep:
    """The Kaplan–Meier estimate just after ``step``."""

    step: int
    at_risk: int
    events: int
    censored: int
    survival: float
    se: float
    """Greenwood's standard error of the survival."""
    low: float
    high: float
    """The log-log interval (``low == high == survival`` where it is 1 or 0)."""


def kaplan_meier(times: Sequence[int], lost: Sequence[bool], level: float = LEVEL) -> list[KMStep]:
    """Kaplan–Meier survival at t=0 and at every step where a fact was lost or censored (events before
    censorings at a shared step; ``scipy.stats.ecdf``), with Greenwood's standard error and the log-log
    interval."""
    if len(times) != len(lost):
        raise ValueError(f"kaplan_meier: {len(times)} times and {len(lost)} event flags")
    t, e = np.asarray(times, dtype=float), np.asarray(lost, dtype=bool)
    out = [KMStep(0, len(t), 0, 0, 1.0, 0.0, 1.0, 1.0)]
    if not len(t):
        return out
    sf = stats.ecdf(stats.CensoredData(uncensored=t[e], right=t[~e])).sf
    with warnings.catch_warnings():  # NaN where S is 0 or 1; the interval is the point there (below)
        warnings.simplefilter("ignore", RuntimeWarning)
        ci = sf.confidence_interval(level, method="log-log")
    at_risk = np.array([(t >= q).sum() for q in sf.quantiles])
    events = np.array([(e & (t == q)).sum() for q in sf.quantiles])
    # SciPy does not expose Greenwood's variance, only intervals built on it; infinite once S reaches 0.
    with np.errstate(divide="ignore", invalid="ignore"):
        greenwood = np.cumsum(np.where(events > 0, events / (at_risk * (at_risk - events)), 0.0))
    for i, q in enumerate(sf.quantiles):
        s = float(sf.probabilities[i])
        low, high = (float(ci.low.probabilities[i]), float(ci.high.probabilities[i])) if 0 < s < 1 else (s, s)
        se = s * math.sqrt(greenwood[i]) if math.isfinite(greenwood[i]) else 0.0
        step = KMStep(int(q), int(at_risk[i]), int(events[i]), int((~e & (t == q)).sum()), s, se, low, high)
        if q == 0:
            out[0] = step
        else:
            out.append(step)
    return out


def logrank(times_a: Sequence[int], lost_a: Sequence[bool], times_b: Sequence[int],
            lost_b: Sequence[bool]) -> tuple[float, float]:
    """The log-rank test of two samples (Mantel 1966; ``scipy.stats.logrank``): (chi-square with 1 degree of
    freedom, p-value); NaN when no fact was lost or a sample is empty."""
    if not len(times_a) or not len(times_b) or not (any(lost_a) or any(lost_b)):
        return math.nan, math.nan
    samples = []
    for times, lost in ((times_a, lost_a), (times_b, lost_b)):
        t, e = np.asarray(times, dtype=float), np.asarray(lost, dtype=bool)
        samples.append(stats.CensoredData(uncensored=t[e], right=t[~e]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # zero variance (every fact lost at once)
        res = stats.logrank(*samples)
    if not math.isfinite(res.statistic):
        return math.nan, math.nan
    return float(res.statistic) ** 2, float(res.pvalue)


# -- logistic regression ----------------------------------------------------------------------------------------


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
        return not math.isnan(self.low) and (self.low > 0 or self.high < 0)


@dataclass
class LogitFit:
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
    (runs that did not record it); then rows with a NaN are left out."""
    x = np.asarray(x, dtype=float).reshape(len(y), -1)
    y = np.asarray(y, dtype=float)
    missing = np.isnan(x).mean(axis=0) if len(y) else np.zeros(x.shape[1])
    dropped: dict[str, str] = {name: f"not recorded for {missing[j]:.0%} of the facts"
                               for j, name in enumerate(names) if missing[j] > 0.5}
    use = [j for j, name in enumerate(names) if name not in dropped]
    x, names = x[:, use], [names[j] for j in use]
    keep = ~np.isnan(x).any(axis=1) & ~np.isnan(y)
    x, y = x[keep], y[keep]
    codes = None
    if groups is not None:
        if len(groups) != len(keep):
            raise ValueError(f"logistic_regression: {len(groups)} groups for {len(keep)} rows")
        codes = np.unique([str(g) for g in groups], return_inverse=True)[1].reshape(-1)[keep]
    n = len(y)
    cols: list[int] = []
    sds = x.std(axis=0, ddof=1) if n > 1 else np.zeros(x.shape[1])
    means = x.mean(axis=0) if n else np.zeros(x.shape[1])
    for j, name in enumerate(names):
        if not n or sds[j] == 0 or not np.isfinite(sds[j]):
            dropped[name] = "constant"
            continue
        z = (x[:, cols + [j]] - means[cols + [j]]) / sds[cols + [j]]
        if np.linalg.matrix_rank(np.column_stack([np.ones(n), z]), tol=1e-8 * math.sqrt(n)) < len(cols) + 2:
            dropped[name] = "collinear with " + ", ".join(names[c] for c in cols)
            continue
        cols.append(j)
    scale = sds[cols] if standardize else np.ones(len(cols))
    shift = means[cols] if standardize else np.zeros(len(cols))
    design = np.column_stack([np.ones(n), (x[:, cols] - shift) / scale]) if n else np.zeros((0, len(cols) + 1))
    events = int(y.sum())
    labels = ["(intercept)" + (" at the means" if standardize else "")] + [names[j] for j in cols]
    clusters = len(np.unique(codes)) if codes is not None else 0
    if n == 0 or events in (0, n):
        nan = [Coefficient(lbl, math.nan, math.nan, math.nan, math.nan, math.nan) for lbl in labels]
        return LogitFit(nan, n, events, False, True, math.nan, dropped, clusters)
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
        nan = [Coefficient(lbl, math.nan, math.nan, math.nan, math.nan, math.nan) for lbl in labels]
        return LogitFit(nan, n, events, False, True, math.nan, dropped, clusters)
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


# -- features ---------------------------------------------------------------------------------------------------


def count_terms(text: str, terms: Sequence[str]) -> dict[str, int]:
    """Case-insensitive whole-word occurrences of each term in ``text`` (a term may span words: "New York")."""
    lower = text.lower()
    out = {}
    for term in dict.fromkeys(t.strip() for t in terms if t and t.strip()):
        out[term] = len(re.findall(r"(?<!\w)" + re.escape(term.lower()) + r"(?!\w)", lower))
    return out


def _run_config(folder: Path) -> dict:
    """The run's resolved config: ``config.yaml`` (LightningCLI's), else the study's record of it."""
    path = folder / "config.yaml"
    if path.is_file():
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    done = folder / "study_run.json"
    if done.is_file():
        tree: dict = {}
        for key, value in json.loads(done.read_text(encoding="utf-8")).get("config", {}).items():
            node = tree
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return tree
    return {}


def _get(tree: dict, dotted: str, default: Any = None) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return default
        tree = tree[part]
    return tree


class _Context:
    """Knowledge records, tokenizers and corpus counts shared by the runs (each loaded once)."""

    def __init__(self, corpus: str | None):
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        self.tokenizers: dict[str, Any] = {}
        self.notes: list[str] = []
        self.corpus_text: str | None = None
        self.corpus_id = None
        self.counts: dict[str, int] = {}
        if corpus:
            from retention.corpus import corpus_text

            try:
                self.corpus_text, self.corpus_id = corpus_text(corpus, min_chars=5_000_000, what="analysis corpus")
            except (FileNotFoundError, ImportError, OSError) as err:
                self.notes.append(f"corpus frequencies left out: {err}")

    def knowledge(self, source: str | None, on_error: str = "raise") -> dict[str, Any]:
        if not source:
            return {}
        key = (str(source), on_error)
        if key not in self.records:
            from retention.data.readers import load_records

            try:
                self.records[key] = {str(r.case_id): r for r in load_records(source, on_error=on_error)}
            except (OSError, ValueError) as err:
                self.notes.append(f"knowledge {source!r} could not be read ({err}): no subject, relation or "
                                  "corpus features for its facts")
                self.records[key] = {}
        return self.records[key]

    def tokenizer(self, model: str | None):
        if not model:
            return None
        if model not in self.tokenizers:
            from retention.models import load_tokenizer

            try:
                self.tokenizers[model] = load_tokenizer(model)
            except Exception as err:  # noqa: BLE001 (any failure only leaves the token counts out)
                self.notes.append(f"tokenizer of {model!r} could not be loaded ({type(err).__name__}: {err}): "
                                  "no subject token counts")
                self.tokenizers[model] = None
        return self.tokenizers[model]

    def frequency(self, term: str | None) -> float:
        if self.corpus_text is None or not term:
            return math.nan
        term = term.strip()
        if term not in self.counts:
            self.counts.update(count_terms(self.corpus_text, [term]))
        return float(self.counts.get(term, 0))


def _subject_tokens(tokenizer, record) -> float:
    if tokenizer is None or record is None:
        return math.nan
    text = record.subject if record.prompt.lstrip().startswith("{}") else " " + record.subject
    return float(len(tokenizer(text, add_special_tokens=False)["input_ids"]))


def _effective_k(record, k: int, source: str, seed: int) -> float:
    """Augmentation phrasings the run gave this fact: recomputed for the deterministic sources (``record``,
    ``relations``: a record can get fewer than ``k``), ``k`` itself for ``model``."""
    if k <= 0:
        return 0.0
    if record is None or source not in ("record", "relations"):
        return float(k)
    from retention.callbacks.augmentation import phrasings

    try:
        return float(len(phrasings(record, k, source, seed)))
    except (KeyError, ValueError):
        return float(k)


def _tokens_per_step(config: dict, world_size: int | None = None) -> float:
    """Tokens one optimiser step sees on a packed text task (batch x block x ranks x accumulation; the ranks
    from the run's recorded world size, else the config's devices x nodes when they are numbers, else one);
    NaN for the other families, whose examples vary in length."""
    if _get(config, "data.task.family") != "text":
        return math.nan
    if not world_size:
        devices = _get(config, "trainer.devices", 1)
        world_size = (devices if isinstance(devices, int) and devices > 0 else 1) * int(
            _get(config, "trainer.num_nodes", 1) or 1)
    return float(int(_get(config, "data.batch_size", 1)) * int(_get(config, "data.task.block_size", 1))
                 * world_size * int(_get(config, "trainer.accumulate_grad_batches", 1) or 1))


def add_features(facts: Sequence[Fact], result: RunResult, ctx: _Context) -> None:
    """Per-fact features of one run's facts (see docs/analysis.md for each)."""
    config = _run_config(result.folder)
    run = result.summary.get("run", {})
    diagnostics = {str(d.get("case_id")): d for d in run.get("edit_diagnostics") or [] if isinstance(d, dict)}
    records = dict(ctx.knowledge(_get(config, "edits.knowledge", run.get("knowledge")),
                                 _get(config, "edits.on_error", "raise")))
    controls = _get(config, "edits.controls")
    if controls:
        records.update(ctx.knowledge(controls, _get(config, "edits.on_error", "raise")))
    tokenizer = ctx.tokenizer(_get(config, "model.model_name", run.get("model")))
    layers = [int(x) for x in run.get("edited_layers") or []]
    k = int(_get(config, "paraphrases.k", 0) or 0)
    source = str(_get(config, "paraphrases.source", "record"))
    k_seed = int(_get(config, "paraphrases.seed", 0) or 0)
    lr = _get(config, "model.optimizer.lr")
    for fact in facts:
        record = records.get(fact.case_id)
        t0 = fact.t0
        margin = t0.get("target_logprob", math.nan) - t0.get("alt_logprob", math.nan)
        diag = diagnostics.get(fact.case_id, {}) if fact.set == "edited" else {}
        target_freq = ctx.frequency(t0.get("target"))
        alternative_freq = ctx.frequency(t0.get("alternative"))
        subject_freq = ctx.frequency(record.subject if record else None)
        f = {
            "edited": 1.0 if fact.set == "edited" else 0.0,
            "margin_t0": margin,
            "target_logprob_t0": float(t0.get("target_logprob", math.nan)),
            "target_rank_t0": float(t0["target_rank"]) if t0.get("target_rank") is not None else math.nan,
            "relation": record.relation_id if record else "",
            "subject": record.subject if record else "",
            "subject_tokens": _subject_tokens(tokenizer, record),
            "subject_freq": subject_freq,
            "target_freq": target_freq,
            "alternative_freq": alternative_freq,
            "log_subject_freq": math.log1p(subject_freq),
            "log_target_freq": math.log1p(target_freq),
            "log_alternative_freq": math.log1p(alternative_freq),
            "steps": float(fact.steps[-1]),
            "log10_lr": math.log10(float(lr)) if lr else math.nan,
            "n_edit": float(run.get("n_edit", math.nan)),
            "tokens_per_step": _tokens_per_step(config, result.summary.get("environment", {}).get("world_size")),
        }
        if fact.set == "edited":
            f.update({
                "update_norm": float(diag.get("delta_norm", math.nan)),
                "relative_update": float(diag.get("relative_update", math.nan)),
                "layer": float(diag["layer"]) if "layer" in diag else (float(np.mean(layers)) if layers else math.nan),
                "n_layers": float(len(layers)) if layers else math.nan,
                "k": _effective_k(record, k, source, k_seed),
                "k_nominal": float(k),
            })
        fact.features = f


def load_facts(folders: Sequence[str | Path], corpus: str | None = "wikitext2") -> tuple[list[Fact], list[str]]:
    """Every edited and intrinsic fact of the finished runs in ``folders`` (study or run folders), with
    features; and notes on what could not be computed."""
    results, _, missing = load_results(folders)
    runs = [(r, read_probes(r.folder)) for r in results]
    facts, notes = facts_of(runs, corpus)
    if missing:
        notes.append(f"{len(missing)} unfinished runs left out")
    return facts, notes


def facts_of(runs: Sequence[tuple[RunResult, dict[int, list[dict]]]],
             corpus: str | None = "wikitext2") -> tuple[list[Fact], list[str]]:
    """The facts of runs with their probe records (:func:`read_probes`), with features; and notes."""
    ctx = _Context(corpus)
    facts: list[Fact] = []
    for r, probes in runs:
        if not probes:
            ctx.notes.append(f"{r.folder}: no probes/step_*.jsonl; left out")
            continue
        c = r.condition
        mine = run_facts(probes, study=c.study, cell=c.cell, arm=c.arm, seed=r.seed, run=r.folder.name)
        add_features(mine, r, ctx)
        facts.extend(mine)
    if ctx.corpus_id:
        ctx.notes.append(f"corpus frequencies from {ctx.corpus_id}")
    return facts, ctx.notes


PROTOCOL_ORDER = ("top1", "gen", "prob", "token_acc")


def _ordered(protocols) -> list[str]:
    """Protocols once each, in the usual order (strictest first), unknown ones last."""
    found = list(dict.fromkeys(protocols))
    return sorted(found, key=lambda p: PROTOCOL_ORDER.index(p) if p in PROTOCOL_ORDER else len(PROTOCOL_ORDER))


def protocols_of(facts: Sequence[Fact]) -> list[str]:
    return _ordered(p for f in facts for p in f.passed)


def _by_condition(facts: Sequence[Fact]) -> dict[tuple[str, str, str], list[Fact]]:
    out: dict[tuple[str, str, str], list[Fact]] = defaultdict(list)
    for f in facts:
        out[f.condition].append(f)
    return dict(out)


def _by_arm(facts: Sequence[Fact]) -> dict[tuple[str, str], list[Fact]]:
    """Facts per study and arm (grid cells and seeds pooled)."""
    out: dict[tuple[str, str], list[Fact]] = defaultdict(list)
    for f in facts:
        out[(f.study, f.arm)].append(f)
    return dict(out)


# -- tables -----------------------------------------------------------------------------------------------------


def survival_rows(facts: Sequence[Fact], level: float = LEVEL) -> list[dict]:
    """Kaplan–Meier curves per condition, protocol and set (survival.csv)."""
    rows = []
    for (study, cell, arm), group in _by_condition(facts).items():
        for protocol in protocols_of(group):
            for name in SETS:
                outcomes = [o for f in group if f.set == name and (o := f.outcome(protocol)) is not None]
                if not outcomes:
                    continue
                runs = len({f.run for f in group if f.set == name})
                for k in kaplan_meier([t for t, _ in outcomes], [e for _, e in outcomes], level):
                    rows.append({"study": study, "cell": cell, "arm": arm, "protocol": protocol, "set": name,
                                 "step": k.step, "at_risk": k.at_risk, "lost": k.events, "censored": k.censored,
                                 "survival": k.survival, "se": k.se, "ci_low": k.low, "ci_high": k.high,
                                 "n_facts": len(outcomes), "n_runs": runs})
    return rows


def logrank_rows(facts: Sequence[Fact], level: float = LEVEL) -> list[dict]:
    """Per condition and protocol: each set's facts at risk, losses and Kaplan–Meier survival at its last step
    (log-log interval), and the log-rank test of edited against intrinsic."""
    rows = []
    for (study, cell, arm), group in _by_condition(facts).items():
        for protocol in protocols_of(group):
            row: dict[str, Any] = {"study": study, "cell": cell, "arm": arm, "protocol": protocol}
            sides = {}
            for name in SETS:
                outcomes = [o for f in group if f.set == name and (o := f.outcome(protocol)) is not None]
                sides[name] = ([t for t, _ in outcomes], [e for _, e in outcomes])
                km = kaplan_meier(*sides[name], level)[-1] if outcomes else None
                row.update({f"{name}_facts": len(outcomes), f"{name}_lost": sum(sides[name][1]),
                            f"{name}_survival": km.survival if km else math.nan,
                            f"{name}_low": km.low if km else math.nan, f"{name}_high": km.high if km else math.nan})
            if not any(row[f"{name}_facts"] for name in SETS):
                continue
            chi2, p = logrank(*sides["edited"], *sides["intrinsic"])
            rows.append({**row, "logrank_chi2": chi2, "logrank_p": p})
    return rows


def predictor_rows(facts: Sequence[Fact], level: float = LEVEL) -> tuple[list[dict], list[dict]]:
    """Logistic regressions of survival per study, arm and protocol, pooled over grid cells and seeds (the
    grid's doses, such as K or n_edit, are features; arms of one seed share their facts, so they are not
    pooled): edited facts, intrinsic facts, and both with an ``edited`` indicator; standard errors clustered
    by case id (a fact recurs in every cell of its seed). Returns (coefficient rows, model rows)."""
    coef_rows, model_rows = [], []
    models = (("edited", "edited", EDITED_PREDICTORS), ("intrinsic", "intrinsic", INTRINSIC_PREDICTORS),
              ("edited vs intrinsic", None, BOTH_PREDICTORS))
    for (study, arm), group in _by_arm(facts).items():
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


def quantile_edges(values: Sequence[float], bins: int) -> list[float]:
    """Edges of up to ``bins`` quantile bins (repeated quantiles merged)."""
    xs = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if not len(xs):
        return []
    edges = list(dict.fromkeys(float(q) for q in np.quantile(xs, np.linspace(0, 1, bins + 1))))
    return edges if len(edges) > 1 else [edges[0], edges[0]]


def matched_rows(facts: Sequence[Fact], bins: int = 4, level: float = LEVEL) -> list[dict]:
    """Edited vs intrinsic retention within quantile bins of the t=0 target log-prob and of the t=0 margin
    (bins over both sets' facts passing at t=0, per condition and protocol), plus all facts unbinned."""
    rows = []
    for (study, cell, arm), group in _by_condition(facts).items():
        for protocol in protocols_of(group):
            at_risk = [(f, kept) for f in group if (kept := f.kept_final(protocol)) is not None]
            if not at_risk:
                continue
            for by in MATCH_BY:
                values = [float(f.features.get(by, math.nan)) for f, _ in at_risk]
                edges = quantile_edges(values, bins)
                members: dict[str, list[tuple[Fact, bool]]] = defaultdict(list)
                for (f, kept), v in zip(at_risk, values):
                    if edges and not math.isnan(v):  # bin i: edges[i] <= v < edges[i + 1]; the last one closed
                        i = min(int(np.searchsorted(edges, v, side="right")) - 1, len(edges) - 2)
                        members[str(i + 1)].append((f, kept))
                spans = {str(i + 1): (edges[i], edges[i + 1]) for i in range(len(edges) - 1)}
                spans["all"] = (-math.inf, math.inf)
                members["all"] = at_risk
                for label, (lo, hi) in spans.items():
                    inside = members.get(label, [])
                    k = {name: sum(kept for f, kept in inside if f.set == name) for name in SETS}
                    n = {name: sum(1 for f, _ in inside if f.set == name) for name in SETS}
                    e, r = wilson(k["edited"], n["edited"], level), wilson(k["intrinsic"], n["intrinsic"], level)
                    d = newcombe(k["edited"], n["edited"], k["intrinsic"], n["intrinsic"], level)
                    rows.append({"study": study, "cell": cell, "arm": arm, "protocol": protocol, "by": by,
                                 "bin": label, "low": lo, "high": hi,
                                 "edited_kept": k["edited"], "edited_n": n["edited"],
                                 "edited_rate": e.estimate, "edited_low": e.low, "edited_high": e.high,
                                 "intrinsic_kept": k["intrinsic"], "intrinsic_n": n["intrinsic"],
                                 "intrinsic_rate": r.estimate, "intrinsic_low": r.low, "intrinsic_high": r.high,
                                 "difference": d.estimate, "diff_low": d.low, "diff_high": d.high,
                                 "excludes_zero": d.excludes_zero})
    return rows


def token_category(token: str, alternative: str | None = None) -> str:
    """``function word``, ``punctuation/space``, ``alternative`` (the probe's alternative starts with it) or
    ``other``."""
    word = token.strip().lower()
    if word in FUNCTION_WORDS:
        return "function word"
    if not word or not any(ch.isalnum() for ch in word):
        return "punctuation/space"
    if alternative and alternative.strip().lower().startswith(word):
        return "alternative"
    return "other"


def sensitivity_rows(runs: Sequence[tuple[RunResult, dict[int, list[dict]]]]) -> list[dict]:
    """Probes (every group) passing ``top1`` and ``prob`` at t=0 that lost ``top1`` but kept ``prob`` at the
    last step: the new top-1 token, its category, and the target's rank at t=0 and at the end."""
    rows = []
    for result, probes in runs:
        steps = sorted(probes)
        if len(steps) < 2 or steps[0] != 0:
            continue
        first = {(r["group"], r["case_id"], r["kind"], r["prompt"], r["target"]): r for r in probes[0]}
        for r in probes[steps[-1]]:
            r0 = first.get((r["group"], r["case_id"], r["kind"], r["prompt"], r["target"]))
            if r0 is None or not (r0["passed"].get("top1") and r0["passed"].get("prob")):
                continue
            if r["passed"].get("top1") is not False or r["passed"].get("prob") is not True:
                continue
            c = result.condition
            rows.append({"study": c.study, "cell": c.cell, "arm": c.arm, "seed": result.seed,
                         "run": result.folder.name, "group": r["group"], "case_id": r["case_id"],
                         "prompt": r["prompt"], "target": r["target"], "alternative": r.get("alternative"),
                         "top1_t0": r0.get("top1_token", ""), "top1_final": r.get("top1_token", ""),
                         "category": token_category(r.get("top1_token", ""), r.get("alternative")),
                         "rank_t0": r0.get("target_rank"), "rank_final": r.get("target_rank"),
                         "margin_t0": r0["target_logprob"] - r0["alt_logprob"],
                         "margin_final": r["target_logprob"] - r["alt_logprob"], "step": steps[-1]})
    return rows


def sensitivity_summary(rows: Sequence[dict], at_risk: dict[tuple, int]) -> list[dict]:
    """Per condition and group: how many probes passing both at t=0 lost top1 but kept prob, the share whose new
    top-1 is a function word (Wilson), and the median target rank before and after."""
    by: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by[(r["study"], r["cell"], r["arm"], r["group"])].append(r)
    out = []
    for key in sorted(set(by) | set(at_risk)):
        rs = by.get(key, [])
        cats = Counter(r["category"] for r in rs)
        fw = wilson(cats["function word"], len(rs))
        ranks0 = [r["rank_t0"] for r in rs if r["rank_t0"] is not None]
        ranks1 = [r["rank_final"] for r in rs if r["rank_final"] is not None]
        out.append({"study": key[0], "cell": key[1], "arm": key[2], "group": key[3],
                    "passing_both_t0": at_risk.get(key, 0), "lost_top1_kept_prob": len(rs),
                    **{c.replace(" ", "_").replace("/", "_"): cats[c] for c in
                       ("function word", "punctuation/space", "alternative", "other")},
                    "function_word_share": fw.estimate, "fw_low": fw.low, "fw_high": fw.high,
                    "median_rank_t0": median(ranks0) if ranks0 else math.nan,
                    "median_rank_final": median(ranks1) if ranks1 else math.nan})
    return out


def auc(scores: Sequence[float], outcomes: Sequence[bool], level: float = LEVEL) -> tuple[float, float, float]:
    """Area under the ROC curve of ``scores`` for ``outcomes``: the Mann–Whitney probability that a random
    positive scores above a random negative, ties counting half (``scipy.stats.mannwhitneyu``'s U / (n1 n0)),
    with Hanley & McNeil's (1982) interval (no library has their standard error; its formula is here); NaN
    when either class is empty."""
    pos = [s for s, o in zip(scores, outcomes) if o]
    neg = [s for s, o in zip(scores, outcomes) if not o]
    if not pos or not neg:
        return math.nan, math.nan, math.nan
    a = float(stats.mannwhitneyu(pos, neg).statistic) / (len(pos) * len(neg))
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (len(pos) - 1) * (q1 - a * a) + (len(neg) - 1) * (q2 - a * a)) / (len(pos) * len(neg))
    half = NormalDist().inv_cdf(0.5 + level / 2) * math.sqrt(max(var, 0.0))
    return a, max(0.0, a - half), min(1.0, a + half)


def single_feature_rows(facts: Sequence[Fact], level: float = LEVEL) -> list[dict]:
    """One feature at a time: per study, arm, protocol and set, the logistic slope of survival on each
    predictor alone (per SD, Wald interval clustered by case id), its AIC, and the AUC [Hanley–McNeil] of the
    feature as a score for survival; the comparison 'does the t=0 margin predict survival better than K' reads
    off these rows."""
    rows = []
    for (study, arm), group in _by_arm(facts).items():
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


def _cell_parts(cell: str) -> dict[str, str]:
    """A grid cell's label (:func:`retention.study.spec.cell_label`: ``axis=value, axis=value``) as a mapping."""
    return dict(part.split("=", 1) for part in cell.split(", ") if "=" in part)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def dose_rows(facts: Sequence[Fact], min_levels: int = 3, level: float = LEVEL) -> list[dict]:
    """Retention against each numeric grid axis of a study with at least ``min_levels`` values (K, n_edit,
    ...): per value, series (the cell's other grid values), arm, protocol and set, the facts passing at t=0
    and at the last step (Wilson interval), pooled over seeds; ``trend`` rows give the logistic slope of
    'kept' on the dose within each series (per unit of the dose, Wald interval clustered by case id: a fact
    recurs at every dose of its seed)."""
    rows = []
    by_study: dict[str, list[Fact]] = defaultdict(list)
    for f in facts:
        by_study[f.study].append(f)
    for study, group in by_study.items():
        parts = {c: _cell_parts(c) for c in {f.cell for f in group}}
        for key in sorted({k for p in parts.values() for k in p}):
            values = {p[key] for p in parts.values() if key in p}
            if len(values) < min_levels or any(_number(v) is None for v in values):
                continue
            kept: dict[tuple, list[tuple[float, bool, str]]] = defaultdict(list)
            runs: dict[tuple, set] = defaultdict(set)
            for f in group:
                cell = parts[f.cell]
                if key not in cell:
                    continue
                series = cell_label([(k, v) for k, v in cell.items() if k != key])
                for protocol in f.passed:
                    if (k := f.kept_final(protocol)) is not None:
                        point = (float(_number(cell[key])), k, f.case_id)
                        kept[(series, f.arm, protocol, f.set)].append(point)
                        runs[(series, f.arm, protocol, f.set, float(_number(cell[key])))].add(f.run)
            for (series, arm, protocol, name), points in sorted(kept.items()):
                base = {"study": study, "dose": key, "series": series, "arm": arm, "protocol": protocol, "set": name}
                for x in sorted({x for x, _, _ in points}):
                    k = sum(y for v, y, _ in points if v == x)
                    n = sum(1 for v, _, _ in points if v == x)
                    w = wilson(k, n, level)
                    rows.append({**base, "value": x, "kept": k, "n": n, "runs": len(runs[(series, arm, protocol,
                                 name, x)]), "rate": w.estimate, "low": w.low, "high": w.high})
                fit = logistic_regression(np.array([[x] for x, _, _ in points]),
                                          np.array([float(y) for _, y, _ in points]), [key], level=level,
                                          groups=[c for _, _, c in points])
                slope = [c for c in fit.coefficients if c.name == key]
                rows.append({**base, "value": "trend", "kept": fit.events, "n": fit.n, "runs": math.nan,
                             "rate": slope[0].estimate if slope and not fit.separated else math.nan,
                             "low": slope[0].low if slope else math.nan, "high": slope[0].high if slope else math.nan})
    return rows


def curve_rows(facts: Sequence[Fact], level: float = LEVEL) -> list[dict]:
    """Retention at every measured step (of the facts passing at t=0, those passing at that step; Wilson) per
    condition, protocol and set, with the tokens seen by then (``tokens_per_step`` x step, when known)."""
    rows = []
    for (study, cell, arm), group in _by_condition(facts).items():
        for protocol in protocols_of(group):
            for name in SETS:
                mine = [f for f in group if f.set == name and f.passed.get(protocol, (None,))[0] is True]
                per_step: dict[int, list[int]] = defaultdict(lambda: [0, 0])
                for f in mine:
                    for step, ok in zip(f.steps, f.passed[protocol]):
                        if ok is not None:
                            per_step[step][0] += ok is True
                            per_step[step][1] += 1
                tps = next((f.features.get("tokens_per_step", math.nan) for f in mine), math.nan)
                for step, (k, n) in sorted(per_step.items()):
                    w = wilson(k, n, level)
                    rows.append({"study": study, "cell": cell, "arm": arm, "protocol": protocol, "set": name,
                                 "step": step, "tokens": step * tps, "passing": k, "at_risk": n,
                                 "rate": w.estimate, "low": w.low, "high": w.high})
    return rows


RANK_PROTOCOLS = (5, 10)
"""``rank < k`` protocols computed from the recorded target rank (top-k accuracy of the target's first token)."""


def loss_class(t0: dict, final: dict) -> str:
    """Why a fact passing ``top1`` at t=0 is or is not passing at the end, from its probe records: ``kept``;
    ``format shift`` (the new top-1 is a function word or punctuation, the target still beats the alternative
    and is within the top 10); ``displaced`` (the same, but the new top-1 is another content word);
    ``buried`` (the target still beats the alternative but fell out of the top 10); ``overturned`` (the
    alternative now beats the target: for an edit, the original object is back)."""
    if final["passed"].get("top1"):
        return "kept"
    if final["target_logprob"] <= final["alt_logprob"]:
        return "overturned"
    rank = final.get("target_rank")
    if rank is not None and rank >= 10:
        return "buried"
    category = token_category(final.get("top1_token", ""), final.get("alternative"))
    return "format shift" if category in ("function word", "punctuation/space") else "displaced"


LOSS_CLASSES = ("kept", "format shift", "displaced", "buried", "overturned")


def decomposition_rows(facts: Sequence[Fact], level: float = LEVEL) -> list[dict]:
    """Per condition and set: the facts passing ``top1`` at t=0 split by :func:`loss_class` at the last step,
    retention under every recorded protocol and under ``rank < k`` (:data:`RANK_PROTOCOLS`), each with its
    count, denominator and Wilson interval, and the median change in the target's log-prob."""
    rows = []
    for (study, cell, arm), group in _by_condition(facts).items():
        for name in SETS:
            mine = [f for f in group if f.set == name]
            if not mine:
                continue
            row: dict[str, Any] = {"study": study, "cell": cell, "arm": arm, "set": name, "facts": len(mine),
                                   "step": max(f.steps[-1] for f in mine)}
            at_risk = [f for f in mine if f.passed.get("top1", (None,))[0] is True]
            classes = Counter(loss_class(f.t0, f.final) for f in at_risk)
            row["top1_t0"] = len(at_risk)
            row.update({c.replace(" ", "_"): classes[c] for c in LOSS_CLASSES})
            for protocol in protocols_of(mine):
                kept = [k for f in mine if (k := f.kept_final(protocol)) is not None]
                w = wilson(sum(kept), len(kept), level)
                row.update({f"{protocol}_kept": sum(kept), f"{protocol}_n": len(kept), f"{protocol}_rate": w.estimate,
                            f"{protocol}_low": w.low, f"{protocol}_high": w.high})
            ranked = [f for f in mine if f.t0.get("target_rank") is not None and f.final.get("target_rank") is not None]
            for k in RANK_PROTOCOLS if ranked else ():
                start = [f for f in ranked if f.t0["target_rank"] < k]
                kept_k = sum(f.final["target_rank"] < k for f in start)
                w = wilson(kept_k, len(start), level)
                row.update({f"top{k}_kept": kept_k, f"top{k}_n": len(start), f"top{k}_rate": w.estimate,
                            f"top{k}_low": w.low, f"top{k}_high": w.high})
            deltas = [f.final["target_logprob"] - f.t0["target_logprob"] for f in mine]
            row["median_delta_logprob"] = median(deltas)
            ranks = [(f.t0["target_rank"], f.final["target_rank"]) for f in ranked]
            row["median_rank_t0"] = median(r for r, _ in ranks) if ranks else math.nan
            row["median_rank_final"] = median(r for _, r in ranks) if ranks else math.nan
            rows.append(row)
    return rows


# -- files ------------------------------------------------------------------------------------------------------


def _f(x: float, digits: int = 2, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _ci(est: float, low: float, high: float, digits: int = 2, sign: bool = False) -> str:
    if math.isnan(est):
        return "n/a"
    if math.isnan(low):
        return _f(est, digits, sign)
    return f"{_f(est, digits, sign)} [{_f(low, digits, sign)}, {_f(high, digits, sign)}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(map(str, r)) + " |" for r in rows)]


def _label(study: str, cell: str, arm: str) -> str:
    return f"{study}: {arm}" if cell == "all" else f"{study}: {cell}, {arm}"


def survival_markdown(logrank_table: Sequence[dict], notes: Sequence[str], images: Sequence[str]) -> str:
    lines = ["# Survival of edited and intrinsic facts", "",
             "Kaplan–Meier survival at each condition's last measured step: of the facts passing at t=0, the "
             "estimated share never lost [95 % log-log interval, Greenwood variance]; facts of all runs and seeds "
             "of a condition pooled. Log-rank test of edited against intrinsic. survival.csv has every step.", ""]
    lines += _table(["condition", "protocol", "edited: facts (lost)", "edited S", "intrinsic: facts (lost)",
                     "intrinsic S", "log-rank p"],
                    [[_label(r["study"], r["cell"], r["arm"]), r["protocol"],
                      f"{r['edited_facts']} ({r['edited_lost']})",
                      _ci(r["edited_survival"], r["edited_low"], r["edited_high"]),
                      f"{r['intrinsic_facts']} ({r['intrinsic_lost']})",
                      _ci(r["intrinsic_survival"], r["intrinsic_low"], r["intrinsic_high"]),
                      _f(r["logrank_p"], 3)] for r in logrank_table])
    if images:
        lines += ["", *images]
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    return "\n".join(lines) + "\n"


CLUSTER_NOTE = ("Wald intervals of the regressions use cluster-robust standard errors clustered by case id: "
                "a fact counted in several grid cells, seeds or runs is one cluster, not independent rows.")


def predictors_markdown(coef: Sequence[dict], models: Sequence[dict], relations: Sequence[dict]) -> str:
    lines = ["# What predicts survival", "",
             "Logistic regression of *survived* (passing at t=0 and at every later measured step) on per-fact "
             "features, per study and arm, pooled over grid cells and seeds; maximum likelihood (statsmodels' "
             "Logit) on standardised features, 95 % Wald intervals. Slopes are log-odds per standard deviation "
             "of the feature (its SD in the data in the `sd` column of predictors.csv, which also has the slope "
             "per unit). Features constant in the data "
             "or collinear with earlier ones are left out; separation (a feature splitting survivors from lost "
             "facts perfectly) leaves no estimate. Fewer than about 10 of the rarer outcome per feature "
             "(Peduzzi et al. 1996) makes the slopes unreliable. **Bold**: the interval excludes zero.", "",
             CLUSTER_NOTE]
    for m in models:
        lines += ["", f"## {m['study']}: {m['arm']}, {m['model']}, `{m['protocol']}`", "",
                  f"{m['n']} facts ({m['clusters']} case ids), {m['survived']} survived; "
                  + ("**separation or no variation in the outcome: no estimates**" if m["separated"] else
                     f"log-likelihood {m['log_likelihood']:.2f}")
                  + (f"; fewer than 10 of the rarer outcome per feature ({m['events_per_feature']:.1f}): "
                     "expect biased, unstable slopes" if m["events_per_feature"] < 10 else "")
                  + (f"; left out: {m['dropped']}" if m["dropped"] else ""), ""]
        if m["separated"]:
            continue
        rows = []
        for c in coef:
            if [c[k] for k in ("study", "arm", "protocol", "model")] != \
                    [m[k] for k in ("study", "arm", "protocol", "model")]:
                continue
            text = _ci(c["per_sd"], c["per_sd_low"], c["per_sd_high"], sign=True)
            rows.append([c["feature"], f"**{text}**" if c["excludes_zero"] else text,
                         _f(c["odds_ratio_per_sd"]) if not c["feature"].startswith("(") else ""])
        lines += _table(["feature", "log-odds per SD [95 % CI]", "odds ratio per SD"], rows)
    if relations:
        lines += ["", "## Survival by relation", "", "Share never lost [95 % Wilson] (survived/facts).", ""]
        lines += _table(["study: arm", "protocol", "set", "relation", "survived"],
                        [[f"{r['study']}: {r['arm']}", r["protocol"], r["set"], r["relation"],
                          f"{_ci(r['rate'], r['wilson_low'], r['wilson_high'])} ({r['survived']}/{r['facts']})"]
                         for r in relations])
    return "\n".join(lines) + "\n"


def matched_markdown(rows: Sequence[dict]) -> str:
    lines = ["# Edited vs intrinsic, matched on t=0 confidence", "",
             "Retention (passing at the last step, of those passing at t=0) of edited and intrinsic facts within "
             "quantile bins of the t=0 target log-prob (`target_logprob_t0`) and of the t=0 margin (`margin_t0`: "
             "target minus alternative log-prob), bins over both sets' facts of the condition; 95 % Wilson "
             "intervals per set, Newcombe's for the difference (**bold**: excludes zero). Bin `all` is unmatched."]
    for (study, cell, arm, protocol, by), rs in _group(rows, ("study", "cell", "arm", "protocol", "by")).items():
        lines += ["", f"## {_label(study, cell, arm)}, `{protocol}`, by `{by}`", ""]
        body = []
        for r in rs:
            d = _ci(r["difference"], r["diff_low"], r["diff_high"], sign=True)
            span = "all" if r["bin"] == "all" else f"{r['low']:.2f} to {r['high']:.2f}"
            body.append([r["bin"], span,
                         f"{_ci(r['edited_rate'], r['edited_low'], r['edited_high'])} "
                         f"({r['edited_kept']}/{r['edited_n']})",
                         f"{_ci(r['intrinsic_rate'], r['intrinsic_low'], r['intrinsic_high'])} "
                         f"({r['intrinsic_kept']}/{r['intrinsic_n']})",
                         f"**{d}**" if r["excludes_zero"] else d])
        lines += _table(["bin", by, "edited", "intrinsic", "E − I"], body)
    return "\n".join(lines) + "\n"


def sensitivity_markdown(summary: Sequence[dict], has_ranks: bool) -> str:
    lines = ["# Lost under `top1`, kept under `prob`", "",
             "Probes passing both `top1` and `prob` at t=0 whose top-1 token at the last step is no longer the "
             "target's first token while the target still beats the alternative. The new top-1 token's category "
             "(function word: a closed-class English word; alternative: the probe's alternative starts with it); "
             "share of function words [95 % Wilson]; the target's median rank (0: top-1; recorded up to 100, which "
             "means 100 or further) at t=0 and at the end."
             + ("" if has_ranks else " These runs did not record `target_rank` (runs before it was added)."),
             "", "protocol_sensitivity.csv lists every such probe with its tokens.", ""]
    lines += _table(["condition", "group", "lost top1, kept prob / passing both", "function word", "punct./space",
                     "alternative", "other", "function-word share", "median rank t0 → end"],
                    [[_label(r["study"], r["cell"], r["arm"]), r["group"],
                      f"{r['lost_top1_kept_prob']}/{r['passing_both_t0']}", r["function_word"],
                      r["punctuation_space"], r["alternative"], r["other"],
                      _ci(r["function_word_share"], r["fw_low"], r["fw_high"]),
                      f"{_f(r['median_rank_t0'], 0)} → {_f(r['median_rank_final'], 0)}"] for r in summary])
    if not summary:
        lines.append("\n(no probe passed both `top1` and `prob` at t=0)")
    return "\n".join(lines) + "\n"


def _rate(row: dict, prefix: str = "") -> str:
    k, n = row[f"{prefix}kept"], row[f"{prefix}n"]
    return f"{_ci(row[f'{prefix}rate'], row[f'{prefix}low'], row[f'{prefix}high'])} ({k}/{n})" if n else "n/a (0/0)"


def dose_markdown(rows: Sequence[dict], curves: Sequence[dict], images: Sequence[str]) -> str:
    lines = ["# Dose–response", "",
             "Retention (of the facts passing at t=0, those passing at the last measured step) against each numeric "
             "grid axis with three or more values, per series (the cell's other grid values), pooled over seeds; "
             "95 % Wilson intervals over facts (facts of one run share its fine-tuning, so these are narrower than "
             "a seed-level interval). *trend*: the logistic slope of 'kept' on the dose, per unit of the dose, "
             "within the series [95 % Wald]. dose.csv has every row.", "", CLUSTER_NOTE]
    points = [r for r in rows if r["value"] != "trend"]
    trends = {(r["study"], r["dose"], r["series"], r["arm"], r["protocol"], r["set"]): r
              for r in rows if r["value"] == "trend"}
    for (study, dose, protocol), rs in _group(points, ("study", "dose", "protocol")).items():
        lines += ["", f"## {study}: retention against `{dose}`, `{protocol}`", ""]
        body = []
        for (series, arm), cell in _group(rs, ("series", "arm")).items():
            by_set = {name: {r["value"]: r for r in cell if r["set"] == name} for name in SETS}
            for x in sorted({r["value"] for r in cell}):
                body.append([f"{x:g}", series, arm] + [_rate(by_set[name][x]) if x in by_set[name] else "n/a"
                                                         for name in SETS])
            t = [trends.get((study, dose, series, arm, protocol, name)) for name in SETS]
            body.append(["trend", series, arm] + [_ci(r["rate"], r["low"], r["high"], 3, sign=True) if r else "n/a"
                                                  for r in t])
        lines += _table([dose, "series", "arm", "edited", "intrinsic"], body)
    if curves:
        lines += ["", "## Retention along fine-tuning", "",
                  "Of the facts passing at t=0, the share passing at each measured step [95 % Wilson], against the "
                  "tokens seen (when the task is packed text) or the step; curves.csv has every point. Last step:", ""]
        last = {}
        for r in curves:
            key = (r["study"], r["cell"], r["arm"], r["protocol"], r["set"])
            if key not in last or r["step"] > last[key]["step"]:
                last[key] = r
        body = [[_label(st, c, a), p, nm, str(r["step"]), "n/a" if math.isnan(r["tokens"]) else f"{r['tokens']:,.0f}",
                 f"{_ci(r['rate'], r['low'], r['high'])} ({r['passing']}/{r['at_risk']})"]
                for (st, c, a, p, nm), r in last.items()]
        lines += _table(["condition", "protocol", "set", "step", "tokens", "retention"], body)
    if images:
        lines += ["", *images]
    return "\n".join(lines) + "\n"


def single_feature_markdown(rows: Sequence[dict]) -> str:
    lines = ["", "## One feature at a time", "",
             "Each predictor alone: its log-odds slope per SD [95 % Wald], AIC (lower fits better; the same facts "
             "only when n is the same) and AUC of the feature as a score for survival [95 % Hanley–McNeil; 0.5: no "
             "information, below 0.5: higher values survive less]. single_features.csv has every row.", "",
             CLUSTER_NOTE + " The AUC interval treats the rows as independent.", ""]
    body = [[f"{r['study']}: {r['arm']}", r["protocol"], r["set"], r["feature"], f"{r['survived']}/{r['n']}",
             "separated" if r["separated"] else _ci(r["per_sd"], r["per_sd_low"], r["per_sd_high"], sign=True),
             _f(r["aic"], 1), _ci(r["auc"], r["auc_low"], r["auc_high"])] for r in rows]
    return "\n".join(lines + _table(["study: arm", "protocol", "set", "feature", "survived/n", "slope per SD",
                                     "AIC", "AUC"], body)) + "\n"


def decomposition_markdown(rows: Sequence[dict]) -> str:
    lines = ["", "# Format shift or real loss", "",
             "Facts passing `top1` at t=0, by what their probe shows at the last step: *kept*; *format shift* (the "
             "new top-1 token is a function word or punctuation, the target still beats the alternative and is in "
             "the top 10); *displaced* (the same with another content word on top); *buried* (the target still "
             "beats the alternative but is no longer in the top 10); *overturned* (the alternative now beats the "
             "target). Then retention under each protocol and under `rank < k` (the target's first token in the "
             "top k), each of the facts passing that protocol at t=0 [95 % Wilson], and the median change of the "
             "target's log-prob over all facts. decomposition.csv has every column.", ""]
    protocols = [p for p in ("top1", "gen", "prob") if any(f"{p}_n" in r for r in rows)]
    ranks = [f"top{k}" for k in RANK_PROTOCOLS if any(f"top{k}_n" in r for r in rows)]
    body = []
    for r in rows:
        body.append([_label(r["study"], r["cell"], r["arm"]), r["set"], str(r["top1_t0"]),
                     *(str(r[c.replace(" ", "_")]) for c in LOSS_CLASSES),
                     *(_rate(r, f"{p}_") if f"{p}_n" in r else "n/a" for p in protocols + ranks),
                     _f(r["median_delta_logprob"]),
                     f"{_f(r['median_rank_t0'], 0)} → {_f(r['median_rank_final'], 0)}"])
    lines += _table(["condition", "set", "top1 at t0", *LOSS_CLASSES, *protocols, *(f"rank<{k}" for k in
                     RANK_PROTOCOLS[:len(ranks)]), "median Δ log-prob", "median rank t0 → end"], body)
    return "\n".join(lines) + "\n"


def _group(rows: Sequence[dict], keys: Sequence[str]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys)].append(r)
    return dict(out)


def plot_survival(rows: Sequence[dict], path: Path, title: str) -> Path:
    """Rows: arms; columns: protocols; Kaplan–Meier step curves of edited (red) and intrinsic (blue) facts with
    their log-log interval bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r["arm"] for r in rows))
    protocols = _ordered(r["protocol"] for r in rows)
    fig, axes = plt.subplots(len(arms), len(protocols), figsize=(3.6 * len(protocols), 2.6 * len(arms)),
                             squeeze=False, sharex=True, sharey=True)
    curves = _group(rows, ("arm", "protocol", "set"))
    for row, arm in zip(axes, arms):
        for ax, protocol in zip(row, protocols):
            for name, color in (("edited", "C3"), ("intrinsic", "C0")):
                pts = curves.get((arm, protocol, name), [])
                if not pts:
                    continue
                xs = [p["step"] for p in pts]
                n = pts[0]["n_facts"]
                ax.step(xs, [p["survival"] for p in pts], where="post", color=color, label=f"{name} (n={n})")
                ax.fill_between(xs, [p["ci_low"] for p in pts], [p["ci_high"] for p in pts], step="post",
                                color=color, alpha=0.18, linewidth=0)
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            ax.set_title(f"{arm} · {protocol}", fontsize=9)
            ax.legend(fontsize=6, loc="lower left")
        row[0].set_ylabel("share never lost")
    for ax in axes[-1]:
        ax.set_xlabel("fine-tuning step")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _panels(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(4.2 * n + 3.5, 3.4), squeeze=False, sharey=True)
    return fig, axes[0]


def _finish(fig, axes, title: str, path: Path) -> Path:
    """One legend right of the panels (it would hide the curves inside them), the title, and the PNG."""
    axes[-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(title, fontsize=10)
    width = 4.2 * len(axes) + 3.5
    fig.subplots_adjust(left=0.7 / width, right=(4.2 * len(axes) - 0.1) / width, bottom=0.16, top=0.84, wspace=0.08)
    return save_figure(fig, path)


def plot_dose(rows: Sequence[dict], path: Path, title: str) -> Path:
    """Columns: protocols; retention against the dose per series and arm, edited (solid) and intrinsic
    (dashed), with Wilson error bars."""
    protocols = _ordered(r["protocol"] for r in rows)
    fig, axes = _panels(len(protocols))
    series = list(dict.fromkeys((r["series"], r["arm"]) for r in rows))
    values = [r["value"] for r in rows]
    log_x = min(values) > 0 and max(values) / min(values) >= 20
    for ax, protocol in zip(axes, protocols):
        for i, (name_s, arm) in enumerate(series):
            for name, style in (("edited", "-o"), ("intrinsic", "--s")):
                pts = sorted((r for r in rows if r["protocol"] == protocol and r["set"] == name
                              and (r["series"], r["arm"]) == (name_s, arm)), key=lambda r: r["value"])
                if not pts:
                    continue
                shift = 0.0 if log_x else (i - (len(series) - 1) / 2) * 0.012 * (max(values) - min(values))
                xs = [r["value"] + shift for r in pts]  # side by side, so the error bars do not hide each other
                ys = [r["rate"] for r in pts]
                err = [[y - r["low"] for y, r in zip(ys, pts)], [r["high"] - y for y, r in zip(ys, pts)]]
                label = f"{name}: {name_s}" + ("" if arm == "baseline" else f", {arm}")
                ax.errorbar(xs, ys, yerr=err, fmt=style, color=f"C{i}", capsize=3, markersize=4,
                            alpha=1.0 if name == "edited" else 0.7, label=label)
        if log_x:
            ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.set_title(protocol, fontsize=9)
        ax.set_xlabel(rows[0]["dose"])
    axes[0].set_ylabel("retained at the end (of passing at t=0)")
    return _finish(fig, axes, title, path)


def plot_curves(rows: Sequence[dict], path: Path, title: str) -> Path:
    """Columns: protocols; retention at every measured step against the tokens seen (or the step), one colour
    per condition, edited solid and intrinsic dashed, with Wilson bands."""
    protocols = _ordered(r["protocol"] for r in rows)
    fig, axes = _panels(len(protocols))
    conditions = list(dict.fromkeys((r["cell"], r["arm"]) for r in rows))
    tokens = all(not math.isnan(r["tokens"]) for r in rows)
    for ax, protocol in zip(axes, protocols):
        for i, (cell, arm) in enumerate(conditions):
            for name, style in (("edited", "-"), ("intrinsic", "--")):
                pts = [r for r in rows if r["protocol"] == protocol and r["set"] == name
                       and (r["cell"], r["arm"]) == (cell, arm)]
                if not pts:
                    continue
                xs = [r["tokens"] if tokens else r["step"] for r in pts]
                label = f"{name}: {cell}" + ("" if arm == "baseline" else f", {arm}") + f" (n={pts[0]['at_risk']})"
                ax.plot(xs, [r["rate"] for r in pts], style, color=f"C{i}", label=label)
                ax.fill_between(xs, [r["low"] for r in pts], [r["high"] for r in pts], color=f"C{i}", alpha=0.12,
                                linewidth=0)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.set_title(protocol, fontsize=9)
        ax.set_xlabel("tokens seen" if tokens else "fine-tuning step")
    axes[0].set_ylabel("passing (of passing at t=0)")
    return _finish(fig, axes, title, path)


def write_analysis(folders: Sequence[str | Path], out: str | Path, corpus: str | None = "wikitext2",
                   plots: bool = True, bins: int = 4, level: float = LEVEL) -> dict[str, Path]:
    """Write the analysis files of ``folders`` (study or run folders) into ``out``; returns their paths by kind.

    ``corpus``: the reference corpus of the frequency features (``builtin``, ``wikitext2``, ``hf:<id>`` or a
    text file; None for none); when it cannot be read the frequencies are left out and the notes say so."""
    out = Path(out)
    results, _, missing = load_results(folders)
    probes = [(r, read_probes(r.folder)) for r in results]
    facts, notes = facts_of(probes, corpus)
    if missing:
        notes.append(f"{len(missing)} unfinished runs left out")
    paths: dict[str, Path] = {}
    surv = survival_rows(facts, level)
    images = []
    if plots and surv:
        cells = _group(surv, ("study", "cell"))
        one_study = len({s for s, _ in cells}) == 1
        for (study, cell), rows in cells.items():
            slug = re.sub(r"[^\w.=-]+", "_", cell if one_study else f"{study}_{cell}")
            paths[f"survival {study} {cell}"] = plot_survival(rows, out / f"survival_{slug}.png", f"{study}: {cell}")
            images.append(f"![survival, {study}: {cell}](survival_{slug}.png)")
    doses = dose_rows(facts, level=level)
    curves = curve_rows(facts, level)
    dose_images = []
    if plots:
        for (study, dose), rows in _group([r for r in doses if r["value"] != "trend"], ("study", "dose")).items():
            slug = re.sub(r"[^\w.=-]+", "_", f"{study}_{dose}")
            paths[f"dose {study} {dose}"] = plot_dose(rows, out / f"dose_{slug}.png", f"{study}: retention against {dose}")
            dose_images.append(f"![{study}: retention against {dose}](dose_{slug}.png)")
        for (study,), rows in _group(curves, ("study",)).items():
            slug = re.sub(r"[^\w.=-]+", "_", study)
            paths[f"curves {study}"] = plot_curves(rows, out / f"curves_{slug}.png", f"{study}: retention along fine-tuning")
            dose_images.append(f"![{study}: retention along fine-tuning](curves_{slug}.png)")
    coef, models = predictor_rows(facts, level)
    singles = single_feature_rows(facts, level)
    decomposition = decomposition_rows(facts, level)
    relations = relation_rows(facts)
    matched = matched_rows(facts, bins, level)
    sens = sensitivity_rows(probes)
    at_risk: Counter = Counter()
    for r, by_step in probes:
        if by_step and 0 in by_step and len(by_step) > 1:
            c = r.condition
            for row in by_step[0]:
                if row["passed"].get("top1") and row["passed"].get("prob"):
                    at_risk[(c.study, c.cell, c.arm, row["group"])] += 1
    sens_summary = sensitivity_summary(sens, dict(at_risk))
    has_ranks = any(row.get("target_rank") is not None for _, by_step in probes for rows in by_step.values()
                    for row in rows[:1])
    fact_rows = [{"study": f.study, "cell": f.cell, "arm": f.arm, "seed": f.seed, "run": f.run,
                  "case_id": f.case_id, "set": f.set, "protocol": p,
                  "passed_t0": f.passed[p][0], "lost_step": o[0] if (o := f.outcome(p)) and o[1] else None,
                  "survived": (not o[1]) if o else None, "kept_final": f.kept_final(p), "last_step": f.steps[-1],
                  **f.features} for f in facts for p in f.passed]
    logrank_table = logrank_rows(facts, level)
    files = {
        "survival": ("survival.csv", _csv(surv)),
        "survival_md": ("survival.md", survival_markdown(logrank_table, notes, images)),
        "logrank": ("logrank.csv", _csv(logrank_table)),
        "facts": ("facts.csv", _csv(fact_rows)),
        "predictors": ("predictors.csv", _csv(coef)),
        "models": ("models.csv", _csv(models)),
        "relations": ("relations.csv", _csv(relations)),
        "single_features": ("single_features.csv", _csv(singles)),
        "predictors_md": ("predictors.md", predictors_markdown(coef, models, relations)
                          + single_feature_markdown(singles)),
        "dose": ("dose.csv", _csv(doses)),
        "curves": ("curves.csv", _csv(curves)),
        "dose_md": ("dose.md", dose_markdown(doses, curves, dose_images)),
        "decomposition": ("decomposition.csv", _csv(decomposition)),
        "matched": ("matched.csv", _csv(matched)),
        "matched_md": ("matched.md", matched_markdown(matched)),
        "sensitivity": ("protocol_sensitivity.csv", _csv(sens)),
        "sensitivity_summary": ("protocol_sensitivity_summary.csv", _csv(sens_summary)),
        "sensitivity_md": ("protocol_sensitivity.md", sensitivity_markdown(sens_summary, has_ranks)
                           + decomposition_markdown(decomposition)),
    }
    paths.update({kind: atomic_write_text(out / name, text) for kind, (name, text) in files.items()})
    return paths
