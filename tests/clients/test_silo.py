"""Loading a BU's silo (clients/silo.py): every declared column is validated, and a bad file is an
error naming the file, the column and the first offending row."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pandas as pd
import pytest

from clients.silo import load_silo
from privacy.errors import ConfigurationError, SiloError
from privacy.schema import ColumnType
from simulations.synthetic import synthesize

UNIT = "retail_stores"  # the first synthetic unit


@pytest.fixture(scope="module")
def csv_silos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("csv") / "silos"
    synthesize(out, units=2, customers=60, seed=1, file_format="csv")
    return out


@pytest.fixture
def silo(csv_silos: Path, tmp_path: Path) -> Path:
    """A private, editable copy of one CSV silo."""
    return shutil.copytree(csv_silos / UNIT, tmp_path / UNIT)


def edit_cell(path: Path, row: int, column: str, value: str) -> None:
    """Set `column` of 1-based data row `row` (the header is not a data row)."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    rows[row][rows[0].index(column)] = value
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)


def drop_column(path: Path, column: str) -> None:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    index = rows[0].index(column)
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, lineterminator="\n").writerows(
            [cell for i, cell in enumerate(r) if i != index] for r in rows
        )


def load_error(directory: Path) -> str:
    with pytest.raises(SiloError) as raised:
        load_silo(directory)
    return str(raised.value)


# --- well-formed silos ---------------------------------------------------------------------------


@pytest.mark.parametrize("file_format", ["parquet", "csv"])
def test_synthetic_silos_load_in_both_formats(tmp_path: Path, file_format: str) -> None:
    result = synthesize(tmp_path / "silos", units=2, customers=60, seed=1, file_format=file_format)

    for unit in result.units:
        silo = load_silo(tmp_path / "silos" / unit)

        assert silo.unit == unit
        assert set(silo.tables) == {"customers", "transactions"}
        assert silo.schema.tables["customers"].file == f"customers.{file_format}"
        customers = silo.tables["customers"]
        assert len(customers) >= 50
        assert customers["customer_id"].is_unique
        assert customers["age"].between(18, 100).all()
        assert customers["churned"].dtype == bool
        assert pd.api.types.is_datetime64_any_dtype(customers["signup_date"])
        assert pd.api.types.is_datetime64_any_dtype(silo.tables["transactions"]["timestamp"])
        assert silo.consent.columns.tolist() == ["customer_id", "purpose", "granted", "timestamp"]
        assert silo.consent["granted"].dtype == bool
        assert set(silo.consent["customer_id"]) <= set(customers["customer_id"])


def test_csv_and_parquet_silos_hold_the_same_data(tmp_path: Path) -> None:
    synthesize(tmp_path / "p", units=1, customers=60, seed=3, file_format="parquet")
    synthesize(tmp_path / "c", units=1, customers=60, seed=3, file_format="csv")

    from_parquet = load_silo(tmp_path / "p" / UNIT)
    from_csv = load_silo(tmp_path / "c" / UNIT)

    for table, spec in from_parquet.schema.tables.items():
        for name, column in spec.columns.items():
            left = from_parquet.tables[table][name]
            right = from_csv.tables[table][name]
            if column.type is ColumnType.FLOAT:
                assert left.to_numpy() == pytest.approx(right.to_numpy(), abs=1e-9), name
            else:
                assert left.astype(str).tolist() == right.astype(str).tolist(), name


# --- corrupted silos -----------------------------------------------------------------------------


def test_missing_declared_column_names_file_and_column(silo: Path) -> None:
    drop_column(silo / "customers.csv", "age")

    message = load_error(silo)

    assert str(silo / "customers.csv") in message
    assert "'age'" in message


def test_non_numeric_value_names_file_column_and_row(silo: Path) -> None:
    edit_cell(silo / "customers.csv", row=7, column="age", value="forty")

    message = load_error(silo)

    assert str(silo / "customers.csv") in message
    assert "column 'age', row 7:" in message
    assert "not an integer" in message
    assert "'forty'" in message


def test_fractional_value_in_an_integer_column_is_rejected(silo: Path) -> None:
    edit_cell(silo / "customers.csv", row=3, column="age", value="41.5")

    message = load_error(silo)

    assert "column 'age', row 3:" in message
    assert "not an integer" in message


def test_first_of_several_bad_rows_is_named_with_the_count(silo: Path) -> None:
    edit_cell(silo / "transactions.csv", row=12, column="amount", value="lots")
    edit_cell(silo / "transactions.csv", row=4, column="amount", value="twelve")

    message = load_error(silo)

    assert str(silo / "transactions.csv") in message
    assert "column 'amount', row 4:" in message
    assert "2 row(s) affected" in message


def test_value_outside_declared_bounds_names_file_column_and_row(silo: Path) -> None:
    edit_cell(silo / "customers.csv", row=5, column="age", value="150")

    message = load_error(silo)

    assert str(silo / "customers.csv") in message
    assert "column 'age', row 5:" in message
    assert "outside the declared bounds [18.0, 100.0]" in message


def test_date_outside_declared_bounds_is_rejected(silo: Path) -> None:
    edit_cell(silo / "transactions.csv", row=2, column="timestamp", value="2030-01-01 00:00:00")

    message = load_error(silo)

    assert str(silo / "transactions.csv") in message
    assert "column 'timestamp', row 2:" in message
    assert "outside the declared bounds" in message


def test_category_outside_domain_names_file_column_and_row(silo: Path) -> None:
    edit_cell(silo / "customers.csv", row=9, column="gender", value="unknown")

    message = load_error(silo)

    assert str(silo / "customers.csv") in message
    assert "column 'gender', row 9:" in message
    assert "not in the declared domain" in message
    assert "'unknown'" in message


def test_missing_value_in_a_required_column_names_the_row(silo: Path) -> None:
    edit_cell(silo / "customers.csv", row=6, column="region", value="")

    message = load_error(silo)

    assert "column 'region', row 6:" in message
    assert "missing value" in message


def test_bad_boolean_in_consent_names_the_consent_file(silo: Path) -> None:
    edit_cell(silo / "consent.csv", row=3, column="granted", value="maybe")

    message = load_error(silo)

    assert str(silo / "consent.csv") in message
    assert "column 'granted', row 3:" in message


@pytest.mark.parametrize("table", ["customers.csv", "transactions.csv", "consent.csv"])
def test_empty_file_names_the_file(silo: Path, table: str) -> None:
    (silo / table).write_bytes(b"")

    message = load_error(silo)

    assert str(silo / table) in message
    assert "empty" in message


@pytest.mark.parametrize("table", ["customers.csv", "transactions.csv", "consent.csv"])
def test_header_without_rows_names_the_file(silo: Path, table: str) -> None:
    path = silo / table
    header = path.read_text(encoding="utf-8").splitlines()[0]
    path.write_text(header + "\n", encoding="utf-8")

    message = load_error(silo)

    assert str(path) in message
    assert "no rows" in message


def test_missing_table_file_names_the_file(silo: Path) -> None:
    (silo / "transactions.csv").unlink()

    message = load_error(silo)

    assert str(silo / "transactions.csv") in message
    assert "not found" in message


def test_missing_consent_file_is_refused(silo: Path) -> None:
    (silo / "consent.csv").unlink()

    message = load_error(silo)

    assert str(silo) in message
    assert "consent.parquet or consent.csv" in message


def test_missing_schema_is_a_configuration_error_naming_the_path(silo: Path) -> None:
    (silo / "schema.json").unlink()

    with pytest.raises(ConfigurationError) as raised:
        load_silo(silo)

    assert str(silo / "schema.json") in str(raised.value)


def test_missing_silo_directory_is_named(tmp_path: Path) -> None:
    message = load_error(tmp_path / "no_such_unit")

    assert str(tmp_path / "no_such_unit") in message


def test_undeclared_column_is_kept_for_minimisation_to_report(silo: Path) -> None:
    path = silo / "customers.csv"
    frame = pd.read_csv(path, dtype=str)
    frame["loyalty_tier"] = "gold"
    frame.to_csv(path, index=False)

    loaded = load_silo(silo)

    assert (loaded.tables["customers"]["loyalty_tier"] == "gold").all()


def test_csv_datetime_column_accepts_iso_dates_with_and_without_time(silo: Path) -> None:
    # Both spellings are ISO 8601, and the error message itself recommends the date-only one.
    path = silo / "consent.csv"
    edit_cell(path, row=1, column="timestamp", value="2020-03-01")
    edit_cell(path, row=2, column="timestamp", value="2020-03-02T09:30:00")

    loaded = load_silo(silo)

    assert loaded.consent["timestamp"].iloc[1] == pd.Timestamp("2020-03-02 09:30:00")
