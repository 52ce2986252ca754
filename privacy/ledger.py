"""A business unit's privacy ledger: every privacy spending it made, its budgets, and the
reservations of the runs in progress (GDPR Art. 5(2), accountability; DESIGN "Guarantees" 2 and 4).

The design is Google dp_accounting's (`dp_event.py`, `privacy_accountant.py`): privacy spending is a
sequence of immutable events, and an epsilon is what an accountant computes by composing them. Here
the accountant is Opacus's RDP accountant (Mironov 2017, "Rényi Differential Privacy"), reached
through `privacy.accounting.composed_epsilon`, so the figure the ledger gives is the figure Opacus
gives for the same DP-SGD steps (Abadi et al. 2016, "Deep Learning with Differential Privacy").
The Gaussian mechanism without sampling (a noised query answer) is one DP-SGD step at sample rate 1
with noise multiplier sigma / sensitivity.

An event is keyed by (run id, round, purpose, kind). Recording a key again with the same parameters
changes nothing, so a replayed round never counts twice; the same key with other parameters is
refused, since an event once recorded is never changed. Composition does not care about purposes:
the BU-wide epsilon composes every event the BU recorded, a purpose's epsilon those of the purpose.

Budgets cap the epsilon per purpose and for the BU as a whole (a scope without a budget has no
limit). A run reserves the epsilon it asks for before it touches any data; the check is
conservative and additive (spent + reserved by open runs + requested <= budget, for the purpose and
for the BU) and made inside one write transaction, so two processes of one BU cannot both take the
last of a budget. After the run, the reservation is released and the events it recorded are what
counts. `supports()` makes the same check and changes nothing. The ledger is a schema-versioned
SQLite store in the BU's home (`home / "ledger.sqlite"`); it holds no customer data.
"""

from __future__ import annotations

import math
import numbers
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from privacy.accounting import ALL, PARTS, DpSgdEvent, LaplaceEvent, partitioned_epsilon
from privacy.errors import ConfigurationError, RefusedByUnit
from privacy.lineage import iso_utc
from privacy.store import SqliteState, open_unit_store, transaction

BUDGET_COMMAND = "[privacy] budget or purpose_budgets in the unit's bu.toml"

_DP_SGD = "dp_sgd"
_GAUSSIAN = "gaussian"
_LAPLACE = "laplace"

_MIGRATIONS = (
    # version 1
    """
    CREATE TABLE ledger (
        unit TEXT NOT NULL CHECK (unit <> '')
    );
    CREATE TABLE events (
        run_id TEXT NOT NULL CHECK (run_id <> ''),
        round INTEGER NOT NULL CHECK (round >= 0),
        purpose TEXT NOT NULL CHECK (purpose <> ''),
        kind TEXT NOT NULL,
        noise_multiplier REAL,
        sample_rate REAL,
        steps INTEGER,
        sigma REAL,
        sensitivity REAL,
        recorded_at TEXT NOT NULL,
        PRIMARY KEY (run_id, round, purpose, kind),
        CHECK (coalesce(CASE kind
            WHEN 'dp_sgd' THEN noise_multiplier > 0 AND sample_rate > 0 AND sample_rate <= 1
                AND steps >= 0 AND sigma IS NULL AND sensitivity IS NULL
            WHEN 'gaussian' THEN sigma > 0 AND sensitivity > 0
                AND noise_multiplier IS NULL AND sample_rate IS NULL AND steps IS NULL
            ELSE 0 END, 0))
    ) WITHOUT ROWID;
    CREATE INDEX events_by_purpose ON events (purpose);
    CREATE TRIGGER events_are_not_updated BEFORE UPDATE ON events
    BEGIN
        SELECT RAISE(ABORT, 'privacy ledger events are immutable');
    END;
    CREATE TRIGGER events_are_not_deleted BEFORE DELETE ON events
    BEGIN
        SELECT RAISE(ABORT, 'privacy ledger events are immutable');
    END;
    CREATE TABLE budget_changes (
        id INTEGER PRIMARY KEY,
        purpose TEXT CHECK (purpose IS NULL OR purpose <> ''),
        epsilon REAL NOT NULL CHECK (epsilon >= 0),
        set_at TEXT NOT NULL
    );
    CREATE TABLE reservations (
        id INTEGER PRIMARY KEY,
        run_id TEXT NOT NULL CHECK (run_id <> ''),
        purpose TEXT NOT NULL CHECK (purpose <> ''),
        epsilon REAL NOT NULL CHECK (epsilon > 0),
        delta REAL NOT NULL CHECK (delta > 0 AND delta < 1),
        reserved_at TEXT NOT NULL,
        released_at TEXT
    );
    CREATE UNIQUE INDEX open_reservations ON reservations (run_id, purpose)
        WHERE released_at IS NULL;
    """,
    # version 2: Laplace events (scale in `sigma`, L1 sensitivity in `sensitivity`). SQLite cannot
    # change a CHECK constraint, so the events table is rebuilt, its rows kept as they were.
    """
    CREATE TABLE events_v2 (
        run_id TEXT NOT NULL CHECK (run_id <> ''),
        round INTEGER NOT NULL CHECK (round >= 0),
        purpose TEXT NOT NULL CHECK (purpose <> ''),
        kind TEXT NOT NULL,
        noise_multiplier REAL,
        sample_rate REAL,
        steps INTEGER,
        sigma REAL,
        sensitivity REAL,
        recorded_at TEXT NOT NULL,
        PRIMARY KEY (run_id, round, purpose, kind),
        CHECK (coalesce(CASE kind
            WHEN 'dp_sgd' THEN noise_multiplier > 0 AND sample_rate > 0 AND sample_rate <= 1
                AND steps >= 0 AND sigma IS NULL AND sensitivity IS NULL
            WHEN 'gaussian' THEN sigma > 0 AND sensitivity > 0
                AND noise_multiplier IS NULL AND sample_rate IS NULL AND steps IS NULL
            WHEN 'laplace' THEN sigma > 0 AND sensitivity > 0
                AND noise_multiplier IS NULL AND sample_rate IS NULL AND steps IS NULL
            ELSE 0 END, 0))
    ) WITHOUT ROWID;
    INSERT INTO events_v2
        SELECT run_id, round, purpose, kind, noise_multiplier, sample_rate, steps, sigma,
               sensitivity, recorded_at
        FROM events;
    DROP TRIGGER events_are_not_updated;
    DROP TRIGGER events_are_not_deleted;
    DROP INDEX events_by_purpose;
    DROP TABLE events;
    ALTER TABLE events_v2 RENAME TO events;
    CREATE INDEX events_by_purpose ON events (purpose);
    CREATE TRIGGER events_are_not_updated BEFORE UPDATE ON events
    BEGIN
        SELECT RAISE(ABORT, 'privacy ledger events are immutable');
    END;
    CREATE TRIGGER events_are_not_deleted BEFORE DELETE ON events
    BEGIN
        SELECT RAISE(ABORT, 'privacy ledger events are immutable');
    END;
    """,
    # version 3: the customers an event touches within its run: all of them, the training
    # customers only, or the held-out ones only (parallel composition). Earlier events touched all.
    """
    ALTER TABLE events ADD COLUMN part TEXT NOT NULL DEFAULT 'all'
        CHECK (part IN ('all', 'train', 'holdout'));
    """,
)


class BudgetExceeded(RefusedByUnit):
    """A run would push a BU past a privacy budget; the BU refuses it before touching its data."""


@dataclass(frozen=True)
class GaussianEvent:
    """One release of the Gaussian mechanism without sampling: noise of standard deviation
    `sigma` on a value of L2 sensitivity `sensitivity`."""

    sigma: float
    sensitivity: float

    def __post_init__(self) -> None:
        if not (_positive(self.sigma) and _positive(self.sensitivity)):
            raise ValueError(f"invalid Gaussian event {self}")

    def as_dp_sgd(self) -> DpSgdEvent:
        """The same spending as one DP-SGD step over the whole data set."""
        return DpSgdEvent(self.sigma / self.sensitivity, 1.0, 1)


PrivacyEvent = DpSgdEvent | GaussianEvent | LaplaceEvent


@dataclass(frozen=True)
class LedgerEntry:
    """An event as the ledger holds it: what was spent, by which run and round, for what."""

    run_id: str
    round: int
    purpose: str
    event: PrivacyEvent
    recorded_at: datetime  # naive UTC
    part: str = ALL  # the customers it touched in its run: all, train or holdout


@dataclass(frozen=True)
class Reservation:
    """Epsilon held for a run in progress, counted against the budgets until it is released."""

    run_id: str
    purpose: str
    epsilon: float
    delta: float
    reserved_at: datetime  # naive UTC


@dataclass(frozen=True)
class BudgetLine:
    """One line of `silofed budget show`: a purpose, or the whole BU when `purpose` is None."""

    purpose: str | None
    budget: float | None  # None: no limit
    spent: float  # composed epsilon at the delta asked for
    reserved: float  # held by open reservations
    remaining: float | None  # what a new reservation may still take; None: no limit
    events: int


class PrivacyLedger(SqliteState):
    """The privacy events, budgets and reservations of one BU."""

    def __init__(self, connection: sqlite3.Connection, path: Path, unit: str) -> None:
        super().__init__(connection, path)
        self.unit = unit

    @classmethod
    def open(cls, path: Path, *, unit: str) -> PrivacyLedger:
        """Open the ledger at `path` (e.g. `home / "ledger.sqlite"`), creating it if missing.
        A ledger belongs to one unit: opening another unit's file is refused."""
        path = Path(path)
        if not unit:
            raise ConfigurationError(f"privacy ledger {path}: a ledger needs a unit name.")
        connection = open_unit_store(
            path, _MIGRATIONS, name="privacy ledger", unit=unit, owner_table="ledger"
        )
        return cls(connection, path, unit)

    # --- events ------------------------------------------------------------------------------

    def record(
        self,
        run_id: str,
        round: int,
        purpose: str,
        event: PrivacyEvent,
        *,
        now: datetime,
        part: str = ALL,
    ) -> bool:
        """Record that round `round` of run `run_id` spent `event` for `purpose`, touching the
        run's customers of `part` (`all`; `train` or `holdout`, the two disjoint sides of the run's
        keyed-hash split, which compose in parallel). Returns True when the event is new, False
        when the same event was already recorded under this key (a replayed round); the same key
        with other parameters raises ConfigurationError."""
        _require_text(run_id, "a run id")
        _require_text(purpose, "a purpose")
        if part not in PARTS:
            raise ConfigurationError(
                f"privacy ledger: part {part!r} of run '{run_id}' is not one of {PARTS}."
            )
        if not _whole(round) or round < 0:
            raise ConfigurationError(
                f"privacy ledger: round {round!r} of run '{run_id}' is not a round number "
                "(an integer from 0)."
            )
        kind, parameters = _columns(event)
        with transaction(self._connection):
            inserted = self._connection.execute(
                # only the key may conflict: any other constraint failing is an error
                "INSERT INTO events (run_id, round, purpose, kind, noise_multiplier, "
                "sample_rate, steps, sigma, sensitivity, recorded_at, part) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (run_id, round, purpose, kind) DO NOTHING",
                (run_id, int(round), purpose, kind, *parameters, iso_utc(now), part),
            ).rowcount
            if inserted:
                return True
            stored = self._connection.execute(
                "SELECT noise_multiplier, sample_rate, steps, sigma, sensitivity, part FROM events "
                "WHERE run_id = ? AND round = ? AND purpose = ? AND kind = ?",
                (run_id, int(round), purpose, kind),
            ).fetchone()
        if tuple(stored) != (*parameters, part):
            raise ConfigurationError(
                f"unit '{self.unit}': round {round} of run '{run_id}' already recorded a "
                f"{kind} event for purpose '{purpose}' as {_event_from(kind, stored[:5])} "
                f"({stored[5]}), not "
                f"{event}; a recorded event never changes. Record a new round (or a new run) "
                "instead."
            )
        return False

    def entries(
        self, *, purpose: str | None = None, run_id: str | None = None
    ) -> list[LedgerEntry]:
        """The recorded events (of `purpose`, of `run_id`, or all), oldest first: what a report
        mirrors."""
        return [
            LedgerEntry(
                run_id=r,
                round=n,
                purpose=p,
                event=_event_from(k, parameters),
                recorded_at=at,
                part=part,
            )
            for r, n, p, k, parameters, at, part in self._rows(purpose, run_id)
        ]

    def epsilon(
        self, delta: float, *, purpose: str | None = None, run_id: str | None = None
    ) -> float:
        """Epsilon at `delta` of the events of `purpose` (of every purpose when None: the BU-wide
        figure) and of `run_id` (of every run when None), composed by Opacus's RDP accountant:
        runs add up; within a run, training-only and held-out-only events compose in parallel."""
        _require_delta(delta)
        return partitioned_epsilon(self._composable(purpose, run_id), delta)

    def epsilon_after(
        self,
        delta: float,
        *,
        purpose: str,
        run_id: str,
        event: PrivacyEvent,
        part: str = ALL,
    ) -> float:
        """The epsilon run `run_id` would reach for `purpose` with `event` (touching `part`)
        recorded too: what a BU checks before it releases anything. Records nothing."""
        _require_delta(delta)
        if part not in PARTS:
            raise ConfigurationError(f"privacy ledger: part {part!r} is not one of {PARTS}.")
        runs = self._composable(purpose, run_id) or [{}]
        (run,) = runs
        extended = {**run, part: [*run.get(part, []), _as_dp_sgd(event)]}
        return partitioned_epsilon([extended], delta)

    # --- budgets and reservations ------------------------------------------------------------

    def set_budget(
        self, purpose: str | None, epsilon: float, *, now: datetime | None = None
    ) -> None:
        """Cap the epsilon of `purpose` (of the BU across purposes when None). Every change is
        kept; the latest is the budget. A budget below what is spent blocks new reservations."""
        if purpose is not None:
            _require_text(purpose, "a purpose")
        if not (_finite(epsilon) and epsilon >= 0):
            raise ConfigurationError(
                f"unit '{self.unit}': budget {epsilon!r} for {_scope(purpose)} is not an "
                "epsilon (a finite number from 0)."
            )
        set_at = iso_utc(now if now is not None else datetime.now(UTC))
        with transaction(self._connection):
            self._connection.execute(
                "INSERT INTO budget_changes (purpose, epsilon, set_at) VALUES (?, ?, ?)",
                (purpose, float(epsilon), set_at),
            )

    def budget(self, purpose: str | None) -> float | None:
        """The budget of `purpose` (of the BU across purposes when None); None when never set."""
        row = self._connection.execute(
            "SELECT epsilon FROM budget_changes WHERE purpose IS ? ORDER BY id DESC LIMIT 1",
            (purpose,),
        ).fetchone()
        return None if row is None else float(row[0])

    def supports(self, purpose: str, epsilon: float, *, delta: float) -> bool:
        """Whether a new reservation of `epsilon` for `purpose` would be granted now. Changes
        nothing."""
        _require_text(purpose, "a purpose")
        _require_request(epsilon, delta)
        return not self._exceeded(purpose, epsilon, delta)

    def reserve(
        self, run_id: str, purpose: str, epsilon: float, *, delta: float, now: datetime
    ) -> Reservation:
        """Hold `epsilon` for run `run_id` and `purpose`, or raise BudgetExceeded if spent +
        reserved + `epsilon` would pass the purpose's budget or the BU-wide one (spent is the
        composed epsilon at `delta`). Checked and written in one transaction. A run holding an
        open reservation for the purpose gets it back unchanged."""
        _require_text(run_id, "a run id")
        _require_text(purpose, "a purpose")
        _require_request(epsilon, delta)
        with transaction(self._connection):
            held = self._open_reservation(run_id, purpose)
            if held is not None:
                if (held.epsilon, held.delta) != (float(epsilon), float(delta)):
                    raise ConfigurationError(
                        f"unit '{self.unit}': run '{run_id}' already holds a reservation of "
                        f"epsilon {held.epsilon:g} at delta {held.delta:g} for purpose "
                        f"'{purpose}', not {epsilon:g} at {delta:g}; a reservation never "
                        "changes. Release it first, or use a new run id."
                    )
                return held
            exceeded = self._exceeded(purpose, epsilon, delta)
            if exceeded:
                raise BudgetExceeded(self._refusal(run_id, purpose, epsilon, delta, exceeded))
            reserved_at = iso_utc(now)
            self._connection.execute(
                "INSERT INTO reservations (run_id, purpose, epsilon, delta, reserved_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (run_id, purpose, float(epsilon), float(delta), reserved_at),
            )
        return _reservation((run_id, purpose, float(epsilon), float(delta), reserved_at))

    def release(self, run_id: str, purpose: str, *, now: datetime | None = None) -> bool:
        """Close the open reservation of run `run_id` for `purpose` (the run's recorded events
        count from now on). Returns False, changing nothing, when there is none."""
        released_at = iso_utc(now if now is not None else datetime.now(UTC))
        with transaction(self._connection):
            return bool(
                self._connection.execute(
                    "UPDATE reservations SET released_at = ? "
                    "WHERE run_id = ? AND purpose = ? AND released_at IS NULL",
                    (released_at, run_id, purpose),
                ).rowcount
            )

    def reservations(self) -> list[Reservation]:
        """The open reservations, oldest first."""
        rows = self._connection.execute(
            "SELECT run_id, purpose, epsilon, delta, reserved_at FROM reservations "
            "WHERE released_at IS NULL ORDER BY id"
        )
        return [_reservation(row) for row in rows]

    def summary(self, delta: float) -> list[BudgetLine]:
        """One line per purpose (sorted) with events, a budget or an open reservation, then the
        BU-wide line (purpose None). Spent is the composed epsilon at `delta`."""
        _require_delta(delta)
        # one transaction: the lines are of one state of the ledger, even while runs reserve
        with transaction(self._connection):
            return [self._line(purpose, delta) for purpose in [*self._purposes(), None]]

    # --- inside ------------------------------------------------------------------------------

    def _purposes(self) -> list[str]:
        """Every purpose with an event, a budget or an open reservation, sorted."""
        return sorted(
            {row[0] for row in self._connection.execute("SELECT DISTINCT purpose FROM events")}
            | {
                row[0]
                for row in self._connection.execute(
                    "SELECT DISTINCT purpose FROM budget_changes WHERE purpose IS NOT NULL"
                )
            }
            | {r.purpose for r in self.reservations()}
        )

    def _line(self, purpose: str | None, delta: float) -> BudgetLine:
        spent, reserved = self._spent_and_reserved(purpose, delta)
        budget = self.budget(purpose)
        count = self._connection.execute(
            "SELECT count(*) FROM events WHERE ? IS NULL OR purpose = ?", (purpose, purpose)
        ).fetchone()[0]
        return BudgetLine(
            purpose=purpose,
            budget=budget,
            spent=spent,
            reserved=reserved,
            remaining=None if budget is None else max(0.0, budget - spent - reserved),
            events=int(count),
        )

    def _spent_and_reserved(self, purpose: str | None, delta: float) -> tuple[float, float]:
        spent = partitioned_epsilon(self._composable(purpose, None), delta)
        reserved = self._connection.execute(
            "SELECT total(epsilon) FROM reservations "
            "WHERE released_at IS NULL AND (? IS NULL OR purpose = ?)",
            (purpose, purpose),
        ).fetchone()[0]
        return spent, float(reserved)

    def _exceeded(
        self, purpose: str, epsilon: float, delta: float
    ) -> list[tuple[str | None, float, float, float]]:
        """The scopes (the purpose, then the BU) whose budget `epsilon` more would pass, each
        as (scope, budget, spent, reserved)."""
        exceeded = []
        for scope in (purpose, None):
            budget = self.budget(scope)
            if budget is None:
                continue
            spent, reserved = self._spent_and_reserved(scope, delta)
            if spent + reserved + epsilon > budget:
                exceeded.append((scope, budget, spent, reserved))
        return exceeded

    def _refusal(
        self,
        run_id: str,
        purpose: str,
        epsilon: float,
        delta: float,
        exceeded: list[tuple[str | None, float, float, float]],
    ) -> str:
        reasons = "; ".join(
            f"its budget for {_scope(scope)} is epsilon {budget:g}, of which {spent:.4g} is "
            f"spent and {reserved:.4g} is reserved by runs in progress"
            for scope, budget, spent, reserved in exceeded
        )
        most = min(max(0.0, budget - spent - reserved) for _, budget, spent, reserved in exceeded)
        return (
            f"unit '{self.unit}' refuses run '{run_id}' for purpose '{purpose}': the epsilon "
            f"{epsilon:g} it asks for (at delta {delta:g}) would exceed a privacy budget "
            f"({reasons}). Ask for at most {math.floor(most * 1e4) / 1e4:g}, or have the unit's "
            f"data steward raise {BUDGET_COMMAND}."
        )

    def _open_reservation(self, run_id: str, purpose: str) -> Reservation | None:
        row = self._connection.execute(
            "SELECT run_id, purpose, epsilon, delta, reserved_at FROM reservations "
            "WHERE run_id = ? AND purpose = ? AND released_at IS NULL",
            (run_id, purpose),
        ).fetchone()
        return None if row is None else _reservation(row)

    def _rows(
        self, purpose: str | None, run_id: str | None
    ) -> Iterator[tuple[str, int, str, str, tuple, datetime, str]]:
        rows = self._connection.execute(
            "SELECT run_id, round, purpose, kind, noise_multiplier, sample_rate, steps, sigma, "
            "sensitivity, recorded_at, part FROM events "
            "WHERE (? IS NULL OR purpose = ?) AND (? IS NULL OR run_id = ?) "
            "ORDER BY recorded_at, run_id, round, purpose, kind",
            (purpose, purpose, run_id, run_id),
        )
        for r, n, p, k, *parameters, at, part in rows:
            yield r, n, p, k, tuple(parameters), datetime.fromisoformat(at), part

    def _composable(
        self, purpose: str | None, run_id: str | None
    ) -> list[dict[str, list[DpSgdEvent | LaplaceEvent]]]:
        """The events of `purpose` and `run_id` (None: all), per run and part, Gaussian ones as
        the DP-SGD step they equal."""
        runs: dict[str, dict[str, list[DpSgdEvent | LaplaceEvent]]] = {}
        for run, _, _, kind, parameters, _, part in self._rows(purpose, run_id):
            runs.setdefault(run, {}).setdefault(part, []).append(
                _as_dp_sgd(_event_from(kind, parameters))
            )
        return list(runs.values())


def _as_dp_sgd(event: PrivacyEvent) -> DpSgdEvent | LaplaceEvent:
    return event.as_dp_sgd() if isinstance(event, GaussianEvent) else event


def _columns(event: PrivacyEvent) -> tuple[str, tuple]:
    """The kind and the (noise_multiplier, sample_rate, steps, sigma, sensitivity) of an event."""
    if isinstance(event, DpSgdEvent):
        if not (_positive(event.noise_multiplier) and _whole(event.steps)):
            raise ConfigurationError(f"privacy ledger: {event} is not a DP-SGD event to record.")
        return _DP_SGD, (
            float(event.noise_multiplier),
            float(event.sample_rate),
            int(event.steps),
            None,
            None,
        )
    if isinstance(event, GaussianEvent):
        return _GAUSSIAN, (None, None, None, float(event.sigma), float(event.sensitivity))
    if isinstance(event, LaplaceEvent):
        return _LAPLACE, (None, None, None, float(event.scale), float(event.sensitivity))
    raise ConfigurationError(
        f"privacy ledger: cannot record {event!r}; record a DpSgdEvent, a GaussianEvent or a "
        "LaplaceEvent."
    )


def _event_from(kind: str, parameters: tuple) -> PrivacyEvent:
    noise_multiplier, sample_rate, steps, sigma, sensitivity = parameters
    if kind == _DP_SGD:
        return DpSgdEvent(noise_multiplier, sample_rate, steps)
    if kind == _LAPLACE:
        return LaplaceEvent(sigma, sensitivity)
    return GaussianEvent(sigma, sensitivity)


def _reservation(row: tuple) -> Reservation:
    run_id, purpose, epsilon, delta, reserved_at = row
    return Reservation(run_id, purpose, epsilon, delta, datetime.fromisoformat(reserved_at))


def _scope(purpose: str | None) -> str:
    return "the whole unit (all purposes)" if purpose is None else f"purpose '{purpose}'"


def _finite(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: object) -> bool:
    return _finite(value) and value > 0  # type: ignore[operator]


def _whole(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _require_text(value: object, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"privacy ledger: {value!r} is not {what} (a non-empty text).")


def _require_delta(delta: float) -> None:
    if not (_positive(delta) and delta < 1):
        raise ConfigurationError(f"privacy ledger: delta {delta!r} must be between 0 and 1.")


def _require_request(epsilon: float, delta: float) -> None:
    if not _positive(epsilon):
        raise ConfigurationError(
            f"privacy ledger: a reservation of epsilon {epsilon!r} is not possible; ask for a "
            "finite epsilon above 0."
        )
    _require_delta(delta)
