"""A query's exact integer vector inside one BU: filter, group, bound each customer's
contribution, then count and sum on the query's public grid.

It runs on the BU's consented, minimised tables (the same dict of DataFrames feature engineering
takes) and checks the query against the BU's own declaration first, so a query the purpose does not
allow stops here even if the coordinator let it through. The vector is exact: the BU's noise is
added afterwards by `ReleaseLayout.noisy` (or, under the central placement, by the coordinator).

Contribution bounding looks at one customer's rows only, so adding or removing a customer changes
each part by at most its declared L2 sensitivity (Wilson et al., PoPETs 2020): of the groups a
customer's rows fall in, the `max_groups` with the most rows are kept (ties: the group that comes
first in the release); in each, the first `max_rows` rows in the table's order. Rows outside every
group (a value outside the declared domain or bins, or missing) are dropped before bounding, so they
use up none of the customer's allowance.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from federation.queries import (
    CUSTOMERS,
    DERIVED_COLUMNS,
    PURCHASE_AMOUNT,
    PURCHASE_CHANNEL,
    PURCHASE_TIME,
    SIGNUP_DATE,
    TRANSACTIONS,
    Condition,
    GroupKey,
    Measure,
    QuerySpec,
    column_kind,
    window_start,
)
from privacy.errors import SiloError
from privacy.frames import among
from privacy.unit_config import UnitConfig

_DAY = pd.Timedelta(days=1)


def query_vector(
    tables: dict[str, pd.DataFrame], config: UnitConfig, spec: QuerySpec
) -> np.ndarray:
    """The BU's exact release for `spec`: int64, shape (spec.layout().size,)."""
    spec.check_unit(config)
    layout = spec.layout()
    rows = _Rows(tables, config, spec)
    vector = np.zeros(layout.size, dtype=np.int64)
    for name, span in layout.slices().items():
        vector[span] = _part(rows, spec.measures[name])
    return vector


def _name(qualified: str) -> str:
    return qualified.partition(".")[2]


class _Rows:
    """The BU's rows per table, and any column of them: the table's own, its customer's (joined on
    the customer key) or a derived one. Derived per-customer columns are computed once."""

    def __init__(self, tables: dict[str, pd.DataFrame], config: UnitConfig, spec: QuerySpec):
        self.tables = tables
        self.config = config
        self.spec = spec
        self._customer_level: dict[str, pd.Series] = {}
        self._frames: dict[str, pd.DataFrame] = {}

    def _key(self, table: str) -> str:
        return self.config.tables[table].key

    @property
    def customers(self) -> pd.DataFrame:
        """The customers table indexed by customer id (text)."""
        if CUSTOMERS not in self._frames:
            frame = self.tables[CUSTOMERS]
            ids = frame[self._key(CUSTOMERS)].astype(str)
            if ids.duplicated().any():
                raise SiloError(
                    f"unit '{self.config.unit}': the customers table holds a customer id more than "
                    "once; one row per customer is expected"
                )
            self._frames[CUSTOMERS] = frame.set_index(ids)
        return self._frames[CUSTOMERS]

    def frame(self, table: str) -> pd.DataFrame:
        """The rows of `table` whose customer the customers table lists, with the customer id as
        text in column `_customer`."""
        cache = f"rows:{table}"
        if cache not in self._frames:
            frame = self.tables[table].reset_index(drop=True)
            ids = frame[self._key(table)].astype(str)
            if table != CUSTOMERS:
                known = among(ids, self.customers.index)
                frame, ids = frame[known].reset_index(drop=True), ids[known].reset_index(drop=True)
            self._frames[cache] = frame.assign(_customer=ids.to_numpy())
        return self._frames[cache]

    def column(self, table: str, column: str) -> pd.Series:
        """`column` for every row of `table`, in the rows' order."""
        frame = self.frame(table)
        ids = frame["_customer"]
        source, _, name = column.partition(".")
        if column == "derived.months_since_signup":
            timestamp = pd.to_datetime(frame[_name(PURCHASE_TIME)])
            signup = pd.to_datetime(self.customers[_name(SIGNUP_DATE)])
            signup = signup.reindex(ids).reset_index(drop=True)
            months = (timestamp.dt.year * 12 + timestamp.dt.month) - (
                signup.dt.year * 12 + signup.dt.month
            )
            return months.astype("float64")
        if column in DERIVED_COLUMNS:
            return self.derived(column).reindex(ids).reset_index(drop=True)
        if source == table:
            return frame[name].reset_index(drop=True)
        return self.customers[name].reindex(ids).reset_index(drop=True)

    def derived(self, column: str) -> pd.Series:
        """A derived per-customer column, indexed by customer id."""
        if column not in self._customer_level:
            self._customer_level[column] = self._compute(column)
        return self._customer_level[column]

    def _window(self) -> pd.DataFrame:
        if "window" not in self._frames:
            spec = self.spec
            assert spec.observation_date is not None
            observed = pd.Timestamp(spec.observation_date)
            start = pd.Timestamp(window_start(spec))
            tx = self.tables[TRANSACTIONS]
            stamp = pd.to_datetime(tx[_name(PURCHASE_TIME)])
            ids = tx[self._key(TRANSACTIONS)].astype(str)
            inside = (stamp > start) & (stamp <= observed) & among(ids, self.customers.index)
            self._frames["window"] = tx[inside].assign(_customer=ids[inside], _stamp=stamp[inside])
        return self._frames["window"]

    def _compute(self, column: str) -> pd.Series:
        spec = self.spec
        ids = self.customers.index
        if column in ("derived.tenure_days", "derived.signup_month"):
            signup = pd.to_datetime(self.customers[_name(SIGNUP_DATE)])
            if column == "derived.signup_month":
                return signup.dt.strftime("%Y-%m").where(signup.notna())
            return (pd.Timestamp(spec.observation_date) - signup) / _DAY
        window = self._window()
        by_customer = window.groupby("_customer")
        if column == "derived.frequency":
            return by_customer.size().reindex(ids, fill_value=0).astype("float64")
        if column == "derived.recency_days":
            last = by_customer["_stamp"].max().reindex(ids)
            days = (pd.Timestamp(spec.observation_date) - last) / _DAY
            return days.fillna(float(spec.lookback_days))  # type: ignore[arg-type]
        if column == "derived.monetary":
            amounts = pd.to_numeric(window[_name(PURCHASE_AMOUNT)])
            return amounts.groupby(window["_customer"]).mean().reindex(ids).fillna(0.0)
        # derived.main_channel: the channel of most purchases, ties broken alphabetically
        counts = (
            window.assign(_channel=window[_name(PURCHASE_CHANNEL)].astype(str))
            .groupby(["_customer", "_channel"])
            .size()
            .rename("purchases")
            .reset_index()
            .sort_values(["_customer", "purchases", "_channel"], ascending=[True, False, True])
            .drop_duplicates("_customer")
        )
        return counts.set_index("_customer")["_channel"].reindex(ids)


def _text(series: pd.Series, kind: str) -> np.ndarray:
    """Values as the labels a domain lists: booleans as 'false' / 'true', the rest as text."""
    if kind == "boolean":
        return series.map({True: "true", False: "false"}).to_numpy(dtype=object)
    return series.astype(str).to_numpy(dtype=object)


def _condition_mask(series: pd.Series, condition: Condition, kind: str) -> np.ndarray:
    present = series.notna().to_numpy()
    if condition.op == "present":
        return present
    if kind == "numeric":
        values: np.ndarray = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64)
        operands = [float(v) for v in condition.operands]
    elif kind == "temporal":
        values = pd.to_datetime(series).to_numpy()
        operands = [pd.Timestamp(str(v)).to_datetime64() for v in condition.operands]
    elif kind == "boolean":
        values = series.map({True: True, False: False}).to_numpy(dtype=object)
        operands = list(condition.operands)
    else:
        values = _text(series, kind)
        operands = [str(v) for v in condition.operands]
    with np.errstate(invalid="ignore"):
        match condition.op:
            case "eq":
                result = values == operands[0]
            case "ne":
                result = values != operands[0]
            case "lt":
                result = values < operands[0]
            case "le":
                result = values <= operands[0]
            case "gt":
                result = values > operands[0]
            case "ge":
                result = values >= operands[0]
            case "in":
                result = np.isin(values, operands)
            case _:  # not_in
                result = ~np.isin(values, operands)
    return present & np.asarray(result, dtype=bool)


def _codes(series: pd.Series, key: GroupKey, kind: str) -> np.ndarray:
    """The position of each row's value in the key's domain or bins; -1 for none."""
    if key.domain is not None:
        codes = pd.Index(list(key.domain)).get_indexer(_text(series, kind)).astype(np.int64)
        codes[~series.notna().to_numpy()] = -1
        return codes
    edges = np.asarray(key.bins, dtype=np.float64)
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64)
    if key.outside == "clip":
        values = np.clip(values, edges[0], edges[-1])
    codes = np.searchsorted(edges, values, side="right").astype(np.int64) - 1
    codes[values == edges[-1]] = len(edges) - 2  # the last bin is closed on the right
    codes[~((values >= edges[0]) & (values <= edges[-1]))] = -1  # NaN included
    return codes


def _groups(rows: _Rows, table: str, keys: tuple[GroupKey, ...]) -> np.ndarray:
    """Each row's group, row-major over the keys (the release's order); -1 for none."""
    group = np.zeros(len(rows.frame(table)), dtype=np.int64)
    for key in keys:
        codes = _codes(rows.column(table, key.column), key, column_kind(rows.config, key.column))
        group = np.where((group >= 0) & (codes >= 0), group * key.size + codes, -1)
    return group


def _bounded(
    customers: np.ndarray, group: np.ndarray, max_groups: int, max_rows: int
) -> np.ndarray:
    """The rows kept after bounding each customer to `max_groups` groups and `max_rows` rows per
    group (a function of the customer's own rows only)."""
    candidates = np.flatnonzero(group >= 0)
    frame = pd.DataFrame(
        {"customer": customers[candidates], "group": group[candidates], "row": candidates}
    )
    sizes = (frame.groupby(["customer", "group"]).size().rename("rows").reset_index()).sort_values(
        ["customer", "rows", "group"], ascending=[True, False, True], kind="stable"
    )
    chosen = sizes[sizes.groupby("customer").cumcount() < max_groups][["customer", "group"]]
    frame = frame.merge(chosen, on=["customer", "group"]).sort_values("row", kind="stable")
    frame = frame[frame.groupby(["customer", "group"]).cumcount() < max_rows]
    kept = np.zeros(len(group), dtype=bool)
    kept[frame["row"].to_numpy()] = True
    return kept


def _part(rows: _Rows, measure: Measure) -> np.ndarray:
    scope = measure.scope
    table = scope.rows
    config = rows.config
    frame = rows.frame(table)
    group = _groups(rows, table, scope.group_by)
    for condition in scope.where:
        mask = _condition_mask(
            rows.column(table, condition.column),
            condition,
            column_kind(config, condition.column),
        )
        group[~mask] = -1
    inner = None
    if measure.bins is not None:
        column = measure.bins.column
        inner = _codes(rows.column(table, column), measure.bins, column_kind(config, column))
        group[inner < 0] = -1
    kept = _bounded(frame["_customer"].to_numpy(), group, scope.max_groups, scope.max_rows)
    groups = scope.groups
    if measure.kind == "count":
        return np.bincount(group[kept], minlength=groups).astype(np.int64)
    if measure.kind == "histogram":
        assert inner is not None and measure.bins is not None
        cells = group[kept] * measure.bins.size + inner[kept]
        return np.bincount(cells, minlength=measure.size).astype(np.int64)
    assert measure.column is not None
    values = pd.to_numeric(rows.column(table, measure.column), errors="coerce").to_numpy(
        dtype=np.float64
    )[kept]
    if np.isnan(values).any():
        raise SiloError(
            f"unit '{config.unit}': '{measure.column}' has missing or non-numeric values in rows "
            "the query sums; fix the data or add a 'present' condition on it to the query"
        )
    totals = np.zeros(groups, dtype=np.int64)
    np.add.at(totals, group[kept], measure.to_grid(values))
    return totals
