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
            text = fmt_interval(c["per_sd"], c["per_sd_low"], c["per_sd_high"], sign=True)
            rows.append([c["feature"], f"**{text}**" if c["excludes_zero"] else text,
                         fmt(c["odds_ratio_per_sd"]) if not c["feature"].startswith("(") else ""])
        lines += markdown_table(["feature", "log-odds per SD [95 % CI]", "odds ratio per SD"], rows)
    if relations:
        lines += ["", "## Survival by relation", "", "Share never lost [95 % Wilson] (survived/facts).", ""]
        lines += markdown_table(["study: arm", "protocol", "set", "relation", "survived"],
                        [[f"{r['study']}: {r['arm']}", r["protocol"], r["set"], r["relation"],
                          f"{fmt_interval(r['rate'], r['wilson_low'], r['wilson_high'])} ({r['survived']}/{r['facts']})"]
                         for r in relations])
    return "\n".join(lines) + "\n"


def matched_markdown(rows: Sequence[dict]) -> str:
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
    k, n = row[f"{prefix}kept"], row[f"{prefix}n"]
    return f"{fmt_interval(row[f'{prefix}rate'], row[f'{prefix}low'], row[f'{prefix}high'])} ({k}/{n})" if n else "n/a (0/0)"


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


def single_feature_markdown(rows: Sequence[dict]) -> str:
    lines = ["", "## One feature at a time", "",
             "Each predictor alone: its log-odds slope per SD [95 % Wald], AIC (lower fits better; the same facts "
             "only when n is the same) and AUC of the feature as a score for survival [95 % Hanley–McNeil; 0.5: no "
             "information, below 0.5: higher values survive less]. single_features.csv has every row.", "",
             CLUSTER_NOTE + " The AUC interval treats the rows as independent.", ""]
    body = [[f"{r['study']}: {r['arm']}", r["protocol"], r["set"], r["feature"], f"{r['survived']}/{r['n']}",
             "separated" if r["separated"] else fmt_interval(r["per_sd"], r["per_sd_low"], r["per_sd_high"], sign=True),
             fmt(r["aic"], 1), fmt_interval(r["auc"], r["auc_low"], r["auc_high"])] for r in rows]
    return "\n".join(lines + markdown_table(["study: arm", "protocol", "set", "feature", "survived/n", "slope per SD",
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
                     fmt(r["median_delta_logprob"]),
                     f"{fmt(r['median_rank_t0'], 0)} → {fmt(r['median_rank_final'], 0)}"])
    lines += markdown_table(["condition", "set", "top1 at t0", *LOSS_CLASSES, *protocols, *(f"rank<{k}" for k in
                     RANK_PROTOCOLS[:len(ranks)]), "median Δ log-prob", "median rank t0 → end"], body)
    return "\n".join(lines) + "\n"
