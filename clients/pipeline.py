"""The client pipeline of one BU, in the fixed order of DESIGN.md:

silo (validated) -> consent filter (purpose, as of the job's start) -> minimisation (the purpose's
column allow-list; special categories always out) -> features (public scaling) -> train/test split
(keyed hash of the customer id, never the label).

The result holds only what the job may use, and the facts the BU reports about it.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from clients.features import FeatureMatrix, compute_features
from clients.silo import Silo
from federation.features import Categorical, ChannelMix, FeatureSpec
from federation.job import Job
from privacy.consent import consented_customers
from privacy.errors import ConfigurationError, PolicyViolation
from privacy.minimisation import ColumnDrop, minimise


@dataclass(frozen=True)
class PreparedUnit:
    unit: str
    train: FeatureMatrix
    test: FeatureMatrix
    excluded: dict[str, int]
    columns_used: tuple[str, ...]
    columns_dropped: tuple[ColumnDrop, ...]


def held_out(customer_ids: np.ndarray, key: str, fraction: float) -> np.ndarray:
    """True for the customers in the test set: HMAC-SHA256(key, id) read as a number in [0, 1)
    below `fraction`. Independent of every attribute and of the label; stable across runs."""
    key_bytes = key.encode()
    draws = np.fromiter(
        (
            int.from_bytes(hmac.new(key_bytes, str(c).encode(), hashlib.sha256).digest()[:8], "big")
            for c in customer_ids
        ),
        dtype=np.float64,
        count=len(customer_ids),
    )
    return draws / 2.0**64 < fraction


def check_spec_fits_schema(silo: Silo, spec: FeatureSpec) -> None:
    """Every value the BU may hold must be representable in the federation's features: a declared
    domain outside the job's domain would silently become all-zero one-hot rows."""
    for feature in spec.features:
        if isinstance(feature, Categorical | ChannelMix):
            column = feature.column if isinstance(feature, Categorical) else feature.channel
            declared = set(silo.schema.column(column).domain or ())
            extra = declared - set(feature.domain)
            if extra:
                raise ConfigurationError(
                    f"unit '{silo.unit}': '{column}' declares values {sorted(extra)} that the job's "
                    f"feature '{feature.name}' does not encode ({list(feature.domain)}); align the "
                    "schemas of the BUs or extend the job's domain."
                )


def prepare_unit(silo: Silo, job: Job, *, as_of: datetime) -> PreparedUnit:
    spec = job.feature_spec
    schema = silo.schema
    schema.policy(job.purpose)  # refuses an undeclared purpose before anything else
    check_spec_fits_schema(silo, spec)

    customers = silo.tables["customers"]
    key = schema.tables["customers"].key
    decision = consented_customers(customers[key], silo.consent, job.purpose, as_of, unit=silo.unit)
    consented = {
        name: frame[frame[schema.tables[name].key].isin(decision.consented)]
        for name, frame in silo.tables.items()
    }

    minimised = minimise(consented, schema, job.purpose)
    tables_read = dict.fromkeys(c.partition(".")[0] for c in spec.columns)
    needed = [*spec.columns, *(f"{t}.{schema.tables[t].key}" for t in tables_read)]
    missing = [c for c in needed if c not in minimised.used]
    if missing:
        raise PolicyViolation(
            f"unit '{silo.unit}': the job's features need {missing}, which purpose "
            f"'{job.purpose}' does not allow; the BU's steward decides whether to allow them."
        )

    matrix = compute_features(minimised.tables, spec, customer_key=key)
    test = held_out(
        matrix.customer_ids, job.evaluation.holdout_key, job.evaluation.holdout_fraction
    )
    return PreparedUnit(
        unit=silo.unit,
        train=_rows(matrix, ~test),
        test=_rows(matrix, test),
        excluded=decision.excluded,
        columns_used=minimised.used,
        columns_dropped=minimised.dropped,
    )


def _rows(matrix: FeatureMatrix, mask: np.ndarray) -> FeatureMatrix:
    return FeatureMatrix(matrix.customer_ids[mask], matrix.features[mask], matrix.labels[mask])
