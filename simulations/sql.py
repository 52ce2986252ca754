"""SQL silos made from file silos: for tests, and for a steward trying a SQL source.

`to_sqlite` writes a file silo's tables into a new SQLite database and, beside it, a copy of the
silo's `bu.toml` whose `[source]` is that database (`kind = "sql"`) and whose tables are read by
queries instead of files, plus the silo's consent export (an import file for the BU's registry, not
a silo table). `to_database` does the same into any database SQLAlchemy can write to (the tests'
PostgreSQL). The rows are the files' rows, as the files' readers return them, so that the SQL silo
loads into the same frames: each table gets a `silo_row` column numbering its rows, and its query
orders by it (a SQL result has no order unless the query gives one, and the customers table's order
is the feature matrix's).
"""

from __future__ import annotations

import os
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pandas as pd
import tomli_w
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from clients.silo import read_tables
from clients.steward import consent_export
from privacy.atomic import fsync_directory, write_atomic
from privacy.errors import ConfigurationError
from privacy.unit_config import UNIT_CONFIG_FILE, UnitConfig, database_url, url_secrets

ROW_ORDER = "silo_row"  # the column keeping the files' row order in the database


def to_sqlite(silo_dir: Path, db_path: Path) -> Path:
    """Copy the file silo in `silo_dir` into a new SQLite file `db_path`, with its `bu.toml`
    (`url = "sqlite:///<name>"`, relative to it) and consent export beside it; returns that
    `bu.toml`. The database appears whole or not at all."""
    db_path = Path(db_path)
    config, frames = _file_silo(silo_dir)
    _check_target(db_path.parent, db_path)
    descriptor, staging = tempfile.mkstemp(
        dir=db_path.parent, prefix=f".{db_path.name}.", suffix=".tmp"
    )
    os.close(descriptor)
    try:
        engine = create_engine(URL.create("sqlite", database=staging), poolclass=NullPool)
        try:
            queries = _copy_tables(frames, engine)
        finally:
            engine.dispose()
        with open(staging, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(staging, db_path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    fsync_directory(db_path.parent)
    source = {"kind": "sql", "url": f"sqlite:///{db_path.name}"}
    return _write_config(silo_dir, config, db_path.parent, source, queries)


def to_database(silo_dir: Path, url: str, out_dir: Path, *, url_env: str | None = None) -> Path:
    """Copy the file silo in `silo_dir` into new tables of the database at `url` (which must not
    hold tables of those names), and write its `bu.toml` and consent export into `out_dir`; the
    `bu.toml` names the database by `url_env` when given (the URL then stays out of the file), by
    `url` otherwise. Returns that `bu.toml`."""
    if url_env is None and url_secrets(database_url(url)):
        raise ConfigurationError(
            "the database URL holds a secret, which bu.toml may not; pass url_env, the name of "
            "an environment variable that will hold the URL"
        )
    config, frames = _file_silo(silo_dir)
    out_dir = Path(out_dir)
    _check_target(out_dir, None)
    engine = create_engine(url, poolclass=NullPool)
    try:
        queries = _copy_tables(frames, engine)
    finally:
        engine.dispose()
    source = {"kind": "sql", "url_env": url_env} if url_env else {"kind": "sql", "url": url}
    return _write_config(silo_dir, config, out_dir, source, queries)


def _file_silo(silo_dir: Path) -> tuple[UnitConfig, dict[str, pd.DataFrame]]:
    config = UnitConfig.load(Path(silo_dir) / UNIT_CONFIG_FILE)
    if config.source.kind != "files":
        raise ConfigurationError(f"{silo_dir}: the silo is already a SQL silo; pass a file silo")
    frames = read_tables(config)
    for table, frame in frames.items():
        if ROW_ORDER in frame.columns:
            raise ConfigurationError(
                f"{silo_dir}: table '{table}' has a column '{ROW_ORDER}', the name the copy gives "
                "its row numbers; rename the column"
            )
    return config, frames


def _check_target(out_dir: Path, db_path: Path | None) -> None:
    if db_path is not None and db_path.exists():
        raise ConfigurationError(f"{db_path} exists; choose another path or remove it")
    if (out_dir / UNIT_CONFIG_FILE).exists():
        raise ConfigurationError(
            f"{out_dir} holds a {UNIT_CONFIG_FILE} already; write the SQL silo into another "
            "directory"
        )
    out_dir.mkdir(parents=True, exist_ok=True)


def _copy_tables(frames: dict[str, pd.DataFrame], engine: Engine) -> dict[str, str]:
    """Write each frame as a new table with its row numbers; the query reading each back."""
    quote = engine.dialect.identifier_preparer.quote
    queries = {}
    for table, frame in frames.items():
        frame.reset_index(drop=True).to_sql(
            table,
            engine,
            index=True,
            index_label=ROW_ORDER,
            if_exists="fail",
        )
        columns = ", ".join(quote(str(column)) for column in frame.columns)
        queries[table] = f"SELECT {columns} FROM {quote(table)} ORDER BY {ROW_ORDER}"
    return queries


def _write_config(
    silo_dir: Path,
    config: UnitConfig,
    out_dir: Path,
    source: dict[str, Any],
    queries: dict[str, str],
) -> Path:
    """The silo's `bu.toml` as written, with `source` as its [source] and a query for each table
    instead of its file; a relative `home` stays the same directory. Validated before it is
    written; the consent export is copied beside it."""
    path = Path(silo_dir) / UNIT_CONFIG_FILE
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    data["source"] = source
    for table, query in queries.items():
        data["tables"][table].pop("file")
        data["tables"][table]["query"] = query
    if config.home is not None:
        data["home"] = str(config.home)  # absolute: load() took it from the silo's directory
    UnitConfig.model_validate(data)
    target = out_dir / UNIT_CONFIG_FILE
    export = consent_export(config.source.directory)
    if export is not None:
        write_atomic(out_dir / export.name, export.read_bytes())
    write_atomic(target, tomli_w.dumps(data))
    return target
