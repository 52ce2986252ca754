"""Data quality at the silo (privacy/quality.py): exact counts of each kind of failure, the customers
with an invalid row, agreement with the loader's validation, and a summary without ids or values."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from clients.silo import load_silo, read_table, table_file, typed
from privacy.errors import ConfigurationError, PolicyViolation, SiloError
from privacy.quality import QualityReport, QualityRules, assess, exclude_invalid
from privacy.schema import ColumnRole, ColumnSpec, ColumnType, SiloSchema, TableSpec
from privacy.unit_config import UNIT_CONFIG_FILE, UnitConfig
from simulations.synthetic import synthesize

EXCLUDE = QualityRules(on_invalid="exclude", formats={"customers.email": "email"})


def spec(type_: ColumnType, **kw: object) -> ColumnSpec:
    return ColumnSpec(type=type_, **kw)


SCHEMA = SiloSchema(
    unit="shop",
    tables={
        "customers": TableSpec(
            file="customers.csv",
            key="customer_id",
            columns={
                "customer_id": spec(ColumnType.STRING, role=ColumnRole.IDENTIFIER),
                "age": spec(ColumnType.INTEGER, lower=18, upper=100),
                "tier": spec(ColumnType.CATEGORY, domain=("gold", "silver")),
                "email": spec(ColumnType.STRING, nullable=True),
                "signup": spec(ColumnType.DATE),
                "opted_in": spec(ColumnType.BOOLEAN),
            },
        ),
        "transactions": TableSpec(
            file="transactions.csv",
            key="customer_id",
            columns={
                "customer_id": spec(ColumnType.STRING, role=ColumnRole.IDENTIFIER),
                "amount": spec(ColumnType.FLOAT, lower=0, upper=1000),
                "when": spec(ColumnType.DATETIME),
            },
        ),
    },
)


def raw(rows: list[tuple[str | None, ...]], columns: list[str]) -> pd.DataFrame:
    """A frame as `read_table` reads a CSV: strings, an empty field missing."""
    return pd.DataFrame(rows, columns=columns, dtype="str")


CUSTOMERS = raw(
    [
        ("cust-0001", "34", "gold", "a@example.com", "2024-01-05", "yes"),
        ("cust-0002", "17", "silver", "not-an-email", "2024-02-30", "maybe"),
        ("cust-0003", "4.5", "platinum", None, "2024-03-01", "no"),
        ("cust-0004", None, "gold", "d@example.org", "2024-04-01", "1"),
        ("cust-0005", "101", "GOLD", "e@example.com", "2024-05-01", "0"),
        ("cust-0006", "60", "silver", "f@example.com", "2024-06-01T08:30:00", "TRUE"),
    ],
    ["customer_id", "age", "tier", "email", "signup", "opted_in"],
)
TRANSACTIONS = raw(
    [
        ("cust-0001", "10.5", "2024-01-06T10:00:00"),
        ("cust-0006", "-1", "2024-01-07"),
        ("cust-0006", "abc", "2024-01-08"),
        ("cust-0006", "20", "yesterday"),
        ("cust-0007", "5", "2024-02-01"),
        (None, "5", "2024-02-01"),
    ],
    ["customer_id", "amount", "when"],
)
RAW_VALUES = ("not-an-email", "2024-02-30", "maybe", "4.5", "platinum", "GOLD", "abc", "yesterday")


@pytest.fixture(scope="module")
def report() -> QualityReport:
    return assess({"customers": CUSTOMERS, "transactions": TRANSACTIONS}, SCHEMA, EXCLUDE)


def counts(report: QualityReport, table: str, column: str) -> dict[str, float | int]:
    return report.summary()["tables"][table]["columns"][column]


# --- counts ----------------------------------------------------------------------------------


def test_each_kind_of_failure_is_counted_per_column(report: QualityReport) -> None:
    assert counts(report, "customers", "age") == {
        "completeness": 5 / 6,
        "type_failures": 1,
        "range_failures": 2,
        "domain_failures": 0,
        "format_failures": 0,
        "missing": 1,
    }
    assert counts(report, "customers", "tier")["domain_failures"] == 2
    assert counts(report, "customers", "email") == {
        "completeness": 5 / 6,
        "type_failures": 0,
        "range_failures": 0,
        "domain_failures": 0,
        "format_failures": 1,
        "missing": 1,
    }
    assert counts(report, "customers", "signup")["type_failures"] == 1
    assert counts(report, "customers", "opted_in")["type_failures"] == 1
    assert counts(report, "customers", "customer_id")["completeness"] == 1.0
    assert counts(report, "transactions", "amount") == {
        "completeness": 1.0,
        "type_failures": 1,
        "range_failures": 1,
        "domain_failures": 0,
        "format_failures": 0,
        "missing": 0,
    }
    assert counts(report, "transactions", "when")["type_failures"] == 1
    assert counts(report, "transactions", "customer_id")["missing"] == 1


def test_customers_with_an_invalid_row_in_any_table_are_named(report: QualityReport) -> None:
    # cust-0006 is valid in customers but has invalid transactions; cust-0001 and the
    # transactions-only cust-0007 have no invalid row; the row without an id names nobody.
    assert report.invalid_customers == frozenset(
        {"cust-0002", "cust-0003", "cust-0004", "cust-0005", "cust-0006"}
    )
    assert report.tables["customers"].invalid.tolist() == [False, True, True, True, True, False]
    assert report.tables["transactions"].invalid.tolist() == [
        False,
        True,
        True,
        True,
        False,
        True,
    ]


def test_summary_has_counts_per_table_and_the_number_of_invalid_customers(
    report: QualityReport,
) -> None:
    summary = report.summary()
    assert summary["invalid_customers"] == 5
    assert summary["duplicate_ids"] == 0
    assert {name: table["rows"] for name, table in summary["tables"].items()} == {
        "customers": 6,
        "transactions": 6,
    }
    assert {name: table["invalid_rows"] for name, table in summary["tables"].items()} == {
        "customers": 4,
        "transactions": 4,
    }
    assert list(summary["tables"]["customers"]["columns"]) == list(
        SCHEMA.tables["customers"].columns
    )


def test_summary_holds_no_id_and_no_value(report: QualityReport) -> None:
    text = json.dumps(report.summary())
    for customer in (*CUSTOMERS["customer_id"], "cust-0007"):
        assert customer not in text
    for value in RAW_VALUES:
        assert value not in text


def test_nullable_column_may_miss_values_but_a_required_one_may_not() -> None:
    frames = {"customers": CUSTOMERS.iloc[[2, 3]], "transactions": TRANSACTIONS.iloc[[0]]}
    out = assess(frames, SCHEMA, QualityRules(on_invalid="exclude"))
    # row cust-0003: email missing (nullable), but age and tier invalid; row cust-0004: age missing
    assert counts(out, "customers", "email")["missing"] == 1
    assert out.invalid_customers == frozenset({"cust-0003", "cust-0004"})
    only_email_missing = CUSTOMERS.iloc[[0]].assign(email=None)
    clean = assess({"customers": only_email_missing}, SCHEMA, QualityRules())
    assert clean.invalid_customers == frozenset()
    assert counts(clean, "customers", "email")["completeness"] == 0.0


@pytest.mark.parametrize(
    ("kind", "valid", "invalid"),
    [
        ("email", ["a@b.co", "first.last+tag@mail.example.org"], ["a@b", "a b@c.de", "@c.de"]),
        ("date", ["2024-05-31", "2024-05-31T10:00:00"], ["31/05/2024", "2024-02-30", "soon"]),
        ("phone", ["+44 20 7946 0958", "(030) 123-4567"], ["12345", "phone me", "+1-800-FLOWERS"]),
    ],
)
def test_format_rules_count_values_that_do_not_match(
    kind: str, valid: list[str], invalid: list[str]
) -> None:
    frame = CUSTOMERS.iloc[[0] * (len(valid) + len(invalid))].reset_index(drop=True)
    frame = frame.assign(customer_id=[f"id-{i}" for i in range(len(frame))], email=valid + invalid)
    rules = QualityRules(on_invalid="exclude", formats={"customers.email": kind})
    out = assess({"customers": frame}, SCHEMA, rules)
    assert counts(out, "customers", "email")["format_failures"] == len(invalid)
    assert out.tables["customers"].invalid.tolist() == [False] * len(valid) + [True] * len(invalid)


def test_duplicate_ids_mark_every_row_of_the_id() -> None:
    ids = ["cust-a", "cust-b", "cust-a", "cust-c", "cust-a", "cust-c", "cust-d"]
    customers = CUSTOMERS.iloc[[0] * len(ids)].reset_index(drop=True).assign(customer_id=ids)
    transactions = TRANSACTIONS.iloc[[0, 0, 0]].assign(customer_id=["cust-b"] * 3)
    out = assess(
        {"customers": customers, "transactions": transactions},
        SCHEMA,
        QualityRules(on_invalid="exclude"),
    )
    assert out.tables["customers"].invalid.tolist() == [True, False, True, True, True, True, False]
    assert out.tables["customers"].duplicate_ids == 5
    assert out.tables["transactions"].duplicate_ids == 0  # many rows per customer is normal there
    assert out.summary()["duplicate_ids"] == 5
    assert out.invalid_customers == frozenset({"cust-a", "cust-c"})
    relaxed = assess(
        {"customers": customers}, SCHEMA, QualityRules(on_invalid="exclude", unique_key=False)
    )
    assert relaxed.invalid_customers == frozenset()
    assert relaxed.summary()["duplicate_ids"] == 0


def test_exclusion_drops_every_row_of_an_invalid_customer(report: QualityReport) -> None:
    kept = exclude_invalid({"customers": CUSTOMERS, "transactions": TRANSACTIONS}, SCHEMA, report)
    assert kept["customers"]["customer_id"].tolist() == ["cust-0001"]
    assert kept["transactions"]["customer_id"].tolist() == ["cust-0001", "cust-0007"]
    assert len(CUSTOMERS) == 6  # the input is untouched


# --- error mode ------------------------------------------------------------------------------


def test_error_mode_fails_on_the_first_invalid_value_naming_file_column_and_row(
    tmp_path: Path,
) -> None:
    with pytest.raises(SiloError) as raised:
        assess({"customers": CUSTOMERS}, SCHEMA, QualityRules(), directory=tmp_path)
    # word for word what clients/silo.py's former coerce_column said for this column
    assert str(raised.value) == (
        f"{tmp_path / 'customers.csv'}: column 'age', row 3: not an integer (value '4.5'); "
        "1 row(s) affected. Fix the data or the schema's declaration."
    )


def test_error_mode_names_file_column_and_row_of_a_format_failure() -> None:
    valid = CUSTOMERS.iloc[[0, 5, 0]].assign(
        customer_id=["c-1", "c-2", "c-3"], email=["a@b.co", None, "nope"]
    )
    rules = QualityRules(formats={"customers.email": "email"})
    with pytest.raises(SiloError, match=r"^customers\.csv: column 'email', row 3: not an email"):
        assess({"customers": valid}, SCHEMA, rules)


def test_error_mode_names_a_duplicate_id() -> None:
    duplicated = CUSTOMERS.iloc[[0, 5, 0]]
    with pytest.raises(SiloError, match=r"column 'customer_id', row 1: customer id shared"):
        assess({"customers": duplicated}, SCHEMA, QualityRules())


def test_a_declared_column_missing_from_its_table_fails_in_either_mode() -> None:
    for rules in (QualityRules(), EXCLUDE):
        with pytest.raises(SiloError, match=r"missing column\(s\) \['opted_in'\]"):
            assess({"customers": CUSTOMERS.drop(columns=["opted_in"])}, SCHEMA, rules)


# --- agreement with the loader ---------------------------------------------------------------

MIXED = [
    "1", "2.0", "2.5", " 7 ", "x", "", " ", None, "-5", "150", "1e2", "NaN", "inf",
    "2024-01-01", "2024-13-01", "2024-06-30T23:59:59", "1999-12-31",
    "true", "Yes", "N", "0", "maybe", "gold", "Gold",
]  # fmt: skip
DECLARATIONS = {
    "integer": spec(ColumnType.INTEGER, lower=0, upper=100),
    "float": spec(ColumnType.FLOAT, nullable=True),
    "date": spec(ColumnType.DATE, lower=datetime(2000, 1, 1), upper=datetime(2030, 1, 1)),
    "datetime": spec(ColumnType.DATETIME, nullable=True),
    "boolean": spec(ColumnType.BOOLEAN, nullable=True),
    "category": spec(ColumnType.CATEGORY, domain=("gold", "silver")),
    "string": spec(ColumnType.STRING),
}
NUMBERS = pd.Series([1.0, 2.5, np.nan, 150.0, -5.0, 100.0, 0.0])
STAMPS = pd.Series(pd.to_datetime(["2024-01-01", None, "1999-12-31", "2030-01-02", "2010-06-30"]))
# Columns as Parquet holds them: already in a native type.
TYPED = {
    "integer": NUMBERS,
    "float": NUMBERS,
    "date": STAMPS,
    "datetime": STAMPS,
    "boolean": pd.Series([True, False, None, True], dtype="boolean"),
    "category": pd.Series(["gold", "Gold", None, "silver", ""], dtype="str"),
    "string": pd.Series(["a", None, "", "b"], dtype="str"),
}


# The values of MIXED that clients/silo.py's former `coerce_column` accepted, one row at a time
# (checked against it when it was replaced by `assess`); the loader's behaviour must not change.
ACCEPTED = {
    "integer": ["1", "2.0", " 7 ", "1e2", "0"],
    "float": ["1", "2.0", "2.5", " 7 ", "", " ", None, "-5", "150", "1e2", "inf", "0"],
    "date": ["2024-01-01", "2024-06-30T23:59:59"],
    "datetime": ["", " ", None, "-5", "2024-01-01", "2024-06-30T23:59:59", "1999-12-31"],
    "boolean": ["1", "", " ", None, "true", "Yes", "N", "0"],
    "category": ["gold"],
    "string": [v for v in MIXED if v is not None and v.strip()],
}
TYPED_ACCEPTED = {
    "integer": [0, 5, 6],
    "float": [0, 1, 2, 3, 4, 5, 6],
    "date": [0, 4],
    "datetime": [0, 1, 2, 3, 4],
    "boolean": [0, 1, 2, 3],
    "category": [0, 3],
    "string": [0, 3],
}


def mixed_frame(declared: str, typed_values: bool) -> tuple[pd.DataFrame, SiloSchema]:
    values = TYPED[declared] if typed_values else pd.Series(MIXED, dtype="str")
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(len(values))], "value": values})
    schema = SiloSchema(
        unit="mixed",
        tables={
            "events": TableSpec(
                file="t.csv",
                key="id",
                columns={"id": spec(ColumnType.STRING), "value": DECLARATIONS[declared]},
            )
        },
    )
    return frame, schema


@pytest.mark.parametrize("declared", DECLARATIONS)
def test_assess_accepts_exactly_what_the_loader_always_accepted(declared: str) -> None:
    frame, schema = mixed_frame(declared, typed_values=False)
    out = assess({"events": frame}, schema, QualityRules(on_invalid="exclude"))
    accepted = frame["value"][~out.tables["events"].invalid]
    assert [None if pd.isna(v) else v for v in accepted] == ACCEPTED[declared]
    assert out.invalid_customers == frozenset(frame["id"][out.tables["events"].invalid])
    typed_frame, schema = mixed_frame(declared, typed_values=True)
    typed_out = assess({"events": typed_frame}, schema, QualityRules(on_invalid="exclude"))
    assert (
        np.flatnonzero(~typed_out.tables["events"].invalid).tolist() == (TYPED_ACCEPTED[declared])
    )


@pytest.mark.parametrize("declared", DECLARATIONS)
@pytest.mark.parametrize("typed_values", [False, True], ids=["csv", "typed"])
def test_every_accepted_value_converts_faithfully_in_the_loader(
    declared: str, typed_values: bool
) -> None:
    frame, schema = mixed_frame(declared, typed_values)
    column = DECLARATIONS[declared]
    out = assess({"events": frame}, schema, QualityRules(on_invalid="exclude"))
    accepted = frame.loc[~out.tables["events"].invalid, "value"]
    converted = typed(accepted, column)
    present = accepted.notna() & (accepted.astype(str).str.strip() != "")
    assert converted[present].notna().all()  # no accepted value silently becomes missing
    assert converted[~present].isna().all()
    assert column.nullable or present.all()
    kept = converted[present]
    if column.type is ColumnType.INTEGER:
        assert (kept == np.round(kept)).all()
    if column.lower is not None:
        lower, upper = (
            (pd.Timestamp(column.lower), pd.Timestamp(column.upper))
            if column.type is ColumnType.DATE
            else (column.lower, column.upper)
        )
        assert ((kept >= lower) & (kept <= upper)).all()
    if column.domain is not None:
        assert kept.isin(column.domain).all()


# --- real silos ------------------------------------------------------------------------------


@pytest.mark.parametrize("file_format", ["csv", "parquet"])
def test_a_synthetic_silo_has_no_failures_raw_or_loaded(tmp_path: Path, file_format: str) -> None:
    result = synthesize(tmp_path / "s", units=1, customers=60, seed=1, file_format=file_format)
    config = UnitConfig.load(result.directory / result.units[0] / UNIT_CONFIG_FILE)
    silo = load_silo(config)
    raw_tables = {name: read_table(table_file(config, name)) for name in config.tables}
    assert silo.quality["invalid_customers"] == 0
    for tables in (raw_tables, silo.tables):
        summary = assess(tables, config, QualityRules()).summary()
        assert summary["invalid_customers"] == 0
        assert summary["tables"]["customers"]["rows"] == len(silo.tables["customers"])
        assert all(
            column["completeness"] == 1.0
            and column["type_failures"] + column["range_failures"] == 0
            for table in summary["tables"].values()
            for column in table["columns"].values()
        )


def test_loading_a_silo_with_an_invalid_value_fails_or_excludes_the_customer(
    tmp_path: Path,
) -> None:
    result = synthesize(tmp_path / "s", units=1, customers=60, seed=1, file_format="csv")
    directory = result.directory / result.units[0]
    config = UnitConfig.load(directory / UNIT_CONFIG_FILE)
    customers = pd.read_csv(directory / "customers.csv", dtype=str, keep_default_na=False)
    customers.loc[4, "age"] = "forty"
    customers.to_csv(directory / "customers.csv", index=False)
    with pytest.raises(SiloError) as raised:
        load_silo(config)
    assert str(raised.value).startswith(
        f"{directory / 'customers.csv'}: column 'age', row 5: not an integer (value 'forty')"
    )
    excluding = config.model_copy(update={"quality": QualityRules(on_invalid="exclude")})
    silo = load_silo(excluding)
    bad = customers.loc[4, "customer_id"]
    assert silo.quality_excluded == frozenset({bad})
    assert silo.quality["invalid_customers"] == 1
    assert len(silo.tables["customers"]) == len(customers) - 1
    assert bad not in set(silo.tables["transactions"]["customer_id"])


# --- configuration ---------------------------------------------------------------------------


def test_rules_are_frozen_and_refuse_unknown_keys() -> None:
    with pytest.raises(ValidationError):
        QualityRules.model_validate({"on_invalid": "ignore"})
    with pytest.raises(ValidationError):
        QualityRules.model_validate({"unique_keys": False})
    with pytest.raises(ValidationError):
        QualityRules.model_validate({"formats": {"email": "email"}})  # not table.column
    with pytest.raises(ValidationError):
        EXCLUDE.on_invalid = "error"  # type: ignore[misc]


def test_format_for_an_undeclared_or_non_text_column_is_refused() -> None:
    frames = {"customers": CUSTOMERS}
    with pytest.raises(PolicyViolation, match=re.escape("'customers.phone'")):
        assess(frames, SCHEMA, QualityRules(formats={"customers.phone": "phone"}))
    with pytest.raises(ConfigurationError, match=re.escape("'customers.signup', a 'date' column")):
        assess(frames, SCHEMA, QualityRules(formats={"customers.signup": "date"}))
