"""Consent evaluation (privacy/consent.py): the latest event at or before `as_of` decides, a
revocation wins a tie, and a unit without any record for the purpose refuses."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.consent import CONSENT_COLUMNS, Exclusion, consented_customers
from privacy.errors import ConsentMissing

CHURN = "churn_model"
RESPONSE = "response_model"
T0 = datetime(2024, 1, 1)


def events(*rows: tuple[str, str, bool, datetime]) -> pd.DataFrame:
    """A consent table as a silo holds it: naive timestamps, read as UTC."""
    frame = pd.DataFrame(list(rows), columns=list(CONSENT_COLUMNS))
    frame["timestamp"] = pd.to_datetime(frame["timestamp"])
    frame["granted"] = frame["granted"].astype(bool)
    return frame


def day(n: int) -> datetime:
    return T0 + timedelta(days=n)


def test_latest_event_wins() -> None:
    table = events(
        ("a", CHURN, True, day(1)),
        ("a", CHURN, False, day(2)),
        ("a", CHURN, True, day(3)),  # granted again after revoking
        ("b", CHURN, False, day(1)),
        ("b", CHURN, True, day(2)),
        ("c", CHURN, True, day(1)),
        ("c", CHURN, False, day(3)),
    )

    decision = consented_customers(["a", "b", "c"], table, CHURN, day(10), unit="retail")

    assert decision.consented == frozenset({"a", "b"})
    assert decision.excluded == {Exclusion.NO_CONSENT: 0, Exclusion.REVOKED: 1}


def test_revocation_wins_a_tie_with_a_grant() -> None:
    # Both orders of the rows in the table: the order must not matter.
    for rows in (
        [("a", CHURN, True, day(1)), ("a", CHURN, False, day(1))],
        [("a", CHURN, False, day(1)), ("a", CHURN, True, day(1))],
    ):
        decision = consented_customers(["a"], events(*rows), CHURN, day(2), unit="retail")

        assert decision.consented == frozenset()
        assert decision.excluded == {Exclusion.NO_CONSENT: 0, Exclusion.REVOKED: 1}


def test_events_after_as_of_are_ignored() -> None:
    table = events(
        ("a", CHURN, True, day(1)),
        ("a", CHURN, False, day(5)),  # revoked later: still consented as of day 3
        ("b", CHURN, True, day(5)),  # granted later: no consent yet as of day 3
    )

    decision = consented_customers(["a", "b"], table, CHURN, day(3), unit="retail")

    assert decision.consented == frozenset({"a"})
    assert decision.excluded == {Exclusion.NO_CONSENT: 1, Exclusion.REVOKED: 0}


def test_event_exactly_at_as_of_counts() -> None:
    table = events(("a", CHURN, True, day(1)), ("a", CHURN, False, day(3)))

    decision = consented_customers(["a"], table, CHURN, day(3), unit="retail")

    assert decision.consented == frozenset()
    assert decision.excluded[Exclusion.REVOKED] == 1


def test_customer_without_any_event_counts_as_no_consent() -> None:
    table = events(("a", CHURN, True, day(1)))

    decision = consented_customers(["a", "b", "c"], table, CHURN, day(2), unit="retail")

    assert decision.consented == frozenset({"a"})
    assert decision.excluded == {Exclusion.NO_CONSENT: 2, Exclusion.REVOKED: 0}


def test_consent_for_another_purpose_does_not_count() -> None:
    table = events(("a", CHURN, True, day(1)), ("b", RESPONSE, True, day(1)))

    decision = consented_customers(["a", "b"], table, CHURN, day(2), unit="retail")

    assert decision.consented == frozenset({"a"})
    assert decision.excluded == {Exclusion.NO_CONSENT: 1, Exclusion.REVOKED: 0}


def test_latest_revocation_counts_as_revoked() -> None:
    table = events(("a", CHURN, True, day(1)), ("a", CHURN, False, day(2)))

    decision = consented_customers(["a"], table, CHURN, day(3), unit="retail")

    assert decision.consented == frozenset()
    assert decision.excluded == {Exclusion.NO_CONSENT: 0, Exclusion.REVOKED: 1}


def test_timezone_aware_as_of_is_compared_in_utc_with_naive_timestamps() -> None:
    table = events(
        ("a", CHURN, True, datetime(2024, 3, 1, 10, 0)),
        ("b", CHURN, True, datetime(2024, 3, 1, 11, 0)),
    )

    at_utc = consented_customers(
        ["a", "b"], table, CHURN, datetime(2024, 3, 1, 10, 30, tzinfo=UTC), unit="retail"
    )
    # 12:30 at UTC+2 is 10:30 UTC: the same cut-off, not 12:30 naive.
    at_plus_two = consented_customers(
        ["a", "b"],
        table,
        CHURN,
        datetime(2024, 3, 1, 12, 30, tzinfo=timezone(timedelta(hours=2))),
        unit="retail",
    )

    for decision in (at_utc, at_plus_two):
        assert decision.consented == frozenset({"a"})
        assert decision.excluded == {Exclusion.NO_CONSENT: 1, Exclusion.REVOKED: 0}


def test_unit_without_events_for_the_purpose_refuses_naming_unit_and_purpose() -> None:
    table = events(("a", RESPONSE, True, day(1)))

    with pytest.raises(ConsentMissing) as raised:
        consented_customers(["a"], table, CHURN, day(2), unit="retail_stores")

    message = str(raised.value)
    assert "'retail_stores'" in message
    assert f"'{CHURN}'" in message


# --- property: the decision equals a brute-force reading of the history ------------------------

TIMES = [datetime(2024, 1, 1) + timedelta(hours=6 * i) for i in range(3)]
AS_OF = [
    *TIMES,
    TIMES[0] - timedelta(hours=1),
    TIMES[2] + timedelta(hours=1),
    TIMES[-1] + (TIMES[1] - TIMES[0]),
]
PURPOSES = (CHURN, RESPONSE)


def reference(
    customers: list[str], history: list[tuple[str, str, bool, datetime]], purpose: str, as_of
) -> tuple[set[str], int, int]:
    """(consented, no_consent, revoked) computed the slow, obvious way."""
    consented: set[str] = set()
    no_consent = revoked = 0
    for customer in customers:
        mine = [(t, g) for c, p, g, t in history if c == customer and p == purpose and t <= as_of]
        if not mine:
            no_consent += 1
            continue
        latest = max(t for t, _ in mine)
        if any(not g for t, g in mine if t == latest):
            revoked += 1
        else:
            consented.add(customer)
    return consented, no_consent, revoked


@st.composite
def histories(draw: st.DrawFn):
    n_customers = draw(st.integers(min_value=1, max_value=5))
    # Some registry entries belong to people who are not among the unit's customers ("x9").
    ids = [f"c{i}" for i in range(n_customers)] + ["x9"]
    event = st.tuples(
        st.sampled_from(ids),
        st.sampled_from(PURPOSES),
        st.booleans(),
        st.sampled_from(TIMES),
    )
    history = draw(st.lists(event, max_size=25))
    return ids[:-1], history, draw(st.sampled_from(AS_OF)), draw(st.sampled_from(PURPOSES))


@settings(max_examples=150, deadline=None)
@given(histories())
def test_consented_set_equals_brute_force_reference(case) -> None:
    customers, history, as_of, purpose = case
    table = events(*history) if history else pd.DataFrame(columns=list(CONSENT_COLUMNS))

    if not any(p == purpose for _, p, _, _ in history):
        with pytest.raises(ConsentMissing):
            consented_customers(customers, table, purpose, as_of, unit="retail")
        return

    decision = consented_customers(customers, table, purpose, as_of, unit="retail")

    consented, no_consent, revoked = reference(customers, history, purpose, as_of)
    assert decision.consented == frozenset(consented)
    assert decision.excluded == {Exclusion.NO_CONSENT: no_consent, Exclusion.REVOKED: revoked}
    assert sum(decision.excluded.values()) == len(customers) - len(decision.consented)
