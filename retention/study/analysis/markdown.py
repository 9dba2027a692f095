"""The Markdown pages of the analysis: survival.md, predictors.md, matched.md, dose.md and
protocol_sensitivity.md, each from the rows of its CSV files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from retention.study.analysis.decomposition import LOSS_CLASSES, RANK_PROTOCOLS
from retention.study.analysis.facts import SETS, group_rows
from retention.study.tables import fmt, fmt_interval, markdown_table


def _label(study: str, cell: str, arm: str) -> str:
    """``study: arm``, or ``study: cell, arm`` inside a grid."""
    return f"{study}: {arm}" if cell == "all" else f"{study}: {cell}, {arm}"


def survival_markdown(logrank_table: Sequence[dict], notes: Sequence[str], images: Sequence[str]) -> str:
    """survival.md: Kaplan–Meier survival at the last step per condition and protocol, and the log-rank test."""
    lines = ["# Survival of edited and intrinsic facts", "",
             "Kaplan–Meier survival at each condition's last measured step: of the facts passing at t=0, the "
             "estimated share never lost [95 % log-log interval, Greenwood variance]; facts of all runs and seeds "
             "of a condition pooled. Log-rank test of edited against intrinsic. survival.csv has every step.", ""]
    lines += markdown_table(["condition", "protocol", "edited: facts (lost)", "edited S", "intrinsic: facts (lost)",
                     "intrinsic S", "log-rank p"],
                    [[_label(r["study"], r["cell"], r["arm"]), r["protocol"],
                      f"{r['edited_facts']} ({r['edited_lost']})",
                      fmt_interval(r["edited_survival"], r["edited_low"], r["edited_high"]),
                      f"{r['intrinsic_facts']} ({r['intrinsic_lost']})",
                      fmt_interval(r["intrinsic_survival"], r["intrinsic_low"], r["intrinsic_high"]),
                      fmt(r["logrank_p"], 3)] for r in logrank_table])
    if images:
        lines += ["", *images]
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    return "\n".join(lines) + "\n"


CLUSTER_NOTE = ("Wald intervals of the regressions use cluster-robust standard errors clustered by case id: "
                "a fact counted in several grid cells, seeds or runs is one cluster, not independent rows.")


MIN_EVENTS_PER_FEATURE = 10
"""Fewer of the rarer outcome per slope than this makes a logistic fit's slopes biased and unstable (Peduzzi
et al. 1996)."""
_MODEL_KEYS = ("study", "arm", "protocol", "model")
METHOD = ("Maximum likelihood (statsmodels' Logit) on standardised features, pooled over grid cells and seeds; the "
          "slopes are reported per standard deviation of the feature in the data. Features constant in the data or "
          "collinear with earlier ones are left out; separation (a feature splitting survivors from lost facts "
          f"perfectly) leaves no estimate. Fewer than about {MIN_EVENTS_PER_FEATURE} of the rarer outcome per "
          "feature (Peduzzi et al. 1996) makes the slopes unreliable.")
"""The method paragraph of predictors.md."""


def _caution(model: dict) -> str:
    """The compact warnings of a fitted model: ``separated``, ``EPV <x>`` (events per feature below
    :data:`MIN_EVENTS_PER_FEATURE`)."""
    notes = ["separated"] if model["separated"] else []
    if model["events_per_feature"] < MIN_EVENTS_PER_FEATURE:
        notes.append(f"EPV {model['events_per_feature']:.1f}")
    return ", ".join(notes)


def _left_out(dropped: str) -> str:
    """A model's ``dropped`` column (``name (reason); ...``) by reason, without the details that models.csv has.

    >>> _left_out("k (constant); n (constant); lr (collinear with k, n); norm (not recorded for 51% of the facts)")
    'constant: k, n; collinear: lr; not recorded: norm (51%)'
    """
    found: dict[str, list[str]] = {}
    for part in filter(None, dropped.split("; ")):
        name, _, reason = part.partition(" (")
        reason = reason.removesuffix(")")
        if reason.startswith("not recorded for "):
            found.setdefault("not recorded", []).append(f"{name} ({reason.split()[3]})")
        else:
            found.setdefault(reason.split(" with ")[0], []).append(name)
    return "; ".join(f"{reason}: {', '.join(names)}" for reason, names in found.items())


def _answer(slopes: Sequence[tuple[dict, dict]], fitted: int) -> list[str]:
    """The features whose slope excludes zero in some fit: how often, in which direction, how large."""
    by_feature: dict[str, list[dict]] = {}
    for c, _ in slopes:
        by_feature.setdefault(c["feature"], []).append(c)
    lines, never = [], []
    for feature, cs in by_feature.items():
        clear = [c for c in cs if c["excludes_zero"]]
        if not clear:
            never.append(f"`{feature}`")
            continue
        up = sum(c["per_sd"] > 0 for c in clear)
        what = "edited facts" if feature == "edited" else "higher values"
        sign = (f"{what} survive more" if up == len(clear) else f"{what} survive less" if up == 0 else
                f"the sign differs: {up} positive, {len(clear) - up} negative")
        effects = sorted(c["per_sd"] for c in clear)
        span = fmt(effects[0], sign=True) + ("" if len(effects) == 1 else f" to {fmt(effects[-1], sign=True)}")
        lines.append(f"- `{feature}`: the interval excludes zero in {len(clear)} of the {len(cs)} fits that "
                     f"estimate it ({sign}; log-odds per SD {span}).")
    if not lines:
        return [f"No slope's 95 % interval excludes zero in any of the {fitted} fitted models."]
    return lines + ([f"- In no fit: {', '.join(never)}."] if never else [])


def predictors_markdown(coef: Sequence[dict], models: Sequence[dict], relations: Sequence[dict],
                        singles: Sequence[dict] = ()) -> str:
    """predictors.md: the answer first (the features whose slope's interval excludes zero), then every model
    with its warnings in one column, every slope, the one-feature fits and survival by relation."""
    by_model = {tuple(m[k] for k in _MODEL_KEYS): m for m in models}
    slopes = [(c, m) for c in coef if not c["feature"].startswith("(")
              and not (m := by_model[tuple(c[k] for k in _MODEL_KEYS)])["separated"]]
    fitted = sum(not m["separated"] for m in models)
    rare = sum(m["events_per_feature"] < MIN_EVENTS_PER_FEATURE for m in models if not m["separated"])
    lines = ["# What predicts survival", "",
             "Logistic regression of *survived* (passing at t=0 and at every later measured step) on per-fact "
             "features, per study, arm, fact set and protocol; slopes in log-odds per standard deviation of the "
             "feature [95 % Wald interval, clustered by case id].", "", "## The answer", "",
             *_answer(slopes, fitted), "",
             f"{fitted} of {len(models)} models could be fitted ({len(models) - fitted} separated: no estimates); "
             f"{rare} of the fitted ones have fewer than {MIN_EVENTS_PER_FEATURE} of the rarer outcome per feature "
             "(caution `EPV`), so their slopes are biased and unstable: read the answer as where to look, not as "
             "effect sizes.", "", *_answer_table(slopes)]
    lines += _models_section(models) + _slopes_section(slopes)
    if singles:
        lines += _single_features(singles)
    if relations:
        lines += _relations_section(relations)
    lines += ["", "## Method", "", METHOD, "", CLUSTER_NOTE]
    return "\n".join(lines) + "\n"


def _answer_table(slopes: Sequence[tuple[dict, dict]]) -> list[str]:
    """The slopes whose interval excludes zero, with their model's size and warnings."""
    clear = [(c, m) for c, m in slopes if c["excludes_zero"]]
    if not clear:
        return []
    return markdown_table(
        ["study: arm", "set", "protocol", "feature", "log-odds per SD [95 % CI]", "odds ratio per SD",
         "survived/facts", "caution"],
        [[f"{c['study']}: {c['arm']}", c["model"], c["protocol"], c["feature"],
          fmt_interval(c["per_sd"], c["per_sd_low"], c["per_sd_high"], sign=True), fmt(c["odds_ratio_per_sd"]),
          f"{m['survived']}/{m['n']}", _caution(m)] for c, m in clear])


def _models_section(models: Sequence[dict]) -> list[str]:
    """One row per model: facts, survivors, log-likelihood, warnings and the features left out."""
    lines = ["", "## Models", "",
              "Facts at risk (their case ids: the clusters), survivors, the fit's log-likelihood, its warnings "
              "(*separated*: a feature or combination splits survivors from lost facts, so no estimate exists; "
              f"*EPV x*: x of the rarer outcome per feature, below {MIN_EVENTS_PER_FEATURE}) and the features "
              "left out (constant, collinear with earlier ones, or not recorded for most facts).", ""]
    lines += markdown_table(
        ["study: arm", "set", "protocol", "facts (case ids)", "survived", "log-lik.", "caution", "left out"],
        [[f"{m['study']}: {m['arm']}", m["model"], m["protocol"], f"{m['n']} ({m['clusters']})",
          str(m["survived"]), "n/a" if m["separated"] else fmt(m["log_likelihood"]), _caution(m),
          _left_out(m["dropped"])] for m in models])
    return lines


def _slopes_section(slopes: Sequence[tuple[dict, dict]]) -> list[str]:
    """Every slope of the fitted models with its model's warnings."""
    lines = ["", "## Slopes", "",
              "Every slope of the fitted models, per standard deviation of the feature (**bold**: the interval "
              "excludes zero). predictors.csv also has the intercepts (log-odds at the features' means), the "
              "slopes per unit and each feature's SD.", ""]
    lines += markdown_table(
        ["study: arm", "set", "protocol", "feature", "log-odds per SD [95 % CI]", "odds ratio per SD", "caution"],
        [[f"{c['study']}: {c['arm']}", c["model"], c["protocol"], c["feature"],
          _bold(fmt_interval(c["per_sd"], c["per_sd_low"], c["per_sd_high"], sign=True), c["excludes_zero"]),
          fmt(c["odds_ratio_per_sd"]), _caution(m)] for c, m in slopes])
    return lines


def _relations_section(relations: Sequence[dict]) -> list[str]:
    """Survival per relation (relations.csv)."""
    return ["", "## Survival by relation", "", "Share never lost [95 % Wilson] (survived/facts).", ""] + \
        markdown_table(
            ["study: arm", "protocol", "set", "relation", "survived"],
            [[f"{r['study']}: {r['arm']}", r["protocol"], r["set"], r["relation"],
              f"{fmt_interval(r['rate'], r['wilson_low'], r['wilson_high'])} ({r['survived']}/{r['facts']})"]
             for r in relations])


def _bold(text: str, bold: bool) -> str:
    return f"**{text}**" if bold else text


def _single_features(rows: Sequence[dict]) -> list[str]:
    """The section of the one-feature fits (single_features.csv)."""
    lines = ["", "## One feature at a time", "",
             "Each predictor alone: its log-odds slope per SD [95 % Wald, clustered by case id], AIC (lower fits "
             "better; the same facts only when n is the same) and AUC of the feature as a score for survival "
             "[95 % Hanley–McNeil, rows treated as independent; 0.5: no information, below 0.5: higher values "
             "survive less]. single_features.csv has every row.", ""]
    body = [[f"{r['study']}: {r['arm']}", r["protocol"], r["set"], r["feature"], f"{r['survived']}/{r['n']}",
             "separated" if r["separated"] else fmt_interval(r["per_sd"], r["per_sd_low"], r["per_sd_high"],
                                                             sign=True),
             fmt(r["aic"], 1), fmt_interval(r["auc"], r["auc_low"], r["auc_high"])] for r in rows]
    return lines + markdown_table(["study: arm", "protocol", "set", "feature", "survived/n", "slope per SD", "AIC",
                                   "AUC"], body)


def matched_markdown(rows: Sequence[dict]) -> str:
    """matched.md: edited against intrinsic per bin of t=0 confidence."""
    lines = ["# Edited vs intrinsic, matched on t=0 confidence", "",
             "Retention (passing at the last step, of those passing at t=0) of edited and intrinsic facts within "
             "quantile bins of the t=0 target log-prob (`target_logprob_t0`) and of the t=0 margin (`margin_t0`: "
             "target minus alternative log-prob), bins over both sets' facts of the condition; 95 % Wilson "
             "intervals per set, Newcombe's for the difference (**bold**: excludes zero). Bin `all` is unmatched."]
    for (study, cell, arm, protocol, by), rs in group_rows(rows, ("study", "cell", "arm", "protocol", "by")).items():
        lines += ["", f"## {_label(study, cell, arm)}, `{protocol}`, by `{by}`", ""]
        body = []
        for r in rs:
            d = fmt_interval(r["difference"], r["diff_low"], r["diff_high"], sign=True)
            span = "all" if r["bin"] == "all" else f"{r['low']:.2f} to {r['high']:.2f}"
            body.append([r["bin"], span,
                         f"{fmt_interval(r['edited_rate'], r['edited_low'], r['edited_high'])} "
                         f"({r['edited_kept']}/{r['edited_n']})",
                         f"{fmt_interval(r['intrinsic_rate'], r['intrinsic_low'], r['intrinsic_high'])} "
                         f"({r['intrinsic_kept']}/{r['intrinsic_n']})",
                         f"**{d}**" if r["excludes_zero"] else d])
        lines += markdown_table(["bin", by, "edited", "intrinsic", "E − I"], body)
    return "\n".join(lines) + "\n"


def sensitivity_markdown(summary: Sequence[dict], has_ranks: bool) -> str:
    """The first part of protocol_sensitivity.md: probes that lost ``top1`` but kept ``prob``."""
    lines = ["# Lost under `top1`, kept under `prob`", "",
             "Probes passing both `top1` and `prob` at t=0 whose top-1 token at the last step is no longer the "
             "target's first token while the target still beats the alternative. The new top-1 token's category "
             "(function word: a closed-class English word; alternative: the probe's alternative starts with it); "
             "share of function words [95 % Wilson]; the target's median rank (0: top-1; recorded up to 100, which "
             "means 100 or further) at t=0 and at the end."
             + ("" if has_ranks else " These runs did not record `target_rank` (runs before it was added)."),
             "", "protocol_sensitivity.csv lists every such probe with its tokens.", ""]
    lines += markdown_table(["condition", "group", "lost top1, kept prob / passing both", "function word", "punct./space",
                     "alternative", "other", "function-word share", "median rank t0 → end"],
                    [[_label(r["study"], r["cell"], r["arm"]), r["group"],
                      f"{r['lost_top1_kept_prob']}/{r['passing_both_t0']}", r["function_word"],
                      r["punctuation_space"], r["alternative"], r["other"],
                      fmt_interval(r["function_word_share"], r["fw_low"], r["fw_high"]),
                      f"{fmt(r['median_rank_t0'], 0)} → {fmt(r['median_rank_final'], 0)}"] for r in summary])
    if not summary:
        lines.append("\n(no probe passed both `top1` and `prob` at t=0)")
    return "\n".join(lines) + "\n"


def _rate(row: dict, prefix: str = "") -> str:
    """``rate [low, high] (kept/n)`` of a row's ``<prefix>`` columns."""
    k, n = row[f"{prefix}kept"], row[f"{prefix}n"]
    return f"{fmt_interval(row[f'{prefix}rate'], row[f'{prefix}low'], row[f'{prefix}high'])} ({k}/{n})" if n else "n/a (0/0)"


def dose_markdown(rows: Sequence[dict], curves: Sequence[dict], images: Sequence[str]) -> str:
    """dose.md: retention against each dose with its trend, and the last point of each curve."""
    lines = ["# Dose–response", "",
             "Retention (of the facts passing at t=0, those passing at the last measured step) against each numeric "
             "grid axis with three or more values, per series (the cell's other grid values), pooled over seeds; "
             "95 % Wilson intervals over facts (facts of one run share its fine-tuning, so these are narrower than "
             "a seed-level interval). *trend*: the logistic slope of 'kept' on the dose, per unit of the dose, "
             "within the series [95 % Wald]. dose.csv has every row.", "", CLUSTER_NOTE]
    points = [r for r in rows if r["value"] != "trend"]
    trends = {(r["study"], r["dose"], r["series"], r["arm"], r["protocol"], r["set"]): r
              for r in rows if r["value"] == "trend"}
    for (study, dose, protocol), rs in group_rows(points, ("study", "dose", "protocol")).items():
        lines += ["", f"## {study}: retention against `{dose}`, `{protocol}`", ""]
        body = []
        for (series, arm), cell in group_rows(rs, ("series", "arm")).items():
            by_set = {name: {r["value"]: r for r in cell if r["set"] == name} for name in SETS}
            for x in sorted({r["value"] for r in cell}):
                body.append([f"{x:g}", series, arm] + [_rate(by_set[name][x]) if x in by_set[name] else "n/a"
                                                         for name in SETS])
            t = [trends.get((study, dose, series, arm, protocol, name)) for name in SETS]
            body.append(["trend", series, arm] + [fmt_interval(r["rate"], r["low"], r["high"], 3, sign=True) if r else "n/a"
                                                  for r in t])
        lines += markdown_table([dose, "series", "arm", "edited", "intrinsic"], body)
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
                 f"{fmt_interval(r['rate'], r['low'], r['high'])} ({r['passing']}/{r['at_risk']})"]
                for (st, c, a, p, nm), r in last.items()]
        lines += markdown_table(["condition", "protocol", "set", "step", "tokens", "retention"], body)
    if images:
        lines += ["", *images]
    return "\n".join(lines) + "\n"


def decomposition_markdown(rows: Sequence[dict]) -> str:
    """The second part of protocol_sensitivity.md: format shift or real loss."""
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
                     fmt(r["median_delta_logprob"]),
                     f"{fmt(r['median_rank_t0'], 0)} → {fmt(r['median_rank_final'], 0)}"])
    lines += markdown_table(["condition", "set", "top1 at t0", *LOSS_CLASSES, *protocols, *(f"rank<{k}" for k in
                     RANK_PROTOCOLS[:len(ranks)]), "median Δ log-prob", "median rank t0 → end"], body)
    return "\n".join(lines) + "\n"
