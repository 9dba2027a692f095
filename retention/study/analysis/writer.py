""":func:`write_analysis`: every table, page and figure of the analysis of study or run folders."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from retention.io import atomic_write_text, safe_name
from retention.study.analysis.decomposition import (
    decomposition_rows,
    records_ranks,
    sensitivity_at_risk,
    sensitivity_rows,
    sensitivity_summary,
)
from retention.study.analysis.dose import curve_rows, dose_rows
from retention.study.analysis.facts import fact_rows, group_rows, read_probes
from retention.study.analysis.features import facts_of
from retention.study.analysis.markdown import (
    decomposition_markdown,
    dose_markdown,
    matched_markdown,
    predictors_markdown,
    sensitivity_markdown,
    survival_markdown,
)
from retention.study.analysis.matched import matched_rows
from retention.study.analysis.plots import plot_curves, plot_dose, plot_survival
from retention.study.analysis.regression import predictor_rows, relation_rows, single_feature_rows
from retention.study.analysis.survival import logrank_rows, survival_rows
from retention.study.results import load_results
from retention.study.stats import LEVEL
from retention.study.tables import csv_text


def _figures(surv: list[dict], doses: list[dict], curves: list[dict], out: Path,
             ) -> tuple[dict[str, Path], list[str], list[str]]:
    """The PNGs: survival per grid cell, retention per dose and along fine-tuning per study; their paths by
    kind, and the Markdown image lines of survival.md and of dose.md."""
    paths: dict[str, Path] = {}
    survival_images, dose_images = [], []
    cells = group_rows(surv, ("study", "cell"))
    one_study = len({s for s, _ in cells}) == 1
    for (study, cell), rows in cells.items():
        slug = safe_name(cell if one_study else f"{study}_{cell}")
        paths[f"survival {study} {cell}"] = plot_survival(rows, out / f"survival_{slug}.png", f"{study}: {cell}")
        survival_images.append(f"![survival, {study}: {cell}](survival_{slug}.png)")
    for (study, dose), rows in group_rows([r for r in doses if r["value"] != "trend"], ("study", "dose")).items():
        slug = safe_name(f"{study}_{dose}")
        paths[f"dose {study} {dose}"] = plot_dose(rows, out / f"dose_{slug}.png", f"{study}: retention against {dose}")
        dose_images.append(f"![{study}: retention against {dose}](dose_{slug}.png)")
    for (study,), rows in group_rows(curves, ("study",)).items():
        slug = safe_name(study)
        paths[f"curves {study}"] = plot_curves(rows, out / f"curves_{slug}.png", f"{study}: retention along fine-tuning")
        dose_images.append(f"![{study}: retention along fine-tuning](curves_{slug}.png)")
    return paths, survival_images, dose_images


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
    surv, doses, curves = survival_rows(facts, level), dose_rows(facts, level=level), curve_rows(facts, level)
    paths, survival_images, dose_images = _figures(surv, doses, curves, out) if plots else ({}, [], [])
    coef, models = predictor_rows(facts, level)
    singles = single_feature_rows(facts, level)
    decomposition = decomposition_rows(facts, level)
    relations = relation_rows(facts)
    matched = matched_rows(facts, bins, level)
    sens = sensitivity_rows(probes)
    sens_summary = sensitivity_summary(sens, sensitivity_at_risk(probes))
    logrank_table = logrank_rows(facts, level)
    files = {
        "survival": ("survival.csv", csv_text(surv)),
        "survival_md": ("survival.md", survival_markdown(logrank_table, notes, survival_images)),
        "logrank": ("logrank.csv", csv_text(logrank_table)),
        "facts": ("facts.csv", csv_text(fact_rows(facts))),
        "predictors": ("predictors.csv", csv_text(coef)),
        "models": ("models.csv", csv_text(models)),
        "relations": ("relations.csv", csv_text(relations)),
        "single_features": ("single_features.csv", csv_text(singles)),
        "predictors_md": ("predictors.md", predictors_markdown(coef, models, relations, singles)),
        "dose": ("dose.csv", csv_text(doses)),
        "curves": ("curves.csv", csv_text(curves)),
        "dose_md": ("dose.md", dose_markdown(doses, curves, dose_images)),
        "decomposition": ("decomposition.csv", csv_text(decomposition)),
        "matched": ("matched.csv", csv_text(matched)),
        "matched_md": ("matched.md", matched_markdown(matched)),
        "sensitivity": ("protocol_sensitivity.csv", csv_text(sens)),
        "sensitivity_summary": ("protocol_sensitivity_summary.csv", csv_text(sens_summary)),
        "sensitivity_md": ("protocol_sensitivity.md", sensitivity_markdown(sens_summary, records_ranks(probes))
                           + decomposition_markdown(decomposition)),
    }
    paths.update({kind: atomic_write_text(out / name, text) for kind, (name, text) in files.items()})
    return paths
