"""Query benchmarks on real data (issue #8, item 2): the error of silofed's DP answers against the
exact pooled answer, at epsilon 1 and 3 per BU.

Two queries, each run through the in-process federation (`simulations.inprocess`) with silofed's
defaults (local noise, delta 1e-6, 95% intervals):

- online shoppers split by Region: a funnel of page stages per visitor type (sessions that viewed a
  product page, then reached a page with a value, then bought) and the conversion between stages;
- CDNOW split by acquisition month: the `rfm_segments` recipe (customers per recency, frequency and
  monetary bin over the last 365 days of the declared period).

The exact answer is computed here with pandas from the same eligible customers (each BU's tables
after consent and minimisation, `clients.pipeline.prepare_tables`), pooled over the BUs: not by
silofed's query code, so that a wrong count there would show as an error here. Per answer cell:
the absolute and relative error, and whether the reported interval holds the exact answer.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.datasets import CDNOW, SHOPPERS, DataSet, prepared_tables, resolved_job
from bench.record import Benchmark, table
from federation.job import Job, JobKind
from federation.queries import Histogram, QuerySpec, window_start
from simulations.inprocess import run_in_process

EPSILONS = (1.0, 3.0)
# A query run takes about two seconds: more seeds than the model benchmarks, for the coverage.
FULL_SEEDS = tuple(range(1, 11))
QUICK_SEEDS = (1, 2)
ANALYTICS = "analytics"
_DAY = pd.Timedelta(days=1)

# A cell of a query's answer: (aggregate name, group labels, bin label or "").
Cell = tuple[str, tuple[str, ...], str]


def cell_of(answer: dict) -> Cell:
    """The cell an answer of `QueryResult.to_json()` is for."""
    return (answer["name"], tuple(str(v) for v in answer["group"].values()), answer.get("bin", ""))


def cell_errors(answer: dict, exact: float) -> dict[str, Any]:
    """One released answer against the exact one: absolute and relative error (None when the
    exact answer is 0), and whether the reported interval holds the exact answer. An answer
    without a value (a ratio whose noisy denominator is not positive) has no error and does not
    cover."""
    value, (low, high) = answer["value"], answer["interval"]
    if value is None:
        return {"abs_error": None, "rel_error": None, "covered": False}
    error = abs(float(value) - exact)
    return {
        "abs_error": error,
        "rel_error": error / abs(exact) if exact else None,
        "covered": low is not None and high is not None and low <= exact <= high,
    }


@dataclass(frozen=True)
class QueryCase:
    """A query on a data set, and the exact pooled answer of its cells from the BUs' tables."""

    name: str
    title: str
    dataset: DataSet
    query: dict[str, Any]  # the job's [query] table
    exact: Callable[[QuerySpec, list[dict[str, pd.DataFrame]]], dict[Cell, float]]


# --- online shoppers: a funnel of page stages -----------------------------------------------------

_VISITOR = "customers.visitortype"
_FUNNEL_STAGES = (
    ("viewed_product", "productrelated", "ge", 1),
    ("valued_page", "pagevalues", "gt", 0),
    ("purchased", "revenue", "eq", True),
)


def _shoppers_funnel_query() -> dict[str, Any]:
    """The funnel spelt out as a query (the `funnel` recipe needs purchases; these are sessions):
    cumulative stage filters per visitor type and the conversion from each stage to the next."""
    counts, reached = [], []
    for name, column, op, value in _FUNNEL_STAGES:
        reached.append({"column": f"customers.{column}", "op": op, "value": value})
        counts.append({"kind": "count", "name": name, "where": list(reached)})
    ratios = [
        {
            "kind": "ratio",
            "name": f"{before[0]}_to_{after[0]}",
            "numerator": after[0],
            "denominator": before[0],
            "rate": True,
        }
        for before, after in itertools.pairwise(_FUNNEL_STAGES)
    ]
    return {
        "purpose": ANALYTICS,
        "group_by": [{"column": _VISITOR}],
        "aggregates": [*counts, *ratios],
    }


_COMPARE = {
    "ge": lambda s, v: s >= v,
    "gt": lambda s, v: s > v,
    "eq": lambda s, v: s == v,
}


def shoppers_funnel_exact(
    spec: QuerySpec, tables: list[dict[str, pd.DataFrame]]
) -> dict[Cell, float]:
    """Sessions reaching each stage per visitor type, and the stage-to-stage conversion."""
    customers = pd.concat([t["customers"] for t in tables], ignore_index=True)
    (key,) = spec.group_by
    reached = pd.Series(True, index=customers.index)
    counts: dict[str, pd.Series] = {}
    for name, column, op, value in _FUNNEL_STAGES:
        values = customers[column]
        reached &= values.notna() & _COMPARE[op](values, value).fillna(False).astype(bool)
        counts[name] = customers[reached].groupby(customers[_VISITOR.partition(".")[2]]).size()
    exact: dict[Cell, float] = {}
    for group in key.names:
        for name, *_ in _FUNNEL_STAGES:
            exact[(name, (group,), "")] = float(counts[name].get(group, 0))
        for before, after in itertools.pairwise(_FUNNEL_STAGES):
            denominator = exact[(before[0], (group,), "")]
            if denominator:
                ratio = exact[(after[0], (group,), "")] / denominator
                exact[(f"{before[0]}_to_{after[0]}", (group,), "")] = ratio
    return exact


# --- CDNOW: RFM segments ----------------------------------------------------------------------------


def rfm_values(spec: QuerySpec, tables: list[dict[str, pd.DataFrame]], key: str) -> pd.DataFrame:
    """Each eligible customer's recency (days), frequency (purchases) and monetary value (mean
    amount) over the query's window (start, observation date]; recency is the window's length and
    monetary 0 for a customer without purchases in it."""
    customers = pd.concat([t["customers"][[key]] for t in tables], ignore_index=True)
    purchases = pd.concat([t["transactions"] for t in tables], ignore_index=True)
    observed = pd.Timestamp(spec.observation_date)
    stamp = pd.to_datetime(purchases["timestamp"])
    inside = purchases[(stamp > pd.Timestamp(window_start(spec))) & (stamp <= observed)]
    per_customer = inside.groupby(inside[key].astype(str))
    ids = customers[key].astype(str)
    last = pd.to_datetime(per_customer["timestamp"].max()).reindex(ids)
    return pd.DataFrame(
        {
            "recency": ((observed - last) / _DAY).fillna(float(spec.lookback_days)).to_numpy(),
            "frequency": per_customer.size().reindex(ids, fill_value=0).to_numpy(dtype=float),
            "monetary": per_customer["amount"].mean().reindex(ids).fillna(0.0).to_numpy(),
        }
    )


def binned_counts(values: pd.Series, edges: tuple[float, ...]) -> np.ndarray:
    """Customers per bin [e0, e1), ..., [e(n-1), en], values beyond the ends in the end bins."""
    bins = pd.IntervalIndex.from_breaks(list(edges), closed="left")
    clipped = values.clip(edges[0], np.nextafter(edges[-1], -np.inf))
    return pd.cut(clipped, bins).value_counts(sort=False).reindex(bins).to_numpy(dtype=float)


def cdnow_rfm_exact(spec: QuerySpec, tables: list[dict[str, pd.DataFrame]]) -> dict[Cell, float]:
    """Customers per recency, frequency and monetary bin of the resolved `rfm_segments` spec."""
    key = "customer_id"
    values = rfm_values(spec, tables, key)
    exact: dict[Cell, float] = {}
    for aggregate in spec.aggregates:
        assert isinstance(aggregate, Histogram) and aggregate.bins is not None
        counts = binned_counts(values[aggregate.name], aggregate.bins)
        for label, count in zip(aggregate.key.names, counts, strict=True):
            exact[(aggregate.name, (), label)] = float(count)
    return exact


CASES = (
    QueryCase(
        name="shoppers_funnel",
        title="Online shoppers (9 BUs by Region): page-stage funnel per visitor type",
        dataset=SHOPPERS,
        query=_shoppers_funnel_query(),
        exact=shoppers_funnel_exact,
    ),
    QueryCase(
        name="cdnow_rfm",
        title="CDNOW (3 BUs by acquisition month): RFM segments (`rfm_segments` recipe)",
        dataset=CDNOW,
        query={"purpose": ANALYTICS, "recipe": "rfm_segments"},
        exact=cdnow_rfm_exact,
    ),
)


# --- the benchmark ----------------------------------------------------------------------------------


def _case_figures(case: QueryCase, chosen: tuple[int, ...], work: Path) -> dict[str, Any]:
    """The case's query at each epsilon and seed, every answer cell against the exact answer."""
    _, bu_configs = case.dataset.write_silos(work / case.name / "silos")
    job = resolved_job(Job(kind=JobKind.QUERY, query=case.query), bu_configs)
    tables = prepared_tables(job, bu_configs, work / case.name / "homes")
    exact = case.exact(job.query_spec, [t.tables for t in tables])
    per_cell: dict[Cell, dict[str, list[dict[str, Any]]]] = {c: {} for c in exact}
    for epsilon in EPSILONS:
        for seed in chosen:
            homes = Path(tempfile.mkdtemp(prefix=f"q-{epsilon:g}-{seed}-", dir=work))
            run = run_in_process(
                Job(kind=JobKind.QUERY, epsilon=epsilon, query=case.query),
                bu_configs,
                homes,
                seed=seed,
            )
            assert run.record.results is not None
            for answer in run.record.results["answers"]:
                cell = cell_of(answer)
                if cell in exact:
                    per_cell[cell].setdefault(f"{epsilon:g}", []).append(
                        cell_errors(answer, exact[cell])
                    )
    return {
        "title": case.title,
        "query": case.query,
        "customers": sum(len(t.tables["customers"]) for t in tables),
        "cells": [
            {
                "name": cell[0],
                "group": list(cell[1]),
                "bin": cell[2],
                "exact": exact[cell],
                "errors": {e: _mean_errors(runs) for e, runs in per_cell[cell].items()},
            }
            for cell in exact
        ],
        "summary": {f"{e:g}": _summary(per_cell, f"{e:g}") for e in EPSILONS},
    }


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _mean_errors(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A cell's errors averaged over the seeds, and the share of seeds whose interval held it."""
    return {
        "abs_error": _mean([r["abs_error"] for r in runs]),
        "rel_error": _mean([r["rel_error"] for r in runs]),
        "covered": float(np.mean([r["covered"] for r in runs])),
    }


def _summary(per_cell: dict[Cell, dict[str, list[dict[str, Any]]]], epsilon: str) -> dict[str, Any]:
    """One epsilon's answers over every cell and seed: coverage and relative errors."""
    runs = [r for cell in per_cell.values() for r in cell.get(epsilon, [])]
    relative = [r["rel_error"] for r in runs if r["rel_error"] is not None]
    return {
        "answers": len(runs),
        "coverage": float(np.mean([r["covered"] for r in runs])),
        "median_rel_error": float(np.median(relative)) if relative else None,
        "max_rel_error": float(np.max(relative)) if relative else None,
        "without_value": sum(r["abs_error"] is None for r in runs),
    }


def queries(quick: bool) -> dict[str, Any]:
    """The figures of every query case (module docstring)."""
    chosen = QUICK_SEEDS if quick else FULL_SEEDS
    with tempfile.TemporaryDirectory(prefix="silofed-bench-queries-") as directory:
        figures = {c.name: _case_figures(c, chosen, Path(directory)) for c in CASES}
    return {"queries": figures, "epsilons": [f"{e:g}" for e in EPSILONS], "seeds": list(chosen)}


# --- rendering ----------------------------------------------------------------------------------


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def markdown(figures: dict[str, Any]) -> str:
    """The queries' section of docs/benchmarks.md."""
    epsilons = figures["epsilons"]
    lines = [
        "Silofed's DP answers (local noise, delta 1e-6, 95% intervals, defaults otherwise) "
        "against the exact answer computed with pandas from the same eligible customers, pooled. "
        "Relative error = |DP - exact| / exact; errors are means over the seeds, coverage the "
        "share of answers whose reported interval holds the exact answer (an answer without a "
        "value, a ratio whose noisy denominator is not positive, counts as outside).",
        "",
    ]
    for case in figures["queries"].values():
        lines += [f"**{case['title']}**, {case['customers']:,} eligible customers.", ""]
        lines.append(
            table(
                [
                    "epsilon per BU",
                    "answers",
                    "inside the 95% interval",
                    "median relative error",
                    "largest relative error",
                    "without a value",
                ],
                [
                    [
                        e,
                        case["summary"][e]["answers"],
                        f"{case['summary'][e]['coverage']:.1%}",
                        _number(case["summary"][e]["median_rel_error"], 3),
                        _number(case["summary"][e]["max_rel_error"], 3),
                        case["summary"][e]["without_value"],
                    ]
                    for e in epsilons
                ],
            )
        )
        header = ["answer", "group", "bin", "exact"]
        for e in epsilons:
            header += [f"abs. error, eps={e}", f"rel. error, eps={e}"]
        rows = []
        for cell in case["cells"]:
            row = [cell["name"], ", ".join(cell["group"]) or "-", cell["bin"] or "-"]
            row.append(_number(cell["exact"]))
            for e in epsilons:
                errors = cell["errors"].get(e, {})
                row += [_number(errors.get("abs_error"), 3), _number(errors.get("rel_error"), 3)]
            rows.append(row)
        lines += ["", table(header, rows), ""]
    return "\n".join(lines)


BENCHMARKS = [
    Benchmark(
        name="queries",
        title="DP query error on real data (funnel, RFM segments)",
        run=queries,
        markdown=markdown,
    )
]
