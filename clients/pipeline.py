"""The client pipeline of one BU, in the fixed order of DESIGN.md:

silo (read, checked by the quality rules) -> consent filter (the registry, for the job's purpose, as
of the job's start; revocations since then apply from the next round; minors need a guardian's
consent; erased customers never count) -> minimisation (the purpose's column allow-list; special
categories always out; quasi-identifiers generalised where the purpose says) -> pseudonymisation
(identifiers replaced by an HMAC under the BU's key) -> features (public scaling) -> train/test split
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
from privacy.consent import Exclusion
from privacy.errors import ConfigurationError, PolicyViolation
from privacy.frames import among
from privacy.minimisation import ColumnDrop, minimise
from privacy.pseudonyms import generalise, pseudonymise_tables
from privacy.registry import ConsentRegistry
from privacy.schema import ColumnRole


@dataclass(frozen=True)
class UnitKeys:
    """The BU's keys the pipeline needs: its own pseudonym key, and a linkage key shared with other
    BUs only for purposes that declare linkage."""

    pseudonym: bytes
    linkage: bytes | None = None


@dataclass(frozen=True)
class PreparedUnit:
    unit: str
    purpose: str
    train: FeatureMatrix  # customer ids are pseudonyms
    test: FeatureMatrix
    excluded: dict[str, int]
    columns_used: tuple[str, ...]
    columns_dropped: tuple[ColumnDrop, ...]
    quality: dict
    encrypted_at_rest: bool
    legal_basis: str = ""  # the purpose's, as the BU declared it
    jurisdictions: tuple[str, ...] = ()


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


MINOR_AGE_COLUMN = "customers.age"


@dataclass(frozen=True)
class PreparedTables:
    """A BU's tables after consent, minimisation, generalisation and pseudonymisation: what any
    exchange of the job may read, and the facts the BU reports about it."""

    unit: str
    purpose: str
    tables: dict  # table name -> DataFrame; identifiers are pseudonyms
    customer_key: str
    held_out: np.ndarray  # per row of tables["customers"]: in the test set (keyed hash of the id)
    excluded: dict[str, int]
    columns_used: tuple[str, ...]
    columns_dropped: tuple[ColumnDrop, ...]
    quality: dict
    encrypted_at_rest: bool
    legal_basis: str = ""  # the purpose's, as the BU declared it
    jurisdictions: tuple[str, ...] = ()


def prepare_tables(
    silo: Silo,
    job: Job,
    *,
    columns: tuple[str, ...],
    registry: ConsentRegistry,
    keys: UnitKeys,
    as_of: datetime,
    now: datetime | None = None,
) -> PreparedTables:
    """Consent, minimisation, generalisation and pseudonymisation for `job`, which reads `columns`
    (qualified `table.column`): a column the purpose does not allow stops the job here."""
    config = silo.config
    policy = config.policy(job.purpose)  # refuses an undeclared purpose before anything else

    customers = silo.tables["customers"]
    key = config.tables["customers"].key
    table, _, age_column = MINOR_AGE_COLUMN.partition(".")
    ages = (
        customers.set_index(key)[age_column] if age_column in config.tables[table].columns else None
    )
    if ages is None and not config.minors.adults_only:
        raise ConfigurationError(
            f"unit '{silo.unit}': the silo has no {MINOR_AGE_COLUMN} column, so the minors rule "
            f"(minimum age {config.minors.age}) cannot be checked; declare the column, or, if "
            "the silo holds adults only, attest it with `adults_only = true` under [minors] in "
            "its bu.toml"
        )
    decision = registry.decision(
        customers[key],
        job.purpose,
        as_of=as_of,
        now=now,
        ages=ages,
        minor_age=config.minors.age if ages is not None else None,
        tombstone_key=keys.pseudonym,
    )
    consented = {
        name: frame[among(frame[config.tables[name].key], decision.consented)]
        for name, frame in silo.tables.items()
    }

    minimised = minimise(consented, config, job.purpose)
    tables_read = dict.fromkeys(c.partition(".")[0] for c in columns)
    needed = [*columns, *(f"{t}.{config.tables[t].key}" for t in tables_read if t in config.tables)]
    missing = [c for c in needed if c not in minimised.used]
    if missing:
        raise PolicyViolation(
            f"unit '{silo.unit}': the job needs {missing}, which purpose "
            f"'{job.purpose}' does not allow; the BU's steward decides whether to allow them."
        )
    generalised = dict(minimised.tables)
    for qualified, rule in policy.generalise.items():
        name, _, column = qualified.partition(".")
        if name in generalised and column in generalised[name]:
            generalised[name] = generalised[name].assign(
                **{column: generalise(generalised[name][column], rule)}
            )

    # The split is fixed on the customer ids before they are replaced: a keyed hash of the id,
    # stable across runs and independent of every attribute.
    test = held_out(
        generalised["customers"][key].to_numpy(),
        job.evaluation.holdout_key,
        job.evaluation.holdout_fraction,
    )
    linkage_columns = frozenset(
        c
        for c in policy.allowed
        if policy.linkage
        and config.column(c).role is ColumnRole.IDENTIFIER
        and c.partition(".")[2] != config.tables[c.partition(".")[0]].key
    )
    pseudonymised = pseudonymise_tables(
        generalised,
        config,
        keys.pseudonym,
        linkage_key=keys.linkage,
        linkage_columns=linkage_columns,
    )
    return PreparedTables(
        unit=silo.unit,
        purpose=job.purpose,
        tables=pseudonymised,
        customer_key=key,
        held_out=test,
        excluded={**decision.excluded, Exclusion.QUALITY: len(silo.quality_excluded)},
        columns_used=minimised.used,
        columns_dropped=minimised.dropped,
        quality=_quality_of_used_columns(silo.quality, minimised.used),
        encrypted_at_rest=silo.encrypted,
        legal_basis=policy.legal_basis,
        jurisdictions=tuple(str(j) for j in silo.config.jurisdictions),
    )


def prepare_unit(
    silo: Silo,
    job: Job,
    *,
    registry: ConsentRegistry,
    keys: UnitKeys,
    as_of: datetime,
    now: datetime | None = None,
) -> PreparedUnit:
    spec = job.feature_spec
    check_spec_fits_schema(silo, spec)
    prepared = prepare_tables(
        silo, job, columns=spec.columns, registry=registry, keys=keys, as_of=as_of, now=now
    )
    matrix = compute_features(prepared.tables, spec, customer_key=prepared.customer_key)
    return features_of(prepared, matrix)


def features_of(prepared: PreparedTables, matrix: FeatureMatrix) -> PreparedUnit:
    test = prepared.held_out
    return PreparedUnit(
        unit=prepared.unit,
        purpose=prepared.purpose,
        train=_rows(matrix, ~test),
        test=_rows(matrix, test),
        excluded=prepared.excluded,
        columns_used=prepared.columns_used,
        columns_dropped=prepared.columns_dropped,
        quality=prepared.quality,
        encrypted_at_rest=prepared.encrypted_at_rest,
        legal_basis=prepared.legal_basis,
        jurisdictions=prepared.jurisdictions,
    )


def _quality_of_used_columns(summary: dict, used: tuple[str, ...]) -> dict:
    """The quality counts of the columns the job used only: the completeness of a column the
    purpose may not see (a special category above all) says something about it, and stays home."""
    allowed = set(used)
    return {
        **summary,
        "tables": {
            table: {
                **stats,
                "columns": {c: v for c, v in stats["columns"].items() if f"{table}.{c}" in allowed},
            }
            for table, stats in summary["tables"].items()
        },
    }


def _rows(matrix: FeatureMatrix, mask: np.ndarray) -> FeatureMatrix:
    return FeatureMatrix(matrix.customer_ids[mask], matrix.features[mask], matrix.labels[mask])
