"""A BU's exact query vector: filters, groups, derived columns, the grid, and contribution bounding
(each customer moves each part by at most its declared sensitivity)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clients.queries import query_vector
from clients.silo import load_silo
from federation.queries import QuerySpec, resolve_query
from privacy.errors import PolicyViolation, SiloError
from privacy.minimisation import minimise
from privacy.schema import PurposePolicy
from privacy.unit_config import UnitConfig
from simulations.synthetic import CHANNELS, PRODUCTS, REGIONS, unit_schema

ANALYTICS = unit_schema("retail_stores").purposes["analytics"]  # the synthetic BUs' purpose
OBSERVED = "2025-12-31T00:00:00"


def with_analytics(config: UnitConfig) -> UnitConfig:
    """The BU's configuration with an `analytics` purpose (the synthetic one, when declared)."""
    if "analytics" in config.purposes:
        return config
    return config.model_copy(update={"purposes": {**config.purposes, "analytics": ANALYTICS}})


CONFIG = with_analytics(unit_schema("retail_stores"))


def customers(*rows: tuple) -> pd.DataFrame:
    return pd.DataFrame(
        rows, columns=["customer_id", "age", "region", "signup_date", "churned"]
    ).astype({"signup_date": "datetime64[ns]"})


def transactions(*rows: tuple) -> pd.DataFrame:
    return pd.DataFrame(
        rows, columns=["customer_id", "timestamp", "amount", "channel", "category"]
    ).astype({"timestamp": "datetime64[ns]"})


TABLES = {
    "customers": customers(
        ("c1", 30, "north", "2024-01-15", False),
        ("c2", 45, "south", "2024-01-03", True),
        ("c3", 61, "north", "2023-06-30", True),
        ("c4", 22, "east", "2024-02-10", False),
    ),
    "transactions": transactions(
        ("c1", "2024-01-20", 10.0, "store", "groceries"),
        ("c1", "2024-03-01", 20.0, "store", "groceries"),
        ("c1", "2025-12-01", 30.0, "store", "fashion"),
        ("c1", "2025-06-01", 7.74, "phone", "fashion"),
        ("c1", "2025-07-01", 3.2, "phone", "services"),
        ("c1", "2025-08-01", 12000.0, "online", "electronics"),
        ("c2", "2025-12-21", 40.0, "online", "groceries"),
        ("c2", "2025-11-01", 50.0, "store", "groceries"),
        ("c3", "2023-01-01", 99.0, "app", "insurance"),  # outside the look-back window
        ("ghost", "2025-12-02", 5.0, "store", "groceries"),  # no longer in the customers table
    ),
}


def vector(**fields) -> np.ndarray:
    spec = QuerySpec.model_validate({"purpose": "analytics", **fields})
    return query_vector(TABLES, CONFIG, spec)


def channel_key(domain=CHANNELS) -> dict:
    return {"column": "transactions.channel", "domain": list(domain)}


def test_customers_are_counted_per_declared_category() -> None:
    got = vector(
        group_by=[{"column": "customers.region", "domain": list(REGIONS)}],
        aggregates=[{"kind": "count", "name": "n"}],
    )
    assert got.tolist() == [2, 1, 1, 0, 0]  # north, south, east, west, central
    assert got.dtype == np.int64


def test_each_row_is_clipped_then_rounded_to_the_grid() -> None:
    got = vector(
        rows="transactions",
        where=[{"column": "customers.region", "op": "eq", "value": "north"}],
        max_rows=100,
        aggregates=[
            {
                "kind": "sum",
                "name": "spend",
                "column": "transactions.amount",
                "lower": 5,
                "upper": 5000,
                "granularity": 0.5,
            }
        ],
    )
    # c1: 10 20 30 7.74 3.2 12000 -> 20 + 40 + 60 + 15 (15.48) + 10 (3.2 -> 5) + 10000 (5000);
    # c3: 99 -> 198; the ghost's row belongs to no known customer
    assert got.tolist() == [20 + 40 + 60 + 15 + 10 + 10000 + 198]


def test_a_customer_counts_in_the_groups_where_it_has_most_rows() -> None:
    def counts(max_groups: int) -> list[int]:
        return vector(
            rows="transactions",
            group_by=[channel_key()],
            max_groups=max_groups,
            aggregates=[{"kind": "count", "name": "n"}],
        ).tolist()

    # c1: store 3 rows, phone 2, online 1; c2: store 1 and online 1 (a tie: store comes first);
    # c3: app 1. max_rows = 1: each kept group counts the customer once
    assert counts(1) == [2, 0, 0, 1]  # store, online, phone, app
    assert counts(2) == [2, 1, 1, 1]
    assert counts(3) == [2, 2, 1, 1]


def test_rows_per_group_are_the_first_max_rows_in_table_order() -> None:
    def spend(max_rows: int) -> int:
        return int(
            vector(
                rows="transactions",
                where=[{"column": "transactions.channel", "op": "eq", "value": "store"}],
                max_rows=max_rows,
                aggregates=[
                    {
                        "kind": "sum",
                        "name": "s",
                        "column": "transactions.amount",
                        "lower": 0,
                        "upper": 100,
                        "granularity": 1,
                    }
                ],
            )[0]
        )

    assert spend(1) == 10 + 50  # c1's first store row, c2's only one
    assert spend(2) == 10 + 20 + 50
    assert spend(9) == 10 + 20 + 30 + 50


def test_rows_outside_every_group_use_none_of_a_customers_allowance() -> None:
    got = vector(
        rows="transactions",
        group_by=[channel_key(("online",))],
        aggregates=[{"kind": "count", "name": "n"}],
    )
    # c1 has more store rows, but store is no group here: its online row still counts
    assert got.tolist() == [2]


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ({"column": "customers.churned", "op": "eq", "value": True}, 2),
        ({"column": "customers.region", "op": "in", "values": ["south", "east"]}, 2),
        ({"column": "customers.region", "op": "not_in", "values": ["north"]}, 2),
        ({"column": "customers.region", "op": "ne", "value": "east"}, 3),
        ({"column": "customers.age", "op": "lt", "value": 45}, 2),
        ({"column": "customers.age", "op": "le", "value": 45}, 3),
        ({"column": "customers.signup_date", "op": "ge", "value": "2024-01-15"}, 2),
        ({"column": "customers.signup_date", "op": "gt", "value": datetime(2024, 1, 15)}, 1),
        ({"column": "customers.age", "op": "present"}, 4),
        ({"column": "derived.frequency", "op": "ge", "value": 2}, 2),
        ({"column": "derived.signup_month", "op": "eq", "value": "2024-01"}, 2),
    ],
)
def test_a_filter_keeps_the_rows_that_pass_it(condition, expected) -> None:
    got = vector(
        observation_date=OBSERVED,
        lookback_days=365,
        where=[condition],
        aggregates=[{"kind": "count", "name": "n"}],
    )
    assert got.tolist() == [expected]


def test_derived_rfm_columns_are_computed_over_the_window() -> None:
    got = vector(
        observation_date=OBSERVED,
        lookback_days=365,
        aggregates=[
            # window (2024-12-31, 2025-12-31]: c1 has 4 purchases, c2 2, c3 and c4 none
            {"kind": "histogram", "name": "f", "column": "derived.frequency", "bins": [0, 1, 3, 5]},
            # last purchases: c1 30 days ago, c2 10; none: 365
            {
                "kind": "histogram",
                "name": "r",
                "column": "derived.recency_days",
                "bins": [0, 15, 60, 365],
            },
            # mean amounts: c1 (7.74 + 3.2 + 12000 + 30) / 4 = 3010.235, c2 45, none: 0
            {
                "kind": "histogram",
                "name": "m",
                "column": "derived.monetary",
                "bins": [0, 1, 100, 5000],
            },
            # c1: phone 2, online 1, store 1 -> phone; c2: online 1, store 1 -> online (alphabetical)
            {
                "kind": "histogram",
                "name": "c",
                "column": "derived.main_channel",
                "domain": list(CHANNELS),
            },
            {
                "kind": "sum",
                "name": "t",
                "column": "derived.tenure_days",
                "lower": 0,
                "upper": 5000,
                "granularity": 1,
            },
        ],
    )
    f, r, m, c, t = np.split(got, [3, 6, 9, 13])
    assert f.tolist() == [2, 1, 1]
    assert r.tolist() == [1, 1, 2]
    assert m.tolist() == [2, 1, 1]
    assert c.tolist() == [0, 1, 1, 0]
    assert t.tolist() == [716 + 728 + 915 + 690]


def test_months_since_signup_count_active_customers_per_cohort_month() -> None:
    got = vector(
        aggregates=[
            {
                "kind": "count",
                "name": "active",
                "rows": "transactions",
                "group_by": [
                    {"column": "derived.signup_month", "domain": ["2024-01"]},
                    {"column": "derived.months_since_signup", "bins": [-0.5, 0.5, 1.5, 2.5]},
                ],
                "max_groups": 3,
            }
        ]
    )
    # c1 (January 2024) buys in January (0) and March (2); c2's purchases are a year later
    assert got.tolist() == [1, 0, 1]


def test_the_vector_matches_an_independent_computation_on_a_synthetic_silo(
    small_silos: Path,
) -> None:
    config = with_analytics(UnitConfig.load(small_silos / "card_services" / "bu.toml"))
    tables = minimise(load_silo(config).tables, config, "analytics").tables
    spec = resolve_query(
        {
            "purpose": "analytics",
            "group_by": [{"column": "customers.region"}],
            "aggregates": [
                {"kind": "count", "name": "customers"},
                {
                    "kind": "count",
                    "name": "churned",
                    "where": [{"column": "customers.churned", "op": "eq", "value": True}],
                },
                {
                    "kind": "sum",
                    "name": "spend",
                    "rows": "transactions",
                    "column": "transactions.amount",
                    "lower": 0,
                    "upper": 150,
                    "granularity": 1,
                    "group_by": [{"column": "transactions.category"}],
                    "max_groups": len(PRODUCTS),
                    "max_rows": 4,
                },
            ],
        },
        [config],
    )
    got = query_vector(tables, config, spec)
    people, tx = tables["customers"], tables["transactions"]
    by_region = people.groupby("region").size().reindex(REGIONS, fill_value=0)
    churned = people[people["churned"]].groupby("region").size().reindex(REGIONS, fill_value=0)
    kept = tx.groupby(["customer_id", "category"]).head(4)
    spend = np.rint(kept["amount"].clip(0, 150)).groupby(kept["category"]).sum().reindex(PRODUCTS)
    assert got.tolist() == [*by_region, *churned, *spend.astype(int)]


def test_no_customer_moves_a_part_by_more_than_its_sensitivity(small_silos: Path) -> None:
    config = with_analytics(UnitConfig.load(small_silos / "ecommerce" / "bu.toml"))
    tables = minimise(load_silo(config).tables, config, "analytics").tables
    spec = resolve_query(
        {
            "purpose": "analytics",
            "aggregates": [
                {
                    "kind": "count",
                    "name": "buyers",
                    "rows": "transactions",
                    "group_by": [{"column": "transactions.channel"}],
                    "max_groups": 2,
                    "max_rows": 3,
                },
                {
                    "kind": "mean",
                    "name": "amount",
                    "rows": "transactions",
                    "column": "transactions.amount",
                    "lower": 0,
                    "upper": 60,
                    "group_by": [{"column": "transactions.category"}],
                    "max_groups": 3,
                    "max_rows": 2,
                },
                {
                    "kind": "histogram",
                    "name": "age",
                    "column": "customers.age",
                    "bins": [14, 30, 50, 100],
                },
            ],
        },
        [config],
    )
    layout = spec.layout()
    spans = layout.slices()
    full = query_vector(tables, config, spec)
    ids = tables["customers"]["customer_id"]
    rng = np.random.default_rng(0)
    busiest = tables["transactions"]["customer_id"].value_counts().index[:10]
    chosen = {*rng.choice(ids.to_numpy(), size=30, replace=False), *busiest}
    largest = dict.fromkeys(spans, 0.0)
    for customer in chosen:
        without = {name: frame[frame["customer_id"] != customer] for name, frame in tables.items()}
        change = full - query_vector(without, config, spec)
        for part in layout.parts:
            moved = float(np.linalg.norm(change[spans[part.name]]))
            assert moved <= part.sensitivity + 1e-9
            largest[part.name] = max(largest[part.name], moved)
    # the busiest customers reach the bound of the counts
    assert largest["buyers"] == pytest.approx(np.sqrt(2) * 3)
    assert largest["amount.count"] == pytest.approx(np.sqrt(3) * 2)


def test_a_column_the_purpose_does_not_allow_stops_the_bu_before_it_reads_a_row() -> None:
    narrow = CONFIG.model_copy(
        update={
            "purposes": {
                "analytics": PurposePolicy(
                    join_keys=("customers.customer_id",), features=("customers.age",)
                )
            }
        }
    )
    spec = QuerySpec.model_validate(
        {
            "purpose": "analytics",
            "group_by": [{"column": "customers.region", "domain": list(REGIONS)}],
            "aggregates": [{"kind": "count", "name": "n"}],
        }
    )
    with pytest.raises(PolicyViolation, match="does not allow"):
        query_vector({}, narrow, spec)


def test_a_missing_value_in_a_declared_non_nullable_summed_column_is_a_silo_error() -> None:
    broken = dict(TABLES)
    broken["transactions"] = TABLES["transactions"].assign(
        amount=lambda f: f["amount"].where(f["customer_id"] != "c2")
    )
    spec = QuerySpec.model_validate(
        {
            "purpose": "analytics",
            "rows": "transactions",
            "aggregates": [
                {
                    "kind": "sum",
                    "name": "s",
                    "column": "transactions.amount",
                    "lower": 0,
                    "upper": 9,
                }
            ],
        }
    )
    with pytest.raises(SiloError, match="missing or non-numeric"):
        query_vector(broken, CONFIG, spec)
