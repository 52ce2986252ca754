"""Loading a BU's silo (clients/silo.py) as its `bu.toml` declares it: every declared column is
validated, and a bad file is an error naming the file, the column and the first offending row; a bad
`bu.toml` is an error naming the file and the key; an encrypted silo reads only with the BU's key
ring. Consent events are not part of a silo: the `consent.*` beside a synthetic silo's tables is an
export for the BU's consent registry (tests/privacy/test_registry.py checks its validation)."""

from __future__ import annotations

import csv
import shutil
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import tomli_w

from clients.silo import Silo, load_silo
from clients.steward import consent_export, encrypt_silo
from privacy.encryption import ENCRYPTED_SUFFIX
from privacy.errors import ConfigurationError, PolicyViolation, SiloError
from privacy.home import UnitHome
from privacy.registry import ConsentRegistry
from privacy.schema import ColumnType
from privacy.unit_config import UNIT_CONFIG_FILE, UnitConfig
from simulations.synthetic import synthesize

UNIT = "retail_stores"  # the first synthetic unit
TABLE_FILES = ("customers.csv", "transactions.csv")
KEY = bytes(range(32))


@pytest.fixture(scope="module")
def csv_silos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("csv") / "silos"
    synthesize(out, units=2, customers=60, seed=1, file_format="csv")
    return out


@pytest.fixture
def silo(csv_silos: Path, tmp_path: Path) -> Path:
    """A private, editable copy of one CSV silo."""
    return shutil.copytree(csv_silos / UNIT, tmp_path / UNIT)


def load(directory: Path, **kwargs: Any) -> Silo:
    return load_silo(UnitConfig.load(directory / UNIT_CONFIG_FILE), **kwargs)


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


def edit_config(directory: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """Apply `change` to the parsed `bu.toml` of `directory` and write it back."""
    path = directory / UNIT_CONFIG_FILE
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory`, by relative path, with its content."""
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def load_error(directory: Path, **kwargs: Any) -> str:
    with pytest.raises(SiloError) as raised:
        load(directory, **kwargs)
    return str(raised.value)


# --- well-formed silos ---------------------------------------------------------------------------


@pytest.mark.parametrize("file_format", ["parquet", "csv"])
def test_synthetic_silos_load_in_both_formats(tmp_path: Path, file_format: str) -> None:
    result = synthesize(tmp_path / "silos", units=2, customers=60, seed=1, file_format=file_format)

    for unit in result.units:
        silo = load(tmp_path / "silos" / unit)

        assert silo.unit == unit
        assert set(silo.tables) == {"customers", "transactions"}
        assert silo.config.tables["customers"].file == f"customers.{file_format}"
        assert silo.config.source.directory == (tmp_path / "silos" / unit).resolve()
        assert not silo.encrypted
        assert silo.quality["invalid_customers"] == 0
        assert silo.quality_excluded == frozenset()
        customers = silo.tables["customers"]
        age = silo.config.tables["customers"].columns["age"]
        assert len(customers) >= 50
        assert customers["customer_id"].is_unique
        assert customers["age"].between(age.lower, age.upper).all()
        assert customers["churned"].dtype == bool
        assert pd.api.types.is_datetime64_any_dtype(customers["signup_date"])
        assert pd.api.types.is_datetime64_any_dtype(silo.tables["transactions"]["timestamp"])


@pytest.mark.parametrize("file_format", ["parquet", "csv"])
def test_consent_export_beside_the_silo_is_found_and_imports(
    tmp_path: Path, file_format: str
) -> None:
    synthesize(tmp_path / "silos", units=1, customers=60, seed=1, file_format=file_format)
    directory = tmp_path / "silos" / UNIT
    customers = load(directory).tables["customers"]

    export = consent_export(directory)

    assert export == directory / f"consent.{file_format}"
    with ConsentRegistry.open(tmp_path / "home" / "consent.sqlite", unit=UNIT) as registry:
        imported = registry.import_file(export, tombstone_key=KEY)
        events = registry.events()
    assert imported.imported == len(events) > 0
    assert events["granted"].dtype == bool
    assert set(events["customer_id"]) <= set(customers["customer_id"])


def test_csv_and_parquet_silos_hold_the_same_data(tmp_path: Path) -> None:
    synthesize(tmp_path / "p", units=1, customers=60, seed=3, file_format="parquet")
    synthesize(tmp_path / "c", units=1, customers=60, seed=3, file_format="csv")

    from_parquet = load(tmp_path / "p" / UNIT)
    from_csv = load(tmp_path / "c" / UNIT)

    for table, spec in from_parquet.config.tables.items():
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
    assert "outside the declared bounds [14.0, 100.0]" in message


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


def test_bad_boolean_names_file_column_and_row(silo: Path) -> None:
    edit_cell(silo / "customers.csv", row=3, column="churned", value="maybe")

    message = load_error(silo)

    assert str(silo / "customers.csv") in message
    assert "column 'churned', row 3:" in message
    assert "not a boolean" in message


@pytest.mark.parametrize("table", TABLE_FILES)
def test_empty_file_names_the_file(silo: Path, table: str) -> None:
    (silo / table).write_bytes(b"")

    message = load_error(silo)

    assert str(silo / table) in message
    assert "empty" in message


@pytest.mark.parametrize("table", TABLE_FILES)
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


def test_consent_export_is_not_part_of_the_silo(silo: Path) -> None:
    (silo / "consent.csv").unlink()

    loaded = load(silo)

    assert consent_export(silo) is None
    assert set(loaded.tables) == {"customers", "transactions"}


def test_missing_silo_directory_is_named(silo: Path) -> None:
    edit_config(silo, lambda data: data["source"].update(directory="no_such_unit"))

    message = load_error(silo)

    assert str(silo / "no_such_unit") in message
    assert "does not exist" in message


def test_undeclared_column_is_kept_for_minimisation_to_report(silo: Path) -> None:
    path = silo / "customers.csv"
    frame = pd.read_csv(path, dtype=str)
    frame["loyalty_tier"] = "gold"
    frame.to_csv(path, index=False)

    loaded = load(silo)

    assert (loaded.tables["customers"]["loyalty_tier"] == "gold").all()


def test_csv_datetime_column_accepts_iso_dates_with_and_without_time(silo: Path) -> None:
    # Both spellings are ISO 8601, and the error message itself recommends the date-only one.
    path = silo / "transactions.csv"
    edit_cell(path, row=1, column="timestamp", value="2024-03-01")
    edit_cell(path, row=2, column="timestamp", value="2024-03-02T09:30:00")

    loaded = load(silo)

    timestamps = loaded.tables["transactions"]["timestamp"]
    assert timestamps.iloc[0] == pd.Timestamp("2024-03-01")
    assert timestamps.iloc[1] == pd.Timestamp("2024-03-02 09:30:00")


# --- bu.toml -------------------------------------------------------------------------------------


def config_error(directory: Path, error: type[ConfigurationError] = ConfigurationError) -> str:
    """The error loading the silo's bu.toml raises; loading it writes nothing."""
    before = snapshot(directory)
    with pytest.raises(error) as raised:
        load(directory)
    assert snapshot(directory) == before
    return str(raised.value)


def test_missing_bu_config_is_a_configuration_error_naming_the_path(silo: Path) -> None:
    (silo / UNIT_CONFIG_FILE).unlink()

    message = config_error(silo)

    assert str(silo / UNIT_CONFIG_FILE) in message
    assert "no BU configuration file" in message


def test_invalid_toml_names_the_path(silo: Path) -> None:
    (silo / UNIT_CONFIG_FILE).write_text('unit = "retail_stores"\n[tables\n', encoding="utf-8")

    message = config_error(silo)

    assert str(silo / UNIT_CONFIG_FILE) in message
    assert "not valid TOML" in message


@pytest.mark.parametrize(
    ("where", "key"), [((), "colour"), (("source",), "encryptd"), (("quality",), "on_error")]
)
def test_unknown_key_names_the_path_and_the_key(
    silo: Path, where: tuple[str, ...], key: str
) -> None:
    def add_key(data: dict[str, Any]) -> None:
        for name in where:
            data = data.setdefault(name, {})
        data[key] = "x"

    path = edit_config(silo, add_key)

    message = config_error(silo)

    assert str(path) in message
    assert ".".join((*where, key)) in message
    assert "Extra inputs are not permitted" in message


@pytest.mark.parametrize("column", ["customers.religion", "customers.health_condition"])
def test_purpose_allowing_a_special_category_names_the_path_and_the_key(
    silo: Path, column: str
) -> None:
    path = edit_config(
        silo, lambda data: data["purposes"]["churn_model"]["features"].append(column)
    )

    message = config_error(silo, PolicyViolation)

    assert str(path) in message
    assert f"'{column}'" in message
    assert "special category" in message
    assert "purposes.churn_model" in message


# --- encrypted silos -----------------------------------------------------------------------------


@pytest.fixture
def encrypted(silo: Path, tmp_path: Path) -> tuple[Path, UnitHome, Silo]:
    """The silo encrypted in place under a new key ring in a BU home, and the silo as it loaded
    in plaintext before."""
    plain = load(silo)
    home = UnitHome(tmp_path / "home", UnitConfig.load(silo / UNIT_CONFIG_FILE))
    encrypt_silo(silo / UNIT_CONFIG_FILE, home)
    return silo, home, plain


def test_encrypted_silo_loads_the_same_tables_with_the_key_ring(
    encrypted: tuple[Path, UnitHome, Silo],
) -> None:
    directory, home, plain = encrypted

    loaded = load(directory, keyring=home.keyring())

    assert loaded.encrypted
    assert loaded.config.source.encrypted
    for name in TABLE_FILES:
        assert not (directory / name).exists()
        assert (directory / (name + ENCRYPTED_SUFFIX)).is_file()
    assert set(loaded.tables) == set(plain.tables)
    for table, frame in plain.tables.items():
        pd.testing.assert_frame_equal(loaded.tables[table], frame)


def test_encrypted_silo_without_a_key_ring_names_the_file(
    encrypted: tuple[Path, UnitHome, Silo],
) -> None:
    directory, _, _ = encrypted

    with pytest.raises(ConfigurationError) as raised:
        load(directory)

    assert not isinstance(raised.value, SiloError)
    assert str(directory / ("customers.csv" + ENCRYPTED_SUFFIX)) in str(raised.value)
    assert "no key ring" in str(raised.value)


def test_plaintext_file_left_in_an_encrypted_silo_is_refused(
    encrypted: tuple[Path, UnitHome, Silo], csv_silos: Path
) -> None:
    directory, home, _ = encrypted
    shutil.copy(csv_silos / UNIT / "transactions.csv", directory / "transactions.csv")

    message = load_error(directory, keyring=home.keyring())

    assert str(directory / "transactions.csv") in message
    assert "declared encrypted" in message
    assert "plaintext" in message
