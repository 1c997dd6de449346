"""Output lengths learned from executions, for the queries of a workload that give none.

A query with neither ``output_tokens`` nor ``max_output_tokens`` is planned with a default
length. Executions of prompts show what the models really produced
(:func:`engine.execution.learned_output_lengths`); this module fills those queries with
that: the median of the query's category where one was learned, else the median over
everything learned. The Plan page and ``plan --learned-output-lengths`` share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pandas as pd

from engine.formatting import format_count
from engine.planning.workload import Workload

#: The category value that :func:`engine.execution.learned_output_lengths` gives a model's summary over every query.
ALL_CATEGORIES = "(all)"


@dataclass(frozen=True)
class LearnedFill:
    """What filling with learned lengths does (or would do) to a workload.

    n_filled: queries without an output length, now given one.
    overall_median_tokens: the length of a query whose category has none learned (tokens).
    by_category_tokens: the length per category learned (tokens).
    """

    n_filled: int
    overall_median_tokens: float
    by_category_tokens: dict[str, float] = field(default_factory=dict)

    @property
    def sentence(self) -> str:
        """``12 queries planned with output lengths learned from executed prompts (median 84 tokens; ...)``."""
        per_category = "; per category where one was learned" if self.by_category_tokens else ""
        return (f"{format_count(self.n_filled, 'query')} planned with output lengths learned from executed prompts "
                f"(median {self.overall_median_tokens:.0f} tokens{per_category})")


def missing_output_lengths(workload: Workload) -> pd.Series:
    """Which queries give neither output_tokens nor max_output_tokens (a boolean per query)."""
    queries = workload.queries
    return queries["output_tokens"].isna() & queries["max_output_tokens"].isna()


def fill_learned_output_lengths(workload: Workload, learned: pd.DataFrame) -> tuple[Workload, LearnedFill | None]:
    """The workload with learned output lengths where it gives none, and what was filled.

    ``learned`` is :func:`engine.execution.learned_output_lengths` (columns model, category,
    median_output_tokens, ...). Returns the workload unchanged and None when no query lacks
    a length or nothing has been learned. The filled workload says so in its warnings.
    """
    missing = missing_output_lengths(workload)
    if learned is None or learned.empty or not missing.any():
        return workload, None
    overall = learned[learned["category"] == ALL_CATEGORIES]
    if overall.empty:
        return workload, None
    by_category = (learned[learned["category"] != ALL_CATEGORIES]
                   .groupby("category")["median_output_tokens"].median())
    fallback = float(overall["median_output_tokens"].median())
    categories = workload.queries["category"].where(missing)
    lengths = categories.map(by_category).fillna(fallback).round().clip(lower=1)
    queries = workload.queries.copy()
    queries.loc[missing, "output_tokens"] = lengths[missing].astype("int64")
    used = {str(c): float(by_category[c]) for c in categories[missing].dropna().unique() if c in by_category.index}
    fill = LearnedFill(n_filled=int(missing.sum()), overall_median_tokens=fallback, by_category_tokens=used)
    return replace(workload, queries=queries, warnings=[*workload.warnings, fill.sentence]), fill
