"""`silofed data split`: one customer table of the analyst's own turned into BU silos.

A public data set (UCI Bank Marketing, CDNOW, ...) is one table; silofed's BUs each hold their own.
The split writes one silo per value of a column (the customer's job, the month of their first
purchase), so that the BUs differ the way real business units do (non-IID). Each silo gets:

- its tables (`customers`, and with `--transactions` also `transactions`), as Parquet;
- a `bu.toml` whose schema is read from the WHOLE table, identical in every BU (the same bounds
  and domains, so that their features agree): numbers with bounds rounded outward to two
  significant digits (the exact extremes would publish one customer's value), text with few
  values as categories with their domain, columns whose names suggest a special category of
  personal data (GDPR Art. 9) proposed as such and kept out of every purpose, for the data steward
  to confirm or correct;
- purposes for the tasks the table supports (`churn_model`, `response_model` with the label; or
  `ltv_model` and `segmentation` from the purchases) and `analytics`;
- a consent export granting every customer those purposes. Public data sets carry no consent; the
  grant stands in for it in simulation, and a real BU imports its own registry instead.

Without `--id` each row is its own customer: the privacy unit is then the record, not the person
(a person with two rows would count twice), and `manifest.json` says so for the run's report.
Column and unit names are made safe (lower case, letters, digits, `_` and `-`); the manifest keeps
the original names and the values each BU holds.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from federation.job import DEFAULT_PURPOSE, Task
from privacy.errors import ConfigurationError
from privacy.schema import (
    GDPR_SPECIAL,
    ColumnRole,
    ColumnSpec,
    ColumnType,
    PurposePolicy,
    TableSpec,
    propose_sensitive,
)
from privacy.unit_config import UNIT_CONFIG_FILE, Minors, UnitConfig
from simulations.synthetic import declared_size

MANIFEST = "manifest.json"
ACQUISITION_MONTH = "acquisition_month"  # --by with --transactions: month of the first purchase
RECORD_KEY = "record_id"
OTHER = "other"
MAX_DOMAIN = 100  # text columns with more distinct values are free text, not categories
SIGNIFICANT_DIGITS = 2
_TRUE = frozenset({"true", "1", "yes", "y", "t"})
_FALSE = frozenset({"false", "0", "no", "n", "f"})
# Names that mark a quasi-identifier: alone harmless, together they can single a person out.
_QUASI_IDENTIFIER = re.compile(
    r"(^|_)(age|gender|sex|zip|postcode|postal|birth|dob|marital|nationality|city|region)(_|$)"
)
_SEPARATORS = (",", ";", "\t", "|")
_WHITESPACE = r"\s+"
_BINARY_PURPOSES = (DEFAULT_PURPOSE[Task.CHURN], DEFAULT_PURPOSE[Task.RESPONSE])
_LTV_PURPOSE = DEFAULT_PURPOSE[Task.LTV]
SEGMENTATION = "segmentation"
ANALYTICS = "analytics"


@dataclass(frozen=True)
class SplitRequest:
    """What to split and how (the `silofed data split` options). Column names may be given as in
    the file or in their safe form."""

    table: Path
    by: str
    out: Path
    label: str | None = None
    positive: str | None = None
    id: str | None = None
    drop: tuple[str, ...] = ()
    sep: str | None = None  # None: detected from the header line
    min_customers: int = 50
    transactions: bool = False
    timestamp: str | None = None
    amount: str | None = None
    overwrite: bool = False


@dataclass(frozen=True)
class SplitUnit:
    name: str  # the BU's unit name (safe)
    display_name: str  # the value(s) of --by it holds, as in the file
    values: tuple[str, ...]
    customers: int
    rows: int


@dataclass(frozen=True)
class SplitResult:
    directory: Path
    units: tuple[SplitUnit, ...]
    privacy_unit: Literal["customer", "record"]
    purposes: tuple[str, ...]
    proposed_special: dict[str, str]  # safe column name -> proposed sensitive category
    notes: tuple[str, ...] = field(default=())


# --- names ---------------------------------------------------------------------------------------


def safe_name(text: str) -> str:
    """Lower case, runs of anything but letters, digits, `_` and `-` as one `_`, trimmed."""
    lowered = re.sub(r"[^a-z0-9_\-]+", "_", str(text).strip().lower())
    return re.sub(r"_+", "_", lowered).strip("_-")


def unit_name(value: str, by: str) -> str:
    """A unit name for a value of the `by` column: its safe form, prefixed by the column's when it
    would not start with a letter (months, numbers)."""
    name = safe_name(value)
    if not re.fullmatch(r"[a-z][a-z0-9_\-]*", name):
        name = f"{safe_name(by)}_{name}".strip("_-")
    return name


def _column_names(columns: list[str], source: str) -> dict[str, str]:
    """Original -> safe column name; two columns with the same safe name are an error."""
    names: dict[str, str] = {}
    for original in columns:
        name = safe_name(original)
        if not name:
            raise ConfigurationError(f"{source}: column {original!r} has no usable name; rename it")
        if not name[0].isalpha():
            name = f"c_{name}"
        clash = next((o for o, n in names.items() if n == name), None)
        if clash is not None:
            raise ConfigurationError(
                f"{source}: columns {clash!r} and {original!r} both become '{name}'; rename one"
            )
        names[original] = name
    return names


def _resolve(given: str, names: dict[str, str], option: str, source: str) -> str:
    """The safe name of the column an option names (as in the file, or already safe)."""
    if given in names:
        return names[given]
    if given in names.values():
        return given
    if safe_name(given) in names.values():
        return safe_name(given)
    raise ConfigurationError(
        f"{source}: {option} {given!r} is not a column; the columns are: {', '.join(names)}"
    )


# --- reading -------------------------------------------------------------------------------------


def _separator(path: Path, sep: str | None) -> str:
    if sep is not None:
        return {"\\t": "\t", "tab": "\t", "whitespace": _WHITESPACE}.get(sep, sep)
    with path.open(encoding="utf-8", errors="replace") as handle:
        header = handle.readline()
    counts = {candidate: header.count(candidate) for candidate in _SEPARATORS}
    best = max(counts, key=lambda c: counts[c])
    return best if counts[best] else _WHITESPACE


def read_source(path: Path, sep: str | None) -> pd.DataFrame:
    """The table as text columns (CSV, or whitespace-separated text with a header line) or with its
    own types (Parquet). Only an empty field is missing: "NA" may be a real value."""
    path = Path(path)
    if not path.is_file():
        raise ConfigurationError(f"{path}: no such file; pass a CSV or Parquet table")
    try:
        if path.suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(
                path,
                sep=_separator(path, sep),
                dtype=str,
                keep_default_na=False,
                na_values=[""],
            )
    except Exception as err:  # the readers raise many types; name the file and their words
        raise ConfigurationError(
            f"{path}: cannot read the table ({type(err).__name__}: {err}); check --sep"
        ) from None
    if frame.empty or len(frame.columns) < 2:
        raise ConfigurationError(
            f"{path}: read {len(frame.columns)} column(s) and {len(frame)} row(s); a customer "
            "table needs a header and rows (check --sep)"
        )
    return frame


# --- declarations from the whole table ------------------------------------------------------------


def _nice(value: float, *, up: bool) -> float:
    """`value` rounded away from the data to two significant digits."""
    if value == 0:
        return 0.0
    step = 10.0 ** (math.floor(math.log10(abs(value))) - (SIGNIFICANT_DIGITS - 1))
    rounded = (math.ceil(value / step) if up else math.floor(value / step)) * step
    return float(round(rounded, 12))


def _as_text(series: pd.Series) -> pd.Series:
    """Text values (missing stays missing); whole floats from Parquet print without '.0'."""
    if pd.api.types.is_float_dtype(series) and series.dropna().mod(1).eq(0).all():
        series = series.astype("Int64")
    return series.astype("string").str.strip().replace("", pd.NA)


def _numeric(series: pd.Series) -> pd.Series | None:
    """The column as numbers when every present value is one; None otherwise."""
    if pd.api.types.is_bool_dtype(series):
        return None
    if pd.api.types.is_numeric_dtype(series):
        return series.astype("Float64")
    text = _as_text(series)
    numbers = pd.to_numeric(text, errors="coerce").astype("Float64")
    if text.notna().sum() == 0 or (numbers.isna() & text.notna()).any():
        return None
    return numbers


@dataclass(frozen=True)
class _Declared:
    spec: ColumnSpec
    values: pd.Series  # the column as written to the silo
    usable: bool  # may be a feature (typed, bounded or with a domain, not special, not constant)


def _declare(name: str, series: pd.Series, notes: list[str]) -> _Declared:
    """The declaration of one attribute column, read from the whole table."""
    tag = propose_sensitive(name)
    special = tag in GDPR_SPECIAL
    role = (
        ColumnRole.SPECIAL_CATEGORY
        if special
        else ColumnRole.QUASI_IDENTIFIER
        if _QUASI_IDENTIFIER.search(name)
        else ColumnRole.ATTRIBUTE
    )
    nullable = bool(series.isna().any())
    common = {"role": role, "sensitive": tag, "nullable": nullable}
    if pd.api.types.is_bool_dtype(series):
        return _Declared(ColumnSpec(type=ColumnType.BOOLEAN, **common), series, not special)
    numbers = _numeric(series)
    if numbers is not None:
        present = numbers.dropna()
        integral = bool(present.mod(1).eq(0).all())
        kind = ColumnType.INTEGER if integral else ColumnType.FLOAT
        lower, upper = _nice(float(present.min()), up=False), _nice(float(present.max()), up=True)
        values = numbers.astype("Int64") if integral else numbers
        if lower == upper:
            notes.append(f"column '{name}' holds one value only; it is declared, not used")
            return _Declared(ColumnSpec(type=kind, **common), values, False)
        spec = ColumnSpec(type=kind, lower=lower, upper=upper, **common)
        return _Declared(spec, values, not special)
    text = _as_text(series)
    domain = sorted(text.dropna().unique().tolist())
    if len(domain) > MAX_DOMAIN:
        notes.append(
            f"column '{name}' has {len(domain)} distinct values: declared as free text, used by no "
            "purpose (drop it with --drop, or group its values into a category)"
        )
        return _Declared(ColumnSpec(type=ColumnType.STRING, **common), text, False)
    spec = ColumnSpec(type=ColumnType.CATEGORY, domain=tuple(domain), **common)
    return _Declared(spec, text, not special and len(domain) > 1)


def _binary_label(series: pd.Series, positive: str | None, column: str, source: str) -> pd.Series:
    text = _as_text(series)
    if text.isna().any():
        row = int(np.flatnonzero(text.isna().to_numpy())[0]) + 1
        raise ConfigurationError(
            f"{source}: label '{column}' is empty in row {row} ({int(text.isna().sum())} rows); "
            "every customer needs a label: drop those rows or fill them"
        )
    values = sorted(text.unique().tolist())
    if positive is not None:
        if positive not in values:
            raise ConfigurationError(
                f"{source}: --positive {positive!r} is not a value of label '{column}'; its "
                f"values are: {', '.join(values[:20])}"
            )
        return (text == positive).astype(bool)
    words = text.str.lower()
    if not words.isin(_TRUE | _FALSE).all():
        raise ConfigurationError(
            f"{source}: label '{column}' is not yes/no (values: {', '.join(values[:20])}); pass "
            "--positive VALUE to name the value that counts as yes"
        )
    return words.isin(_TRUE).astype(bool)


def _parse_times(series: pd.Series, column: str, source: str) -> pd.Series:
    """Dates as YYYYMMDD (CDNOW) or ISO 8601; the first unreadable row is an error."""
    if pd.api.types.is_datetime64_any_dtype(series):
        parsed = series
    else:
        text = _as_text(series)
        compact = text.str.fullmatch(r"\d{8}").fillna(False).all()
        parsed = pd.to_datetime(text, format="%Y%m%d" if compact else "ISO8601", errors="coerce")
    bad = parsed.isna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0]) + 1
        raise ConfigurationError(
            f"{source}: --timestamp column '{column}', row {row}: {series.iloc[row - 1]!r} is not "
            "a date (YYYYMMDD or ISO 8601)"
        )
    return parsed.dt.tz_localize(None) if parsed.dt.tz is not None else parsed


def _period(times: pd.Series) -> tuple[datetime, datetime, ColumnType]:
    """Declared bounds of a time column: from the first day of its first month to the last day
    (or last second) of its last month, so that the exact first and last dates stay unpublished."""
    first, last = times.min(), times.max()
    dated = bool((times == times.dt.normalize()).all())
    start = first.to_period("M").to_timestamp()
    end = last.to_period("M").to_timestamp(how="end")
    end = end.normalize() if dated else end.floor("s")
    return (
        start.to_pydatetime(),
        end.to_pydatetime(),
        ColumnType.DATE if dated else ColumnType.DATETIME,
    )


# --- grouping ------------------------------------------------------------------------------------


def _units(groups: pd.Series, customer_ids: pd.Series, by: str, minimum: int, notes: list[str]):
    """Per unit name: (display name, values), values with fewer than `minimum` customers merged into
    `other`; and the unit name of each row."""
    per_value = customer_ids.groupby(groups).nunique().sort_index()
    small = [str(v) for v, n in per_value.items() if n < minimum]
    names: dict[str, str] = {}
    taken: set[str] = set()
    for value in (str(v) for v in per_value.index):
        if value in small:
            names[value] = OTHER
            continue
        name = unit_name(value, by)
        base, suffix = name, 2
        while name in taken or (name == OTHER and value != OTHER):
            name, suffix = f"{base}_{suffix}", suffix + 1
        taken.add(name)
        names[value] = name
    if small:
        notes.append(
            f"{len(small)} value(s) of '{by}' with fewer than {minimum} customers merged into "
            f"'{OTHER}': {', '.join(small)}"
        )
    members: dict[str, list[str]] = {}
    for value, name in names.items():
        members.setdefault(name, []).append(value)
    other = members.get(OTHER)
    if other is not None and customer_ids[groups.map(names) == OTHER].nunique() < minimum:
        notes.append(
            f"unit '{OTHER}' still has fewer than {minimum} customers: its noise will be large"
        )
    return members, groups.map(names)


# --- the split -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Silos:
    """The whole table, declared and assigned to units, before it is written."""

    customers: pd.DataFrame
    transactions: pd.DataFrame | None
    unit_of_customer: pd.Series  # per row of `customers`
    members: dict[str, list[str]]
    key: str
    tables: dict[str, TableSpec]
    purposes: dict[str, PurposePolicy]
    privacy_unit: Literal["customer", "record"]
    proposed_special: dict[str, str]
    columns: dict[str, str]  # safe -> original
    notes: list[str]


def split_table(request: SplitRequest, *, now: datetime) -> SplitResult:
    """Write the silos of `request` under `request.out` (atomically); consent is granted at `now`."""
    out = Path(request.out)
    if out.exists() and not request.overwrite:
        raise ConfigurationError(f"{out} exists; choose another --out or pass --overwrite")
    if request.min_customers < 1:
        raise ConfigurationError(f"--min-customers must be at least 1, got {request.min_customers}")
    source = str(request.table)
    raw = read_source(request.table, request.sep)
    names = _column_names([str(c) for c in raw.columns], source)
    frame = raw.rename(columns={str(c): names[str(c)] for c in raw.columns})
    for column in request.drop:
        frame = frame.drop(columns=_resolve(column, names, "--drop", source))
    silos = (
        _transactions_silos(frame, names, request, source)
        if request.transactions
        else _table_silos(frame, names, request, source)
    )
    return _write(silos, request, now)


def _table_silos(
    frame: pd.DataFrame, names: dict[str, str], request: SplitRequest, source: str
) -> _Silos:
    if request.label is None:
        raise ConfigurationError(
            f"{source}: pass --label COLUMN (the yes/no each customer is predicted on; "
            "--positive VALUE names the value that counts as yes)"
        )
    for option in ("timestamp", "amount"):
        if getattr(request, option) is not None:
            raise ConfigurationError(f"--{option} reads a table of purchases: add --transactions")
    notes: list[str] = []
    by = _resolve(request.by, names, "--by", source)
    label = _resolve(request.label, names, "--label", source)
    if label == by:
        raise ConfigurationError(f"{source}: --by and --label name the same column '{by}'")
    if request.id is not None:
        key = _resolve(request.id, names, "--id", source)
        ids = _as_text(frame[key])
        if ids.isna().any():
            raise ConfigurationError(f"{source}: --id column '{key}' is empty in some rows")
        repeated = int(ids.duplicated().sum())
        if repeated:
            raise ConfigurationError(
                f"{source}: --id column '{key}' repeats {repeated} id(s); a customer table has "
                "one row per customer (a table of purchases: add --transactions)"
            )
        privacy_unit: Literal["customer", "record"] = "customer"
    else:
        key = RECORD_KEY
        if key in frame.columns:
            raise ConfigurationError(
                f"{source}: the table has a '{key}' column; pass it as --id, or rename it"
            )
        width = len(str(len(frame)))
        ids = pd.Series([f"r{i:0{width}d}" for i in range(1, len(frame) + 1)], index=frame.index)
        privacy_unit = "record"

    groups = _as_text(frame[by]).fillna("missing")
    members, unit_of_row = _units(groups, ids, by, request.min_customers, notes)

    declared: dict[str, _Declared] = {}
    for column in frame.columns:
        if column not in (key, by, label):
            declared[column] = _declare(column, frame[column], notes)
    key_spec = ColumnSpec(
        type=ColumnType.STRING,
        role=ColumnRole.IDENTIFIER,
        description=(
            "the customer id"
            if privacy_unit == "customer"
            else "the row's number in the source table: each row is its own customer "
            "(privacy unit: record)"
        ),
    )
    label_spec = ColumnSpec(type=ColumnType.BOOLEAN, role=ColumnRole.LABEL)
    customers = pd.DataFrame(
        {
            key: ids.to_numpy(),
            **{c: d.values.to_numpy() for c, d in declared.items()},
            label: _binary_label(frame[label], request.positive, label, source).to_numpy(),
        }
    )
    columns = {key: key_spec, **{c: d.spec for c, d in declared.items()}, label: label_spec}
    usable = tuple(f"customers.{c}" for c, d in declared.items() if d.usable)
    qualified_label = f"customers.{label}"
    join = (f"customers.{key}",)
    purposes = {
        purpose: PurposePolicy(join_keys=join, features=usable, label=qualified_label)
        for purpose in _BINARY_PURPOSES
    }
    purposes[ANALYTICS] = PurposePolicy(join_keys=join, features=(*usable, qualified_label))
    return _Silos(
        customers=customers,
        transactions=None,
        unit_of_customer=pd.Series(unit_of_row.to_numpy()),
        members=members,
        key=key,
        tables={
            "customers": TableSpec(file="customers.parquet", columns=columns, key=key),
        },
        purposes=purposes,
        privacy_unit=privacy_unit,
        proposed_special=_proposed(declared),
        columns=_originals(names, request.drop),
        notes=notes,
    )


def _transactions_silos(
    frame: pd.DataFrame, names: dict[str, str], request: SplitRequest, source: str
) -> _Silos:
    missing = [o for o in ("id", "timestamp", "amount") if getattr(request, o) is None]
    if missing:
        raise ConfigurationError(
            f"--transactions needs {', '.join('--' + m for m in missing)}: the customer id, the "
            "purchase date and the purchase amount columns"
        )
    if request.label is not None or request.positive is not None:
        raise ConfigurationError(
            "--label and --positive are for a customer table; from purchases the ltv task "
            "derives its label (the spend in the period's last months)"
        )
    notes: list[str] = []
    assert request.id and request.timestamp and request.amount
    key = _resolve(request.id, names, "--id", source)
    time_column = _resolve(request.timestamp, names, "--timestamp", source)
    amount_column = _resolve(request.amount, names, "--amount", source)
    ids = _as_text(frame[key])
    if ids.isna().any():
        raise ConfigurationError(f"{source}: --id column '{key}' is empty in some rows")
    times = _parse_times(frame[time_column], time_column, source)
    amounts = _numeric(frame[amount_column])
    if amounts is None or amounts.isna().any():
        raise ConfigurationError(
            f"{source}: --amount column '{amount_column}' must hold a number in every row"
        )
    if float(amounts.min()) < 0:
        raise ConfigurationError(
            f"{source}: --amount column '{amount_column}' has negative amounts (returns); the "
            "ltv task sums purchases from 0: net them out or drop those rows first"
        )
    first = times.groupby(ids).transform("min")
    if request.by == ACQUISITION_MONTH and ACQUISITION_MONTH not in frame.columns:
        by = ACQUISITION_MONTH
        groups = first.dt.strftime("%Y-%m")
    else:
        by = _resolve(request.by, names, "--by", source)
        groups = _as_text(frame[by]).fillna("missing")
        if (groups.groupby(ids).nunique() > 1).any():
            raise ConfigurationError(
                f"{source}: --by column '{by}' changes within a customer's purchases; split by a "
                f"column that is the same for all of a customer's rows, or by {ACQUISITION_MONTH}"
            )
    members, unit_of_row = _units(groups, ids, by, request.min_customers, notes)

    start, end, time_type = _period(times)
    largest = float(amounts.max())
    if largest <= 0:
        raise ConfigurationError(f"{source}: --amount column '{amount_column}' is zero throughout")
    amount_spec = ColumnSpec(
        type=ColumnType.FLOAT,
        lower=0.0,
        upper=_nice(largest, up=True),
        description="purchase amount",
    )
    reserved = {key, time_column, amount_column, by}
    for clash in ("timestamp", "amount"):
        if clash in frame.columns and clash not in reserved:
            raise ConfigurationError(
                f"{source}: the table has a '{clash}' column besides --timestamp/--amount; "
                "rename it or --drop it"
            )
    declared = {c: _declare(c, frame[c], notes) for c in frame.columns if c not in reserved}
    transactions = pd.DataFrame(
        {
            key: ids.to_numpy(),
            "timestamp": times.to_numpy(),
            "amount": amounts.astype(float).to_numpy(),
            **{c: d.values.to_numpy() for c, d in declared.items()},
        }
    ).sort_values(["timestamp", key], kind="stable", ignore_index=True)
    per_customer = pd.DataFrame({"id": ids, "first": first, "unit": unit_of_row}).drop_duplicates(
        "id"
    )
    customers = pd.DataFrame(
        {
            key: per_customer["id"].to_numpy(),
            "first_purchase": per_customer["first"].dt.normalize().to_numpy(),
        }
    )
    key_spec = ColumnSpec(type=ColumnType.STRING, role=ColumnRole.IDENTIFIER)
    customer_columns = {
        key: key_spec,
        "first_purchase": ColumnSpec(
            type=ColumnType.DATE,
            lower=start,
            upper=end,
            description="the date of the customer's first purchase",
        ),
    }
    transaction_columns = {
        key: key_spec,
        "timestamp": ColumnSpec(type=time_type, lower=start, upper=end),
        "amount": amount_spec,
        **{c: d.spec for c, d in declared.items()},
    }
    join = (f"customers.{key}", f"transactions.{key}")
    extra = tuple(f"transactions.{c}" for c, d in declared.items() if d.usable)
    purposes = {
        _LTV_PURPOSE: PurposePolicy(
            join_keys=join,
            features=(
                "customers.first_purchase",
                "transactions.timestamp",
                "transactions.amount",
            ),
            label="transactions.amount",
        ),
        SEGMENTATION: PurposePolicy(
            join_keys=join, features=("transactions.timestamp", "transactions.amount")
        ),
        ANALYTICS: PurposePolicy(
            join_keys=join,
            features=(
                "customers.first_purchase",
                "transactions.timestamp",
                "transactions.amount",
                *extra,
            ),
        ),
    }
    return _Silos(
        customers=customers,
        transactions=transactions,
        unit_of_customer=pd.Series(per_customer["unit"].to_numpy()),
        members=members,
        key=key,
        tables={
            "customers": TableSpec(file="customers.parquet", columns=customer_columns, key=key),
            "transactions": TableSpec(
                file="transactions.parquet", columns=transaction_columns, key=key
            ),
        },
        purposes=purposes,
        privacy_unit="customer",
        proposed_special=_proposed(declared),
        columns=_originals(names, request.drop),
        notes=notes,
    )


def _proposed(declared: dict[str, _Declared]) -> dict[str, str]:
    return {c: str(d.spec.sensitive) for c, d in declared.items() if d.spec.sensitive is not None}


def _originals(names: dict[str, str], dropped: tuple[str, ...]) -> dict[str, str]:
    gone = set(dropped) | {names.get(d, d) for d in dropped}
    return {safe: original for original, safe in names.items() if safe not in gone}


def _header(display: str, by: str, request: SplitRequest, silos: _Silos) -> str:
    special = ", ".join(f"{c} ({t})" for c, t in silos.proposed_special.items()) or "none"
    return (
        f"# Written by `silofed data split` from {Path(request.table).name}: the customers whose "
        f"{by} = {display!r}.\n"
        "# Review before use. Bounds and domains were read from the whole table (rounded outward,\n"
        "# the same in every BU's file so that their features agree); they are public.\n"
        f"# Columns proposed as sensitive by their name, to confirm or correct: {special}.\n"
        f"# Privacy unit: {silos.privacy_unit}. The consent export grants every customer the "
        "purposes below\n# (the source carries no consent); a real BU imports its own.\n\n"
    )


def _write(silos: _Silos, request: SplitRequest, now: datetime) -> SplitResult:
    out = Path(request.out)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None)
    )
    units = []
    consent_time = (
        pd.Timestamp(now).tz_localize(None) if pd.Timestamp(now).tz else pd.Timestamp(now)
    )
    try:
        for name in sorted(silos.members):
            values = tuple(silos.members[name])
            display = values[0] if len(values) == 1 else f"{OTHER} ({', '.join(values)})"
            mask = (silos.unit_of_customer == name).to_numpy()
            customers = silos.customers[mask].reset_index(drop=True)
            ids = customers[silos.key]
            # Without an age column the minors rule cannot be checked: the split attests adults
            # only (public purchase records); the steward must confirm it (bu.toml [minors]).
            adults_only = "age" not in silos.tables["customers"].columns
            config = UnitConfig(
                unit=name,
                tables=silos.tables,
                purposes=silos.purposes,
                minors=Minors(adults_only=adults_only),
                max_customers=declared_size(len(customers)),
            )
            unit_dir = staging / name
            unit_dir.mkdir()
            (unit_dir / UNIT_CONFIG_FILE).write_text(
                _header(display, request.by, request, silos) + config.dump(), encoding="utf-8"
            )
            customers.to_parquet(unit_dir / "customers.parquet", index=False)
            rows = len(customers)
            if silos.transactions is not None:
                transactions = silos.transactions[
                    silos.transactions[silos.key].isin(ids)
                ].reset_index(drop=True)
                transactions.to_parquet(unit_dir / "transactions.parquet", index=False)
                rows = len(transactions)
            pd.DataFrame(
                {
                    "customer_id": np.tile(ids.to_numpy(), len(silos.purposes)),
                    "purpose": np.repeat(list(silos.purposes), len(ids)),
                    "granted": True,
                    "guardian": False,
                    "timestamp": consent_time,
                }
            ).to_parquet(unit_dir / "consent.parquet", index=False)
            units.append(SplitUnit(name, display, values, len(customers), rows))
        manifest = {
            "generator": "silofed.simulations.split",
            "version": 1,
            "source": {
                "file": Path(request.table).name,
                "sha256": hashlib.sha256(Path(request.table).read_bytes()).hexdigest(),
            },
            "mode": "transactions" if request.transactions else "table",
            "by": request.by,
            "label": request.label,
            "positive": request.positive,
            "id": request.id,
            "dropped": list(request.drop),
            "privacy_unit": silos.privacy_unit,
            "purposes": list(silos.purposes),
            "consent_granted_at": consent_time.isoformat(),
            "columns": silos.columns,
            "proposed_special": silos.proposed_special,
            "units": {
                u.name: {
                    "display_name": u.display_name,
                    "values": list(u.values),
                    "customers": u.customers,
                    "rows": u.rows,
                }
                for u in units
            },
            "notes": silos.notes,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return SplitResult(
        directory=out,
        units=tuple(units),
        privacy_unit=silos.privacy_unit,
        purposes=tuple(silos.purposes),
        proposed_special=silos.proposed_special,
        notes=tuple(silos.notes),
    )


def read_privacy_unit(silos: Path) -> Literal["customer", "record"]:
    """The privacy unit of silos under `silos`: "record" when `silofed data split` wrote them
    without --id (each row its own customer), "customer" otherwise."""
    path = Path(silos) / MANIFEST
    if path.exists():
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("privacy_unit") == "record":
            return "record"
    return "customer"


def display_names(silos: Path) -> dict[str, str]:
    """Unit name -> display name (the original value of the split column), for silos written by
    `silofed data split`; empty for others."""
    path = Path(silos) / MANIFEST
    if not path.exists():
        return {}
    units = json.loads(path.read_text(encoding="utf-8")).get("units", {})
    if not isinstance(units, dict):
        return {}
    return {name: str(entry.get("display_name", name)) for name, entry in units.items()}
