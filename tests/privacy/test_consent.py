"""Consent evaluation (privacy/consent.py): the latest event at or before `as_of` decides, a
revocation wins a tie, and a unit without any record for the purpose refuses."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.consent import CONSENT_COLUMNS, Exclusion, consented_customers
from privacy.errors import ConfigurationError, ConsentMissing

CHURN = "churn_model"
RESPONSE = "response_model"
T0 = datetime(2024, 1, 1)


def events(*rows: tuple[str, str, bool, datetime]) -> pd.DataFrame:
    """A consent table as a silo holds it: naive timestamps, read as UTC."""
    frame = pd.DataFrame(list(rows), columns=list(CONSENT_COLUMNS))
    frame["timestamp"] = pd.to_datetime(frame["timestamp"])
    frame["granted"] = frame["granted"].astype(bool)
    return frame


def counts(**reasons: int) -> dict[str, int]:
    """A decision's `excluded`: every reason of `Exclusion.ALL`, zero unless given."""
    assert set(reasons) <= set(Exclusion.ALL)
    return {reason: reasons.get(reason, 0) for reason in Exclusion.ALL}


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
    assert decision.excluded == counts(no_consent=0, revoked=1)


def test_revocation_wins_a_tie_with_a_grant() -> None:
    # Both orders of the rows in the table: the order must not matter.
    for rows in (
        [("a", CHURN, True, day(1)), ("a", CHURN, False, day(1))],
        [("a", CHURN, False, day(1)), ("a", CHURN, True, day(1))],
    ):
        decision = consented_customers(["a"], events(*rows), CHURN, day(2), unit="retail")

        assert decision.consented == frozenset()
        assert decision.excluded == counts(no_consent=0, revoked=1)


def test_events_after_as_of_are_ignored() -> None:
    table = events(
        ("a", CHURN, True, day(1)),
        ("a", CHURN, False, day(5)),  # revoked later: still consented as of day 3
        ("b", CHURN, True, day(5)),  # granted later: no consent yet as of day 3
    )

    decision = consented_customers(["a", "b"], table, CHURN, day(3), unit="retail")

    assert decision.consented == frozenset({"a"})
    assert decision.excluded == counts(no_consent=1, revoked=0)


def test_event_exactly_at_as_of_counts() -> None:
    table = events(("a", CHURN, True, day(1)), ("a", CHURN, False, day(3)))

    decision = consented_customers(["a"], table, CHURN, day(3), unit="retail")

    assert decision.consented == frozenset()
    assert decision.excluded[Exclusion.REVOKED] == 1


def test_customer_without_any_event_counts_as_no_consent() -> None:
    table = events(("a", CHURN, True, day(1)))

    decision = consented_customers(["a", "b", "c"], table, CHURN, day(2), unit="retail")

    assert decision.consented == frozenset({"a"})
    assert decision.excluded == counts(no_consent=2, revoked=0)


def test_consent_for_another_purpose_does_not_count() -> None:
    table = events(("a", CHURN, True, day(1)), ("b", RESPONSE, True, day(1)))

    decision = consented_customers(["a", "b"], table, CHURN, day(2), unit="retail")

    assert decision.consented == frozenset({"a"})
    assert decision.excluded == counts(no_consent=1, revoked=0)


def test_latest_revocation_counts_as_revoked() -> None:
    table = events(("a", CHURN, True, day(1)), ("a", CHURN, False, day(2)))

    decision = consented_customers(["a"], table, CHURN, day(3), unit="retail")

    assert decision.consented == frozenset()
    assert decision.excluded == counts(no_consent=0, revoked=1)


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
        assert decision.excluded == counts(no_consent=1, revoked=0)


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
    assert decision.excluded == counts(no_consent=no_consent, revoked=revoked)
    assert sum(decision.excluded.values()) == len(customers) - len(decision.consented)


# --- while a job runs: revocations count from the next round, grants never ----------------------

START = day(10)


def test_revoked_customer_is_excluded_from_next_round() -> None:
    table = events(
        ("a", CHURN, True, day(1)),
        ("a", CHURN, False, day(12)),  # revoked two days into the job
        ("b", CHURN, True, day(1)),
    )

    first_round = consented_customers(["a", "b"], table, CHURN, START, unit="retail", now=day(11))
    next_round = consented_customers(["a", "b"], table, CHURN, START, unit="retail", now=day(12))

    assert first_round.consented == frozenset({"a", "b"})
    assert next_round.consented == frozenset({"b"})
    assert next_round.excluded == counts(revoked=1)


def test_without_now_only_the_status_at_the_start_counts() -> None:
    table = events(("a", CHURN, True, day(1)), ("a", CHURN, False, day(12)))

    decision = consented_customers(["a"], table, CHURN, START, unit="retail")

    assert decision.consented == frozenset({"a"})
    assert decision.excluded == counts()


def test_grant_after_the_start_adds_nobody() -> None:
    table = events(
        ("a", CHURN, False, day(1)),
        ("a", CHURN, True, day(11)),  # re-granted during the job
        ("b", CHURN, True, day(11)),  # first grant during the job
        ("c", CHURN, True, day(1)),
    )

    decision = consented_customers(["a", "b", "c"], table, CHURN, START, unit="retail", now=day(20))

    assert decision.consented == frozenset({"c"})
    assert decision.excluded == counts(no_consent=1, revoked=1)


def test_revocation_then_regrant_during_the_job_stays_excluded() -> None:
    table = events(
        ("a", CHURN, True, day(1)),
        ("a", CHURN, False, day(11)),
        ("a", CHURN, True, day(12)),
    )

    decision = consented_customers(["a"], table, CHURN, START, unit="retail", now=day(13))

    assert decision.consented == frozenset()
    assert decision.excluded == counts(revoked=1)


def test_timezone_aware_now_is_compared_in_utc() -> None:
    table = events(
        ("a", CHURN, True, day(1)),
        ("a", CHURN, False, datetime(2024, 1, 12, 10, 0)),  # naive UTC
    )
    plus_two = timezone(timedelta(hours=2))

    # 11:30 at UTC+2 is 09:30 UTC: before the revocation.
    before = consented_customers(
        ["a"],
        table,
        CHURN,
        START,
        unit="retail",
        now=datetime(2024, 1, 12, 11, 30, tzinfo=plus_two),
    )
    # 12:30 at UTC+2 is 10:30 UTC: after it.
    after = consented_customers(
        ["a"],
        table,
        CHURN,
        START,
        unit="retail",
        now=datetime(2024, 1, 12, 12, 30, tzinfo=plus_two),
    )

    assert before.consented == frozenset({"a"})
    assert after.consented == frozenset()


def test_now_before_the_start_is_refused() -> None:
    table = events(("a", CHURN, True, day(1)))

    with pytest.raises(ConfigurationError, match="before the job's start"):
        consented_customers(["a"], table, CHURN, START, unit="retail", now=day(9))


# --- minors, erasure, and one reason per excluded customer ---------------------------------------


def with_guardian(frame: pd.DataFrame, *flags: bool) -> pd.DataFrame:
    return frame.assign(guardian=list(flags))


def test_minor_counts_only_with_a_guardians_grant() -> None:
    table = with_guardian(
        events(
            ("kid_alone", CHURN, True, day(1)),
            ("kid_guarded", CHURN, True, day(1)),
            ("adult", CHURN, True, day(1)),
        ),
        False,
        True,
        False,
    )
    ages = pd.Series({"kid_alone": 14, "kid_guarded": 14, "adult": 16})

    decision = consented_customers(
        ["kid_alone", "kid_guarded", "adult"],
        table,
        CHURN,
        START,
        unit="retail",
        ages=ages,
        minor_age=16,
    )

    assert decision.consented == frozenset({"kid_guarded", "adult"})
    assert decision.excluded == counts(minor=1)


def test_only_the_winning_grant_decides_the_guardian_question() -> None:
    # A guardian's grant, then the minor's own later grant: the later one decides.
    table = with_guardian(
        events(("kid", CHURN, True, day(1)), ("kid", CHURN, True, day(2))), True, False
    )

    decision = consented_customers(
        ["kid"], table, CHURN, START, unit="retail", ages=pd.Series({"kid": 12}), minor_age=16
    )

    assert decision.consented == frozenset()
    assert decision.excluded == counts(minor=1)


def test_without_a_guardian_column_no_grant_is_a_guardians() -> None:
    table = events(("kid", CHURN, True, day(1)))

    decision = consented_customers(
        ["kid"], table, CHURN, START, unit="retail", ages=pd.Series({"kid": 12}), minor_age=16
    )

    assert decision.excluded == counts(minor=1)


def test_customer_of_unknown_age_counts_as_a_minor() -> None:
    table = events(("a", CHURN, True, day(1)), ("b", CHURN, True, day(1)))
    ages = pd.Series({"a": float("nan")})  # "b" is not in the ages at all

    decision = consented_customers(
        ["a", "b"], table, CHURN, START, unit="retail", ages=ages, minor_age=16
    )

    assert decision.consented == frozenset()
    assert decision.excluded == counts(minor=2)


def test_minimum_age_without_ages_is_refused() -> None:
    table = events(("a", CHURN, True, day(1)))

    with pytest.raises(ConfigurationError, match="no ages were given"):
        consented_customers(["a"], table, CHURN, START, unit="retail", minor_age=16)


def test_two_ages_for_one_customer_are_refused() -> None:
    table = events(("a", CHURN, True, day(1)))
    ages = pd.Series([30, 12], index=["a", "a"])

    with pytest.raises(ConfigurationError, match="the ages name customer 'a' more than once"):
        consented_customers(["a"], table, CHURN, START, unit="retail", ages=ages, minor_age=16)


def test_textual_guardian_flags_are_refused_not_read_as_truthy() -> None:
    table = events(("kid", CHURN, True, day(1))).assign(guardian=["false"])

    with pytest.raises(ConfigurationError, match="'guardian' column holds non-boolean"):
        consented_customers(
            ["kid"], table, CHURN, START, unit="retail", ages=pd.Series({"kid": 12}), minor_age=16
        )


def test_erased_customer_is_excluded_whatever_their_consent() -> None:
    table = events(("a", CHURN, True, day(1)), ("b", CHURN, True, day(1)))

    decision = consented_customers(
        ["a", "b"], table, CHURN, START, unit="retail", erased=frozenset({"a"})
    )

    assert decision.consented == frozenset({"b"})
    assert decision.excluded == counts(erased=1)


def test_each_excluded_customer_counts_under_one_reason_by_priority() -> None:
    table = events(
        ("erased_kid_revoked", CHURN, False, day(1)),
        ("kid_revoked", CHURN, False, day(1)),
        ("kid_revoked_in_job", CHURN, True, day(1)),
        ("kid_revoked_in_job", CHURN, False, day(11)),
        ("kid", CHURN, True, day(1)),
    )
    ids = [
        "erased_kid_revoked",
        "erased_kid",
        "kid_no_consent",
        "kid_revoked",
        "kid_revoked_in_job",
        "kid",
    ]
    ages = pd.Series(12, index=ids)

    decision = consented_customers(
        ids,
        table,
        CHURN,
        START,
        unit="retail",
        now=day(12),
        ages=ages,
        minor_age=16,
        erased=frozenset({"erased_kid_revoked", "erased_kid"}),
    )

    assert decision.consented == frozenset()
    assert decision.excluded == counts(erased=2, no_consent=1, revoked=2, minor=1)


def test_every_reason_is_reported_even_when_nobody_is_excluded() -> None:
    table = events(("a", CHURN, True, day(1)))

    decision = consented_customers(["a"], table, CHURN, START, unit="retail")

    assert list(decision.excluded) == [
        Exclusion.NO_CONSENT,
        Exclusion.REVOKED,
        Exclusion.MINOR,
        Exclusion.ERASED,
        Exclusion.QUALITY,
    ]
    assert list(decision.excluded) == ["no_consent", "revoked", "minor", "erased", "quality"]
    assert set(decision.excluded.values()) == {0}


# --- property: in a running job, the used set is the start's grants minus later revocations ----

JOB_START = datetime(2024, 6, 1)
BEFORE_START = [JOB_START - timedelta(days=d) for d in (3, 2, 1, 0)]  # 0: exactly at the start
AFTER_START = [JOB_START + timedelta(days=d) for d in (1, 2, 3, 4)]


@st.composite
def running_jobs(draw: st.DrawFn):
    n_customers = draw(st.integers(min_value=1, max_value=6))
    customers = [f"c{i}" for i in range(n_customers)]
    history: list[tuple[str, str, bool, datetime]] = []
    for customer in customers:
        for times in (BEFORE_START, AFTER_START):  # every customer has events on both sides
            history += draw(
                st.lists(
                    st.tuples(
                        st.just(customer),
                        st.sampled_from(PURPOSES),
                        st.booleans(),
                        st.sampled_from(times),
                    ),
                    min_size=1,
                    max_size=4,
                )
            )
    history.append(("anchor", CHURN, True, BEFORE_START[0]))  # the unit holds records for CHURN
    now = draw(st.sampled_from(AFTER_START))
    return customers, history, now


@settings(max_examples=100, deadline=None)
@given(running_jobs())
def test_used_set_is_start_grants_minus_revocations_up_to_now(case) -> None:
    customers, history, now = case

    decision = consented_customers(
        customers, events(*history), CHURN, JOB_START, unit="retail", now=now
    )

    granted_at_start, no_consent, revoked_at_start = reference(customers, history, CHURN, JOB_START)
    revoked_in_job = {c for c, p, g, t in history if p == CHURN and not g and JOB_START < t <= now}
    assert decision.consented == frozenset(granted_at_start - revoked_in_job)
    assert decision.excluded == counts(
        no_consent=no_consent,
        revoked=revoked_at_start + len(granted_at_start & revoked_in_job),
    )
