"""Consent evaluation for a purpose, as of a point in time (GDPR Art. 6(1)(a), 7; PIPL Art. 14, 15).

A consent event says that a customer granted or revoked consent for one purpose at one time. The
status of a customer for a purpose *as of* a time is the latest event at or before that time; when a
grant and a revocation carry the same timestamp the revocation wins. A customer with no event, or whose
latest event is a revocation, is excluded, and the reason is counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import pandas as pd

from privacy.errors import ConsentMissing

CONSENT_COLUMNS = ("customer_id", "purpose", "granted", "timestamp")


class Exclusion:
    """Reasons a customer's records were not used, as they appear in reports."""

    NO_CONSENT = "no_consent"
    REVOKED = "revoked"


@dataclass(frozen=True)
class ConsentDecision:
    consented: frozenset[str]
    excluded: dict[str, int]


def consent_status(events: pd.DataFrame, purpose: str, as_of: datetime) -> pd.Series:
    """Per customer id, True if consent for `purpose` is active as of `as_of`, False if revoked.

    Customers with no event up to `as_of` are absent from the result.
    """
    cutoff = pd.Timestamp(as_of)
    if cutoff.tzinfo is not None:  # silo timestamps are naive and read as UTC
        cutoff = cutoff.tz_convert("UTC").tz_localize(None)
    relevant = events[(events["purpose"] == purpose) & (events["timestamp"] <= cutoff)]
    # Sort so that, per customer, the last row is the latest event and, on a tie, the revocation
    # (granted=False sorts before True, so put grants first by sorting on "not granted").
    ordered = relevant.assign(_revoked=~relevant["granted"].astype(bool)).sort_values(
        ["timestamp", "_revoked"], kind="stable"
    )
    latest = ordered.groupby("customer_id", sort=True).tail(1)
    return pd.Series(
        latest["granted"].astype(bool).to_numpy(), index=latest["customer_id"].astype(str)
    )


def consented_customers(
    customer_ids: Iterable[str], events: pd.DataFrame, purpose: str, as_of: datetime, *, unit: str
) -> ConsentDecision:
    """Split `customer_ids` into those with active consent for `purpose` as of `as_of` and the
    counts of the rest by reason. A unit with no consent record at all for the purpose refuses."""
    if not (events["purpose"] == purpose).any():
        raise ConsentMissing(
            f"unit '{unit}' holds no consent records for purpose '{purpose}'; it refuses the job. "
            "Import the consent events for that purpose into the silo's consent table first."
        )
    status = consent_status(events, purpose, as_of)
    ids = pd.Index(pd.unique(pd.Series(list(customer_ids), dtype=str)))
    known = status.reindex(ids)
    granted = ids[known.eq(True).to_numpy()]
    revoked = int(known.eq(False).sum())
    missing = int(known.isna().sum())
    return ConsentDecision(
        consented=frozenset(granted),
        excluded={Exclusion.NO_CONSENT: missing, Exclusion.REVOKED: revoked},
    )
