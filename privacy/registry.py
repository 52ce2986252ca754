"""A business unit's consent registry: the consent events it imported and the tombstones of the
customers it erased (GDPR Art. 7(1), 15, 17; PIPL Art. 14, 15, 45, 47).

The registry is a schema-versioned SQLite store in the BU's home. Consent events come in from the
BU's own systems as CSV or Parquet files, are validated once at import (a bad value names the file,
the column and the row) and are kept with their source and import time, so that the BU can show
where each consent came from (Art. 7(1)). Importing is idempotent: an event already present is a
duplicate and changes nothing.

Erasing a customer deletes their events and keeps a tombstone: a keyed digest of their id
(HMAC-SHA256 under the BU's key, see `privacy.pseudonyms.customer_digest`), never the id itself. Every
later import skips the events of a tombstoned customer, so a re-import of an old export does not
bring them back, and every decision counts them as erased.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from privacy.consent import CONSENT_COLUMNS, GUARDIAN_COLUMN, ConsentDecision, consented_customers
from privacy.errors import ConfigurationError, ConsentMissing
from privacy.frames import among
from privacy.lineage import iso_utc
from privacy.pseudonyms import customer_digest
from privacy.store import SqliteState, open_unit_store, transaction

IMPORT_COMMAND = "silofed consent import --bu-config BU.toml FILE"
EVENT_COLUMNS = (*CONSENT_COLUMNS[:3], GUARDIAN_COLUMN, CONSENT_COLUMNS[3])
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})

_MIGRATIONS = (
    # version 1
    """
    CREATE TABLE registry (
        unit TEXT NOT NULL
    );
    CREATE TABLE consent_events (
        id INTEGER PRIMARY KEY,
        customer_id TEXT NOT NULL CHECK (customer_id <> ''),
        purpose TEXT NOT NULL CHECK (purpose <> ''),
        granted INTEGER NOT NULL CHECK (granted IN (0, 1)),
        guardian INTEGER NOT NULL CHECK (guardian IN (0, 1)),
        timestamp TEXT NOT NULL,
        source TEXT NOT NULL,
        imported_at TEXT NOT NULL,
        UNIQUE (customer_id, purpose, granted, guardian, timestamp)
    );
    CREATE INDEX consent_events_by_purpose ON consent_events (purpose);
    CREATE TABLE tombstones (
        digest TEXT PRIMARY KEY,
        erased_at TEXT NOT NULL
    ) WITHOUT ROWID;
    """,
)


@dataclass(frozen=True)
class ImportResult:
    imported: int  # new events stored
    duplicates: int  # events already present (or repeated within the import)
    erased: int  # events of erased customers, skipped


class ConsentRegistry(SqliteState):
    """The consent events and erasure tombstones of one BU."""

    def __init__(self, connection: sqlite3.Connection, path: Path, unit: str) -> None:
        super().__init__(connection, path)
        self.unit = unit

    @classmethod
    def open(cls, path: Path, *, unit: str) -> ConsentRegistry:
        """Open the registry at `path` (e.g. `home / "consent.sqlite"`), creating it if missing.
        A registry belongs to one unit: opening another unit's file is refused."""
        path = Path(path)
        connection = open_unit_store(
            path, _MIGRATIONS, name="consent registry", unit=unit, owner_table="registry"
        )
        return cls(connection, path, unit)

    # --- import ------------------------------------------------------------------------------

    def import_file(
        self, path: Path, *, tombstone_key: bytes, now: datetime | None = None
    ) -> ImportResult:
        """Import the consent events of a `.csv` or `.parquet` file (see `import_events`)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigurationError(f"{path}: no such consent file; check the path.")
        try:
            if path.suffix == ".csv":
                # only an empty field is missing: "NA" may be a real customer id
                frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
            elif path.suffix == ".parquet":
                frame = pd.read_parquet(path)
            else:
                raise ConfigurationError(
                    f"{path}: unsupported file type '{path.suffix}'; export the consent events "
                    "as .csv or .parquet."
                )
        except ConfigurationError:
            raise
        except Exception as err:  # the readers raise many types; name the file and their words
            raise ConfigurationError(
                f"{path}: cannot read the consent file ({type(err).__name__}: {err})."
            ) from None
        return self.import_events(frame, source=str(path), tombstone_key=tombstone_key, now=now)

    def import_events(
        self,
        events: pd.DataFrame,
        *,
        source: str,
        tombstone_key: bytes,
        now: datetime | None = None,
    ) -> ImportResult:
        """Validate and store consent events: columns customer_id, purpose, granted, timestamp
        and optionally guardian (other columns are ignored). Booleans are bool or the text
        true/false, 1/0, yes/no; an empty guardian is False. Timestamps are ISO 8601; one without
        an offset is UTC. A bad value raises ConfigurationError naming `source`, the column and
        the row (1-based, the first data row being row 1) and nothing is stored.

        Events already present are duplicates; events of erased customers are skipped.
        """
        rows = _validated(events, source)
        imported_at = iso_utc(now if now is not None else datetime.now(UTC))
        with transaction(self._connection):
            gone = self._tombstoned(rows["customer_id"].unique(), tombstone_key)
            skipped = among(rows["customer_id"], gone)
            kept = rows[~skipped]
            before = self._connection.total_changes
            self._connection.executemany(
                "INSERT OR IGNORE INTO consent_events "
                "(customer_id, purpose, granted, guardian, timestamp, source, imported_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    (c, p, int(g), int(h), t, source, imported_at)
                    for c, p, g, h, t in kept[list(EVENT_COLUMNS)].itertuples(index=False)
                ),
            )
            imported = self._connection.total_changes - before
        return ImportResult(
            imported=imported, duplicates=len(kept) - imported, erased=int(skipped.sum())
        )

    # --- reading -----------------------------------------------------------------------------

    def purposes(self) -> frozenset[str]:
        """Every purpose the registry holds at least one event for."""
        rows = self._connection.execute("SELECT DISTINCT purpose FROM consent_events")
        return frozenset(row[0] for row in rows)

    def events(self, purpose: str | None = None) -> pd.DataFrame:
        """The stored events (of `purpose`, or all), in insertion order, with naive UTC
        timestamps: the table `consented_customers` reads."""
        query = f"SELECT {', '.join(EVENT_COLUMNS)} FROM consent_events"
        parameters: tuple[str, ...] = ()
        if purpose is not None:
            query += " WHERE purpose = ?"
            parameters = (purpose,)
        rows = self._connection.execute(query + " ORDER BY id", parameters).fetchall()
        frame = pd.DataFrame(rows, columns=list(EVENT_COLUMNS))
        frame["customer_id"] = frame["customer_id"].astype(object)
        frame["purpose"] = frame["purpose"].astype(object)
        frame["granted"] = frame["granted"].astype(bool)
        frame[GUARDIAN_COLUMN] = frame[GUARDIAN_COLUMN].astype(bool)
        frame["timestamp"] = pd.to_datetime(frame["timestamp"], format="ISO8601").astype(
            "datetime64[ns]"
        )
        return frame

    def decision(
        self,
        customer_ids: Iterable[str],
        purpose: str,
        *,
        as_of: datetime,
        now: datetime | None = None,
        ages: pd.Series | None = None,
        minor_age: int | None = None,
        tombstone_key: bytes,
    ) -> ConsentDecision:
        """Which of `customer_ids` may be used for `purpose` (see `consented_customers`), erased
        customers counted as such. A registry without any event for the purpose refuses."""
        held = self._connection.execute(
            "SELECT 1 FROM consent_events WHERE purpose = ? LIMIT 1", (purpose,)
        ).fetchone()
        if held is None:
            raise ConsentMissing(
                f"unit '{self.unit}' has no consent events for purpose '{purpose}' in its consent "
                f"registry {self.path}; it refuses the job. To take part, import one with "
                f"`{IMPORT_COMMAND}`."
            )
        ids = pd.unique(pd.Series(list(customer_ids), dtype=str))
        return consented_customers(
            ids,
            self.events(purpose),
            purpose,
            as_of,
            unit=self.unit,
            now=now,
            ages=ages,
            minor_age=minor_age,
            erased=frozenset(self._tombstoned(ids, tombstone_key)),
        )

    # --- data subject requests ---------------------------------------------------------------

    def erase(self, customer_id: str, *, tombstone_key: bytes, now: datetime) -> int:
        """Delete the customer's events and keep a tombstone of their id's digest; returns the
        number of events removed. Erasing again removes nothing and keeps the first time."""
        digest = customer_digest(tombstone_key, customer_id)
        with transaction(self._connection):
            removed = self._connection.execute(
                "DELETE FROM consent_events WHERE customer_id = ?", (customer_id,)
            ).rowcount
            self._connection.execute(
                "INSERT OR IGNORE INTO tombstones (digest, erased_at) VALUES (?, ?)",
                (digest, iso_utc(now)),
            )
        # secure_delete zeroed the rows in the pages written; fold the write-ahead log back into
        # the file and truncate it so no older copy of those pages stays on disk.
        self._connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return removed

    def is_erased(self, customer_id: str, *, tombstone_key: bytes) -> bool:
        row = self._connection.execute(
            "SELECT 1 FROM tombstones WHERE digest = ?",
            (customer_digest(tombstone_key, customer_id),),
        ).fetchone()
        return row is not None

    def export_events(self, customer_id: str) -> list[dict[str, Any]]:
        """The customer's events, oldest import first, as JSON-ready dicts (for an access
        request): purpose, granted, guardian, timestamp and imported_at in ISO 8601 UTC, and the
        source the event was imported from."""
        rows = self._connection.execute(
            "SELECT customer_id, purpose, granted, guardian, timestamp, source, imported_at "
            "FROM consent_events WHERE customer_id = ? ORDER BY id",
            (customer_id,),
        )
        return [
            {
                "customer_id": c,
                "purpose": p,
                "granted": bool(g),
                "guardian": bool(h),
                "timestamp": _utc_text(t),
                "source": s,
                "imported_at": _utc_text(i),
            }
            for c, p, g, h, t, s, i in rows
        ]

    def _tombstoned(self, customer_ids: Iterable[str], key: bytes) -> set[str]:
        """The ids among `customer_ids` whose digest has a tombstone."""
        customer_digest(key, "")  # a weak key is refused even while nobody is erased
        if self._connection.execute("SELECT 1 FROM tombstones LIMIT 1").fetchone() is None:
            return set()
        digests = {row[0] for row in self._connection.execute("SELECT digest FROM tombstones")}
        return {c for c in customer_ids if customer_digest(key, c) in digests}


def _utc_text(stored: str) -> str:
    return datetime.fromisoformat(stored).replace(tzinfo=UTC).isoformat()


# --- validation at the edge ---------------------------------------------------------------------


def _validated(events: pd.DataFrame, source: str) -> pd.DataFrame:
    """The events as (customer_id, purpose, granted, guardian, timestamp-as-text), or a
    ConfigurationError naming the source, the column and the first bad row."""
    missing = [c for c in CONSENT_COLUMNS if c not in events.columns]
    if missing:
        raise ConfigurationError(
            f"{source}: missing column(s) {missing}; a consent file needs "
            f"{list(CONSENT_COLUMNS)} and may add '{GUARDIAN_COLUMN}'."
        )
    frame = events.reset_index(drop=True)
    guardian = (
        _booleans(frame, GUARDIAN_COLUMN, source, empty_is_false=True)
        if GUARDIAN_COLUMN in frame.columns
        else pd.Series(False, index=frame.index)
    )
    return pd.DataFrame(
        {
            "customer_id": _texts(frame, "customer_id", source),
            "purpose": _texts(frame, "purpose", source),
            "granted": _booleans(frame, "granted", source, empty_is_false=False),
            GUARDIAN_COLUMN: guardian,
            "timestamp": _timestamps(frame, "timestamp", source),
        }
    )


def _bad_row(source: str, frame: pd.DataFrame, column: str, bad: np.ndarray, problem: str):
    position = int(np.flatnonzero(bad)[0])
    return ConfigurationError(
        f"{source}: column '{column}', row {position + 1}: {problem} "
        f"(value {frame[column].iloc[position]!r}); {int(bad.sum())} row(s) affected. "
        "Fix the file and import it again."
    )


def _is_blank(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or _is_na(value)


def _is_na(value: object) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # array-like values: not missing, but not valid either
        return False


def _texts(frame: pd.DataFrame, column: str, source: str) -> pd.Series:
    """Non-empty text; whole numbers (a Parquet integer id) are taken as their decimal text."""

    def text(value: object) -> str | None:
        if isinstance(value, str):
            return value if value.strip() else None
        if isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_):
            return str(int(value))
        return None

    values = frame[column].map(text)
    bad = values.isna().to_numpy()
    if bad.any():
        raise _bad_row(source, frame, column, bad, "not a non-empty text")
    return values.astype(object)


def _booleans(frame: pd.DataFrame, column: str, source: str, *, empty_is_false: bool) -> pd.Series:
    def boolean(value: object) -> bool | None:
        if isinstance(value, bool | np.bool_):
            return bool(value)
        if isinstance(value, int | np.integer) and int(value) in (0, 1):
            return bool(value)
        if isinstance(value, str):
            word = value.strip().lower()
            if word in _TRUE:
                return True
            if word in _FALSE:
                return False
        if empty_is_false and _is_blank(value):
            return False
        return None

    values = frame[column].map(boolean)
    bad = values.isna().to_numpy()
    if bad.any():
        raise _bad_row(source, frame, column, bad, "not a boolean (true/false, 1/0, yes/no)")
    return values.astype(bool)


def _timestamps(frame: pd.DataFrame, column: str, source: str) -> pd.Series:
    """ISO 8601 times as fixed-width naive-UTC text (text order is time order in SQL)."""
    raw = frame[column]
    if pd.api.types.is_datetime64_any_dtype(raw):
        parsed = pd.to_datetime(raw, utc=True)
    else:
        text = raw.map(lambda v: v if isinstance(v, str) and v.strip() else None)
        parsed = pd.to_datetime(text, format="ISO8601", utc=True, errors="coerce")
    bad = parsed.isna().to_numpy()
    if bad.any():
        raise _bad_row(
            source, frame, column, bad, "not an ISO 8601 time (e.g. 2024-05-31T09:30:00Z)"
        )
    return parsed.dt.tz_localize(None).dt.strftime("%Y-%m-%dT%H:%M:%S.%f")
