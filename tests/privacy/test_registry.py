"""The consent registry (privacy/registry.py) and run lineage (privacy/lineage.py) of one BU:
validated, idempotent imports; erasure that sticks; decisions that refuse a purpose without
events; lineage that can answer "which runs used this customer" without holding ids in clear."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest

from privacy.consent import Exclusion
from privacy.errors import ConfigurationError, ConsentMissing
from privacy.lineage import Lineage, customer_digest
from privacy.registry import ConsentRegistry, ImportResult

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
CHURN = "churn_model"
RESPONSE = "response_model"
IMPORTED_AT = datetime(2024, 7, 1, 12, 0)
JOB_START = datetime(2024, 6, 1)

CONSENT_CSV = """customer_id,purpose,granted,timestamp,guardian
alice,churn_model,true,2024-01-01T09:00:00,
alice,response_model,yes,2024-01-02T09:00:00Z,
bob,churn_model,1,2024-01-03T11:00:00+02:00,no
carol,churn_model,false,2024-01-04,false
kid,churn_model,TRUE,2024-01-05,Yes
"""


def counts(**reasons: int) -> dict[str, int]:
    return {reason: reasons.get(reason, 0) for reason in Exclusion.ALL}


@pytest.fixture()
def registry(tmp_path: Path):
    with ConsentRegistry.open(tmp_path / "home" / "consent.sqlite", unit="retail") as opened:
        yield opened


@pytest.fixture()
def consent_file(tmp_path: Path) -> Path:
    path = tmp_path / "consent.csv"
    path.write_text(CONSENT_CSV)
    return path


def write_csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "export.csv"
    path.write_text(text)
    return path


# --- import ------------------------------------------------------------------------------------


def test_import_stores_validated_events_in_utc(registry, consent_file: Path) -> None:
    result = registry.import_file(consent_file, tombstone_key=KEY, now=IMPORTED_AT)

    assert result == ImportResult(imported=5, duplicates=0, erased=0)
    assert registry.purposes() == frozenset({CHURN, RESPONSE})
    stored = registry.events()
    assert list(stored.columns) == ["customer_id", "purpose", "granted", "guardian", "timestamp"]
    assert stored["customer_id"].tolist() == ["alice", "alice", "bob", "carol", "kid"]
    assert stored["granted"].tolist() == [True, True, True, False, True]
    assert stored["guardian"].tolist() == [False, False, False, False, True]
    assert stored["timestamp"].dtype == "datetime64[ns]"
    assert stored["timestamp"].tolist() == [
        pd.Timestamp("2024-01-01 09:00"),
        pd.Timestamp("2024-01-02 09:00"),
        pd.Timestamp("2024-01-03 09:00"),  # 11:00 at UTC+2
        pd.Timestamp("2024-01-04 00:00"),
        pd.Timestamp("2024-01-05 00:00"),
    ]
    assert registry.events(RESPONSE)["customer_id"].tolist() == ["alice"]


def test_importing_the_same_file_twice_adds_nothing(registry, consent_file: Path) -> None:
    registry.import_file(consent_file, tombstone_key=KEY, now=IMPORTED_AT)
    before = registry.events()

    again = registry.import_file(
        consent_file, tombstone_key=KEY, now=IMPORTED_AT + timedelta(days=1)
    )

    assert again == ImportResult(imported=0, duplicates=5, erased=0)
    pd.testing.assert_frame_equal(registry.events(), before)


def test_a_row_repeated_within_one_import_is_a_duplicate(registry) -> None:
    events = pd.DataFrame(
        {
            "customer_id": ["a", "a", "b"],
            "purpose": [CHURN, CHURN, CHURN],
            "granted": [True, True, True],
            "timestamp": ["2024-01-01", "2024-01-01T00:00:00Z", "2024-01-01"],
        }
    )

    result = registry.import_events(events, source="crm export", tombstone_key=KEY)

    assert result == ImportResult(imported=2, duplicates=1, erased=0)


def test_parquet_import_accepts_typed_columns(registry, tmp_path: Path) -> None:
    path = tmp_path / "consent.parquet"
    pd.DataFrame(
        {
            "customer_id": [1001, 1002],  # integer ids, as a Parquet export may type them
            "purpose": [CHURN, CHURN],
            "granted": [True, False],
            "guardian": [False, True],
            "timestamp": pd.to_datetime(["2024-01-01 10:00", "2024-01-02 10:00"]).tz_localize(
                "Europe/Paris"
            ),
        }
    ).to_parquet(path)

    result = registry.import_file(path, tombstone_key=KEY)

    assert result == ImportResult(imported=2, duplicates=0, erased=0)
    stored = registry.events()
    assert stored["customer_id"].tolist() == ["1001", "1002"]
    assert stored["timestamp"].tolist() == [
        pd.Timestamp("2024-01-01 09:00"),
        pd.Timestamp("2024-01-02 09:00"),
    ]


HEADER = "customer_id,purpose,granted,timestamp,guardian\nok,churn_model,true,2024-01-01,\n"


@pytest.mark.parametrize(
    ("row", "column", "problem"),
    [
        (",churn_model,true,2024-01-02,", "customer_id", "not a non-empty text (value nan)"),
        ("x,   ,true,2024-01-02,", "purpose", "not a non-empty text (value '   ')"),
        ("x,churn_model,maybe,2024-01-02,", "granted", "not a boolean"),
        ("x,churn_model,,2024-01-02,", "granted", "not a boolean"),
        ("x,churn_model,true,2024-01-02,2", "guardian", "not a boolean"),
        ("x,churn_model,true,yesterday,", "timestamp", "not an ISO 8601 time"),
        ("x,churn_model,true,2024-13-45,", "timestamp", "not an ISO 8601 time"),
        ("x,churn_model,true,,", "timestamp", "not an ISO 8601 time"),
    ],
)
def test_bad_value_is_refused_naming_file_column_and_row(
    registry, tmp_path: Path, row: str, column: str, problem: str
) -> None:
    path = write_csv(tmp_path, HEADER + row + "\n")

    with pytest.raises(ConfigurationError) as raised:
        registry.import_file(path, tombstone_key=KEY)

    message = str(raised.value)
    assert message.startswith(f"{path}: column '{column}', row 2: {problem}")
    assert raised.value.exit_code == 2
    assert registry.events().empty  # nothing of a bad file is stored


def test_missing_column_is_refused_naming_file_and_column(registry, tmp_path: Path) -> None:
    path = write_csv(tmp_path, "customer_id,purpose,timestamp\na,churn_model,2024-01-01\n")

    with pytest.raises(ConfigurationError) as raised:
        registry.import_file(path, tombstone_key=KEY)

    assert str(raised.value).startswith(f"{path}: missing column(s) ['granted']")


def test_unsupported_or_missing_file_is_refused_naming_it(registry, tmp_path: Path) -> None:
    json_file = tmp_path / "consent.json"
    json_file.write_text("[]")

    with pytest.raises(ConfigurationError, match=r"consent\.json: unsupported file type '\.json'"):
        registry.import_file(json_file, tombstone_key=KEY)
    with pytest.raises(ConfigurationError, match=r"absent\.csv: no such consent file"):
        registry.import_file(tmp_path / "absent.csv", tombstone_key=KEY)


def test_text_na_is_a_customer_id_not_a_missing_value(registry, tmp_path: Path) -> None:
    path = write_csv(
        tmp_path, "customer_id,purpose,granted,timestamp\nNA,churn_model,true,2024-01-01\n"
    )

    registry.import_file(path, tombstone_key=KEY)

    assert registry.events()["customer_id"].tolist() == ["NA"]


# --- erasure -----------------------------------------------------------------------------------


def test_erase_removes_events_and_keeps_a_tombstone(registry, consent_file: Path) -> None:
    registry.import_file(consent_file, tombstone_key=KEY)

    removed = registry.erase("alice", tombstone_key=KEY, now=IMPORTED_AT)

    assert removed == 2
    assert registry.is_erased("alice", tombstone_key=KEY)
    assert not registry.is_erased("bob", tombstone_key=KEY)
    assert "alice" not in set(registry.events()["customer_id"])
    assert registry.export_events("alice") == []
    assert stored(registry.path, "SELECT digest, erased_at FROM tombstones") == [
        (customer_digest(KEY, "alice"), "2024-07-01T12:00:00.000000")
    ]


def test_erasing_again_removes_nothing_and_keeps_the_first_time(
    registry, consent_file: Path
) -> None:
    registry.import_file(consent_file, tombstone_key=KEY)
    registry.erase("alice", tombstone_key=KEY, now=IMPORTED_AT)

    again = registry.erase("alice", tombstone_key=KEY, now=IMPORTED_AT + timedelta(days=3))

    assert again == 0
    assert stored(registry.path, "SELECT erased_at FROM tombstones") == [
        ("2024-07-01T12:00:00.000000",)
    ]


def test_reimport_does_not_bring_an_erased_customer_back(registry, consent_file: Path) -> None:
    registry.import_file(consent_file, tombstone_key=KEY)
    registry.erase("alice", tombstone_key=KEY, now=IMPORTED_AT)

    result = registry.import_file(consent_file, tombstone_key=KEY)

    assert result == ImportResult(imported=0, duplicates=3, erased=2)
    assert "alice" not in set(registry.events()["customer_id"])


def test_erased_customer_leaves_no_clear_id_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "consent.sqlite"
    victim = "cust-erase-me-0001"
    with ConsentRegistry.open(path, unit="retail") as registry:
        events = pd.DataFrame(
            {
                "customer_id": [victim, victim, "cust-keep-0002"],
                "purpose": [CHURN, RESPONSE, CHURN],
                "granted": [True, True, True],
                "timestamp": ["2024-01-01", "2024-01-02", "2024-01-01"],
            }
        )
        registry.import_events(events, source="crm", tombstone_key=KEY)
        assert victim.encode() in path.read_bytes() + _wal(path)

        registry.erase(victim, tombstone_key=KEY, now=IMPORTED_AT)

        on_disk = path.read_bytes() + _wal(path)
        assert victim.encode() not in on_disk
        assert b"cust-keep-0002" in on_disk


def stored(path: Path, query: str) -> list[tuple]:
    """Rows read straight from the SQLite file, as another tool would see them."""
    connection = sqlite3.connect(path)
    try:
        return connection.execute(query).fetchall()
    finally:
        connection.close()


def _wal(path: Path) -> bytes:
    wal = path.with_name(path.name + "-wal")
    return wal.read_bytes() if wal.exists() else b""


# --- decisions ---------------------------------------------------------------------------------


def test_decision_refuses_a_purpose_without_events(registry, consent_file: Path) -> None:
    registry.import_file(consent_file, tombstone_key=KEY)

    with pytest.raises(ConsentMissing) as raised:
        registry.decision(["alice"], "ltv_model", as_of=JOB_START, tombstone_key=KEY)

    message = str(raised.value)
    assert raised.value.exit_code == 3
    assert "unit 'retail'" in message
    assert "purpose 'ltv_model'" in message
    assert "import one with `silofed consent import --bu-config BU.toml FILE`" in message


def test_decision_counts_erased_customers_as_erased(registry, consent_file: Path) -> None:
    registry.import_file(consent_file, tombstone_key=KEY)
    registry.erase("bob", tombstone_key=KEY, now=IMPORTED_AT)

    decision = registry.decision(
        ["alice", "bob", "carol", "dave"], CHURN, as_of=JOB_START, tombstone_key=KEY
    )

    assert decision.consented == frozenset({"alice"})
    assert decision.excluded == counts(erased=1, revoked=1, no_consent=1)


def test_decision_applies_the_minor_rule_with_guardian_flags(registry, consent_file: Path) -> None:
    registry.import_file(consent_file, tombstone_key=KEY)
    ages = pd.Series({"alice": 40, "bob": 15, "kid": 12})

    decision = registry.decision(
        ["alice", "bob", "kid"],
        CHURN,
        as_of=JOB_START,
        ages=ages,
        minor_age=16,
        tombstone_key=KEY,
    )

    assert decision.consented == frozenset({"alice", "kid"})  # kid's grant is a guardian's
    assert decision.excluded == counts(minor=1)


def test_revocation_imported_during_a_job_excludes_from_the_next_round(registry) -> None:
    grants = pd.DataFrame(
        {
            "customer_id": ["a", "b"],
            "purpose": [CHURN, CHURN],
            "granted": ["true", "true"],
            "timestamp": ["2024-05-01", "2024-05-01"],
        }
    )
    registry.import_events(grants, source="crm", tombstone_key=KEY)
    first_round = registry.decision(
        ["a", "b"], CHURN, as_of=JOB_START, now=JOB_START, tombstone_key=KEY
    )
    revocation = grants.iloc[:1].assign(granted="false", timestamp="2024-06-02T08:00:00Z")
    registry.import_events(revocation, source="crm", tombstone_key=KEY)
    round_time = datetime(2024, 6, 2, 9, 0, tzinfo=UTC)

    next_round = registry.decision(
        ["a", "b"], CHURN, as_of=JOB_START, now=round_time, tombstone_key=KEY
    )
    # now=None evaluates the job's start only, as the first round did: the caller passes the
    # round's time for every later round.
    start_only = registry.decision(["a", "b"], CHURN, as_of=JOB_START, tombstone_key=KEY)

    assert first_round.consented == frozenset({"a", "b"})
    assert next_round.consented == frozenset({"b"})
    assert next_round.excluded == counts(revoked=1)
    assert start_only.consented == frozenset({"a", "b"})


def test_decision_with_another_key_does_not_see_the_tombstones(registry, consent_file) -> None:
    registry.import_file(consent_file, tombstone_key=KEY)
    registry.erase("bob", tombstone_key=KEY, now=IMPORTED_AT)

    assert not registry.is_erased("bob", tombstone_key=OTHER_KEY)


def test_weak_key_is_refused(registry, consent_file: Path) -> None:
    with pytest.raises(ConfigurationError, match="at least 32 random bytes"):
        registry.import_file(consent_file, tombstone_key=b"short")
    with (
        Lineage.open(registry.path.with_name("lineage.sqlite")) as lineage,
        pytest.raises(ConfigurationError, match="at least 32 random bytes"),
    ):
        lineage.record("run-a", ["alice"], key=KEY[:31], purpose=CHURN, now=IMPORTED_AT)


# --- access requests and ownership ---------------------------------------------------------------


def test_export_events_gives_a_customers_events_as_json_ready_dicts(
    registry, consent_file: Path
) -> None:
    registry.import_file(consent_file, tombstone_key=KEY, now=IMPORTED_AT)

    exported = registry.export_events("alice")

    assert exported == [
        {
            "customer_id": "alice",
            "purpose": CHURN,
            "granted": True,
            "guardian": False,
            "timestamp": "2024-01-01T09:00:00+00:00",
            "source": str(consent_file),
            "imported_at": "2024-07-01T12:00:00+00:00",
        },
        {
            "customer_id": "alice",
            "purpose": RESPONSE,
            "granted": True,
            "guardian": False,
            "timestamp": "2024-01-02T09:00:00+00:00",
            "source": str(consent_file),
            "imported_at": "2024-07-01T12:00:00+00:00",
        },
    ]
    assert registry.export_events("nobody") == []


def test_registry_of_another_unit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "consent.sqlite"
    ConsentRegistry.open(path, unit="retail").close()

    with pytest.raises(ConfigurationError, match="belongs to unit 'retail', not 'ecommerce'"):
        ConsentRegistry.open(path, unit="ecommerce")


def test_registry_carries_schema_version_one(tmp_path: Path) -> None:
    path = tmp_path / "consent.sqlite"
    ConsentRegistry.open(path, unit="retail").close()

    assert stored(path, "PRAGMA user_version") == [(1,)]


# --- lineage -----------------------------------------------------------------------------------

RUN_AT = datetime(2024, 6, 1, 8, 0, tzinfo=timezone(timedelta(hours=2)))


def test_lineage_answers_which_runs_used_a_customer(tmp_path: Path) -> None:
    with Lineage.open(tmp_path / "lineage.sqlite") as lineage:
        lineage.record("run-b", ["alice", "bob"], key=KEY, purpose=CHURN, now=RUN_AT)
        lineage.record("run-a", ["alice"], key=KEY, purpose=RESPONSE, now=RUN_AT)

        assert lineage.runs_using("alice", key=KEY) == ["run-a", "run-b"]
        assert lineage.runs_using("bob", key=KEY) == ["run-b"]
        assert lineage.runs_using("carol", key=KEY) == []
        assert lineage.runs_using("alice", key=OTHER_KEY) == []
        assert lineage.runs() == ["run-a", "run-b"]


def test_recording_a_run_again_changes_nothing(tmp_path: Path) -> None:
    with Lineage.open(tmp_path / "lineage.sqlite") as lineage:
        lineage.record("run-a", ["alice", "bob", "alice"], key=KEY, purpose=CHURN, now=RUN_AT)
        lineage.record(
            "run-a", ["bob", "carol"], key=KEY, purpose=CHURN, now=RUN_AT + timedelta(hours=1)
        )

        rows = stored(lineage.path, "SELECT purpose, digest, recorded_at FROM run_customers")
        first, later = "2024-06-01T06:00:00.000000", "2024-06-01T07:00:00.000000"
        assert sorted(rows) == sorted(
            [
                (CHURN, customer_digest(KEY, "alice"), first),
                (CHURN, customer_digest(KEY, "bob"), first),
                (CHURN, customer_digest(KEY, "carol"), later),
            ]
        )
        assert lineage.runs_using("bob", key=KEY) == ["run-a"]


def test_a_run_is_recorded_under_one_purpose(tmp_path: Path) -> None:
    with Lineage.open(tmp_path / "lineage.sqlite") as lineage:
        lineage.record("run-a", ["alice"], key=KEY, purpose=CHURN, now=RUN_AT)

        with pytest.raises(ConfigurationError, match="recorded for purpose 'churn_model'"):
            lineage.record("run-a", ["bob"], key=KEY, purpose=RESPONSE, now=RUN_AT)


def test_lineage_file_holds_no_customer_id_in_clear(tmp_path: Path) -> None:
    path = tmp_path / "lineage.sqlite"
    ids = [f"customer-{i:05d}" for i in range(200)]
    with Lineage.open(path) as lineage:
        lineage.record("run-a", ids, key=KEY, purpose=CHURN, now=RUN_AT)
        on_disk = path.read_bytes() + _wal(path)

    assert customer_digest(KEY, ids[0]).encode() in on_disk  # the scan does see the rows
    assert b"customer-" not in on_disk
    assert b"customer-" not in path.read_bytes() + _wal(path)  # and after the checkpoint on close
