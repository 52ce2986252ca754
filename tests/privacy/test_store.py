"""Schema-versioned SQLite state (privacy/store.py): new files get the latest version, older files
are migrated forward, newer ones are refused, and the files are private to the BU's user."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest

from privacy.errors import ConfigurationError
from privacy.store import open_store, transaction

V1 = "CREATE TABLE customers_seen (customer_digest TEXT PRIMARY KEY);"
V2 = """
CREATE TABLE notes (body TEXT NOT NULL DEFAULT 'a; b');  -- a `;` in a string and a comment;
ALTER TABLE customers_seen ADD COLUMN seen_at TEXT;
"""


def version(connection: sqlite3.Connection) -> int:
    return connection.execute("PRAGMA user_version").fetchone()[0]


def tables(connection: sqlite3.Connection) -> set[str]:
    rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    return {row[0] for row in rows}


def test_fresh_file_gets_the_latest_version(tmp_path: Path) -> None:
    connection = open_store(tmp_path / "state.sqlite", [V1, V2], name="test store")

    assert version(connection) == 2
    assert tables(connection) == {"customers_seen", "notes"}
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert connection.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    connection.close()


def test_older_file_is_migrated_forward_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    old = open_store(path, [V1], name="test store")
    with transaction(old):
        old.execute("INSERT INTO customers_seen (customer_digest) VALUES ('d1')")
    assert version(old) == 1
    old.close()

    new = open_store(path, [V1, V2], name="test store")

    assert version(new) == 2
    assert tables(new) == {"customers_seen", "notes"}
    assert new.execute("SELECT customer_digest, seen_at FROM customers_seen").fetchall() == [
        ("d1", None)
    ]
    new.close()


def test_failed_migration_leaves_the_file_at_its_version(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    open_store(path, [V1], name="test store").close()
    broken = "CREATE TABLE notes (body TEXT); CREATE TABLE customers_seen (x TEXT);"

    with pytest.raises(ConfigurationError, match="from schema version 1 to 2 failed"):
        open_store(path, [V1, broken], name="test store")

    again = open_store(path, [V1], name="test store")
    assert version(again) == 1
    assert tables(again) == {"customers_seen"}  # the half-run migration was rolled back
    again.close()


def test_file_from_a_newer_silofed_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    open_store(path, [V1, V2], name="consent registry").close()

    with pytest.raises(ConfigurationError) as raised:
        open_store(path, [V1], name="consent registry")

    assert str(raised.value) == (
        f"consent registry {path} has schema version 2, but this version of silofed supports up "
        "to version 1; upgrade silofed to open it (the file was written by a newer release and is "
        "left unchanged)."
    )
    assert raised.value.exit_code == 2
    current = open_store(path, [V1, V2], name="consent registry")
    assert version(current) == 2
    current.close()


def test_a_file_that_is_not_a_database_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    path.write_bytes(b"this is not a database, it only has its name" * 100)

    with pytest.raises(ConfigurationError, match=f"test store {path}: cannot use it"):
        open_store(path, [V1], name="test store")


def test_created_directories_and_file_are_private(tmp_path: Path) -> None:
    home = tmp_path / "bu_home" / "state"
    path = home / "state.sqlite"

    open_store(path, [V1], name="test store").close()

    assert stat.S_IMODE((tmp_path / "bu_home").stat().st_mode) == 0o700
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_existing_parent_directory_keeps_its_mode(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)

    open_store(tmp_path / "state.sqlite", [V1], name="test store").close()

    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755
