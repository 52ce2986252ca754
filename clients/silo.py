"""A BU's silo: its tables, read from the source its `bu.toml` declares, checked and typed.

Files are CSV or Parquet, each optionally AES-GCM encrypted (`<file>.enc`, read through the BU's key
ring; the plaintext never touches the disk); a SQL source is a database read read-only through
SQLAlchemy, one query per table (clients/sql.py). Whatever the source, the raw tables go through
the same checks and the same typing, so that the same rows give the same silo (a datetime is kept
to the microsecond, what SQL databases and CSV parsing hold). Every declared column is checked by
the BU's data-quality rules (`privacy.quality`): with `on_invalid = "error"` the first invalid
value stops the run with an error naming the file (or the table's query), the column and the row;
with `"exclude"` every row of a customer with an invalid value is left out and counted. Columns
present but not declared are kept here so that minimisation can drop and report them; nothing
downstream receives them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from pandas.api.types import is_bool_dtype, is_numeric_dtype

from privacy.encryption import ENCRYPTED_SUFFIX, KeyRing, read_encrypted
from privacy.errors import ConfigurationError, SiloError
from privacy.quality import assess, exclude_invalid, present_values
from privacy.schema import ColumnSpec, ColumnType
from privacy.unit_config import UnitConfig

SILO_PURPOSE = "silo"  # the purpose bound into encrypted silo files' associated data
_TRUE = {"true", "1", "yes", "y", "t"}
# One resolution for every source: Parquet may hold nanoseconds, CSV text and databases hold
# microseconds; the same instants must give the same column (and the same features).
_DATETIME_UNIT = "us"


@dataclass(frozen=True)
class Silo:
    config: UnitConfig
    tables: dict[str, pd.DataFrame]
    quality: dict  # counts only, for the report
    quality_excluded: frozenset[str]  # customers left out by the quality rules
    encrypted: bool

    @property
    def unit(self) -> str:
        return self.config.unit

    @property
    def schema(self) -> UnitConfig:
        return self.config


def read_table(path: Path, *, keyring: KeyRing | None = None, unit: str = "") -> pd.DataFrame:
    """Read a CSV or Parquet file, or its encrypted form `<file>.enc`; an unreadable or empty file
    is a SiloError naming it."""
    if not path.exists():
        raise SiloError(
            f"{path}: file not found; the schema declares it. Restore it or fix the schema."
        )
    if path.stat().st_size == 0:
        raise SiloError(f"{path}: the file is empty; a silo table needs a header and rows.")
    encrypted = path.suffix == ENCRYPTED_SUFFIX
    kind = Path(path.stem).suffix if encrypted else path.suffix
    if kind not in (".parquet", ".csv"):
        raise SiloError(f"{path}: unsupported file type '{kind}'; use .parquet or .csv.")
    if encrypted:
        if keyring is None:
            raise ConfigurationError(
                f"{path} is encrypted but no key ring was given; the BU's key ring lives in its "
                "home (keys/kek) or in the environment variable named by [keys] encryption_env"
            )
        source: Path | io.BytesIO = io.BytesIO(
            read_encrypted(path, keyring=keyring, unit=unit, purpose=SILO_PURPOSE)
        )
    else:
        source = path
    try:
        if kind == ".parquet":
            frame = pd.read_parquet(source)
        else:
            # only an empty field is missing: "NA" or "None" may be real values (a region code)
            frame = pd.read_csv(source, dtype=str, keep_default_na=False, na_values=[""])
    except Exception as err:  # the readers raise many types; name the file and the reader's words
        raise SiloError(f"{path}: cannot read the file ({type(err).__name__}: {err}).") from None
    if frame.empty:
        raise SiloError(f"{path}: the table has no rows.")
    return frame


def typed(raw: pd.Series, spec: ColumnSpec) -> pd.Series:
    """The column converted to its declared type. Values were checked by `privacy.quality.assess`
    before; this only converts."""
    present = present_values(raw)
    if spec.type in (ColumnType.INTEGER, ColumnType.FLOAT):
        return pd.to_numeric(raw.where(present), errors="coerce")
    if spec.type in (ColumnType.DATE, ColumnType.DATETIME):
        parsed = pd.to_datetime(raw.where(present), errors="coerce", format="ISO8601")
        return parsed.dt.as_unit(_DATETIME_UNIT)
    if spec.type is ColumnType.BOOLEAN:
        if raw.dtype == bool:
            return raw
        if is_numeric_dtype(raw) and not is_bool_dtype(raw):  # 1/0; float once one is missing
            return raw.eq(1).where(present)
        return raw.astype(str).str.strip().str.lower().isin(_TRUE).where(present)
    return raw.where(present).astype("string")


def table_file(config: UnitConfig, table: str) -> Path:
    """The path a table is read from: its declared file, or `<file>.enc` in an encrypted silo."""
    declared = config.tables[table].file
    if declared is None:
        raise ConfigurationError(
            f"unit '{config.unit}': table '{table}' is read from a SQL database "
            '([source] kind = "sql"); it has no file'
        )
    plain = config.source.directory / declared
    encrypted = plain.with_name(plain.name + ENCRYPTED_SUFFIX)
    if config.source.encrypted:
        if plain.exists():
            raise SiloError(
                f"{plain}: the silo is declared encrypted but this file is in plaintext; encrypt "
                "it (`silofed keys encrypt`) or set [source] encrypted = false"
            )
        return encrypted
    if encrypted.exists() and not plain.exists():
        raise SiloError(
            f"{encrypted}: the file is encrypted but the BU's [source] says encrypted = false; "
            "set it to true"
        )
    return plain


def read_tables(config: UnitConfig, *, keyring: KeyRing | None = None) -> dict[str, pd.DataFrame]:
    """Every declared table of the BU's silo as its source holds it, before checks and typing."""
    if config.source.kind == "sql":
        from clients.sql import read_sql_tables  # SQLAlchemy and a driver: only for SQL silos

        return read_sql_tables(config)
    directory = config.source.directory
    if not directory.is_dir():
        raise SiloError(
            f"{directory}: the BU's silo directory does not exist; fix [source] directory."
        )
    return {
        name: read_table(table_file(config, name), keyring=keyring, unit=config.unit)
        for name in config.tables
    }


def check_silo(config: UnitConfig, *, keyring: KeyRing | None = None) -> None:
    """Raise what `load_silo` would raise for this silo (an unreadable file, a missing column,
    with `on_invalid = "error"` the first invalid value), without typing its tables."""
    assess(
        read_tables(config, keyring=keyring),
        config,
        config.quality,
        directory=config.source.directory,
    )


def load_silo(config: UnitConfig, *, keyring: KeyRing | None = None) -> Silo:
    """Read, check and type every declared table of the BU's silo."""
    raw = read_tables(config, keyring=keyring)
    report = assess(raw, config, config.quality, directory=config.source.directory)
    excluding = config.quality.on_invalid == "exclude"
    kept = exclude_invalid(raw, config, report) if excluding else raw
    tables = {}
    for name, spec in config.tables.items():
        frame = kept[name].copy()
        for column, column_spec in spec.columns.items():
            frame[column] = typed(frame[column], column_spec)
        frame[spec.key] = frame[spec.key].astype(str)
        tables[name] = frame
    return Silo(
        config=config,
        tables=tables,
        quality=report.summary(),
        quality_excluded=report.invalid_customers if excluding else frozenset(),
        encrypted=config.source.encrypted,
    )
