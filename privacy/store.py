"""Schema-versioned SQLite state in a BU's home directory (consent registry, lineage, ...).

Every store carries its schema version in SQLite's `PRAGMA user_version`. Code knows a list of
migrations, SQL scripts where script i moves a file from version i to version i + 1; opening a store
applies the missing ones in order, each in its own transaction, so an older file is migrated forward
and a crash leaves it at a whole version. A file newer than the code is refused rather than guessed
at. Files and the directories created for them are private to the BU's user (0600 / 0700), and
deleted rows are overwritten (`secure_delete`) so that an erasure does not linger in free pages.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Self

from privacy.errors import ConfigurationError

_BUSY_TIMEOUT_MS = 5_000


def open_store(path: Path, migrations: Sequence[str], *, name: str) -> sqlite3.Connection:
    """Open (creating if missing) the SQLite file at `path` and migrate it to version
    `len(migrations)`. `name` says what the file is ("consent registry") in error messages.

    The connection is in autocommit mode: group writes with `transaction(connection)`.
    """
    path = Path(path)
    latest = len(migrations)
    _make_private_parents(path.parent)
    _create_private_file(path)
    try:
        connection = sqlite3.connect(path, isolation_level=None)
    except sqlite3.Error as err:
        raise ConfigurationError(f"{name} {path}: cannot open it ({err}).") from None
    try:
        connection.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA foreign_keys = ON")
        connection.execute("PRAGMA secure_delete = ON")
        version = _user_version(connection)
        if version > latest:
            raise ConfigurationError(
                f"{name} {path} has schema version {version}, but this version of silofed "
                f"supports up to version {latest}; upgrade silofed to open it (the file was "
                "written by a newer release and is left unchanged)."
            )
        for target in range(version + 1, latest + 1):
            _migrate(connection, path, name, target, migrations[target - 1])
    except sqlite3.DatabaseError as err:
        connection.close()
        raise ConfigurationError(
            f"{name} {path}: cannot use it as a SQLite database ({err}); if the file is damaged "
            "or not a database, restore it from a backup or move it away to start empty."
        ) from None
    except BaseException:
        connection.close()
        raise
    return connection


@contextmanager
def transaction(connection: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction: committed when the block ends, rolled back if it raises. Taken
    IMMEDIATE so that two processes of one BU serialise instead of failing half-way."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def _user_version(connection: sqlite3.Connection) -> int:
    return int(connection.execute("PRAGMA user_version").fetchone()[0])


def _migrate(
    connection: sqlite3.Connection, path: Path, name: str, target: int, script: str
) -> None:
    try:
        with transaction(connection):
            # Another process may have migrated the file since we read its version.
            if _user_version(connection) >= target:
                return
            for statement in _statements(script):
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {target}")
    except sqlite3.Error as err:
        raise ConfigurationError(
            f"{name} {path}: migration from schema version {target - 1} to {target} failed "
            f"({err}); the file was left at version {target - 1}. Report this as a silofed bug."
        ) from None


def _statements(script: str) -> Iterator[str]:
    """The statements of an SQL script, split where SQLite's own tokenizer sees one end (so a
    `;` inside a string or a trigger body does not split). `executescript` cannot be used: it
    commits any open transaction first, and a migration must be one transaction."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\r\n;"):
                yield pending
            pending = ""
    if pending.strip(" \t\r\n;"):
        yield pending[:-1]  # no closing `;`: let SQLite report what is wrong with it


def _make_private_parents(directory: Path) -> None:
    """Create `directory` and any missing ancestor with mode 0700; existing ones are not touched
    (the BU's home may be shared with other tools and its mode is the steward's choice)."""
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(folder, 0o700)  # mkdir's mode is filtered by the umask


def _create_private_file(path: Path) -> None:
    """Create an empty file readable only by its owner; SQLite gives its -wal and -shm files the
    same mode. An existing file is left as it is."""
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    os.close(descriptor)


class SqliteState:
    """Base of the BU's SQLite-backed state objects: one connection, closed on exit."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._connection = connection
        self.path = path

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def open_unit_store(
    path: Path, migrations: Sequence[str], *, name: str, unit: str, owner_table: str
) -> sqlite3.Connection:
    """`open_store` for state that belongs to one BU: the first opener's unit is written to
    `owner_table` (a one-column `unit` table of the schema); another unit's file is refused."""
    connection = open_store(path, migrations, name=name)
    try:
        with transaction(connection):
            row = connection.execute(f"SELECT unit FROM {owner_table}").fetchone()
            if row is None:
                connection.execute(f"INSERT INTO {owner_table} (unit) VALUES (?)", (unit,))
            elif row[0] != unit:
                raise ConfigurationError(
                    f"{name} {path} belongs to unit '{row[0]}', not '{unit}'; "
                    "check the home directory in the BU's bu.toml."
                )
    except BaseException:
        connection.close()
        raise
    return connection
