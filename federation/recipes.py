"""Customer-analytics recipes: the questions marketing asks most, written as query specs.

Each recipe takes the BUs' declared configurations (bounds and domains, never data) and a few
parameters, and returns a `QuerySpec` whose every domain, bin edge and bound is public:

- `rfm_segments`: customers per recency, frequency and monetary segment (five bins each, declared
  from the bounds: linear for recency, log-spaced for frequency and amounts, as the churn features
  scale them), or per bins taken from an earlier DP quantile query (`rfm_quantiles`, then
  `quintile_edges`): two releases, each accounted;
- `churn_rate_by_segment`: churned / all customers per segment;
- `funnel`: customers reaching each declared stage (ordered filters, each stage includes the ones
  before it) per channel, and the conversion between consecutive stages;
- `cohort_retention`: per signup month and month since signup, the customers active in that month
  over the cohort's size;
- `top_categories`: customers buying in each category per segment; the top k are ranked on the
  noisy counts (post-processing, free of privacy cost).

A job's `[query]` table names a recipe with `recipe = "..."` and gives its parameters as keys;
`federation.queries.resolve_query` calls `build_recipe`.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from datetime import date
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, validate_call

from federation.queries import (
    CUSTOMERS,
    PURCHASE_AMOUNT,
    PURCHASE_TIME,
    QUERY_DOCS,
    TRANSACTIONS,
    Chart,
    Condition,
    Count,
    GroupKey,
    Histogram,
    Quantiles,
    QueryResult,
    QuerySpec,
    Ratio,
    declared_bounds,
    declared_domain,
    declared_window,
    months_between,
    units_taking_part,
    validation_problems,
)
from privacy.errors import ConfigurationError
from privacy.schema import SiloSchema

ANALYTICS_PURPOSE = "analytics"
RFM_COLUMNS = {
    "recency": "derived.recency_days",
    "frequency": "derived.frequency",
    "monetary": "derived.monetary",
}
SEGMENTS = 5
FREQUENCY_UPPER = 52.0  # purchases a year: the cap the churn task's features use
QUINTILES = (0.2, 0.4, 0.6, 0.8)
# The most bins (or months) a parameter makes a recipe build for one histogram or group key: ten
# times the finest real use (1,000 bins per quantile histogram), and a bound on the time and memory
# building the query takes, since `resolution`, `frequency_upper`, `cohorts` and `months` size it.
MAX_BINS = 10_000
_FIRST_MONTH, _LAST_MONTH = 1 * 12, 9999 * 12 + 11  # January of year 1, December of 9999


class Stage(BaseModel):
    """One funnel stage: a name and the filter a customer must pass (on top of the earlier
    stages') to reach it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    where: tuple[Condition, ...] = ()


def _at_least(purchases: int) -> tuple[Condition, ...]:
    return (Condition(column="derived.frequency", op="ge", value=purchases),)


DEFAULT_STAGES = (
    Stage(name="purchased", where=_at_least(1)),
    Stage(name="repeat", where=_at_least(2)),
    Stage(name="regular", where=_at_least(6)),
    Stage(name="loyal", where=_at_least(12)),
)

_validated = validate_call(config=ConfigDict(arbitrary_types_allowed=True))


def _window(configs: Sequence[SiloSchema], lookback_days: int) -> tuple[Any, int]:
    window = declared_window(configs, lookback_days)
    if window is None:
        raise ConfigurationError(
            f"the RFM columns need declared bounds for '{PURCHASE_TIME}' in the BUs' schemas "
            "(the observation window ends at its upper bound); declare them"
        )
    return window


def _rounded(edges: np.ndarray) -> tuple[float, ...]:
    """Edges to three significant digits (readable labels), strictly increasing."""
    out: list[float] = []
    for edge in edges:
        value = float(f"{edge:.3g}") if edge else 0.0
        if not out or value > out[-1]:
            out.append(value)
    return tuple(out)


def _log_edges(lower: float, upper: float, bins: int) -> tuple[float, ...]:
    return _rounded(lower + np.expm1(np.linspace(0.0, math.log1p(upper - lower), bins + 1)))


def rfm_edges(
    configs: Sequence[SiloSchema],
    *,
    lookback_days: int,
    frequency_upper: float = FREQUENCY_UPPER,
    bins: int = SEGMENTS,
) -> dict[str, tuple[float, ...]]:
    """Bin edges for recency (days, linear over the window), frequency (purchases, log-spaced up to
    `frequency_upper`) and monetary (mean amount, log-spaced over the declared amount bounds):
    the scales the churn task's features use, declared from bounds alone."""
    amount = declared_bounds(PURCHASE_AMOUNT, configs)
    if amount is None:
        raise ConfigurationError(
            f"monetary segments need declared bounds for '{PURCHASE_AMOUNT}'; declare them"
        )
    return {
        "recency": _rounded(np.linspace(0.0, float(lookback_days), bins + 1)),
        "frequency": _log_edges(0.0, frequency_upper, bins),
        "monetary": _log_edges(float(amount[0]), float(amount[1]), bins),
    }


def _rfm_key(name: str, edges: Sequence[float]) -> GroupKey:
    return GroupKey(column=RFM_COLUMNS[name], bins=tuple(edges), outside="clip")


def _segment_key(
    column: str,
    configs: Sequence[SiloSchema],
    bins: Sequence[float] | None,
    lookback_days: int,
    frequency_upper: float,
) -> GroupKey:
    """A segment: given bins, the default RFM bins of an RFM column, or the declared domain (left
    undeclared when there is none, which the query's check then names)."""
    if bins is not None:
        return GroupKey(column=column, bins=tuple(bins), outside="clip")
    for name, rfm_column in RFM_COLUMNS.items():
        if column == rfm_column:
            edges = rfm_edges(configs, lookback_days=lookback_days, frequency_upper=frequency_upper)
            return _rfm_key(name, edges[name])
    return GroupKey(column=column, domain=declared_domain(column, configs))


@_validated
def rfm_segments(
    configs: Sequence[SiloSchema],
    *,
    purpose: str = ANALYTICS_PURPOSE,
    units: tuple[str, ...] = (),
    lookback_days: int = Field(365, ge=1),
    frequency_upper: float = Field(FREQUENCY_UPPER, gt=0),
    bins: dict[str, tuple[float, ...]] | None = None,
    joint: bool = False,
) -> QuerySpec:
    """Customers per recency, frequency and monetary segment: three histograms (one customer
    counts once in each), or with `joint` one count per R x F x M cell. `bins` replaces the
    declared quintile bins of any of the three, e.g. by `quintile_edges` of an `rfm_quantiles`
    result. Values beyond the end edges count in the end bins."""
    chosen = units_taking_part(configs, units)
    observation_date, lookback = _window(chosen, lookback_days)
    unknown = sorted(set(bins or {}) - set(RFM_COLUMNS))
    if unknown:
        raise ConfigurationError(
            f"rfm_segments: bins for {unknown}; only {sorted(RFM_COLUMNS)} have bins"
        )
    edges = {
        **rfm_edges(chosen, lookback_days=lookback, frequency_upper=frequency_upper),
        **(bins or {}),
    }
    if joint:
        aggregates: tuple = (
            Count(name="customers", group_by=tuple(_rfm_key(n, edges[n]) for n in RFM_COLUMNS)),
        )
    else:
        aggregates = tuple(
            Histogram(name=n, column=RFM_COLUMNS[n], bins=tuple(edges[n]), outside="clip")
            for n in RFM_COLUMNS
        )
    return QuerySpec(
        purpose=purpose,
        units=units,
        rows=CUSTOMERS,
        observation_date=observation_date,
        lookback_days=lookback,
        aggregates=aggregates,
        chart=Chart(kind="bars", series=tuple(a.name for a in aggregates)),
        recipe="rfm_segments",
    )


@_validated
def rfm_quantiles(
    configs: Sequence[SiloSchema],
    *,
    purpose: str = ANALYTICS_PURPOSE,
    units: tuple[str, ...] = (),
    lookback_days: int = Field(365, ge=1),
    frequency_upper: float = Field(FREQUENCY_UPPER, gt=0, le=MAX_BINS),
    resolution: int = Field(100, ge=2, le=MAX_BINS),
    probabilities: tuple[float, ...] = QUINTILES,
) -> QuerySpec:
    """DP quintiles (by default) of recency, frequency and monetary, each read off one histogram
    of `resolution` declared bins (frequency: one bin per purchase count). Feed the result to
    `quintile_edges` for data-driven yet DP segment bins."""
    chosen = units_taking_part(configs, units)
    observation_date, lookback = _window(chosen, lookback_days)
    amount = declared_bounds(PURCHASE_AMOUNT, chosen)
    if amount is None:
        raise ConfigurationError(
            f"monetary quantiles need declared bounds for '{PURCHASE_AMOUNT}'; declare them"
        )
    fine = {
        "recency": _rounded(np.linspace(0.0, float(lookback), resolution + 1)),
        "frequency": tuple(float(k) for k in range(math.ceil(frequency_upper) + 1)),
        "monetary": _log_edges(float(amount[0]), float(amount[1]), resolution),
    }
    return QuerySpec(
        purpose=purpose,
        units=units,
        rows=CUSTOMERS,
        observation_date=observation_date,
        lookback_days=lookback,
        aggregates=tuple(
            Quantiles(
                name=name,
                column=column,
                bins=fine[name],
                probabilities=probabilities,
                outside="clip",
            )
            for name, column in RFM_COLUMNS.items()
        ),
        recipe="rfm_quantiles",
    )


def quintile_edges(result: QueryResult) -> dict[str, tuple[float, ...]]:
    """Segment bins from an `rfm_quantiles` result: the first declared edge, the noisy quantiles
    (rounded to three digits, repeats dropped) and the last declared edge. Post-processing of a
    DP release: using them costs no further privacy."""
    edges = {}
    for name in RFM_COLUMNS:
        aggregate = result.spec.aggregate(name)
        assert isinstance(aggregate, Quantiles) and aggregate.bins is not None
        inner = [a["value"] for a in result.answers_of(name) if a["value"] is not None]
        lower, upper = aggregate.bins[0], aggregate.bins[-1]
        cuts = [v for v in inner if lower < v < upper]
        edges[name] = _rounded(np.asarray([lower, *sorted(cuts), upper], dtype=np.float64))
    return edges


@_validated
def churn_rate_by_segment(
    configs: Sequence[SiloSchema],
    *,
    purpose: str = ANALYTICS_PURPOSE,
    units: tuple[str, ...] = (),
    segment: str = "customers.region",
    bins: tuple[float, ...] | None = None,
    churned: str = "customers.churned",
    lookback_days: int = Field(365, ge=1),
    frequency_upper: float = Field(FREQUENCY_UPPER, gt=0),
) -> QuerySpec:
    """Per segment (a declared category, or bins of a numeric or RFM column): all customers, the
    churned ones, and the churn rate = churned / all (clipped to [0, 1], said in the answer)."""
    chosen = units_taking_part(configs, units)
    observation_date, lookback = _window(chosen, lookback_days)
    key = _segment_key(segment, chosen, bins, lookback, frequency_upper)
    return QuerySpec(
        purpose=purpose,
        units=units,
        rows=CUSTOMERS,
        group_by=(key,),
        observation_date=observation_date,
        lookback_days=lookback,
        aggregates=(
            Count(name="customers"),
            Count(name="churned", where=(Condition(column=churned, op="eq", value=True),)),
            Ratio(name="churn_rate", numerator="churned", denominator="customers", rate=True),
        ),
        chart=Chart(kind="bars", series=("churn_rate",)),
        recipe="churn_rate_by_segment",
    )


@_validated
def funnel(
    configs: Sequence[SiloSchema],
    *,
    purpose: str = ANALYTICS_PURPOSE,
    units: tuple[str, ...] = (),
    stages: tuple[Stage, ...] = DEFAULT_STAGES,
    by: tuple[str, ...] = ("derived.main_channel",),
    lookback_days: int = Field(365, ge=1),
) -> QuerySpec:
    """Customers reaching each stage, per group of the `by` columns (default: the customer's main
    channel in the window; none: one funnel), and the conversion from each stage to the next. A
    customer reaches a stage when they pass its filter and every earlier stage's, so each
    conversion is a rate in [0, 1]. The default stages count purchases in the window: 1, 2, 6
    and 12 or more."""
    if len(stages) < 2:
        raise ConfigurationError("funnel: declare at least two stages")
    chosen = units_taking_part(configs, units)
    observation_date, lookback = _window(chosen, lookback_days)
    group_by = tuple(GroupKey(column=c, domain=declared_domain(c, chosen)) for c in by)
    counts, steps, reached = [], [], ()
    for stage in stages:
        reached = (*reached, *stage.where)
        counts.append(Count(name=stage.name, where=reached))
    for before, after in itertools.pairwise(stages):
        steps.append(
            Ratio(
                name=f"{before.name}_to_{after.name}",
                numerator=after.name,
                denominator=before.name,
                rate=True,
            )
        )
    return QuerySpec(
        purpose=purpose,
        units=units,
        rows=CUSTOMERS,
        group_by=group_by,
        observation_date=observation_date,
        lookback_days=lookback,
        aggregates=(*counts, *steps),
        chart=Chart(
            kind="funnel",
            series=tuple(c.name for c in counts),
            steps=tuple(s.name for s in steps),
        ),
        recipe="funnel",
    )


@_validated
def cohort_retention(
    configs: Sequence[SiloSchema],
    *,
    purpose: str = ANALYTICS_PURPOSE,
    units: tuple[str, ...] = (),
    first_cohort: str | None = Field(None, pattern=r"^\d{4}-(0[1-9]|1[0-2])$"),
    cohorts: int = Field(12, ge=1, le=MAX_BINS),
    months: int = Field(12, ge=1, le=MAX_BINS),
) -> QuerySpec:
    """The retention matrix: per signup month (`cohorts` of them from `first_cohort`, by default
    the month the transactions' declared period starts) and month since signup (0 to
    `months` - 1), the customers with a purchase in that month over the cohort's size. A customer
    counts once per cell and in at most `months` cells."""
    chosen = units_taking_part(configs, units)
    if first_cohort is None:
        period = declared_bounds(PURCHASE_TIME, chosen)
        if period is None:
            raise ConfigurationError(
                f"cohort_retention: give first_cohort (YYYY-MM) or declare bounds for "
                f"'{PURCHASE_TIME}'"
            )
        first_cohort = f"{period[0].year:04d}-{period[0].month:02d}"
    year, month = (int(part) for part in first_cohort.split("-"))
    start = year * 12 + month - 1
    last = start + cohorts - 1
    if start < _FIRST_MONTH or last > _LAST_MONTH:
        raise ConfigurationError(
            f"cohort_retention: {cohorts} cohorts from {first_cohort} leave the calendar (years "
            "1 to 9999); choose another first_cohort or fewer cohorts"
        )
    cohort = GroupKey(
        column="derived.signup_month",
        domain=months_between(_month(start), _month(last)),
    )
    since = GroupKey(
        column="derived.months_since_signup",
        bins=tuple(m - 0.5 for m in range(months + 1)),  # one bin per whole month
        labels=tuple(str(m) for m in range(months)),
    )
    return QuerySpec(
        purpose=purpose,
        units=units,
        aggregates=(
            Count(name="cohort_size", rows=CUSTOMERS, group_by=(cohort,)),
            Count(
                name="active",
                rows=TRANSACTIONS,
                group_by=(cohort, since),
                max_groups=months,
                max_rows=1,
            ),
            Ratio(name="retention", numerator="active", denominator="cohort_size", rate=True),
        ),
        chart=Chart(kind="matrix", series=("retention", "cohort_size")),
        recipe="cohort_retention",
    )


def _month(index: int) -> date:
    return date(index // 12, index % 12 + 1, 1)


@_validated
def top_categories(
    configs: Sequence[SiloSchema],
    *,
    purpose: str = ANALYTICS_PURPOSE,
    units: tuple[str, ...] = (),
    category: str = "transactions.category",
    segment: str = "customers.region",
    segment_bins: tuple[float, ...] | None = None,
    k: int = Field(3, ge=1),
    max_categories: int | None = Field(None, ge=1),
    lookback_days: int = Field(365, ge=1),
    frequency_upper: float = Field(FREQUENCY_UPPER, gt=0),
) -> QuerySpec:
    """Customers buying in each category, per segment, and the top `k` categories of each
    segment ranked on the noisy counts. A customer counts once per category and in at most
    `max_categories` categories (default: all of the declared domain)."""
    chosen = units_taking_part(configs, units)
    observation_date, lookback = _window(chosen, lookback_days)
    categories = GroupKey(column=category, domain=declared_domain(category, chosen))
    spread = max_categories or (len(categories.domain) if categories.domain else 1)
    return QuerySpec(
        purpose=purpose,
        units=units,
        rows=TRANSACTIONS,
        group_by=(
            _segment_key(segment, chosen, segment_bins, lookback, frequency_upper),
            categories,
        ),
        max_groups=spread,
        max_rows=1,
        observation_date=observation_date,
        lookback_days=lookback,
        aggregates=(Count(name="buyers"),),
        chart=Chart(kind="top", series=("buyers",), top=k),
        recipe="top_categories",
    )


RECIPES: dict[str, Callable[..., QuerySpec]] = {
    "rfm_segments": rfm_segments,
    "rfm_quantiles": rfm_quantiles,
    "churn_rate_by_segment": churn_rate_by_segment,
    "funnel": funnel,
    "cohort_retention": cohort_retention,
    "top_categories": top_categories,
}


def build_recipe(
    name: str, configs: Sequence[SiloSchema], parameters: Mapping[str, Any]
) -> QuerySpec:
    """The query of recipe `name` with `parameters` (the other keys of its `[query]` table)."""
    recipe = RECIPES.get(name)
    if recipe is None:
        raise ConfigurationError(
            f"[query] recipe = '{name}' is not a recipe; choose one of {sorted(RECIPES)} "
            f"(see {QUERY_DOCS})"
        )
    accepted = [p for p in inspect.signature(recipe).parameters if p != "configs"]
    try:
        return recipe(configs, **parameters)
    except ValidationError as err:
        raise ConfigurationError(
            f"[query] recipe '{name}': {validation_problems(err)}; its parameters are {accepted} "
            f"(see {QUERY_DOCS})"
        ) from None
