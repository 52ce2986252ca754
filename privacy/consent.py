"""Consent evaluation for a purpose, as of a point in time (GDPR Art. 6(1)(a), 7, 8, 17; PIPL Art.
14, 15, 31).

A consent event says that a customer granted or revoked consent for one purpose at one time. The
status of a customer for a purpose *as of* a time is the latest event at or before that time; when a
grant and a revocation carry the same timestamp the revocation wins. A customer with no event, or whose
latest event is a revocation, is excluded, and the reason is counted.

A job evaluates consent as of its start. While it runs, only withdrawals count (Art. 7(3): withdrawing
must be as easy as giving, and takes effect from then on): a revocation after the start and at or
before `now` takes the customer out of the next round; a grant after the start adds nobody. A child
below the BU's age of digital consent (Art. 8, PIPL Art. 31) counts only if the winning grant was given
by a guardian; erased customers (Art. 17) are out whatever their history says.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd

from privacy.errors import ConfigurationError, ConsentMissing
from privacy.frames import among

CONSENT_COLUMNS = ("customer_id", "purpose", "granted", "timestamp")
GUARDIAN_COLUMN = "guardian"  # optional: True when a guardian gave the consent for a minor


class Exclusion:
    """Reasons a customer's records were not used, as they appear in reports."""

    NO_CONSENT = "no_consent"
    REVOKED = "revoked"
    MINOR = "minor"
    ERASED = "erased"
    QUALITY = "quality"  # reserved for the pipeline: rows dropped for failing validation
    # Every report lists every reason, zeros included, in this order.
    ALL = (NO_CONSENT, REVOKED, MINOR, ERASED, QUALITY)


@dataclass(frozen=True)
class ConsentDecision:
    consented: frozenset[str]
    excluded: dict[str, int]


def consent_status(events: pd.DataFrame, purpose: str, as_of: datetime) -> pd.Series:
    """Per customer id, True if consent for `purpose` is active as of `as_of`, False if revoked.

    Customers with no event up to `as_of` are absent from the result.
    """
    latest = _winning_events(events, purpose, _naive_utc(as_of))
    return pd.Series(
        latest["granted"].astype(bool).to_numpy(), index=latest["customer_id"].astype(str)
    )


def consented_customers(
    customer_ids: Iterable[str],
    events: pd.DataFrame,
    purpose: str,
    as_of: datetime,
    *,
    unit: str,
    now: datetime | None = None,
    ages: pd.Series | None = None,
    minor_age: int | None = None,
    erased: frozenset[str] = frozenset(),
) -> ConsentDecision:
    """Split `customer_ids` into those with active consent for `purpose` as of `as_of` (the job's
    start) and the counts of the rest by reason. A unit with no consent record at all for the
    purpose refuses.

    `now` (a later time in the same job) takes out customers who revoked after `as_of`.
    `ages` (customer id -> age in years) with `minor_age` takes out customers younger than
    `minor_age` whose winning grant has no `guardian` flag; a customer whose age is unknown counts
    as a minor, since the rule cannot be checked for them. `erased` ids are out in any case.
    Each excluded customer is counted once, under the first of erased, no_consent, revoked, minor.
    """
    if not (events["purpose"] == purpose).any():
        raise ConsentMissing(
            f"unit '{unit}' holds no consent records for purpose '{purpose}'; it refuses the job. "
            "Import the consent events for that purpose into the silo's consent table first."
        )
    if minor_age is not None and ages is None:
        raise ConfigurationError(
            f"unit '{unit}': a minimum age of consent ({minor_age}) is set but no ages were "
            "given; pass the customers' ages or unset the minimum age."
        )
    start = _naive_utc(as_of)
    ids = pd.Index(pd.unique(pd.Series(list(customer_ids), dtype=str)))

    latest = _winning_events(events, purpose, start)
    latest_ids = latest["customer_id"].astype(str).to_numpy()
    granted = pd.Series(latest["granted"].astype(bool).to_numpy(), index=latest_ids).reindex(ids)
    guardian = pd.Series(_guardian_flags(latest, unit).to_numpy(), index=latest_ids).reindex(ids)

    is_erased = among(ids, erased)
    no_consent = ~is_erased & granted.isna().to_numpy()
    revoked = ~is_erased & granted.eq(False).to_numpy()
    if now is not None:
        revoked |= (
            ~is_erased
            & granted.eq(True).to_numpy()
            & among(ids, _revoked_between(events, purpose, start, _naive_utc(now), unit))
        )
    minor = np.zeros(len(ids), dtype=bool)
    if minor_age is not None and ages is not None:
        known_ages = pd.Series(ages.to_numpy(), index=ages.index.astype(str))
        if known_ages.index.has_duplicates:
            raise ConfigurationError(
                f"unit '{unit}': the ages name customer "
                f"'{known_ages.index[known_ages.index.duplicated()][0]}' more than once; give one "
                "age per customer."
            )
        age = pd.to_numeric(known_ages.reindex(ids), errors="coerce")
        is_minor = ~(age >= minor_age).to_numpy()  # an unknown age (NaN) counts as a minor
        minor = ~(is_erased | no_consent | revoked) & is_minor & ~guardian.eq(True).to_numpy()
    out = is_erased | no_consent | revoked | minor
    counts = dict.fromkeys(Exclusion.ALL, 0)
    counts[Exclusion.ERASED] = int(is_erased.sum())
    counts[Exclusion.NO_CONSENT] = int(no_consent.sum())
    counts[Exclusion.REVOKED] = int(revoked.sum())
    counts[Exclusion.MINOR] = int(minor.sum())
    return ConsentDecision(consented=frozenset(ids[~out]), excluded=counts)


def _naive_utc(moment: datetime) -> pd.Timestamp:
    """Silo timestamps are naive and read as UTC: convert an aware time to that convention."""
    stamp = pd.Timestamp(moment)
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert("UTC").tz_localize(None)
    return stamp


def _winning_events(events: pd.DataFrame, purpose: str, cutoff: pd.Timestamp) -> pd.DataFrame:
    """Per customer, the event that decides their status for `purpose` as of `cutoff`."""
    relevant = events[(events["purpose"] == purpose) & (events["timestamp"] <= cutoff)]
    # Sort so that, per customer, the last row is the latest event and, on a tie, the revocation
    # (granted=False sorts before True, so put grants first by sorting on "not granted").
    ordered = relevant.assign(_revoked=~relevant["granted"].astype(bool)).sort_values(
        ["timestamp", "_revoked"], kind="stable"
    )
    return ordered.groupby("customer_id", sort=True).tail(1)


def _guardian_flags(events: pd.DataFrame, unit: str) -> pd.Series:
    """The `guardian` column as booleans (missing column or value: False). Anything else is an
    error: reading the text "false" as a truthy value would let a minor in."""
    if GUARDIAN_COLUMN not in events.columns:
        return pd.Series(False, index=events.index)
    column = events[GUARDIAN_COLUMN]
    if pd.api.types.is_bool_dtype(column):
        return column.fillna(False).astype(bool)
    flags = column.map(lambda v: bool(v) if isinstance(v, bool | np.bool_) else None)
    invalid = column.notna() & flags.isna()
    if invalid.any():
        raise ConfigurationError(
            f"unit '{unit}': the consent events' '{GUARDIAN_COLUMN}' column holds non-boolean "
            f"values such as {column[invalid].iloc[0]!r}; convert it to true/false when loading."
        )
    return flags.eq(True)


def _revoked_between(
    events: pd.DataFrame, purpose: str, start: pd.Timestamp, now: pd.Timestamp, unit: str
) -> list[str]:
    """Customers with a revocation for `purpose` in (start, now]."""
    if now < start:
        raise ConfigurationError(
            f"unit '{unit}': the current time {now} is before the job's start {start}; "
            "check the clock or the job's start time."
        )
    window = (
        (events["purpose"] == purpose)
        & ~events["granted"].astype(bool)
        & (events["timestamp"] > start)
        & (events["timestamp"] <= now)
    )
    return events.loc[window, "customer_id"].astype(str).unique().tolist()
