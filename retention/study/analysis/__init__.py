"""Why edits survive: per-fact survival, its predictors, a matched comparison of edited and intrinsic facts,
dose–response, and where the ``top1`` protocol disagrees with ``prob``; read from the per-probe records of run
folders (``retention report --analysis true``; docs/analysis.md).

One module per concern, each building rows (the CSV files) from :class:`~retention.study.analysis.facts.Fact`
objects; SciPy and statsmodels do the statistics:

- :mod:`~retention.study.analysis.facts`: facts and their outcome at every measured step;
- :mod:`~retention.study.analysis.features`: per-fact features, and :func:`load_facts`;
- :mod:`~retention.study.analysis.survival`: Kaplan–Meier and the log-rank test;
- :mod:`~retention.study.analysis.regression`: logistic regression of survival, one feature at a time, AUC;
- :mod:`~retention.study.analysis.matched`: edited vs intrinsic within bins of t=0 confidence;
- :mod:`~retention.study.analysis.dose`: retention against the grid's doses and along fine-tuning;
- :mod:`~retention.study.analysis.decomposition`: format shift or real loss (``top1`` against ``prob``);
- :mod:`~retention.study.analysis.markdown` and :mod:`~retention.study.analysis.plots`: the pages and figures;
- :mod:`~retention.study.analysis.writer`: :func:`write_analysis`, all of the above into one folder.
"""

from retention.study.analysis.facts import Fact
from retention.study.analysis.features import load_facts
from retention.study.analysis.writer import write_analysis

__all__ = ["Fact", "load_facts", "write_analysis"]
