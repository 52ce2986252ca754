"""A BU's silo on disk: its declared schema, its tables and its consent events.

Loading validates every declared column (presence, type, domain, bounds, nulls) and fails with an
error naming the file, the column and the first offending row, before any computation starts.
Columns present in a file but not declared are kept here so that minimisation can drop and report
them; nothing downstream receives them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from privacy.consent import CONSENT_COLUMNS
from privacy.errors import SiloError
from privacy.schema import SCHEMA_FILE, ColumnSpec, ColumnType, SiloSchema

CONSENT_FILE_STEM = "consent"
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}


@dataclass(frozen=True)
class Silo:
    directory: Path
    schema: SiloSchema
    tables: dict[str, pd.DataFrame]
    consent: pd.DataFrame

    @property
    def unit(self) -> str:
        return self.schema.unit


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV or Parquet file; an unreadable or empty file is a SiloError naming it."""
    if not path.exists():
        raise SiloError(
            f"{path}: file not found; the schema declares it. Restore it or fix the schema."
        )
    if path.stat().st_size == 0:
        raise SiloError(f"{path}: the file is empty; a silo table needs a header and rows.")
    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif path.suffix == ".csv":
            # only an empty field is missing: "NA" or "None" may be real values (a region code)
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
        else:
            raise SiloError(f"{path}: unsupported file type '{path.suffix}'; use .parquet or .csv.")
    except SiloError:
        raise
    except Exception as err:  # the readers raise many types; name the file and the reader's words
        raise SiloError(f"{path}: cannot read the file ({type(err).__name__}: {err}).") from None
    if frame.empty:
        raise SiloError(f"{path}: the table has no rows.")
    return frame


def _bad_row(
    path: Path, column: str, frame: pd.DataFrame, mask: pd.Series, problem: str
) -> SiloError:
    position = int(np.flatnonzero(mask.to_numpy())[0])
    value = frame[column].iloc[position]
    return SiloError(
        f"{path}: column '{column}', row {position + 1}: {problem} (value {value!r}); "
        f"{int(mask.sum())} row(s) affected. Fix the data or the schema's declaration."
    )


def coerce_column(path: Path, frame: pd.DataFrame, name: str, spec: ColumnSpec) -> pd.Series:
    """The column converted to its declared type, or a SiloError naming the first bad row."""
    raw = frame[name]
    present = raw.notna() & (raw.astype(str).str.strip() != "")
    if spec.type in (ColumnType.INTEGER, ColumnType.FLOAT):
        values = pd.to_numeric(raw.where(present), errors="coerce")
        bad = present & values.isna()
        if spec.type is ColumnType.INTEGER:
            bad |= present & values.notna() & (values != np.round(values))
        problem = f"not {'an integer' if spec.type is ColumnType.INTEGER else 'a number'}"
    elif spec.type in (ColumnType.DATE, ColumnType.DATETIME):
        values = pd.to_datetime(raw.where(present), errors="coerce", format="ISO8601")
        bad = present & values.isna()
        problem = "not a date (use ISO 8601, e.g. 2024-05-31)"
    elif spec.type is ColumnType.BOOLEAN:
        if raw.dtype == bool:
            values = raw
            bad = pd.Series(False, index=raw.index)
        else:
            text = raw.astype(str).str.strip().str.lower()
            values = text.map(lambda v: True if v in _TRUE else (False if v in _FALSE else None))
            bad = present & values.isna()
        problem = "not a boolean (true/false)"
    elif spec.type is ColumnType.CATEGORY:
        values = raw.where(present).astype("string")
        bad = present & ~values.isin(list(spec.domain or ()))
        problem = f"not in the declared domain {list(spec.domain or ())}"
    else:
        values = raw.where(present).astype("string")
        bad = pd.Series(False, index=raw.index)
        problem = ""
    if bad.any():
        raise _bad_row(path, name, frame, bad, problem)
    if not spec.nullable and not present.all():
        raise _bad_row(
            path, name, frame, ~present, "missing value in a column not declared nullable"
        )
    if spec.lower is not None:
        lower, upper = (
            (pd.Timestamp(spec.lower), pd.Timestamp(spec.upper))
            if spec.type
            in (
                ColumnType.DATE,
                ColumnType.DATETIME,
            )
            else (spec.lower, spec.upper)
        )
        outside = present & ((values < lower) | (values > upper))
        if outside.any():
            raise _bad_row(
                path,
                name,
                frame,
                outside,
                f"outside the declared bounds [{spec.lower}, {spec.upper}]",
            )
    return values


def _validated(path: Path, frame: pd.DataFrame, columns: dict[str, ColumnSpec]) -> pd.DataFrame:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise SiloError(
            f"{path}: missing column(s) {missing} declared in the schema; add them to the file "
            "or remove them from the schema."
        )
    out = frame.copy()
    for name, spec in columns.items():
        out[name] = coerce_column(path, frame, name, spec)
    return out


CONSENT_SPEC = {
    "customer_id": ColumnSpec(type=ColumnType.STRING, role="identifier"),
    "purpose": ColumnSpec(type=ColumnType.STRING),
    "granted": ColumnSpec(type=ColumnType.BOOLEAN),
    "timestamp": ColumnSpec(type=ColumnType.DATETIME),
}
assert tuple(CONSENT_SPEC) == CONSENT_COLUMNS


def consent_path(directory: Path) -> Path | None:
    for suffix in (".parquet", ".csv"):
        if (candidate := directory / f"{CONSENT_FILE_STEM}{suffix}").exists():
            return candidate
    return None


def load_silo(directory: Path) -> Silo:
    """Load and validate a silo directory: `schema.json`, one file per declared table, and the
    consent events (`consent.parquet` or `consent.csv`)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SiloError(f"{directory}: not a silo directory (it does not exist).")
    schema = SiloSchema.load(directory / SCHEMA_FILE)
    tables = {
        name: _validated(
            directory / spec.file, read_table(directory / spec.file), dict(spec.columns)
        )
        for name, spec in schema.tables.items()
    }
    for name, spec in schema.tables.items():
        ids = tables[name][spec.key].astype(str)
        tables[name][spec.key] = ids
    path = consent_path(directory)
    if path is None:
        raise SiloError(
            f"{directory}: no consent table (consent.parquet or consent.csv); a BU without consent "
            "records cannot take part. Export its consent events there."
        )
    consent = _validated(path, read_table(path), CONSENT_SPEC)
    consent["customer_id"] = consent["customer_id"].astype(str)
    return Silo(directory=directory, schema=schema, tables=tables, consent=consent)
