"""The client pipeline: consent, minimisation, public feature scaling, keyed hold-out split."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clients.features import compute_features
from clients.pipeline import UnitKeys, held_out
from clients.pipeline import prepare_unit as _prepare_unit
from clients.silo import load_silo
from clients.steward import consent_export
from federation.features import resolve_feature_spec
from federation.job import Job
from privacy.consent import consented_customers
from privacy.errors import ConfigurationError, PolicyViolation
from privacy.registry import ConsentRegistry
from privacy.unit_config import UnitConfig

AS_OF = datetime(2026, 6, 1)
KEYS = UnitKeys(pseudonym=b"k" * 32)


def _job(silo) -> Job:
    return Job(features=resolve_feature_spec("churn", [silo.schema]))


@pytest.fixture()
def silo(small_silos: Path):
    return load_silo(UnitConfig.load(small_silos / "retail_stores" / "bu.toml"))


@pytest.fixture()
def consent_events(silo) -> pd.DataFrame:
    return pd.read_parquet(consent_export(silo.config.source.directory))


def prepare_unit(silo, job, *, as_of, events=None, tmp=None, now=None):
    """The pipeline with a fresh registry holding `events` (the silo's export by default)."""
    import tempfile

    directory = Path(tempfile.mkdtemp(dir=tmp))
    events = (
        events
        if events is not None
        else pd.read_parquet(consent_export(silo.config.source.directory))
    )
    with ConsentRegistry.open(directory / "consent.sqlite", unit=silo.unit) as registry:
        registry.import_events(events, source="test", tombstone_key=KEYS.pseudonym)
        return _prepare_unit(silo, job, registry=registry, keys=KEYS, as_of=as_of, now=now)


def _pseudonyms(ids) -> set[str]:
    from privacy.pseudonyms import pseudonymise

    return set(pseudonymise(pd.Series(list(ids), dtype=str), KEYS.pseudonym))


def test_only_customers_with_active_consent_reach_training_or_evaluation(
    silo, consent_events
) -> None:
    job = _job(silo)
    prepared = prepare_unit(silo, job, as_of=AS_OF)
    ages = silo.tables["customers"].set_index("customer_id")["age"]
    expected = consented_customers(
        silo.tables["customers"]["customer_id"],
        consent_events,
        "churn_model",
        AS_OF,
        unit=silo.unit,
        ages=ages,
        minor_age=16,
    ).consented
    used = set(prepared.train.customer_ids) | set(prepared.test.customer_ids)
    assert used == _pseudonyms(expected)
    assert sum(prepared.excluded.values()) == len(silo.tables["customers"]) - len(expected)
    assert prepared.excluded["no_consent"] > 0 and prepared.excluded["revoked"] > 0


def test_a_customer_whose_consent_is_revoked_never_reaches_training(silo, consent_events) -> None:
    job = _job(silo)
    before = prepare_unit(silo, job, as_of=AS_OF)
    clear = {p: c for c in silo.tables["customers"]["customer_id"] for p in _pseudonyms([c])}
    victim = clear[before.train.customer_ids[0]]
    revocation = pd.DataFrame(
        {
            "customer_id": [victim],
            "purpose": ["churn_model"],
            "granted": [False],
            "timestamp": [pd.Timestamp("2026-01-01")],
        }
    )
    events = pd.concat([consent_events, revocation], ignore_index=True)
    after = prepare_unit(silo, job, as_of=AS_OF, events=events)
    assert _pseudonyms([victim]).isdisjoint(
        set(after.train.customer_ids) | set(after.test.customer_ids)
    )
    assert len(after.train.customer_ids) == len(before.train.customer_ids) - 1
    assert after.excluded["revoked"] == before.excluded["revoked"] + 1


def test_special_categories_never_reach_features(silo) -> None:
    job = _job(silo)
    prepared = prepare_unit(silo, job, as_of=AS_OF)
    dropped = {d.column: d.reason for d in prepared.columns_dropped}
    assert dropped["customers.religion"] == "special_category"
    assert dropped["customers.health_condition"] == "special_category"
    assert not any("religion" in c or "health" in c for c in prepared.columns_used)
    assert not any("religion" in n or "health" in n for n in job.feature_spec.output_names)
    # Changing the special-category values changes nothing that is computed.
    customers = silo.tables["customers"].copy()
    customers["religion"] = "other"
    customers["health_condition"] = "cardiac"
    altered = replace(silo, tables={**silo.tables, "customers": customers})
    again = prepare_unit(altered, job, as_of=AS_OF)
    np.testing.assert_array_equal(again.train.features, prepared.train.features)


def test_feature_scaling_and_domains_come_from_the_schema_not_the_data(silo) -> None:
    spec = _job(silo).feature_spec
    assert spec == resolve_feature_spec(
        "churn", [UnitConfig.model_validate(silo.schema.model_dump())]
    )
    ages = dict(zip(spec.output_names, range(spec.dim), strict=True))
    age = next(f for f in spec.features if f.name == "age")
    assert (age.lower, age.upper) == (14.0, 100.0)  # declared, not the observed 14..90
    before = compute_features(silo.tables, spec)
    # Make the data extreme: one customer 100 years old spending the maximum. Nobody else's
    # features move, which they would if scaling used the data's min/max/mean/std.
    customers = silo.tables["customers"].copy()
    customers.loc[0, "age"] = 100
    tx = silo.tables["transactions"].copy()
    tx.loc[tx["customer_id"] == customers.loc[0, "customer_id"], "amount"] = 5000.0
    after = compute_features({"customers": customers, "transactions": tx}, spec)
    np.testing.assert_array_equal(after.features[1:], before.features[1:])
    assert after.features[0, ages["age"]] == 1.0
    region = next(f for f in spec.features if f.name == "region")
    assert region.domain == ("north", "south", "east", "west", "central")
    # A silo whose customers are all in one region still encodes all five declared regions.
    one_region = customers.assign(region="north")
    matrix = compute_features({"customers": one_region, "transactions": tx}, spec)
    region_cols = [i for i, n in enumerate(spec.output_names) if n.startswith("region=")]
    assert len(region_cols) == 5
    assert matrix.features[:, region_cols].sum(axis=0).tolist() == [len(one_region), 0, 0, 0, 0]


def test_every_feature_lies_in_the_unit_interval(silo) -> None:
    prepared = prepare_unit(silo, _job(silo), as_of=AS_OF)
    assert prepared.train.features.min() >= 0.0
    assert prepared.train.features.max() <= 1.0


def test_hold_out_split_is_a_keyed_hash_independent_of_labels(silo) -> None:
    ids = silo.tables["customers"]["customer_id"].to_numpy()
    split = held_out(ids, "silofed-holdout-v1", 0.2)
    assert split.tolist() == held_out(ids[::-1], "silofed-holdout-v1", 0.2)[::-1].tolist()
    assert 0.15 < split.mean() < 0.25  # 1,000 customers: binomial sd 0.013
    assert held_out(ids, "another-key-123", 0.2).tolist() != split.tolist()
    job = _job(silo)
    flipped = replace(
        silo,
        tables={
            **silo.tables,
            "customers": silo.tables["customers"].assign(
                churned=~silo.tables["customers"]["churned"]
            ),
        },
    )
    a = prepare_unit(silo, job, as_of=AS_OF)
    b = prepare_unit(flipped, job, as_of=AS_OF)
    assert a.test.customer_ids.tolist() == b.test.customer_ids.tolist()


def test_a_purpose_the_unit_has_not_declared_is_refused(silo) -> None:
    job = _job(silo).model_copy(update={"purpose": "segment_stats"})
    with pytest.raises(ConfigurationError, match="has not declared purpose 'segment_stats'"):
        prepare_unit(silo, job, as_of=AS_OF)


def test_a_purpose_that_does_not_allow_a_needed_column_is_refused(silo) -> None:
    data = silo.schema.model_dump(mode="json")
    data["purposes"]["churn_model"]["features"].remove("customers.region")
    narrowed = replace(silo, config=UnitConfig.model_validate(data))
    with pytest.raises(PolicyViolation, match=r"customers\.region"):
        prepare_unit(narrowed, _job(silo), as_of=AS_OF)


def test_identifiers_are_pseudonymised_before_any_computation(silo) -> None:
    prepared = prepare_unit(silo, _job(silo), as_of=AS_OF)
    clear = set(silo.tables["customers"]["customer_id"])
    used = set(prepared.train.customer_ids) | set(prepared.test.customer_ids)
    assert used and clear.isdisjoint(used)
    assert all(len(p) == 64 for p in used)  # hex HMAC-SHA256 under the BU's key


def test_a_revocation_during_the_run_excludes_the_customer_from_the_next_round(
    silo, consent_events
) -> None:
    job = _job(silo)
    start = datetime(2026, 6, 1)
    first = prepare_unit(silo, job, as_of=start, now=start)
    clear = {p: c for c in silo.tables["customers"]["customer_id"] for p in _pseudonyms([c])}
    victim = clear[first.train.customer_ids[0]]
    revocation = pd.DataFrame(
        {
            "customer_id": [victim],
            "purpose": ["churn_model"],
            "granted": [False],
            "timestamp": [pd.Timestamp("2026-06-01 10:00")],
        }
    )
    events = pd.concat([consent_events, revocation], ignore_index=True)
    # round 1 ran at the start; the revocation arrives at 10:00; round 2 starts at 11:00
    second = prepare_unit(silo, job, as_of=start, events=events, now=datetime(2026, 6, 1, 11))
    assert _pseudonyms([victim]).isdisjoint(second.train.customer_ids)
    assert len(second.train.customer_ids) == len(first.train.customer_ids) - 1
    # ... while a grant after the start never adds anyone to a running job
    assert second.excluded["revoked"] == first.excluded["revoked"] + 1


def test_minors_count_only_with_a_guardians_consent(small_silos: Path) -> None:
    silo = load_silo(UnitConfig.load(small_silos / "ecommerce" / "bu.toml"))  # the youngest BU
    consent_events = pd.read_parquet(consent_export(silo.config.source.directory))
    prepared = prepare_unit(silo, _job(silo), as_of=AS_OF)
    ages = silo.tables["customers"].set_index("customer_id")["age"]
    unguarded_minors = set(ages[ages < 16].index) - set(
        consent_events.loc[consent_events["guardian"], "customer_id"]
    )
    adults_rule = consented_customers(  # the same decision without the minors rule
        ages.index, consent_events, "churn_model", AS_OF, unit=silo.unit
    ).consented
    assert unguarded_minors & adults_rule  # the fixture has minors to exclude
    used = set(prepared.train.customer_ids) | set(prepared.test.customer_ids)
    assert used == _pseudonyms(adults_rule - unguarded_minors)
    assert prepared.excluded["minor"] == len(adults_rule & unguarded_minors)


def test_a_purpose_can_generalise_a_quasi_identifier_before_features(silo) -> None:
    data = silo.schema.model_dump(mode="json")
    data["purposes"]["churn_model"]["generalise"] = {"customers.age": "band:10"}
    banded = replace(silo, config=UnitConfig.model_validate(data))
    job = _job(silo)
    age = next(f for f in job.feature_spec.features if f.name == "age")
    column = job.feature_spec.output_names.index("age")
    features = prepare_unit(banded, job, as_of=AS_OF).train.features[:, column]
    ages = features * (age.upper - age.lower) + age.lower
    lower_edges = np.round(ages)
    np.testing.assert_allclose(ages, lower_edges, atol=1e-4)
    # every age is a band's lower edge, or the declared lower bound the 10-19 band is clipped to
    assert set(lower_edges) <= {14.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0}
    exact = prepare_unit(silo, job, as_of=AS_OF).train.features[:, column]
    assert not np.allclose(exact * (age.upper - age.lower) % 10, 0, atol=1e-4)
