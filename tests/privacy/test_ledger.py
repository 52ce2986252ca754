"""The privacy ledger of one BU (privacy/ledger.py): immutable events composed by Opacus's RDP
accountant, per purpose and BU-wide; replayed rounds that never count twice; budgets enforced by
reservations that two processes cannot both win."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from privacy.accounting import DpSgdEvent, LaplaceEvent, dp_sgd_epsilon
from privacy.errors import ConfigurationError, RefusedByUnit
from privacy.ledger import (
    BudgetExceeded,
    BudgetLine,
    GaussianEvent,
    LedgerEntry,
    PrivacyLedger,
    Reservation,
)

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")

REPO = Path(__file__).resolve().parents[2]
UNIT = "retail"
CHURN = "churn_model"
RESPONSE = "response_model"
DELTA = 1e-5
NOW = datetime(2024, 7, 1, 12, 0)
LATER = datetime(2024, 7, 2, 12, 0)
GOLDEN = DpSgdEvent(1.5, 0.04, 2250)


@pytest.fixture()
def ledger(tmp_path: Path):
    with PrivacyLedger.open(tmp_path / "home" / "ledger.sqlite", unit=UNIT) as opened:
        yield opened


# --- composition -------------------------------------------------------------------------------


def test_golden_epsilon_of_one_recorded_run(ledger: PrivacyLedger) -> None:
    assert ledger.record("run-1", 0, CHURN, GOLDEN, now=NOW) is True

    assert ledger.epsilon(DELTA) == pytest.approx(7.32911117143, rel=1e-6)
    assert ledger.epsilon(DELTA, purpose=CHURN) == pytest.approx(7.32911117143, rel=1e-6)
    assert ledger.epsilon(DELTA, run_id="run-1") == pytest.approx(7.32911117143, rel=1e-6)


def test_two_runs_compose_exactly_as_one_run_of_their_summed_steps(ledger: PrivacyLedger) -> None:
    ledger.record("run-1", 0, CHURN, DpSgdEvent(1.5, 0.04, 1000), now=NOW)
    ledger.record("run-2", 0, CHURN, DpSgdEvent(1.5, 0.04, 1250), now=LATER)

    whole = dp_sgd_epsilon([GOLDEN], DELTA)

    assert ledger.epsilon(DELTA, purpose=CHURN) == pytest.approx(whole, rel=1e-9)
    assert ledger.epsilon(DELTA, run_id="run-1") == pytest.approx(
        dp_sgd_epsilon([DpSgdEvent(1.5, 0.04, 1000)], DELTA), rel=1e-12
    )


def test_empty_ledger_has_spent_nothing(ledger: PrivacyLedger) -> None:
    assert ledger.epsilon(DELTA) == 0.0
    assert ledger.epsilon(DELTA, purpose=CHURN) == 0.0


def test_gaussian_release_counts_as_one_unsampled_dp_sgd_step(ledger: PrivacyLedger) -> None:
    ledger.record("query-1", 0, RESPONSE, GaussianEvent(sigma=6.0, sensitivity=2.0), now=NOW)

    assert ledger.epsilon(DELTA) == pytest.approx(
        dp_sgd_epsilon([DpSgdEvent(3.0, 1.0, 1)], DELTA), rel=1e-12
    )


def test_total_composes_every_purpose_and_each_purpose_only_its_own(
    ledger: PrivacyLedger,
) -> None:
    churn = DpSgdEvent(1.5, 0.04, 1000)
    response = DpSgdEvent(1.1, 0.02, 500)
    query = GaussianEvent(sigma=4.0, sensitivity=1.0)
    ledger.record("run-1", 0, CHURN, churn, now=NOW)
    ledger.record("run-2", 0, RESPONSE, response, now=NOW)
    ledger.record("run-2", 0, RESPONSE, query, now=NOW)  # same round, another kind

    assert ledger.epsilon(DELTA, purpose=CHURN) == pytest.approx(
        dp_sgd_epsilon([churn], DELTA), rel=1e-12
    )
    assert ledger.epsilon(DELTA, purpose=RESPONSE) == pytest.approx(
        dp_sgd_epsilon([response, query.as_dp_sgd()], DELTA), rel=1e-12
    )
    assert ledger.epsilon(DELTA) == pytest.approx(
        dp_sgd_epsilon([churn, response, query.as_dp_sgd()], DELTA), rel=1e-12
    )
    assert ledger.epsilon(DELTA) > ledger.epsilon(DELTA, purpose=CHURN)
    assert ledger.epsilon(DELTA) > ledger.epsilon(DELTA, purpose=RESPONSE)


# --- immutable events --------------------------------------------------------------------------


def test_replaying_a_round_changes_nothing(ledger: PrivacyLedger) -> None:
    event = DpSgdEvent(1.5, 0.04, 100)
    ledger.record("run-1", 3, CHURN, event, now=NOW)
    before = ledger.epsilon(DELTA)

    assert ledger.record("run-1", 3, CHURN, event, now=LATER) is False

    assert ledger.epsilon(DELTA) == before
    assert ledger.entries() == [LedgerEntry("run-1", 3, CHURN, event, recorded_at=NOW)]


def test_same_key_with_other_parameters_is_refused(ledger: PrivacyLedger) -> None:
    ledger.record("run-1", 3, CHURN, DpSgdEvent(1.5, 0.04, 100), now=NOW)

    with pytest.raises(ConfigurationError, match=r"round 3 of run 'run-1'.*never changes"):
        ledger.record("run-1", 3, CHURN, DpSgdEvent(1.5, 0.04, 101), now=LATER)

    assert ledger.entries() == [
        LedgerEntry("run-1", 3, CHURN, DpSgdEvent(1.5, 0.04, 100), recorded_at=NOW)
    ]


def test_stored_events_cannot_be_updated_or_deleted(ledger: PrivacyLedger) -> None:
    ledger.record("run-1", 0, CHURN, GOLDEN, now=NOW)
    connection = sqlite3.connect(ledger.path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="immutable"):
            connection.execute("UPDATE events SET steps = 1")
        with pytest.raises(sqlite3.IntegrityError, match="immutable"):
            connection.execute("DELETE FROM events")
    finally:
        connection.close()


def test_events_outlive_the_process(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with PrivacyLedger.open(path, unit=UNIT) as first:
        first.record("run-1", 0, CHURN, GOLDEN, now=NOW)

    with PrivacyLedger.open(path, unit=UNIT) as reopened:
        assert reopened.epsilon(DELTA) == pytest.approx(7.32911117143, rel=1e-6)


# --- budgets and reservations ------------------------------------------------------------------


def test_unset_budget_means_no_limit(ledger: PrivacyLedger) -> None:
    assert ledger.budget(CHURN) is None
    assert ledger.budget(None) is None

    reservation = ledger.reserve("run-1", CHURN, 1000.0, delta=DELTA, now=NOW)

    assert reservation == Reservation("run-1", CHURN, 1000.0, DELTA, reserved_at=NOW)


def test_latest_budget_counts(ledger: PrivacyLedger) -> None:
    ledger.set_budget(CHURN, 4.0, now=NOW)
    ledger.set_budget(CHURN, 6.0, now=LATER)
    ledger.set_budget(None, 10.0, now=LATER)

    assert ledger.budget(CHURN) == 6.0
    assert ledger.budget(None) == 10.0
    assert ledger.budget(RESPONSE) is None


def test_reservations_and_spending_are_checked_additively(ledger: PrivacyLedger) -> None:
    ledger.set_budget(CHURN, 4.0, now=NOW)
    first = ledger.reserve("run-1", CHURN, 3.0, delta=DELTA, now=NOW)

    with pytest.raises(BudgetExceeded) as refused:
        ledger.reserve("run-2", CHURN, 3.0, delta=DELTA, now=NOW)

    assert isinstance(refused.value, RefusedByUnit)
    assert refused.value.exit_code == 3
    message = str(refused.value)
    assert "unit 'retail'" in message
    assert "purpose 'churn_model'" in message
    assert "budget for purpose 'churn_model' is epsilon 4" in message
    assert "0 is spent and 3 is reserved" in message
    assert "epsilon 3 it asks for" in message
    assert "Ask for at most 1" in message
    assert "raise [privacy] budget or purpose_budgets in the unit's bu.toml" in message
    assert ledger.reservations() == [first]

    ledger.record("run-1", 0, CHURN, DpSgdEvent(1.5, 0.04, 400), now=NOW)
    spent = ledger.epsilon(DELTA, purpose=CHURN)
    assert 2.85 < spent < 2.95
    # while run-1 holds its reservation, its events count on top of it (conservative)
    assert not ledger.supports(CHURN, 1.0, delta=DELTA)
    assert ledger.release("run-1", CHURN, now=LATER) is True
    assert ledger.release("run-1", CHURN, now=LATER) is False

    assert ledger.supports(CHURN, 1.0, delta=DELTA)
    assert not ledger.supports(CHURN, 1.2, delta=DELTA)
    with pytest.raises(BudgetExceeded, match="unit 'retail' refuses run 'run-3'"):
        ledger.reserve("run-3", CHURN, 1.2, delta=DELTA, now=LATER)
    assert ledger.reserve("run-2", CHURN, 1.0, delta=DELTA, now=LATER).epsilon == 1.0


def test_unit_wide_budget_caps_all_purposes_together(ledger: PrivacyLedger) -> None:
    ledger.set_budget(None, 5.0, now=NOW)
    ledger.reserve("run-1", CHURN, 3.0, delta=DELTA, now=NOW)

    with pytest.raises(BudgetExceeded) as refused:
        ledger.reserve("run-2", RESPONSE, 3.0, delta=DELTA, now=NOW)

    assert "purpose 'response_model'" in str(refused.value)
    assert "budget for the whole unit (all purposes) is epsilon 5" in str(refused.value)
    assert ledger.reserve("run-2", RESPONSE, 2.0, delta=DELTA, now=NOW).epsilon == 2.0


def test_a_run_re_reserving_gets_its_reservation_back(ledger: PrivacyLedger) -> None:
    ledger.set_budget(CHURN, 4.0, now=NOW)
    first = ledger.reserve("run-1", CHURN, 3.0, delta=DELTA, now=NOW)

    again = ledger.reserve("run-1", CHURN, 3.0, delta=DELTA, now=LATER)

    assert again == first
    assert ledger.reservations() == [first]
    with pytest.raises(ConfigurationError, match="never changes"):
        ledger.reserve("run-1", CHURN, 2.0, delta=DELTA, now=LATER)


def test_a_released_run_reserves_again_under_the_same_check(ledger: PrivacyLedger) -> None:
    ledger.set_budget(CHURN, 4.0, now=NOW)
    ledger.reserve("run-1", CHURN, 3.0, delta=DELTA, now=NOW)
    ledger.release("run-1", CHURN, now=NOW)

    again = ledger.reserve("run-1", CHURN, 2.0, delta=DELTA, now=LATER)

    assert ledger.reservations() == [again]
    with pytest.raises(BudgetExceeded):
        ledger.reserve("run-2", CHURN, 2.5, delta=DELTA, now=LATER)


def test_checks_change_nothing(ledger: PrivacyLedger) -> None:
    ledger.set_budget(CHURN, 4.0, now=NOW)

    assert ledger.supports(CHURN, 4.0, delta=DELTA)
    assert not ledger.supports(CHURN, 4.5, delta=DELTA)
    assert ledger.reservations() == []


def test_summary_lists_each_purpose_and_the_unit(ledger: PrivacyLedger) -> None:
    ledger.set_budget(CHURN, 10.0, now=NOW)
    ledger.set_budget(None, 12.0, now=NOW)
    ledger.record("run-1", 0, CHURN, DpSgdEvent(1.5, 0.04, 1000), now=NOW)
    ledger.record("run-1", 1, CHURN, DpSgdEvent(1.5, 0.04, 1250), now=NOW)
    ledger.reserve("run-2", RESPONSE, 1.5, delta=DELTA, now=NOW)

    churn, response, total = ledger.summary(DELTA)

    spent = dp_sgd_epsilon([GOLDEN], DELTA)
    assert churn == BudgetLine(
        CHURN,
        budget=10.0,
        spent=pytest.approx(spent, rel=1e-9),
        reserved=0.0,
        remaining=pytest.approx(10.0 - spent, rel=1e-9),
        events=2,
    )
    assert response == BudgetLine(
        RESPONSE, budget=None, spent=0.0, reserved=1.5, remaining=None, events=0
    )
    assert total == BudgetLine(
        None,
        budget=12.0,
        spent=pytest.approx(spent, rel=1e-9),
        reserved=1.5,
        remaining=pytest.approx(12.0 - spent - 1.5, rel=1e-9),
        events=2,
    )


def test_bad_requests_are_refused_before_anything_is_written(ledger: PrivacyLedger) -> None:
    with pytest.raises(ConfigurationError, match="delta"):
        ledger.epsilon(0.0)
    with pytest.raises(ConfigurationError, match="finite epsilon above 0"):
        ledger.reserve("run-1", CHURN, float("nan"), delta=DELTA, now=NOW)
    with pytest.raises(ConfigurationError, match="not an epsilon"):
        ledger.set_budget(CHURN, -1.0, now=NOW)
    with pytest.raises(ConfigurationError, match="round number"):
        ledger.record("run-1", -1, CHURN, GOLDEN, now=NOW)
    with pytest.raises(ConfigurationError, match="a purpose"):
        ledger.record("run-1", 0, "", GOLDEN, now=NOW)

    assert ledger.summary(DELTA) == [
        BudgetLine(None, budget=None, spent=0.0, reserved=0.0, remaining=None, events=0)
    ]


# --- atomic reservations across processes ------------------------------------------------------

# Each worker opens every trial's ledger, then per trial: says it is ready, waits for the go file,
# and tries to reserve 3 of the budget of 4. The import of Opacus happens once, before any trial.
WORKER = """
import sys, time
from datetime import datetime
from pathlib import Path
from privacy.ledger import BudgetExceeded, PrivacyLedger

folder, name, trials = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
ledgers = [PrivacyLedger.open(folder / f"ledger-{t}.sqlite", unit="retail") for t in range(trials)]
for trial, ledger in enumerate(ledgers):
    (folder / f"ready-{trial}-{name}").touch()
    while not (folder / f"go-{trial}").exists():
        time.sleep(0.0005)
    try:
        ledger.reserve(f"run-{name}", "churn_model", 3.0, delta=1e-5, now=datetime(2024, 7, 1))
        print("reserved", flush=True)
    except BudgetExceeded:
        print("refused", flush=True)
"""


def test_two_processes_cannot_both_take_the_last_of_a_budget(tmp_path: Path) -> None:
    trials = 4
    for trial in range(trials):
        with PrivacyLedger.open(tmp_path / f"ledger-{trial}.sqlite", unit=UNIT) as ledger:
            ledger.set_budget(CHURN, 4.0, now=NOW)
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tmp_path), name, str(trials)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    try:
        for trial in range(trials):
            deadline = time.monotonic() + 60
            while not all((tmp_path / f"ready-{trial}-{n}").exists() for n in ("a", "b")):
                assert all(w.poll() is None for w in workers), "a worker died"
                assert time.monotonic() < deadline, "workers never got ready"
                time.sleep(0.001)
            (tmp_path / f"go-{trial}").touch()
        outputs = [w.communicate(timeout=60)[0].split() for w in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()

    assert [w.returncode for w in workers] == [0, 0]
    for trial in range(trials):
        assert sorted(output[trial] for output in outputs) == ["refused", "reserved"]
        with PrivacyLedger.open(tmp_path / f"ledger-{trial}.sqlite", unit=UNIT) as ledger:
            (held,) = ledger.reservations()
            assert held.epsilon == 3.0


# --- the file ----------------------------------------------------------------------------------


def test_file_has_the_latest_schema_version(ledger: PrivacyLedger) -> None:
    connection = sqlite3.connect(ledger.path)
    try:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == 3
    finally:
        connection.close()
    assert ledger.path.name == "ledger.sqlite"


def test_another_units_ledger_is_refused(ledger: PrivacyLedger) -> None:
    with pytest.raises(ConfigurationError, match="belongs to unit 'retail', not 'telecom'"):
        PrivacyLedger.open(ledger.path, unit="telecom")


def test_a_version_1_ledger_is_migrated_forward_with_its_events(tmp_path) -> None:
    from privacy.ledger import _MIGRATIONS
    from privacy.store import open_store

    path = tmp_path / "ledger.sqlite"
    old = open_store(path, _MIGRATIONS[:1], name="privacy ledger")
    old.execute("INSERT INTO ledger (unit) VALUES ('retail')")
    old.execute(
        "INSERT INTO events VALUES ('run-1', 1, 'churn_model', 'dp_sgd', 1.5, 0.04, 2250, NULL, NULL, "
        "'2026-01-01T00:00:00.000000')"
    )
    old.commit()
    old.close()
    with PrivacyLedger.open(path, unit="retail") as migrated:
        assert migrated.epsilon(1e-5) == pytest.approx(7.32911117143, rel=1e-6)
        migrated.record("run-2", 1, "segment_stats", LaplaceEvent(2.0, 1.0), now=NOW)
        assert sorted(type(e.event).__name__ for e in migrated.entries()) == [
            "DpSgdEvent",
            "LaplaceEvent",
        ]
        assert {e.part for e in migrated.entries()} == {"all"}  # v3: earlier events touched all
        with pytest.raises(sqlite3.DatabaseError, match="immutable"):
            migrated._connection.execute("DELETE FROM events")


def test_training_and_held_out_releases_of_a_run_compose_in_parallel(
    ledger: PrivacyLedger,
) -> None:
    from privacy.accounting import composed_epsilon

    training = DpSgdEvent(1.5, 0.04, 2250)
    evaluation = GaussianEvent(sigma=4.0, sensitivity=1.0)
    ledger.record("run-1", 1, "churn_model", training, now=NOW, part="train")
    ledger.record("run-1", 2, "churn_model", evaluation, now=NOW, part="holdout")
    # disjoint customers: the run costs the larger of the two, not their composition
    alone = composed_epsilon([training], 1e-5)
    assert ledger.epsilon(1e-5, run_id="run-1") == pytest.approx(alone, rel=1e-9)
    both = composed_epsilon([training, evaluation.as_dp_sgd()], 1e-5)
    assert both > alone
    # a release touching every customer composes with both sides; a second run adds up
    ledger.record("run-1", 3, "churn_model", evaluation, now=NOW)
    assert ledger.epsilon(1e-5, run_id="run-1") == pytest.approx(both, rel=1e-9)
    ledger.record("run-2", 1, "churn_model", training, now=NOW, part="holdout")
    assert ledger.epsilon(1e-5) == pytest.approx(
        composed_epsilon([training, evaluation.as_dp_sgd(), training], 1e-5), rel=1e-9
    )
    assert [e.part for e in ledger.entries()] == ["train", "holdout", "all", "holdout"]
    with pytest.raises(ConfigurationError, match="not one of"):
        ledger.record("run-3", 1, "churn_model", training, now=NOW, part="test")
    with pytest.raises(ConfigurationError, match="never changes"):
        ledger.record("run-1", 1, "churn_model", training, now=NOW, part="holdout")


def test_laplace_events_compose_with_the_rest(ledger: PrivacyLedger) -> None:
    ledger.record("q", 1, "segment_stats", LaplaceEvent(scale=10.0, sensitivity=1.0), now=NOW)
    assert ledger.epsilon(1e-6, purpose="segment_stats") == pytest.approx(0.1)  # pure, alone
    for n in range(2, 101):
        ledger.record("q", n, "segment_stats", LaplaceEvent(scale=10.0, sensitivity=1.0), now=NOW)
    eight = ledger.epsilon(1e-6, purpose="segment_stats")
    assert eight < 0.75 * 100 * 0.1  # over 100 releases RDP composition beats adding epsilons
    ledger.record("m", 1, "churn_model", DpSgdEvent(1.5, 0.04, 100), now=NOW)
    churn = ledger.epsilon(1e-6, purpose="churn_model")
    assert ledger.epsilon(1e-6) > max(eight, churn)  # the BU-wide figure composes both
