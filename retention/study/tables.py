"""Text of the study tables: CSV with compact floats, Markdown tables and the interval notation they share.

Imports nothing of the project, so the report and the analysis both use it.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence


def csv_text(rows: Sequence[dict]) -> str:
    """``rows`` as CSV text: the union of their keys as columns (a missing value is left empty), floats to six
    significant digits.

    >>> print(csv_text([{"arm": "baseline", "rate": 2 / 3}, {"arm": "freeze", "n": 4}]), end="")
    arm,rate,n
    baseline,0.666667,
    freeze,,4
    """
    buf = io.StringIO()
    if rows:
        fields = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def fmt(x: float | None, digits: int = 2, sign: bool = False) -> str:
    """A number with ``digits`` decimals (a leading sign with ``sign``); ``n/a`` for None or NaN.

    >>> fmt(0.5), fmt(0.5, 1, sign=True), fmt(float("nan"))
    ('0.50', '+0.5', 'n/a')
    """
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def fmt_interval(est: float, low: float, high: float, digits: int = 2, sign: bool = False) -> str:
    """``est [low, high]``; the estimate alone when there is no interval (NaN bounds).

    >>> fmt_interval(0.8, 0.6, 0.9), fmt_interval(0.8, float("nan"), float("nan"))
    ('0.80 [0.60, 0.90]', '0.80')
    """
    if math.isnan(est):
        return "n/a"
    if math.isnan(low):
        return fmt(est, digits, sign)
    return f"{fmt(est, digits, sign)} [{fmt(low, digits, sign)}, {fmt(high, digits, sign)}]"


def fmt_difference(est: float, low: float, high: float, excludes_zero: bool, digits: int = 2) -> str:
    """A signed difference with its interval, **bold** when the interval excludes zero.

    >>> fmt_difference(0.25, 0.1, 0.4, True), fmt_difference(-0.1, -0.3, 0.1, False)
    ('**+0.25 [+0.10, +0.40]**', '-0.10 [-0.30, +0.10]')
    """
    text = fmt_interval(est, low, high, digits, sign=True)
    return f"**{text}**" if excludes_zero else text


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table.

    >>> print("\\n".join(markdown_table(["arm", "rate"], [["baseline", "0.50"]])))
    | arm | rate |
    | --- | --- |
    | baseline | 0.50 |
    """
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(map(str, r)) + " |" for r in rows)]
