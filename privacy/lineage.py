"""Which runs used which customers, kept by each BU without customer ids in clear (GDPR Art. 5(2),
15(1)(c), 17, 30).

To answer "was my data used, and where?" and to follow an erasure through to the runs that used
a customer, a BU records, per run, a keyed digest of every customer id it used: HMAC-SHA256 under a
key only the BU holds (RFC 2104). The digest lets the BU look a customer up when it knows the id,
and tells anyone who reads the file without the key nothing (customer ids are guessable, so a plain
hash would not do). The file is a schema-versioned SQLite store in the BU's home.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from privacy.errors import ConfigurationError
from privacy.pseudonyms import customer_digest
from privacy.store import SqliteState, open_store, transaction

_MIGRATIONS = (
    # version 1
    """
    CREATE TABLE run_customers (
        run_id TEXT NOT NULL CHECK (run_id <> ''),
        purpose TEXT NOT NULL CHECK (purpose <> ''),
        digest TEXT NOT NULL,
        recorded_at TEXT NOT NULL,
        PRIMARY KEY (run_id, digest)
    ) WITHOUT ROWID;
    CREATE INDEX run_customers_by_digest ON run_customers (digest);
    """,
)


def iso_utc(moment: datetime) -> str:
    """A time as fixed-width ISO 8601 text in naive UTC, so that text order is time order.
    A naive time is taken to be UTC already (the silo convention)."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")


class Lineage(SqliteState):
    """The BU's record of the customers each run used, by keyed digest."""

    @classmethod
    def open(cls, path: Path) -> Lineage:
        """Open the lineage file at `path` (e.g. `home / "lineage.sqlite"`), creating it if missing."""
        path = Path(path)
        return cls(open_store(path, _MIGRATIONS, name="lineage"), path)

    def record(
        self, run_id: str, customer_ids: Iterable[str], *, key: bytes, purpose: str, now: datetime
    ) -> None:
        """Record that run `run_id`, for `purpose`, used `customer_ids`. Recording a customer for a
        run again changes nothing (the first time is kept); a run has one purpose."""
        self.record_digests(
            run_id, (customer_digest(key, c) for c in customer_ids), purpose=purpose, now=now
        )

    def record_digests(
        self, run_id: str, digests: Iterable[str], *, purpose: str, now: datetime
    ) -> None:
        """As `record`, for customers already known by their digest: the pseudonyms the client
        pipeline computes are these digests, so the ids need not be hashed twice."""
        if not run_id or not purpose:
            raise ConfigurationError("lineage: a record needs a run id and a purpose.")
        known = {
            row[0]
            for row in self._connection.execute(
                "SELECT DISTINCT purpose FROM run_customers WHERE run_id = ?", (run_id,)
            )
        }
        if known - {purpose}:
            raise ConfigurationError(
                f"lineage {self.path}: run '{run_id}' is recorded for purpose "
                f"'{sorted(known)[0]}', not '{purpose}'; a run has one purpose. Use the run's "
                "own id."
            )
        recorded_at = iso_utc(now)
        digests = set(digests)
        with transaction(self._connection):
            self._connection.executemany(
                "INSERT OR IGNORE INTO run_customers (run_id, purpose, digest, recorded_at) "
                "VALUES (?, ?, ?, ?)",
                ((run_id, purpose, d, recorded_at) for d in sorted(digests)),
            )

    def runs_using(self, customer_id: str, *, key: bytes) -> list[str]:
        """The ids of the runs that used `customer_id`, sorted."""
        rows = self._connection.execute(
            "SELECT DISTINCT run_id FROM run_customers WHERE digest = ? ORDER BY run_id",
            (customer_digest(key, customer_id),),
        )
        return [row[0] for row in rows]

    def runs(self) -> list[str]:
        """The ids of every recorded run, sorted."""
        rows = self._connection.execute("SELECT DISTINCT run_id FROM run_customers ORDER BY run_id")
        return [row[0] for row in rows]
