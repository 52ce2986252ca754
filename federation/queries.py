"""Federated DP queries: the query specification, its release layout and the answers read off it.

A query is public: its purpose, the BUs taking part, a filter, group-by keys with a declared domain
(categories) or declared bins (edges), and aggregates: `count`, `sum` and `mean` of a column with
declared clipping bounds, `histogram`, `quantiles` (read off a DP histogram over declared bins) and
`ratio` (of two counts or sums, e.g. churn rate = churned / all). Nothing in it is taken from the
data: a domain or a bin edge learnt from the data would leak through the shape of the answer.

Contribution bounding is explicit and enforced inside each BU (`clients.queries`): a customer counts
in at most `max_groups` groups and with at most `max_rows` rows per group, so every released part
has a known L2 sensitivity in grid units (Wilson et al., "Differentially Private SQL with Bounded
User Contribution", PoPETs 2020):

- a count (or a histogram over bins inside each group): sqrt(max_groups) x max_rows;
- a sum of values clipped to [lower, upper] and rounded to a public grid of step `granularity`:
  sqrt(max_groups) x max_rows x max(|lower|, |upper|) / granularity grid steps.

Each aggregate releases one part (a mean releases a sum part and a count part; a ratio releases
nothing of its own and is read off the parts of its numerator and denominator); identical counts
are released once and shared. Parts are integer vectors, noised with the discrete Gaussian
(`privacy.mechanisms`), so every released count or sum is an exact multiple of its granularity.
Intervals come from the noise actually in the sum: counts and sums from the exact distribution of
that noise, means and ratios by the delta method from their parts (`ratio_interval`), quantiles from
the noisy cumulative histogram.

Per-customer columns computed inside the BU are named `derived.<name>` (`DERIVED_COLUMNS`): RFM
(recency, frequency, monetary over a look-back window ending at `observation_date`), tenure, main
channel, signup month and, per transaction, months since signup.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from statistics import NormalDist
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from federation.release import Part, ReleaseLayout, layout_of
from privacy.errors import ConfigurationError, PolicyViolation
from privacy.mechanisms import NoiseInSum, ratio_interval
from privacy.schema import NUMERIC_TYPES, TEMPORAL_TYPES, ColumnType, SiloSchema

QUERY_DOCS = "docs/queries.md"
CUSTOMERS = "customers"
TRANSACTIONS = "transactions"
# the columns derived columns read (the same names the churn task's features read)
PURCHASE_TIME = "transactions.timestamp"
PURCHASE_AMOUNT = "transactions.amount"
PURCHASE_CHANNEL = "transactions.channel"
SIGNUP_DATE = "customers.signup_date"
DEFAULT_LOOKBACK_DAYS = 365
_GRID_STEPS = 1000  # default granularity: about (upper - lower) / 1000, on a 1-2-5 grid
_EXACT = 2**53  # the largest count or number of days that stays exact as a float, as noise uses it
_COLUMN = r"^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$"
_NAME = r"^[a-z][a-z0-9_]*$"
_MONTH = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")


@dataclass(frozen=True)
class DerivedColumn:
    """A per-customer (or, `per_row`, per-transaction) value computed inside the BU from the
    customer's own rows: it reads `reads`; `windowed` ones need the query's observation date and
    look-back window."""

    reads: tuple[str, ...]
    numeric: bool
    windowed: bool
    per_row: bool
    description: str


DERIVED_COLUMNS: dict[str, DerivedColumn] = {
    "derived.recency_days": DerivedColumn(
        (PURCHASE_TIME,),
        True,
        True,
        False,
        "days from the last purchase in the window to the observation date (lookback_days if none)",
    ),
    "derived.frequency": DerivedColumn(
        (PURCHASE_TIME,), True, True, False, "purchases in the window"
    ),
    "derived.monetary": DerivedColumn(
        (PURCHASE_AMOUNT, PURCHASE_TIME),
        True,
        True,
        False,
        "mean purchase amount in the window (0 if none)",
    ),
    "derived.main_channel": DerivedColumn(
        (PURCHASE_CHANNEL, PURCHASE_TIME),
        False,
        True,
        False,
        "channel of most purchases in the window (ties: alphabetical; missing if none)",
    ),
    "derived.tenure_days": DerivedColumn(
        (SIGNUP_DATE,), True, True, False, "days from signup to the observation date"
    ),
    "derived.signup_month": DerivedColumn(
        (SIGNUP_DATE,), False, False, False, "signup month as YYYY-MM"
    ),
    "derived.months_since_signup": DerivedColumn(
        (SIGNUP_DATE, PURCHASE_TIME),
        True,
        False,
        True,
        "calendar months from the signup month to the transaction's month (rows = transactions)",
    ),
}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _column_name(column: str) -> str:
    if not re.fullmatch(_COLUMN, column):
        raise ValueError(f"'{column}' is not a qualified column name; write it as table.column")
    if column.startswith("derived.") and column not in DERIVED_COLUMNS:
        raise ValueError(
            f"'{column}' is not a derived column; known: {', '.join(sorted(DERIVED_COLUMNS))}"
        )
    return column


def _check_declaration(
    column: str,
    domain: tuple[str, ...] | None,
    bins: tuple[float, ...] | None,
    labels: tuple[str, ...] | None,
    outside: str,
) -> None:
    """The rules every declared domain or set of bins follows (group keys, histograms, quantiles)."""
    if domain is not None and bins is not None:
        raise ValueError(f"'{column}': declare either 'domain' or 'bins', not both")
    if domain is not None and (not domain or len(set(domain)) != len(domain)):
        raise ValueError(f"'{column}': 'domain' must list distinct values")
    if bins is not None:
        if len(bins) < 2 or not all(math.isfinite(e) for e in bins):
            raise ValueError(f"'{column}': 'bins' needs at least two finite edges")
        if any(b <= a for a, b in itertools.pairwise(bins)):
            raise ValueError(f"'{column}': bin edges must increase strictly: {bins}")
    if outside == "clip" and bins is None:
        raise ValueError(f"'{column}': outside = 'clip' needs 'bins'")
    if labels is not None:
        size = len(domain) if domain is not None else len(bins) - 1 if bins is not None else 0
        if size == 0:
            raise ValueError(f"'{column}': 'labels' name the values of a domain or bins")
        if len(labels) != size or len(set(labels)) != len(labels):
            raise ValueError(f"'{column}': give {size} distinct labels")


def _booleans_as_text(domain: Any) -> Any:
    if isinstance(domain, list | tuple):
        return [str(v).lower() if isinstance(v, bool) else v for v in domain]
    return domain


def _iso(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


Scalar = bool | int | float | str


class Condition(_Frozen):
    """One filter term on a row; a row passes the filter when it passes every term. A missing value
    passes `present` only."""

    column: str
    op: Literal["eq", "ne", "lt", "le", "gt", "ge", "in", "not_in", "present"]
    value: Scalar | None = None
    values: tuple[Scalar, ...] = ()

    @field_validator("column")
    @classmethod
    def _known_column(cls, column: str) -> str:
        return _column_name(column)

    @field_validator("value", mode="before")
    @classmethod
    def _dates_as_text(cls, value: Any) -> Any:
        return _iso(value)

    @field_validator("values", mode="before")
    @classmethod
    def _many_dates_as_text(cls, values: Any) -> Any:
        return [_iso(v) for v in values] if isinstance(values, list | tuple) else values

    @model_validator(mode="after")
    def _operands_fit_op(self) -> Condition:
        if self.op in ("in", "not_in"):
            if not self.values or self.value is not None:
                raise ValueError(f"'{self.op}' takes a non-empty 'values' list and no 'value'")
        elif self.op == "present":
            if self.value is not None or self.values:
                raise ValueError("'present' takes no 'value' or 'values'")
        elif self.value is None or self.values:
            raise ValueError(f"'{self.op}' takes one 'value' and no 'values'")
        return self

    @property
    def operands(self) -> tuple[Scalar, ...]:
        return (
            self.values
            if self.op in ("in", "not_in")
            else (() if self.value is None else (self.value,))
        )


class _Declared(_Frozen):
    """A column with its declared categories (`domain`) or bin edges (`bins`): the public values
    a group key or a histogram counts over."""

    column: str
    domain: tuple[str, ...] | None = None
    bins: tuple[float, ...] | None = None
    labels: tuple[str, ...] | None = None
    outside: Literal["drop", "clip"] = "drop"

    @field_validator("column")
    @classmethod
    def _known_column(cls, column: str) -> str:
        return _column_name(column)

    @field_validator("domain", mode="before")
    @classmethod
    def _domain_as_text(cls, domain: Any) -> Any:
        return _booleans_as_text(domain)

    @model_validator(mode="after")
    def _declaration_is_consistent(self) -> _Declared:
        _check_declaration(self.column, self.domain, self.bins, self.labels, self.outside)
        return self


class GroupKey(_Declared):
    """A group-by key (or a histogram's bins): a declared `domain` of categories, or `bins`, the
    edges of [e0, e1), ..., [e(n-1), en]. Values outside the domain or the bins belong to no group
    (`outside = "drop"`), or, for bins with `outside = "clip"`, to the first or last bin."""

    @property
    def declared(self) -> bool:
        return self.domain is not None or self.bins is not None

    @property
    def size(self) -> int:
        if self.domain is not None:
            return len(self.domain)
        if self.bins is not None:
            return len(self.bins) - 1
        raise ConfigurationError(f"'{self.column}' has no declared domain or bins")

    @property
    def names(self) -> tuple[str, ...]:
        """The label of each group, in the release's order."""
        if self.labels is not None:
            return self.labels
        if self.domain is not None:
            return self.domain
        edges = self.bins or ()
        last = len(edges) - 2
        return tuple(
            f"[{lo:g}, {hi:g}{']' if i == last else ')'}"
            for i, (lo, hi) in enumerate(itertools.pairwise(edges))
        )


class _Aggregate(_Frozen):
    name: str = Field(pattern=_NAME)


class _Scoped(_Aggregate):
    """An aggregate over rows: each field left unset takes the query's value; `where` adds terms
    to the query's filter."""

    rows: str | None = None
    where: tuple[Condition, ...] = ()
    group_by: tuple[GroupKey, ...] | None = None
    max_groups: int | None = Field(None, ge=1, le=_EXACT)
    max_rows: int | None = Field(None, ge=1, le=_EXACT)


class Count(_Scoped):
    """The number of rows in each group (rows = customers: the number of customers)."""

    kind: Literal["count"] = "count"


class _Bounded(_Scoped):
    column: str
    lower: float | None = None
    upper: float | None = None
    granularity: float | None = Field(None, gt=0)

    @field_validator("column")
    @classmethod
    def _known_column(cls, column: str) -> str:
        return _column_name(column)

    @model_validator(mode="after")
    def _bounds_are_ordered(self) -> _Bounded:
        if (self.lower is None) != (self.upper is None):
            raise ValueError(f"'{self.name}': declare both 'lower' and 'upper', or neither")
        if self.lower is None or self.upper is None:
            return self
        if not self.lower < self.upper:
            raise ValueError(f"'{self.name}': 'lower' must be below 'upper'")
        # Values are rounded to a grid between the bounds: a span that overflows to infinity, or a
        # default step that underflows to zero, leaves no grid, and so does a declared step too
        # fine for the bounds to be counted in steps.
        step = (self.upper - self.lower) / _GRID_STEPS
        if not (math.isfinite(step) and step > 0):
            raise ValueError(
                f"'{self.name}': 'lower' and 'upper' must be finite, with room for a grid between "
                f"them: [{self.lower:g}, {self.upper:g}]"
            )
        grid = self.grid
        if not (grid > 0 and math.isfinite(max(abs(self.lower), abs(self.upper)) / grid)):
            raise ValueError(
                f"'{self.name}': granularity {grid:g} is too fine for the bounds "
                f"[{self.lower:g}, {self.upper:g}]; choose a coarser one"
            )
        return self

    @property
    def grid(self) -> float:
        """The public step every clipped value is rounded to: declared, or about a thousandth of
        the bounds' range on a 1-2-5 grid."""
        if self.granularity is not None:
            return self.granularity
        if self.lower is None or self.upper is None:
            raise ConfigurationError(f"aggregate '{self.name}' has no clipping bounds")
        return default_granularity(self.lower, self.upper)


class Sum(_Bounded):
    """The sum of a column clipped to [lower, upper], rounded to multiples of `granularity`."""

    kind: Literal["sum"] = "sum"


class Mean(_Bounded):
    """Sum / count of a column clipped to [lower, upper]; releases a sum part and a count part."""

    kind: Literal["mean"] = "mean"


class Histogram(_Scoped, _Declared):
    """Counts of rows per category (`domain`) or per bin (`bins`) of a column, in each group."""

    kind: Literal["histogram"] = "histogram"

    @property
    def key(self) -> GroupKey:
        return GroupKey(
            column=self.column,
            domain=self.domain,
            bins=self.bins,
            labels=self.labels,
            outside=self.outside,
        )


class Quantiles(_Scoped):
    """Quantiles of a column read off one DP histogram over the declared `bins` (one release; no
    DP binary search): the value is interpolated inside the bin where the noisy cumulative count
    reaches p x the noisy total, the interval is in bin edges."""

    kind: Literal["quantiles"] = "quantiles"
    column: str
    bins: tuple[float, ...] | None = None
    probabilities: tuple[float, ...] = (0.25, 0.5, 0.75)
    outside: Literal["drop", "clip"] = "drop"

    @field_validator("column")
    @classmethod
    def _known_column(cls, column: str) -> str:
        return _column_name(column)

    @model_validator(mode="after")
    def _declaration_is_consistent(self) -> Quantiles:
        probabilities = self.probabilities
        if not probabilities or any(not 0 < p < 1 for p in probabilities):
            raise ValueError(f"'{self.name}': probabilities must lie in (0, 1)")
        if any(b <= a for a, b in itertools.pairwise(probabilities)):
            raise ValueError(f"'{self.name}': probabilities must increase strictly")
        _check_declaration(self.column, None, self.bins, None, self.outside)
        return self

    @property
    def key(self) -> GroupKey:
        return GroupKey(column=self.column, bins=self.bins, outside=self.outside)


class Ratio(_Aggregate):
    """numerator / denominator, two `count` or `sum` aggregates of this query; the denominator's
    group keys must be among the numerator's (it is broadcast over the others). `rate = true`
    clips the value and the interval to [0, 1] and says so in the answer."""

    kind: Literal["ratio"] = "ratio"
    numerator: str
    denominator: str
    rate: bool = False


Aggregate = Annotated[
    Count | Sum | Mean | Histogram | Quantiles | Ratio, Field(discriminator="kind")
]


class Chart(_Frozen):
    """How a result is best drawn (a recipe sets it): `bars` of each series over its groups, a
    `funnel` of stage counts (`series`) with the conversions between them (`steps`), a `matrix`
    of a two-key aggregate (`series[0]`, with `series[1]` as row totals), or the `top` categories
    (last group key) per segment (the other keys) of a count."""

    kind: Literal["bars", "funnel", "matrix", "top"]
    series: tuple[str, ...] = Field(min_length=1)
    steps: tuple[str, ...] = ()
    top: int | None = Field(None, ge=1)


@dataclass(frozen=True)
class Scope:
    """The rows an aggregate reads and how each customer's contribution to them is bounded."""

    rows: str
    where: tuple[Condition, ...]
    group_by: tuple[GroupKey, ...]
    max_groups: int
    max_rows: int

    @property
    def groups(self) -> int:
        return math.prod(key.size for key in self.group_by)


@dataclass(frozen=True)
class Measure:
    """One released part: a count, a bounded sum or a histogram, per group of its scope."""

    kind: Literal["count", "sum", "histogram"]
    scope: Scope
    column: str | None = None
    lower: float | None = None
    upper: float | None = None
    granularity: float = 1.0
    bins: GroupKey | None = None

    @property
    def size(self) -> int:
        return self.scope.groups * (self.bins.size if self.bins is not None else 1)

    @property
    def grid_bound(self) -> int:
        """The largest |value| of one row, in grid steps (1 for counts)."""
        if self.kind != "sum":
            return 1
        return int(
            max(
                abs(np.rint(self.lower / self.granularity)),  # type: ignore[operator]
                abs(np.rint(self.upper / self.granularity)),  # type: ignore[operator]
            )
        )

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of the part in grid units, for one customer added or removed."""
        return math.sqrt(self.scope.max_groups) * self.scope.max_rows * self.grid_bound

    def to_grid(self, values: np.ndarray) -> np.ndarray:
        """Each value clipped to [lower, upper] and rounded (half to even) to the grid: int64."""
        clipped = np.clip(np.asarray(values, dtype=np.float64), self.lower, self.upper)
        return np.rint(clipped / self.granularity).astype(np.int64)


def default_granularity(lower: float, upper: float) -> float:
    """The largest step of the form {1, 2, 5} x 10^k not above (upper - lower) / 1000: a decimal
    step, so that released sums print exactly."""
    step = (upper - lower) / _GRID_STEPS
    exponent = math.floor(math.log10(step))
    for mantissa in (5, 2, 1):
        candidate = Decimal(mantissa).scaleb(exponent)
        if float(candidate) <= step:
            return float(candidate)
    # log10 rounded up across a power of ten (step just below 10^k): the next power down
    return float(Decimal(5).scaleb(exponent - 1))


class QuerySpec(_Frozen):
    """A federated DP query: the `[query]` table of a job.

    `rows` is the table whose rows are counted (`customers`: one row per customer; `transactions`:
    each row joined with its customer's columns and derived columns). `where`, `group_by`,
    `max_groups` and `max_rows` apply to every aggregate that does not set its own."""

    purpose: str = Field(min_length=1)
    units: tuple[str, ...] = ()
    rows: str = CUSTOMERS
    where: tuple[Condition, ...] = ()
    group_by: tuple[GroupKey, ...] = ()
    max_groups: int = Field(1, ge=1, le=_EXACT)
    max_rows: int = Field(1, ge=1, le=_EXACT)
    observation_date: datetime | None = None
    lookback_days: int | None = Field(None, ge=1, le=_EXACT)
    aggregates: tuple[Aggregate, ...] = Field(min_length=1)
    chart: Chart | None = None
    recipe: str | None = None

    @model_validator(mode="after")
    def _references_are_valid(self) -> QuerySpec:
        names = [a.name for a in self.aggregates]
        if len(set(names)) != len(names):
            raise ValueError(f"aggregate names must be unique: {names}")
        by_name = {a.name: a for a in self.aggregates}
        for aggregate in self.aggregates:
            if isinstance(aggregate, Ratio):
                for role in ("numerator", "denominator"):
                    target = by_name.get(getattr(aggregate, role))
                    if not isinstance(target, Count | Sum):
                        raise ValueError(
                            f"ratio '{aggregate.name}': {role} '{getattr(aggregate, role)}' must "
                            "name a count or sum aggregate of this query"
                        )
                if aggregate.numerator == aggregate.denominator:
                    raise ValueError(f"ratio '{aggregate.name}': numerator equals denominator")
                numerator_keys = self.scope(by_name[aggregate.numerator]).group_by  # type: ignore[arg-type]
                denominator_keys = self.scope(by_name[aggregate.denominator]).group_by  # type: ignore[arg-type]
                if any(key not in numerator_keys for key in denominator_keys):
                    raise ValueError(
                        f"ratio '{aggregate.name}': every group key of the denominator must be a "
                        "group key of the numerator (same column, domain or bins)"
                    )
            else:
                self._check_scope(aggregate)
        if self.chart is not None:
            unknown = [n for n in (*self.chart.series, *self.chart.steps) if n not in by_name]
            if unknown:
                raise ValueError(f"chart names aggregates this query does not have: {unknown}")
        return self

    def _check_scope(self, aggregate: _Scoped) -> None:
        scope = self.scope(aggregate)
        columns = [key.column for key in scope.group_by]
        if len(set(columns)) != len(columns):
            raise ValueError(f"'{aggregate.name}': a column appears twice among its group keys")
        for column in self._aggregate_columns(aggregate):
            table = column.partition(".")[0]
            derived = DERIVED_COLUMNS.get(column)
            if derived is not None:
                if derived.per_row and scope.rows != TRANSACTIONS:
                    raise ValueError(
                        f"'{aggregate.name}': '{column}' is a value per transaction; set "
                        f"rows = '{TRANSACTIONS}'"
                    )
            elif table not in (scope.rows, CUSTOMERS):
                raise ValueError(
                    f"'{aggregate.name}' counts rows of '{scope.rows}' and cannot read '{column}'; "
                    f"use rows = '{table}' or a derived column ({', '.join(DERIVED_COLUMNS)})"
                )

    def scope(self, aggregate: _Scoped) -> Scope:
        """The effective rows, filter, group keys and bounds of `aggregate`."""
        where = tuple(
            sorted(
                dict.fromkeys((*self.where, *aggregate.where)), key=lambda c: c.model_dump_json()
            )
        )
        return Scope(
            rows=aggregate.rows or self.rows,
            where=where,
            group_by=self.group_by if aggregate.group_by is None else aggregate.group_by,
            max_groups=aggregate.max_groups or self.max_groups,
            max_rows=aggregate.max_rows or self.max_rows,
        )

    @staticmethod
    def _aggregate_columns(aggregate: _Scoped) -> Iterator[str]:
        yield from (c.column for c in aggregate.where)
        yield from (k.column for k in aggregate.group_by or ())
        if isinstance(aggregate, Sum | Mean | Histogram | Quantiles):
            yield aggregate.column

    def aggregate(self, name: str) -> Count | Sum | Mean | Histogram | Quantiles | Ratio:
        for aggregate in self.aggregates:
            if aggregate.name == name:
                return aggregate
        raise KeyError(name)

    # --- what the query reads -------------------------------------------------------------------

    def _uses(self) -> Iterator[tuple[str, str, object]]:
        """(where in the query, column, the declaration using it) for every column reference."""
        for i, condition in enumerate(self.where):
            yield f"where[{i}]", condition.column, condition
        for key in self.group_by:
            yield "group_by", key.column, key
        for aggregate in self.aggregates:
            if isinstance(aggregate, Ratio):
                continue
            at = f"aggregates.{aggregate.name}"
            for i, condition in enumerate(aggregate.where):
                yield f"{at}.where[{i}]", condition.column, condition
            for key in aggregate.group_by or ():
                yield f"{at}.group_by", key.column, key
            if isinstance(aggregate, Sum | Mean | Quantiles):
                yield at, aggregate.column, aggregate
            elif isinstance(aggregate, Histogram):
                yield at, aggregate.column, aggregate.key

    @property
    def columns(self) -> tuple[str, ...]:
        """The silo columns (`table.column`) the query reads, derived columns expanded to what
        they read; the tables' customer keys are not listed (`tables` names the tables)."""
        seen: dict[str, None] = {}
        for _, column, _ in self._uses():
            derived = DERIVED_COLUMNS.get(column)
            seen.update(dict.fromkeys(derived.reads if derived else (column,)))
        return tuple(seen)

    @property
    def tables(self) -> tuple[str, ...]:
        """Every table the query reads, whose customer key it therefore reads too: always the
        customers table, since only rows of the customers it lists (after consent) count."""
        rows = [self.scope(a).rows for a in self.aggregates if not isinstance(a, Ratio)]
        columns = (c.partition(".")[0] for c in self.columns)
        return tuple(dict.fromkeys((CUSTOMERS, *rows, *columns)))

    @property
    def windowed(self) -> bool:
        return any(DERIVED_COLUMNS[c].windowed for _, c, _ in self._uses() if c in DERIVED_COLUMNS)

    # --- checks before any data is read -----------------------------------------------------------

    def missing(self) -> list[str]:
        """What the query still lacks to be released: domains, bins, bounds, the window."""
        problems = []
        for at, column, use in self._uses():
            if isinstance(use, GroupKey) and not use.declared:
                problems.append(
                    f"{at}: '{column}' has no declared domain or bins; declare the categories "
                    "(domain = [...]) or the bin edges (bins = [...]) in the query (never from "
                    "the data)"
                )
            if isinstance(use, Sum | Mean) and use.lower is None:
                problems.append(
                    f"{at}: '{column}' has no clipping bounds; declare lower and upper in the "
                    "query (or declare them for the column in every BU's schema)"
                )
            if isinstance(use, Quantiles) and use.bins is None:
                problems.append(
                    f"{at}: quantiles of '{column}' are read off a histogram; declare its bin "
                    "edges (bins = [...])"
                )
        if self.windowed and (self.observation_date is None or self.lookback_days is None):
            problems.append(
                "observation_date and lookback_days: derived RFM columns need the look-back "
                "window; declare both (resolve_query fills them from the declared timestamp bounds)"
            )
        return list(dict.fromkeys(problems))

    def _require_complete(self) -> None:
        problems = self.missing()
        if problems:
            raise ConfigurationError(
                "the query is incomplete: " + "; ".join(problems) + f" (see {QUERY_DOCS})"
            )

    def taking_part(self, configs: Sequence[SiloSchema]) -> list[SiloSchema]:
        """The configurations of the BUs named in `units` (all when `units` is empty)."""
        return units_taking_part(configs, self.units)

    def check_against(self, configs: Sequence[SiloSchema]) -> None:
        """Every check a BU would make, on the declared configurations alone (no data read): the
        query is complete, each BU taking part declares the purpose, the purpose allows every
        column read (and the tables' keys), no column is a special category, and every use of a
        column fits its declared type and nullability; and every category the query names is
        declared by at least one of these BUs (a BU that does not declare it holds none of it)."""
        self._require_complete()
        taking_part = self.taking_part(configs)
        for config in taking_part:
            self.check_unit(config)
        for at, column, use in self._uses():
            if isinstance(use, GroupKey):
                labels: tuple = use.domain or ()
            elif isinstance(use, Condition):
                labels = use.operands
            else:
                continue
            declared = declared_domain(column, taking_part)
            if declared is None or column == "derived.signup_month":
                continue
            unknown = [v for v in labels if isinstance(v, str) and v not in declared]
            if unknown:
                raise ConfigurationError(
                    f"{at}: {unknown} are not in the declared domain of '{column}' "
                    f"({list(declared)}) of any BU taking part; fix the values (see {QUERY_DOCS})"
                )

    def check_unit(self, config: SiloSchema) -> None:
        """The checks of `check_against` for one BU (run by the BU itself before it reads data)."""
        self._require_complete()
        where = f"unit '{config.unit}'"
        policy = config.policy(self.purpose)
        for column in self.columns:
            declared = config.column(column)
            if declared.is_special(config.jurisdictions):
                raise PolicyViolation(
                    f"{where}: the query reads '{column}', a special category of personal data "
                    "(GDPR Art. 9; PIPL Art. 28); no query may read it. Remove it from the query."
                )
            if column not in policy.allowed:
                raise PolicyViolation(
                    f"{where}: purpose '{self.purpose}' does not allow '{column}', which the query "
                    f"reads; the BU's steward may add it to [purposes.{self.purpose}], or change "
                    "the query"
                )
        for table in self.tables:
            if table not in config.tables:
                raise ConfigurationError(
                    f"{where}: the query reads table '{table}', which the BU does not declare"
                )
            key = f"{table}.{config.tables[table].key}"
            if key not in policy.allowed:
                raise PolicyViolation(
                    f"{where}: the query reads '{table}' rows by customer, but purpose "
                    f"'{self.purpose}' does not allow its key '{key}'; add it to the purpose's "
                    "join_keys"
                )
        for at, column, use in self._uses():
            _check_use(config, at, column, use, self)

    # --- the release ----------------------------------------------------------------------------

    @property
    def _plan(self) -> tuple[dict[str, Measure], dict[str, tuple[str, ...]]]:
        return _plan_of(self)

    @property
    def measures(self) -> dict[str, Measure]:
        """Part name -> what the part releases, in the release's order."""
        return dict(self._plan[0])

    def parts_of(self, aggregate: str) -> tuple[str, ...]:
        """The parts an aggregate is read off (a ratio: its numerator's, then its denominator's)."""
        target = self.aggregate(aggregate)
        if isinstance(target, Ratio):
            return (*self._plan[1][target.numerator], *self._plan[1][target.denominator])
        return self._plan[1][aggregate]

    def layout(self) -> ReleaseLayout:
        """The release: one part per measure, of known L2 sensitivity in grid units."""
        return layout_of([Part(name, m.size, m.sensitivity) for name, m in self.measures.items()])


@lru_cache(maxsize=256)
def _plan_of(spec: QuerySpec) -> tuple[dict[str, Measure], dict[str, tuple[str, ...]]]:
    """(part name -> measure, in release order; aggregate -> its parts). Identical measures (the
    same count under a mean and a count, say) are one part, named after the first aggregate."""
    spec._require_complete()
    names: dict[Measure, str] = {}
    parts_of: dict[str, tuple[str, ...]] = {}

    def part(measure: Measure, name: str) -> str:
        return names.setdefault(measure, name)

    for aggregate in spec.aggregates:
        if isinstance(aggregate, Ratio):
            continue
        scope = spec.scope(aggregate)
        count = Measure("count", scope)
        if isinstance(aggregate, Count):
            parts_of[aggregate.name] = (part(count, aggregate.name),)
        elif isinstance(aggregate, Sum | Mean):
            total = Measure(
                "sum",
                scope,
                column=aggregate.column,
                lower=aggregate.lower,
                upper=aggregate.upper,
                granularity=aggregate.grid,
            )
            if total.grid_bound < 1:
                raise ConfigurationError(
                    f"aggregate '{aggregate.name}': granularity {aggregate.grid} is coarser than "
                    "its bounds; choose a smaller one"
                )
            if isinstance(aggregate, Sum):
                parts_of[aggregate.name] = (part(total, aggregate.name),)
            else:
                parts_of[aggregate.name] = (
                    part(total, f"{aggregate.name}.sum"),
                    part(count, f"{aggregate.name}.count"),
                )
        else:
            histogram = Measure("histogram", scope, column=aggregate.column, bins=aggregate.key)
            parts_of[aggregate.name] = (part(histogram, aggregate.name),)
    return {name: measure for measure, name in names.items()}, parts_of


def units_taking_part(configs: Sequence[SiloSchema], units: Sequence[str]) -> list[SiloSchema]:
    """The configurations of the BUs named in `units` (all of them when `units` is empty)."""
    known = {c.unit for c in configs}
    unknown = [u for u in units if u not in known]
    if unknown:
        raise ConfigurationError(
            f"query.units names {unknown}, which are not among the BUs "
            f"({', '.join(sorted(known)) or 'none'}); fix the names or add the BUs"
        )
    chosen = [c for c in configs if not units or c.unit in units]
    if not chosen:
        raise ConfigurationError("the query has no BU to run on; give BU configurations")
    return chosen


# --- checks of one use of a column against a BU's declaration ---------------------------------


def _kind_of(config: SiloSchema, column: str) -> tuple[str, bool]:
    """(numeric | temporal | category | boolean | string | month, nullable)."""
    derived = DERIVED_COLUMNS.get(column)
    if derived is not None:
        nullable = any(config.column(c).nullable for c in derived.reads)
        if column == "derived.main_channel":
            return "category", True
        return ("numeric" if derived.numeric else "month"), nullable
    declared = config.column(column)
    if declared.type in NUMERIC_TYPES:
        kind = "numeric"
    elif declared.type in TEMPORAL_TYPES:
        kind = "temporal"
    else:
        kind = {
            ColumnType.CATEGORY: "category",
            ColumnType.BOOLEAN: "boolean",
            ColumnType.STRING: "string",
        }[declared.type]
    return kind, declared.nullable


def column_kind(config: SiloSchema, column: str) -> str:
    """How the BU compares and groups the values of `column`: numeric, temporal, category,
    boolean, string or month (YYYY-MM text)."""
    return _kind_of(config, column)[0]


def _check_use(config: SiloSchema, at: str, column: str, use: object, spec: QuerySpec) -> None:
    kind, nullable = _kind_of(config, column)
    where = f"unit '{config.unit}': {at}"
    categorical = ("category", "boolean", "string", "month")

    def refuse(problem: str) -> None:
        raise ConfigurationError(f"{where}: {problem} (see {QUERY_DOCS})")

    def check_label(value: object) -> None:
        if kind == "boolean" and value not in ("false", "true"):
            refuse(f"'{column}' is boolean; its values are 'false' and 'true', not '{value}'")
        if kind == "month" and not (isinstance(value, str) and _MONTH.match(value)):
            refuse(f"'{column}' holds months written YYYY-MM, not '{value}'")

    if isinstance(use, GroupKey):
        if use.domain is not None:
            if kind not in categorical:
                refuse(f"'{column}' is {kind}; group it by bins, not by a domain of categories")
            for value in use.domain:
                check_label(value)
        elif kind != "numeric":
            refuse(f"'{column}' is {kind}; bins are for numeric columns, use a domain")
    elif isinstance(use, Quantiles):
        if kind != "numeric":
            refuse(f"'{column}' is {kind}; quantiles need a numeric column")
    elif isinstance(use, Sum | Mean):
        if kind != "numeric":
            refuse(f"'{column}' is {kind}; a {use.kind} needs a numeric column")
        scope = spec.scope(use)
        if nullable and not any(c.column == column and c.op == "present" for c in scope.where):
            refuse(
                f"'{column}' may be missing (nullable); add {{column = '{column}', "
                "op = 'present'} to the aggregate's where, so that sum and count cover the "
                "same rows"
            )
    elif isinstance(use, Condition):
        if use.op == "present":
            return
        if use.op in ("lt", "le", "gt", "ge") and kind not in ("numeric", "temporal", "month"):
            refuse(f"'{column}' is {kind}; '{use.op}' compares numbers, dates or months")
        for value in use.operands:
            if kind == "numeric" and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                refuse(f"'{column}' is numeric; compare it with a number, not {value!r}")
            elif kind == "temporal":
                try:
                    datetime.fromisoformat(str(value))
                except ValueError:
                    refuse(f"'{column}' is a date; compare it with an ISO date, not {value!r}")
            elif kind == "boolean":
                if not isinstance(value, bool):
                    refuse(f"'{column}' is boolean; compare it with true or false, not {value!r}")
            elif kind in ("category", "string", "month"):
                if not isinstance(value, str):
                    refuse(f"'{column}' holds text; compare it with a string, not {value!r}")
                check_label(value)


# --- resolution of a job's [query] table --------------------------------------------------------


def declared_domain(column: str, configs: Sequence[SiloSchema]) -> tuple[str, ...] | None:
    """The categories of `column` the BUs declare (their union, in order of first declaration):
    booleans are ('false', 'true'); `derived.main_channel` takes the channel's domain and
    `derived.signup_month` every month within the declared signup bounds. None when undeclared."""
    if column == "derived.main_channel":
        column = PURCHASE_CHANNEL
    if column == "derived.signup_month":
        bounds = declared_bounds(SIGNUP_DATE, configs)
        return None if bounds is None else months_between(bounds[0], bounds[1])
    values: dict[str, None] = {}
    for config in configs:
        try:
            declared = config.column(column)
        except ConfigurationError:
            continue
        if declared.type is ColumnType.BOOLEAN:
            values.update(dict.fromkeys(("false", "true")))
        elif declared.domain is not None:
            values.update(dict.fromkeys(declared.domain))
    return tuple(values) or None


def declared_bounds(column: str, configs: Sequence[SiloSchema]) -> tuple[Any, Any] | None:
    """The widest declared [lower, upper] of `column` over the BUs that declare it."""
    found = []
    for config in configs:
        try:
            declared = config.column(column)
        except ConfigurationError:
            continue
        if declared.lower is not None:
            found.append((declared.lower, declared.upper))
    if not found:
        return None
    return min(lo for lo, _ in found), max(hi for _, hi in found)


def declared_window(
    configs: Sequence[SiloSchema], lookback_days: int = DEFAULT_LOOKBACK_DAYS
) -> tuple[datetime, int] | None:
    """(observation date, look-back days) from the declared bounds of `transactions.timestamp`:
    the window ends where the silos' period ends, as for the churn task's features."""
    bounds = declared_bounds(PURCHASE_TIME, configs)
    if bounds is None:
        return None
    lower, upper = bounds
    return upper, max(1, min(lookback_days, (upper - lower).days))


def months_between(first: datetime | date, last: datetime | date) -> tuple[str, ...]:
    """Every month from `first`'s to `last`'s, as YYYY-MM."""
    start, end = first.year * 12 + first.month - 1, last.year * 12 + last.month - 1
    return tuple(f"{m // 12:04d}-{m % 12 + 1:02d}" for m in range(start, end + 1))


def _derived_bounds(column: str, spec: QuerySpec, configs: Sequence[SiloSchema]):
    if column == "derived.recency_days" and spec.lookback_days is not None:
        return 0.0, float(spec.lookback_days)
    if column == "derived.monetary":
        return declared_bounds(PURCHASE_AMOUNT, configs)
    if column == "derived.tenure_days" and spec.observation_date is not None:
        signup = declared_bounds(SIGNUP_DATE, configs)
        if signup is not None:
            if (spec.observation_date.tzinfo is None) != (signup[0].tzinfo is None):
                raise ConfigurationError(
                    f"observation_date {spec.observation_date.isoformat()} and the declared "
                    f"bounds of '{SIGNUP_DATE}' ({signup[0].isoformat()}) must both carry a UTC "
                    "offset or both not; write observation_date as the BUs' schemas do"
                )
            return 0.0, float((spec.observation_date - signup[0]).days)
    if column in DERIVED_COLUMNS:
        return None
    bounds = declared_bounds(column, configs)
    if bounds is None or not isinstance(bounds[0], int | float):
        return None
    return float(bounds[0]), float(bounds[1])


def _completed(spec: QuerySpec, configs: Sequence[SiloSchema]) -> QuerySpec:
    """`spec` with what the BUs declare filled in: the look-back window, categorical domains and
    clipping bounds. Bin edges are never filled: they are the analyst's choice of resolution."""
    update: dict[str, Any] = {}
    window = declared_window(configs, spec.lookback_days or DEFAULT_LOOKBACK_DAYS)
    if spec.windowed and window is not None:
        if spec.observation_date is None:
            update["observation_date"] = window[0]
        if spec.lookback_days is None:
            update["lookback_days"] = window[1]
    spec = spec.model_copy(update=update)

    def key(k: GroupKey) -> GroupKey:
        if k.declared:
            return k
        return k.model_copy(update={"domain": declared_domain(k.column, configs)})

    aggregates = []
    for aggregate in spec.aggregates:
        changes: dict[str, Any] = {}
        if not isinstance(aggregate, Ratio) and aggregate.group_by is not None:
            changes["group_by"] = tuple(key(k) for k in aggregate.group_by)
        if isinstance(aggregate, Sum | Mean) and aggregate.lower is None:
            bounds = _derived_bounds(aggregate.column, spec, configs)
            if bounds is not None:
                changes["lower"], changes["upper"] = bounds
        if isinstance(aggregate, Histogram) and aggregate.domain is None and aggregate.bins is None:
            changes["domain"] = declared_domain(aggregate.column, configs)
        aggregates.append(aggregate.model_copy(update=changes))
    completed = spec.model_copy(
        update={"group_by": tuple(key(k) for k in spec.group_by), "aggregates": tuple(aggregates)}
    )
    return parse_query(completed.model_dump())


def validation_problems(err: ValidationError) -> str:
    """A pydantic error as one line: each field's path and what is wrong with it."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors()
    )


def parse_query(section: Mapping[str, Any]) -> QuerySpec:
    """A `[query]` table as a QuerySpec; a malformed one is a ConfigurationError naming the field."""
    try:
        return QuerySpec.model_validate(dict(section))
    except ValidationError as err:
        raise ConfigurationError(
            f"[query]: {validation_problems(err)} (see {QUERY_DOCS})"
        ) from None


def resolve_query(
    section: Mapping[str, Any] | QuerySpec, configs: Sequence[SiloSchema]
) -> QuerySpec:
    """The complete, checked query of a job: a `[query]` table (or a `recipe = "..."` table,
    expanded by `federation.recipes`), with the look-back window, categorical domains and
    clipping bounds the BUs declare filled in where the query leaves them out, checked against
    every BU taking part. Nothing here reads data."""
    if isinstance(section, QuerySpec):
        spec = section
    elif "recipe" in section:
        # recipes build on this module's spec, so the registry is imported here, not at the top
        from federation.recipes import build_recipe

        parameters = {k: v for k, v in section.items() if k != "recipe"}
        spec = build_recipe(str(section["recipe"]), configs, parameters)
    else:
        spec = parse_query(section)
    spec = _completed(spec, spec.taking_part(configs))
    spec.check_against(configs)
    return spec


# --- answers ------------------------------------------------------------------------------------


def _on_grid(steps: int, granularity: float) -> float:
    """steps x granularity, exact in decimal (0.05 x 3 is 0.15, not 0.15000000000000002)."""
    return float(Decimal(int(steps)) * Decimal(repr(float(granularity))))


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _z(level: float) -> float:
    return NormalDist().inv_cdf(0.5 + level / 2)


@lru_cache(maxsize=1024)
def _half_width(noise: NoiseInSum, level: float) -> int:
    """The interval half-width in grid steps: computed from the exact pmf of the noise (a large
    convolution for a bounded sum), once per noise and level."""
    return noise.quantile(level)


@dataclass(frozen=True)
class QueryResult:
    """The answers of a query: one per aggregate, group (and bin or probability), each with its
    noise scale and interval; per-aggregate tables; and the recipe's chart, if any."""

    spec: QuerySpec
    level: float
    answers: tuple[dict, ...]
    tables: dict[str, dict]
    chart: dict | None

    def answers_of(self, name: str) -> list[dict]:
        return [a for a in self.answers if a["name"] == name]

    def to_json(self) -> dict:
        return {
            "purpose": self.spec.purpose,
            "recipe": self.spec.recipe,
            "level": self.level,
            "answers": [dict(a) for a in self.answers],
            "tables": self.tables,
            "chart": self.chart,
        }


def _groups(keys: tuple[GroupKey, ...]) -> list[dict[str, str]]:
    return [
        dict(zip((k.column for k in keys), labels, strict=True))
        for labels in itertools.product(*(k.names for k in keys))
    ]


def _answer(
    aggregate: str,
    name: str,
    group: dict,
    value: float | int | None,
    granularity: float | int | None,
    noise_std: float | None,
    interval: tuple[float | None, float | None],
    level: float,
    **extra: Any,
) -> dict:
    return {
        "aggregate": aggregate,
        "name": name,
        "group": group,
        "value": value,
        "granularity": granularity,
        "noise_std": noise_std,
        "interval": [interval[0], interval[1]],
        "level": level,
        **extra,
    }


def query_answers(
    spec: QuerySpec,
    total: np.ndarray,
    noise: Mapping[str, NoiseInSum],
    *,
    level: float = 0.95,
) -> QueryResult:
    """The answers read off the summed release `total` whose parts carry `noise` (by part name,
    as `layout.noise_in_sum` gives it). Values are the raw noisy ones (a count may be negative);
    the only post-processing (a rate clipped to [0, 1], a quantile interpolated in its bin, top-k
    ranked on noisy counts) is stated in the answer."""
    layout = spec.layout()
    values = layout.check(total)
    spans = layout.slices()
    missing = [name for name in spans if name not in noise]
    if missing:
        raise ValueError(f"no noise description for parts {missing}")
    blocks = {name: values[span] for name, span in spans.items()}
    half = {name: _half_width(noise[name], level) for name in spans}
    # the exact variance is a sum over the pmf: computed once per part, not once per answer
    variance = {name: noise[name].variance for name in spans}
    std = {name: math.sqrt(v) for name, v in variance.items()}
    answers: list[dict] = []
    for aggregate in spec.aggregates:
        if isinstance(aggregate, Ratio):
            answers.extend(_ratio_answers(spec, aggregate, blocks, noise, level))
            continue
        scope = spec.scope(aggregate)
        groups = _groups(scope.group_by)
        parts = spec.parts_of(aggregate.name)
        if isinstance(aggregate, Count):
            (part,) = parts
            for group, k in zip(groups, blocks[part], strict=True):
                answers.append(
                    _answer(
                        "count",
                        aggregate.name,
                        group,
                        int(k),
                        1,
                        std[part],
                        (int(k) - half[part], int(k) + half[part]),
                        level,
                    )
                )
        elif isinstance(aggregate, Sum):
            (part,) = parts
            g = aggregate.grid
            for group, k in zip(groups, blocks[part], strict=True):
                answers.append(
                    _answer(
                        "sum",
                        aggregate.name,
                        group,
                        _on_grid(k, g),
                        g,
                        std[part] * g,
                        (_on_grid(k - half[part], g), _on_grid(k + half[part], g)),
                        level,
                    )
                )
        elif isinstance(aggregate, Mean):
            sum_part, count_part = parts
            g = aggregate.grid
            for group, s, c in zip(groups, blocks[sum_part], blocks[count_part], strict=True):
                answers.append(
                    _quotient(
                        "mean",
                        aggregate.name,
                        group,
                        int(s),
                        int(c),
                        noise[sum_part],
                        noise[count_part],
                        g,
                        level,
                        rate=False,
                    )
                )
        elif isinstance(aggregate, Histogram):
            (part,) = parts
            bins = aggregate.key.names
            counts = blocks[part].reshape(len(groups), len(bins))
            for group, row in zip(groups, counts, strict=True):
                for label, k in zip(bins, row, strict=True):
                    answers.append(
                        _answer(
                            "histogram",
                            aggregate.name,
                            group,
                            int(k),
                            1,
                            std[part],
                            (int(k) - half[part], int(k) + half[part]),
                            level,
                            bin=label,
                        )
                    )
        else:
            (part,) = parts
            edges = np.asarray(aggregate.bins, dtype=np.float64)
            counts = blocks[part].reshape(len(groups), len(edges) - 1)
            for group, row in zip(groups, counts, strict=True):
                answers.extend(
                    _quantile_answers(aggregate, group, row, edges, variance[part], level)
                )
    answers_tuple = tuple(answers)
    tables = _tables(spec, answers_tuple)
    return QueryResult(
        spec=spec,
        level=level,
        answers=answers_tuple,
        tables=tables,
        chart=_chart(spec, tables),
    )


def _quotient(
    aggregate: str,
    name: str,
    group: dict,
    numerator: int,
    denominator: int,
    numerator_noise: NoiseInSum,
    denominator_noise: NoiseInSum,
    scale: float,
    level: float,
    *,
    rate: bool,
) -> dict:
    """numerator / denominator x scale (both in grid steps) with its delta-method interval."""
    lo, hi = ratio_interval(numerator, denominator, numerator_noise, denominator_noise, level=level)
    extra: dict[str, Any] = {"denominator": denominator}
    if denominator <= 0:
        value = None
        extra["note"] = "the noisy denominator is not positive: no value"
        std = math.inf
    else:
        value = numerator / denominator * scale
        std = (hi - lo) / 2 / _z(level) * scale
    interval = (lo * scale, hi * scale)
    if rate and value is not None:
        clipped_value = min(max(value, 0.0), 1.0)
        clipped_interval = (
            min(max(interval[0], 0.0), 1.0),
            min(max(interval[1], 0.0), 1.0),
        )
        if clipped_value != value:
            extra["raw_value"] = value
        if clipped_interval != interval:
            extra["raw_interval"] = [_finite(interval[0]), _finite(interval[1])]
        extra["post_processing"] = "a rate: value and interval clipped to [0, 1]"
        value, interval = clipped_value, clipped_interval
    return _answer(
        aggregate,
        name,
        group,
        value,
        None,
        _finite(std),
        (_finite(interval[0]), _finite(interval[1])),
        level,
        **extra,
    )


def _ratio_answers(
    spec: QuerySpec,
    ratio: Ratio,
    blocks: Mapping[str, np.ndarray],
    noise: Mapping[str, NoiseInSum],
    level: float,
) -> list[dict]:
    numerator = spec.aggregate(ratio.numerator)
    denominator = spec.aggregate(ratio.denominator)
    assert isinstance(numerator, Count | Sum) and isinstance(denominator, Count | Sum)
    (num_part,) = spec.parts_of(numerator.name)
    (den_part,) = spec.parts_of(denominator.name)
    num_keys = spec.scope(numerator).group_by
    den_keys = spec.scope(denominator).group_by
    scale = (numerator.grid if isinstance(numerator, Sum) else 1.0) / (
        denominator.grid if isinstance(denominator, Sum) else 1.0
    )
    # the denominator's group of each numerator group: its keys' coordinates, row-major
    den_shape = tuple(k.size for k in den_keys)
    out = []
    for index, coordinates in enumerate(itertools.product(*(range(k.size) for k in num_keys))):
        position = dict(zip(num_keys, coordinates, strict=True))
        den_index = (
            int(np.ravel_multi_index(tuple(position[k] for k in den_keys), den_shape))
            if den_keys
            else 0
        )
        group = {k.column: k.names[i] for k, i in position.items()}
        out.append(
            _quotient(
                "ratio",
                ratio.name,
                group,
                int(blocks[num_part][index]),
                int(blocks[den_part][den_index]),
                noise[num_part],
                noise[den_part],
                scale,
                level,
                rate=ratio.rate,
            )
        )
    return out


def _quantile_answers(
    aggregate: Quantiles,
    group: dict,
    counts: np.ndarray,
    edges: np.ndarray,
    variance: float,
    level: float,
) -> list[dict]:
    """Quantiles read off a noisy histogram. With C_j the noisy count of the first j bins and N
    the noisy total, D_j = C_j - p N is a weighted sum of the bins' noise, of variance
    v (j (1 - p)^2 + (B - j) p^2); the quantile's bin is the first j with D_j >= 0, and the
    interval runs from the first bin where D_j + h_j >= 0 to the first where D_j - h_j >= 0
    (h_j: the normal quantile of D_j's noise at `level`)."""
    bins = len(counts)
    cumulative = np.concatenate([[0], np.cumsum(counts)]).astype(np.float64)
    n = float(cumulative[-1])
    j = np.arange(bins + 1, dtype=np.float64)
    out = []
    for p in aggregate.probabilities:
        d = cumulative - p * n
        h = _z(level) * np.sqrt(variance * (j * (1 - p) ** 2 + (bins - j) * p * p))
        extra = {"probability": p, "post_processing": "interpolated inside its bin"}
        if n <= 0:
            out.append(
                _answer(
                    "quantiles",
                    aggregate.name,
                    group,
                    None,
                    None,
                    math.sqrt(variance),
                    (float(edges[0]), float(edges[-1])),
                    level,
                    note="the noisy total is not positive: no value",
                    **extra,
                )
            )
            continue
        first = _first_at_least(d[1:], 0.0)
        low_bin = _first_at_least(d[1:] + h[1:], 0.0)
        high_bin = _first_at_least(d[1:] - h[1:], 0.0)
        inside = counts[first]
        fraction = (p * n - cumulative[first]) / inside if inside > 0 else 1.0
        fraction = min(max(fraction, 0.0), 1.0)
        value = edges[first] + fraction * (edges[first + 1] - edges[first])
        out.append(
            _answer(
                "quantiles",
                aggregate.name,
                group,
                float(value),
                None,
                math.sqrt(variance),
                (float(edges[low_bin]), float(edges[high_bin + 1])),
                level,
                **extra,
            )
        )
    return out


def _first_at_least(values: np.ndarray, threshold: float) -> int:
    """The first index with values >= threshold; the last index if none."""
    hits = np.flatnonzero(values >= threshold)
    return int(hits[0]) if hits.size else len(values) - 1


def _tables(spec: QuerySpec, answers: tuple[dict, ...]) -> dict[str, dict]:
    """Per aggregate: its dimensions (group keys, then bins or probabilities) and nested lists of
    values and interval ends, row-major: ready for bars, matrices and funnels."""
    tables = {}
    for aggregate in spec.aggregates:
        if isinstance(aggregate, Ratio):
            keys = spec.scope(spec.aggregate(aggregate.numerator)).group_by  # type: ignore[arg-type]
        else:
            keys = spec.scope(aggregate).group_by
        dims = [{"column": k.column, "labels": list(k.names)} for k in keys]
        if isinstance(aggregate, Histogram):
            dims.append({"column": aggregate.column, "labels": list(aggregate.key.names)})
        if isinstance(aggregate, Quantiles):
            dims.append(
                {"column": "probability", "labels": [str(p) for p in aggregate.probabilities]}
            )
        rows = [a for a in answers if a["name"] == aggregate.name]
        shape = [len(d["labels"]) for d in dims]

        def nested(values: list, shape: list[int] = shape) -> Any:
            if not shape:
                return values[0]
            step = len(values) // shape[0]
            return [nested(values[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]

        tables[aggregate.name] = {
            "aggregate": aggregate.kind,
            "dims": dims,
            "values": nested([a["value"] for a in rows]),
            "lower": nested([a["interval"][0] for a in rows]),
            "upper": nested([a["interval"][1] for a in rows]),
        }
    return tables


def _flat_labels(table: dict) -> list[str]:
    return [
        " / ".join(labels) for labels in itertools.product(*(d["labels"] for d in table["dims"]))
    ]


def _flat(nested: Any) -> list:
    if isinstance(nested, list):
        return [v for item in nested for v in _flat(item)]
    return [nested]


def _chart(spec: QuerySpec, tables: Mapping[str, dict]) -> dict | None:
    chart = spec.chart
    if chart is None:
        return None
    if chart.kind == "bars":
        return {
            "kind": "bars",
            "series": [
                {
                    "name": name,
                    "labels": _flat_labels(tables[name]),
                    "values": _flat(tables[name]["values"]),
                    "lower": _flat(tables[name]["lower"]),
                    "upper": _flat(tables[name]["upper"]),
                }
                for name in chart.series
            ],
        }
    if chart.kind == "funnel":
        first = tables[chart.series[0]]

        def by_group(names: tuple[str, ...], field: str) -> list[list]:
            columns = [_flat(tables[n][field]) for n in names]
            return [list(row) for row in zip(*columns, strict=True)]

        return {
            "kind": "funnel",
            "stages": list(chart.series),
            "steps": list(chart.steps),
            "groups": _flat_labels(first),
            "counts": by_group(chart.series, "values"),
            "conversion": by_group(chart.steps, "values"),
            "conversion_lower": by_group(chart.steps, "lower"),
            "conversion_upper": by_group(chart.steps, "upper"),
        }
    if chart.kind == "matrix":
        table = tables[chart.series[0]]
        rows, columns = table["dims"][0], table["dims"][1]
        out = {
            "kind": "matrix",
            "name": chart.series[0],
            "row_column": rows["column"],
            "column_column": columns["column"],
            "rows": rows["labels"],
            "columns": columns["labels"],
            "values": table["values"],
            "lower": table["lower"],
            "upper": table["upper"],
        }
        if len(chart.series) > 1:
            out["row_totals"] = _flat(tables[chart.series[1]]["values"])
        return out
    table = tables[chart.series[0]]
    k = chart.top or 3
    categories = table["dims"][-1]["labels"]
    segments = _flat_labels({"dims": table["dims"][:-1]})
    values, lower, upper = (
        np.asarray(_flat(table[f]), dtype=object).reshape(len(segments), len(categories))
        for f in ("values", "lower", "upper")
    )
    return {
        "kind": "top",
        "name": chart.series[0],
        "k": k,
        "post_processing": f"the top {k} categories per segment, ranked on the noisy counts",
        "segments": [
            {
                "segment": segment,
                "top": [
                    {
                        "category": categories[c],
                        "value": values[s][c],
                        "interval": [lower[s][c], upper[s][c]],
                    }
                    for c in sorted(range(len(categories)), key=lambda c, s=s: -values[s][c])[:k]
                ],
            }
            for s, segment in enumerate(segments)
        ],
    }


def preview_answers(
    spec: QuerySpec,
    noise: Mapping[str, NoiseInSum],
    *,
    level: float = 0.95,
    denominator: float = 1000.0,
) -> list[dict]:
    """The expected error of every aggregate before any data is read: the interval half-width of
    each count and sum; for a mean or a ratio, the half-width at a stated denominator (`denominator`
    rows in the group) and at the largest value the ratio can take (a mean: max |bound|; a rate:
    1; a sum over a count: its max |bound|); for quantiles, the half-width of the cumulative
    count at the median, in rows."""
    spec.layout()
    out = []
    for aggregate in spec.aggregates:
        entry: dict[str, Any] = {
            "aggregate": aggregate.kind,
            "name": aggregate.name,
            "level": level,
        }
        parts = spec.parts_of(aggregate.name)
        if isinstance(aggregate, Count | Histogram):
            part_noise = noise[parts[0]]
            entry.update(
                granularity=1,
                noise_std=part_noise.std,
                half_width=_half_width(part_noise, level),
                unit="rows",
            )
        elif isinstance(aggregate, Sum):
            part_noise, g = noise[parts[0]], aggregate.grid
            entry.update(
                granularity=g,
                noise_std=part_noise.std * g,
                half_width=_on_grid(_half_width(part_noise, level), g),
                unit="value",
            )
        elif isinstance(aggregate, Quantiles):
            part_noise = noise[parts[0]]
            bins = len(aggregate.bins or ()) - 1
            # D_j at the median's bin, j = B / 2, p = 1/2: variance v B / 4
            entry.update(
                granularity=None,
                noise_std=part_noise.std,
                half_width=_z(level) * math.sqrt(part_noise.variance * bins / 4),
                unit="rows of the cumulative count",
            )
        else:
            num, den = noise[parts[0]], noise[parts[1]]
            if isinstance(aggregate, Mean):
                at_ratio = max(abs(aggregate.lower), abs(aggregate.upper))  # type: ignore[arg-type]
                num_grid, den_grid = aggregate.grid, 1.0
            else:
                numerator = spec.aggregate(aggregate.numerator)
                denominator_of = spec.aggregate(aggregate.denominator)
                num_grid = numerator.grid if isinstance(numerator, Sum) else 1.0
                den_grid = denominator_of.grid if isinstance(denominator_of, Sum) else 1.0
                at_ratio = (
                    max(abs(numerator.lower), abs(numerator.upper))  # type: ignore[arg-type]
                    if isinstance(numerator, Sum) and not aggregate.rate
                    else 1.0
                )
            # in grid steps: the ratio is (N steps) / (D steps) x num_grid / den_grid
            scale = num_grid / den_grid
            steps = denominator / den_grid
            lo, hi = ratio_interval(at_ratio / scale * steps, steps, num, den, level=level)
            entry.update(
                granularity=None,
                noise_std=(hi - lo) / 2 / _z(level) * scale,
                half_width=(hi - lo) / 2 * scale,
                unit="value",
                at_denominator=denominator,
                at_ratio=at_ratio,
            )
        out.append(entry)
    return out


def window_start(spec: QuerySpec) -> datetime:
    """The first instant after which purchases count for the derived RFM columns."""
    assert spec.observation_date is not None and spec.lookback_days is not None
    return spec.observation_date - timedelta(days=spec.lookback_days)
