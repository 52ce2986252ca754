"""Data quality at the silo (GDPR Art. 5(1)(d), accuracy), reported as counts only.

Every declared column is checked as `clients.silo` validates it when a silo is loaded: present
values must have the declared type (integers integral, numbers numeric, dates ISO 8601, booleans
true/false/1/0/yes/no), categories must lie in the declared domain, numbers and dates within the
declared bounds, and a column not declared nullable may not miss a value. On top of that, a BU may
require formats of text columns (email, ISO date, phone number), and a customer id may appear only
once in the table that holds one row per customer.

A BU chooses what an invalid value does (`QualityRules.on_invalid`): `error` fails on the first one,
with an error naming the file, the column and the row; `exclude` keeps going, and the report names the
customers with an invalid row in any table so that the pipeline can leave all of their rows out
(`exclude_invalid`). The report's `summary()` holds counts only, never a value or an id, so that it
can go into a run's record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, StringConstraints

from privacy.errors import ConfigurationError, SiloError
from privacy.frames import among
from privacy.schema import ColumnSpec, ColumnType, SiloSchema, TableSpec

# The table whose rows are one per customer: a repeated id there is a data error.
ONE_ROW_PER_CUSTOMER = "customers"

FORMAT_PATTERNS = {
    "email": r"^[^@\s]+@[^@\s]+\.[^@\s]+$",
    "phone": r"^\+?[0-9 ()\-]{6,20}$",
}
_FORMAT_PROBLEMS = {
    "email": "not an email address",
    "date": "not an ISO 8601 date (e.g. 2024-05-31)",
    "phone": "not a phone number (digits, spaces, ( ) - and an optional leading +)",
}
# As clients/silo.py reads booleans; the two must agree.
_TRUE = frozenset({"true", "1", "yes", "y", "t"})
_FALSE = frozenset({"false", "0", "no", "n", "f"})

QualifiedColumn = Annotated[str, StringConstraints(pattern=r"^[^.\s]+\.[^.\s]+$")]


class QualityRules(BaseModel):
    """A BU's data-quality rules (`[quality]` in its bu.toml)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    on_invalid: Literal["error", "exclude"] = "error"
    formats: dict[QualifiedColumn, Literal["email", "date", "phone"]] = {}
    unique_key: bool = True


@dataclass(frozen=True)
class ColumnQuality:
    rows: int
    missing: int
    type_failures: int
    range_failures: int
    domain_failures: int
    format_failures: int

    @property
    def completeness(self) -> float:
        """The share of rows with a value (1.0 for a table without rows)."""
        return 1.0 if self.rows == 0 else (self.rows - self.missing) / self.rows

    def summary(self) -> dict[str, float | int]:
        return {
            "completeness": self.completeness,
            "type_failures": self.type_failures,
            "range_failures": self.range_failures,
            "domain_failures": self.domain_failures,
            "format_failures": self.format_failures,
            "missing": self.missing,
        }


@dataclass(frozen=True, eq=False)
class TableQuality:
    rows: int
    columns: dict[str, ColumnQuality]
    duplicate_ids: int  # rows whose customer id another row of a one-row-per-customer table shares
    invalid: np.ndarray  # per row position, True if the row fails any check

    @property
    def invalid_rows(self) -> int:
        return int(self.invalid.sum())


@dataclass(frozen=True, eq=False)
class QualityReport:
    tables: dict[str, TableQuality]
    invalid_customers: frozenset[str]

    @property
    def duplicate_ids(self) -> int:
        return sum(table.duplicate_ids for table in self.tables.values())

    def summary(self) -> dict[str, Any]:
        """Counts only, ready for JSON: nothing in it identifies a customer or shows a value."""
        return {
            "tables": {
                name: {
                    "rows": table.rows,
                    "invalid_rows": table.invalid_rows,
                    "duplicate_ids": table.duplicate_ids,
                    "columns": {
                        column: quality.summary() for column, quality in table.columns.items()
                    },
                }
                for name, table in self.tables.items()
            },
            "duplicate_ids": self.duplicate_ids,
            "invalid_customers": len(self.invalid_customers),
        }


@dataclass(frozen=True)
class _Failure:
    """Rows failing one check of one column, and how clients/silo.py words the problem."""

    column: str
    rows: pd.Series
    problem: str
    remedy: str = "Fix the data or the schema's declaration."


@dataclass(frozen=True)
class _ColumnCheck:
    values: pd.Series  # the column converted to its declared type, as clients/silo.py does
    present: pd.Series
    quality: ColumnQuality
    failures: tuple[_Failure, ...]  # in the order clients/silo.py checks them


def assess(
    tables: dict[str, pd.DataFrame],
    schema: SiloSchema,
    rules: QualityRules,
    *,
    directory: Path | None = None,
) -> QualityReport:
    """Check every declared column of `tables` (raw strings from CSV or typed frames) against
    `schema` and `rules`.

    With `on_invalid="error"` the first invalid value raises a SiloError naming the file (under
    `directory`, when given), the column and the row; otherwise the report counts the failures and
    names the customers with an invalid row. A declared column absent from its table always raises.
    """
    formats = _formats_by_table(schema, rules)
    undeclared = [name for name in tables if name not in schema.tables]
    if undeclared:
        raise ConfigurationError(
            f"unit '{schema.unit}': table(s) {undeclared} are not declared in the schema; declare "
            "them under tables, or do not pass them."
        )
    reports: dict[str, TableQuality] = {}
    invalid_customers: set[str] = set()
    for table, spec in schema.tables.items():
        if table not in tables:
            continue
        frame = tables[table]
        where = _location(schema.unit, table, spec, directory)
        missing = [c for c in spec.columns if c not in frame.columns]
        if missing:
            holder = "the file" if spec.file is not None else "the query's SELECT list"
            raise SiloError(
                f"{where}: missing column(s) {missing} declared in the schema; add them to "
                f"{holder} or remove them from the schema."
            )
        checks = {
            name: _check_column(frame[name], column, formats.get((table, name)), name)
            for name, column in spec.columns.items()
        }
        failures = [failure for check in checks.values() for failure in check.failures]
        key = checks[spec.key]
        duplicated = pd.Series(False, index=frame.index)
        if rules.unique_key and table == ONE_ROW_PER_CUSTOMER:
            ids = key.values.astype(str).where(key.present)
            duplicated = key.present & ids.duplicated(keep=False)
            failures.append(
                _Failure(
                    spec.key,
                    duplicated,
                    "customer id shared with another row of a table that holds one row per "
                    "customer",
                    "Fix the data, or set unique_key = false in the BU's quality rules.",
                )
            )
        if rules.on_invalid == "error":
            for failure in failures:
                if failure.rows.any():
                    raise _bad_row(where, frame, failure)
        invalid = np.zeros(len(frame), dtype=bool)
        for failure in failures:
            invalid |= failure.rows.to_numpy(dtype=bool)
        attributable = invalid & key.present.to_numpy(dtype=bool)
        invalid_customers.update(key.values.astype(str).to_numpy()[attributable].tolist())
        reports[table] = TableQuality(
            rows=len(frame),
            columns={name: check.quality for name, check in checks.items()},
            duplicate_ids=int(duplicated.sum()),
            invalid=invalid,
        )
    return QualityReport(tables=reports, invalid_customers=frozenset(invalid_customers))


def exclude_invalid(
    tables: dict[str, pd.DataFrame], schema: SiloSchema, report: QualityReport
) -> dict[str, pd.DataFrame]:
    """New frames without any row of an invalid customer, and without invalid rows that carry no
    customer id. A whole customer goes: features built from part of a customer's rows would be
    wrong, not just incomplete."""
    kept: dict[str, pd.DataFrame] = {}
    for table, frame in tables.items():
        keep = ~among(frame[schema.tables[table].key].astype(str), report.invalid_customers)
        if table in report.tables:
            keep &= ~report.tables[table].invalid
        kept[table] = frame.loc[keep.to_numpy(dtype=bool)].copy()
    return kept


def _formats_by_table(
    schema: SiloSchema, rules: QualityRules
) -> dict[tuple[str, str], Literal["email", "date", "phone"]]:
    formats = {}
    for qualified, kind in rules.formats.items():
        column = schema.column(qualified)  # an undeclared column is a PolicyViolation
        if column.type is not ColumnType.STRING:
            raise ConfigurationError(
                f"unit '{schema.unit}': quality format '{kind}' is set for '{qualified}', a "
                f"'{column.type}' column; formats apply to 'string' columns, whose type checks "
                "nothing. Remove it from the quality rules' formats."
            )
        table, _, name = qualified.partition(".")
        formats[(table, name)] = kind
    return formats


def _check_column(
    raw: pd.Series,
    spec: ColumnSpec,
    format_kind: Literal["email", "date", "phone"] | None,
    name: str,
) -> _ColumnCheck:
    """The checks of `clients.silo.coerce_column`, as masks instead of a first error."""
    nothing = pd.Series(False, index=raw.index)
    present = present_values(raw)
    type_bad = domain_bad = range_bad = format_bad = nothing
    failures: list[_Failure] = []
    if spec.type in (ColumnType.INTEGER, ColumnType.FLOAT):
        values = pd.to_numeric(raw.where(present), errors="coerce")
        type_bad = present & values.isna()
        if spec.type is ColumnType.INTEGER:
            type_bad = type_bad | (present & values.notna() & (values != np.round(values)))
        kind = "an integer" if spec.type is ColumnType.INTEGER else "a number"
        failures.append(_Failure(name, type_bad, f"not {kind}"))
    elif spec.type in (ColumnType.DATE, ColumnType.DATETIME):
        values = pd.to_datetime(raw.where(present), errors="coerce", format="ISO8601")
        type_bad = present & values.isna()
        failures.append(_Failure(name, type_bad, "not a date (use ISO 8601, e.g. 2024-05-31)"))
    elif spec.type is ColumnType.BOOLEAN:
        if raw.dtype == bool:
            values = raw
        elif _is_number(raw):  # 1/0, as databases store them; NaN is missing
            values = raw.map({1: True, 0: False})
            type_bad = present & values.isna()
        else:
            text = raw.astype(str).str.strip().str.lower()
            values = text.map(lambda v: True if v in _TRUE else (False if v in _FALSE else None))
            type_bad = present & values.isna()
        failures.append(_Failure(name, type_bad, "not a boolean (true/false)"))
    elif spec.type is ColumnType.CATEGORY:
        domain = list(spec.domain or ())
        values = raw.where(present).astype("string")
        domain_bad = present & ~values.isin(domain)
        failures.append(_Failure(name, domain_bad, f"not in the declared domain {domain}"))
    else:
        values = raw.where(present).astype("string")
    if not spec.nullable:
        failures.append(_Failure(name, ~present, "missing value in a column not declared nullable"))
    if spec.lower is not None:
        temporal = spec.type in (ColumnType.DATE, ColumnType.DATETIME)
        lower, upper = (
            (pd.Timestamp(spec.lower), pd.Timestamp(spec.upper))
            if temporal
            else (spec.lower, spec.upper)
        )
        # a value of the wrong type (4.5 for an integer) counts as a type failure only
        outside = ((values < lower) | (values > upper)).fillna(False)
        range_bad = present & ~type_bad & outside
        failures.append(
            _Failure(name, range_bad, f"outside the declared bounds [{spec.lower}, {spec.upper}]")
        )
    if format_kind is not None:
        text = raw.where(present).astype("string")
        if format_kind == "date":
            valid = pd.to_datetime(text, errors="coerce", format="ISO8601").notna()
        else:
            valid = text.str.fullmatch(FORMAT_PATTERNS[format_kind]).fillna(False)
        format_bad = present & ~valid.astype(bool)
        failures.append(_Failure(name, format_bad, _FORMAT_PROBLEMS[format_kind]))
    quality = ColumnQuality(
        rows=len(raw),
        missing=int((~present).sum()),
        type_failures=int(type_bad.sum()),
        range_failures=int(range_bad.sum()),
        domain_failures=int(domain_bad.sum()),
        format_failures=int(format_bad.sum()),
    )
    return _ColumnCheck(values, present, quality, tuple(failures))


def present_values(raw: pd.Series) -> pd.Series:
    """Which values are there: not missing and, for text, not blank. Numbers, times and booleans
    are only tested for missing (their text is never blank); converting them to text first, as
    text columns need, would cost more than every other check of the column together."""
    known = raw.notna()
    if (
        pd.api.types.is_numeric_dtype(raw)
        or pd.api.types.is_bool_dtype(raw)
        or pd.api.types.is_datetime64_any_dtype(raw)
    ):
        return known
    if isinstance(raw.dtype, pd.StringDtype):  # "str" and "string": stripped where they are
        return known & (raw.str.strip() != "").fillna(False).astype(bool)
    return known & (raw.astype(str).str.strip() != "")


def _is_number(raw: pd.Series) -> bool:
    """Numbers, not booleans (pandas counts its nullable boolean as numeric)."""
    return pd.api.types.is_numeric_dtype(raw) and not pd.api.types.is_bool_dtype(raw)


def _location(unit: str, table: str, spec: TableSpec, directory: Path | None) -> str:
    """How errors name a table: its file, or the query that reads it from a SQL source (whose
    row numbers count the query's result)."""
    if spec.file is None:
        return f"unit '{unit}', table '{table}' (the result of tables.{table}.query in bu.toml)"
    return str(Path(spec.file) if directory is None else Path(directory) / spec.file)


def _bad_row(where: str, frame: pd.DataFrame, failure: _Failure) -> SiloError:
    """The error clients/silo.py raises for the first row of `failure`, word for word."""
    mask = failure.rows.to_numpy(dtype=bool)
    position = int(np.flatnonzero(mask)[0])
    value = frame[failure.column].iloc[position]
    return SiloError(
        f"{where}: column '{failure.column}', row {position + 1}: {failure.problem} "
        f"(value {value!r}); {int(mask.sum())} row(s) affected. {failure.remedy}"
    )
