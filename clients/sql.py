"""A BU's silo read from a SQL database through SQLAlchemy, read-only.

The steward's `bu.toml` names the database (`[source] url`, or `url_env`: an environment variable
holding the URL, so that a password is never written in the file) and, per table, the one SELECT
that reads it. silofed never writes to the database, and does not rely on the steward's database
role alone for that:
- SQLite is opened read-only (`mode=ro`); a missing file is an error, never a new empty database;
- PostgreSQL reads in a `READ ONLY` transaction (the engine begins every transaction so), so the
  server refuses any write a query attempts (a data-modifying WITH, SELECT INTO, nextval), at
  REPEATABLE READ so that every table comes from one snapshot (SQLite's single read transaction
  gives the same).
Every query runs under `[source] statement_timeout` (PostgreSQL's statement_timeout; for SQLite a
progress handler that interrupts the query), and the engine is disposed after the read.

The frames returned are raw, as the file readers return theirs: clients/silo.py checks and types
both the same way, so the same rows give the same silo and train the same model whatever holds
them. Row order is the query's (its ORDER BY): the feature matrix follows the customers table's
order. Messages show the URL with its password and secret parameters masked, and a driver's message
is scrubbed of them too.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pandas as pd
from pandas.errors import DatabaseError
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from privacy.errors import ConfigurationError, SiloError
from privacy.unit_config import SECRET_URL_PARAMETER, UnitConfig, database_url

CONNECT_TIMEOUT = 30  # seconds to reach a database server
POSTGRES_INSTALL = 'pip install "psycopg[binary]>=3.1"'
_SQLITE_PROGRESS_STEPS = 10_000  # SQLite virtual-machine steps between two looks at the clock
_MASK = "***"


def source_url(config: UnitConfig) -> URL:
    """The database URL of the BU's SQL source, from the file or from its environment variable;
    a relative SQLite path is taken from `[source] directory` (by default bu.toml's own)."""
    source = config.source
    if source.url_env is not None:
        text = os.environ.get(source.url_env, "")
        where = f"the environment variable {source.url_env} ([source] url_env)"
        if not text:
            raise ConfigurationError(
                f"unit '{config.unit}': {where} is not set or empty; set it to the database URL "
                "(dialect://user:password@host:port/database) before starting the BU's node"
            )
    elif source.url is not None:
        text, where = source.url, "[source] url"
    else:
        raise ConfigurationError(f"unit '{config.unit}': its [source] is not a SQL source")
    try:
        url = database_url(text)
    except ValueError as err:
        raise ConfigurationError(f"unit '{config.unit}': {where}: {err}") from None
    if url.get_backend_name() == "sqlite":
        path = Path(str(url.database)).expanduser()
        url = url.set(database=str((source.directory / path).resolve()))
    return url


def masked(url: URL) -> str:
    """`url` as messages show it: password and secret query parameters replaced by ***."""
    secret = [name for name in url.query if SECRET_URL_PARAMETER.search(name)]
    shown = url.difference_update_query(secret).render_as_string(hide_password=True)
    return shown + "".join(
        f"{'&' if '?' in shown or i else '?'}{name}={_MASK}" for i, name in enumerate(secret)
    )


def read_only_engine(url: URL, *, timeout: float) -> Engine:
    """An engine that cannot write: SQLite opened with `mode=ro` (a missing file is a SiloError,
    and no file is created), PostgreSQL with every transaction READ ONLY at REPEATABLE READ."""
    if url.get_backend_name() == "sqlite":
        path = Path(str(url.database))
        if not path.is_file():
            raise SiloError(
                f"{path}: no SQLite database there ([source] url); silofed opens it read-only and "
                "never creates it. Fix the path, or restore the file."
            )
        uri = f"{path.resolve().as_uri()}?mode=ro"
        return create_engine(
            "sqlite+pysqlite://",
            # autocommit at the driver (isolation_level=None): the reader's own BEGIN spans the
            # queries; `timeout` waits out a writer's lock
            creator=lambda: sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None),
            poolclass=NullPool,
        )
    if url.drivername == "postgresql":  # SQLAlchemy's default driver is psycopg2; we ship psycopg
        url = url.set(drivername="postgresql+psycopg")
    try:
        return create_engine(
            url,
            poolclass=NullPool,
            connect_args={"connect_timeout": CONNECT_TIMEOUT},
            # each transaction begins READ ONLY, and sees one snapshot for all its queries
            execution_options={"isolation_level": "REPEATABLE READ", "postgresql_readonly": True},
        )
    except ImportError as err:
        raise ConfigurationError(
            f"the database driver for {masked(url)} is not installed ({err.name}); install it "
            f"with {POSTGRES_INSTALL}"
        ) from None


def read_sql_tables(config: UnitConfig) -> dict[str, pd.DataFrame]:
    """Every declared table of the BU's SQL silo: its query's result, raw (clients/silo.py checks
    and types it), read in one read-only transaction."""
    url = source_url(config)
    timeout = config.source.timeout
    try:
        engine = read_only_engine(url, timeout=timeout)
    except ConfigurationError as err:
        raise type(err)(f"unit '{config.unit}': {err}") from None
    try:
        try:
            connection = engine.connect()
        except SQLAlchemyError as err:
            raise _unreadable(config, url, err) from None
        with connection:
            # the queries go to the driver as written: no parameters, so '%' and ':' are plain
            connection.execution_options(no_parameters=True)
            try:
                _begin(connection, timeout)
            except SQLAlchemyError as err:
                raise _unreadable(config, url, err) from None
            tables = {name: _read(connection, config, url, name) for name in config.tables}
            connection.rollback()
        return tables
    finally:
        engine.dispose()


def _unreadable(config: UnitConfig, url: URL, err: SQLAlchemyError) -> SiloError:
    return SiloError(
        f"unit '{config.unit}': cannot read the database {masked(url)} ([source] in its bu.toml): "
        f"{_database_message(err, url)}. Check the URL, that the server is up and that the user "
        "may connect."
    )


def _begin(connection: Connection, timeout: float) -> None:
    """Open the transaction every table is read in (read-only: see `read_only_engine`)."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SET LOCAL statement_timeout = {max(1, round(timeout * 1000))}")
    else:  # SQLite's driver begins no transaction for a SELECT: one snapshot needs a BEGIN
        connection.exec_driver_sql("BEGIN")


def _read(connection: Connection, config: UnitConfig, url: URL, table: str) -> pd.DataFrame:
    spec = config.tables[table]
    where = f"unit '{config.unit}', table '{table}' (tables.{table}.query in its bu.toml)"
    timeout = config.source.timeout
    deadline = time.monotonic() + timeout
    if connection.dialect.name == "sqlite":
        connection.connection.driver_connection.set_progress_handler(  # type: ignore[union-attr]
            lambda: time.monotonic() > deadline, _SQLITE_PROGRESS_STEPS
        )
    try:
        frame = pd.read_sql_query(spec.query, connection, coerce_float=True)
    except (DatabaseError, SQLAlchemyError) as err:
        late = (
            f" (stopped after [source] statement_timeout = {timeout:g} s)"
            if time.monotonic() > deadline
            else ""
        )
        raise SiloError(
            f"{where}: the query failed in the database {masked(url)}: "
            f"{_database_message(err, url)}{late}. Fix the query, or the database."
        ) from None
    repeated = sorted({c for c in frame.columns if list(frame.columns).count(c) > 1})
    if repeated:
        raise SiloError(
            f"{where}: the query returns column(s) {repeated} more than once; name each column "
            "once in its SELECT list."
        )
    if frame.empty:
        raise SiloError(f"{where}: the query returned no rows; a silo table needs rows.")
    return frame


def _database_message(err: BaseException, url: URL) -> str:
    """The database's (or driver's) own words, on one line, without any secret of `url`."""
    cause: BaseException = err
    while not isinstance(cause, SQLAlchemyError) and cause.__cause__ is not None:
        cause = cause.__cause__  # pandas wraps SQLAlchemy's error
    original = getattr(cause, "orig", None) or cause
    text = " ".join(str(original).split())
    secrets = [url.password] if url.password else []
    for name, value in url.query.items():
        if SECRET_URL_PARAMETER.search(name):
            secrets += [value] if isinstance(value, str) else list(value)
    for secret in filter(None, secrets):
        text = text.replace(str(secret), _MASK)
    return f"{type(original).__name__}: {text}"
