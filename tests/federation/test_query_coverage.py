"""Measured: the reported 95% intervals hold the true answer 93-97% of the time, and every released
count and sum is an exact multiple of its granularity.

Three synthetic BUs compute their exact vectors once (`clients.queries.query_vector`); each
repetition redraws only the noise (each BU's own under the local placement, the coordinator's under
the central one, shares under the distributed one), sums, and reads the answers with
`query_answers`. The truth is computed independently with pandas over the pooled BU customers,
after the declared clipping (before the grid rounding, whose error is far below the noise).
"""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clients.queries import query_vector
from clients.silo import load_silo
from federation.queries import QuerySpec, query_answers, resolve_query
from privacy.mechanisms import Placement, noise_multiplier
from privacy.minimisation import minimise
from privacy.samplers import SeededSource
from privacy.unit_config import UnitConfig
from simulations.synthetic import CHANNELS, REGIONS, unit_schema

REPETITIONS = 2000
EPSILON, DELTA = 1.0, 1e-6
AGE_BINS = [14, 25, 35, 45, 55, 65, 100]
ANALYTICS = unit_schema("retail_stores").purposes["analytics"]  # the synthetic BUs' purpose
QUERY = {
    "purpose": "analytics",
    "aggregates": [
        {"kind": "count", "name": "customers", "group_by": [{"column": "customers.region"}]},
        {
            "kind": "sum",
            "name": "spend",
            "rows": "transactions",
            "column": "transactions.amount",
            "lower": 0,
            "upper": 200,  # clips the larger purchases
            "granularity": 0.25,
            "group_by": [{"column": "transactions.channel"}],
            "max_groups": 4,
            "max_rows": 5,
        },
        {
            "kind": "mean",
            "name": "age",
            "column": "customers.age",
            "lower": 20,  # clips the youngest and the oldest
            "upper": 70,
            "granularity": 0.5,
            "group_by": [{"column": "customers.region"}],
        },
        {"kind": "histogram", "name": "ages", "column": "customers.age", "bins": AGE_BINS},
    ],
}


def with_analytics(config: UnitConfig) -> UnitConfig:
    if "analytics" in config.purposes:
        return config
    return config.model_copy(update={"purposes": {**config.purposes, "analytics": ANALYTICS}})


@pytest.fixture(scope="module")
def federation(small_silos: Path) -> tuple[list[UnitConfig], list[dict[str, pd.DataFrame]]]:
    configs = [
        with_analytics(UnitConfig.load(path)) for path in sorted(small_silos.glob("*/bu.toml"))
    ]
    tables = [minimise(load_silo(c).tables, c, "analytics").tables for c in configs]
    return configs, tables


@pytest.fixture(scope="module")
def query(federation) -> QuerySpec:
    return resolve_query(QUERY, federation[0])


@pytest.fixture(scope="module")
def vectors(federation, query) -> list[np.ndarray]:
    return [query_vector(t, c, query) for t, c in zip(federation[1], federation[0], strict=True)]


@pytest.fixture(scope="module")
def truth(federation) -> dict[str, np.ndarray]:
    people = pd.concat([t["customers"] for t in federation[1]], ignore_index=True)
    tx = pd.concat(
        [
            t["transactions"][t["transactions"]["customer_id"].isin(t["customers"]["customer_id"])]
            for t in federation[1]
        ],
        ignore_index=True,
    )
    kept = tx.groupby(["customer_id", "channel"]).head(5)  # table order: by time
    ages = people["age"].clip(20, 70)
    return {
        "customers": people.groupby("region").size().reindex(REGIONS).to_numpy(),
        "spend": kept["amount"]
        .clip(0, 200)
        .groupby(kept["channel"])
        .sum()
        .reindex(CHANNELS)
        .to_numpy(),
        "age": ages.groupby(people["region"]).mean().reindex(REGIONS).to_numpy(),
        "ages": np.histogram(people["age"], AGE_BINS)[0],  # half-open, the last closed
    }


def test_the_exact_release_is_the_truth_up_to_the_grid(query, vectors, truth) -> None:
    layout = query.layout()
    exact = query_answers(
        query, sum(vectors), layout.noise_in_sum(None, Placement.LOCAL, contributors=3)
    )
    values = {name: np.array([a["value"] for a in exact.answers_of(name)]) for name in truth}
    assert values["customers"].tolist() == truth["customers"].tolist()
    assert values["ages"].tolist() == truth["ages"].tolist()
    rows = 5 * 4 * sum(truth["customers"])  # at most this many summed rows, each off by <= g / 2
    assert np.all(np.abs(values["spend"] - truth["spend"]) <= rows * 0.125)
    assert np.allclose(values["age"], truth["age"], atol=0.25)


def _coverage(query, vectors, truth, placement: Placement, seed: int) -> dict[str, float]:
    layout = query.layout()
    z = noise_multiplier(EPSILON, DELTA)
    units = len(vectors)
    noise = layout.noise_in_sum(z, placement, contributors=units, threshold=units)
    source = SeededSource(seed)
    total = sum(vectors)
    inside = dict.fromkeys(truth, 0)
    for _ in range(REPETITIONS):
        if placement is Placement.CENTRAL:
            released = layout.central_noise(total, z, source)
        else:
            released = sum(layout.noisy(v, z, placement, source, threshold=units) for v in vectors)
        result = query_answers(query, released, noise)
        for name, true in truth.items():
            answers = result.answers_of(name)
            lower = np.array([a["interval"][0] for a in answers], dtype=np.float64)
            upper = np.array([a["interval"][1] for a in answers], dtype=np.float64)
            inside[name] += int(np.sum((lower <= true) & (true <= upper)))
    return {name: inside[name] / (REPETITIONS * len(truth[name])) for name in truth}


@pytest.mark.parametrize(
    ("placement", "seed"),
    [
        (Placement.LOCAL, 11),
        (Placement.CENTRAL, 12),
        pytest.param(Placement.DISTRIBUTED, 13, marks=pytest.mark.slow),
    ],
)
def test_the_95_percent_intervals_cover_the_truth_93_to_97_percent_of_the_time(
    query, vectors, truth, placement, seed
) -> None:
    coverage = _coverage(query, vectors, truth, placement, seed)
    print(f"coverage {placement.value}: " + ", ".join(f"{k} {v:.4f}" for k, v in coverage.items()))
    for name, share in coverage.items():
        assert 0.93 <= share <= 0.97, (name, share)


def test_quantile_intervals_in_bin_edges_hold_the_true_quantile(federation) -> None:
    edges = list(range(14, 101, 2))
    query = resolve_query(
        {
            "purpose": "analytics",
            "aggregates": [
                {
                    "kind": "quantiles",
                    "name": "age",
                    "column": "customers.age",
                    "bins": edges,
                    "probabilities": [0.25, 0.5, 0.75],
                }
            ],
        },
        federation[0],
    )
    total = sum(
        query_vector(t, c, query) for t, c in zip(federation[1], federation[0], strict=True)
    )
    ages = np.sort(pd.concat([t["customers"]["age"] for t in federation[1]]).to_numpy())
    true = np.array([ages[math.ceil(p * len(ages)) - 1] for p in (0.25, 0.5, 0.75)])
    layout = query.layout()
    z = noise_multiplier(EPSILON, DELTA)
    noise = layout.noise_in_sum(z, Placement.CENTRAL, contributors=3)
    source = SeededSource(14)
    inside = 0
    for _ in range(REPETITIONS):
        answers = query_answers(query, layout.central_noise(total, z, source), noise).answers
        inside += sum(
            a["interval"][0] <= t <= a["interval"][1] for a, t in zip(answers, true, strict=True)
        )
    coverage = inside / (3 * REPETITIONS)
    print(f"coverage quantiles (central): {coverage:.4f}")
    assert coverage >= 0.93  # conservative: the interval is whole bins


def _exact_multiple(value: float | int, granularity: float | int) -> bool:
    ratio = Fraction(Decimal(repr(value))) / Fraction(Decimal(repr(granularity)))
    return ratio.denominator == 1


@pytest.mark.parametrize("granularity", [0.05, 0.1, 0.3, 2.5, None])
def test_every_released_count_and_sum_is_a_whole_number_of_grid_steps(
    federation, granularity
) -> None:
    configs, tables = federation
    query = resolve_query(
        {
            "purpose": "analytics",
            "rows": "transactions",
            "max_rows": 3,
            "group_by": [{"column": "transactions.channel"}],
            "max_groups": 4,
            "aggregates": [
                {"kind": "count", "name": "purchases"},
                {
                    "kind": "sum",
                    "name": "spend",
                    "column": "transactions.amount",
                    **({} if granularity is None else {"granularity": granularity}),
                },
                {"kind": "histogram", "name": "categories", "column": "transactions.category"},
            ],
        },
        configs,
    )
    layout = query.layout()
    vectors = [query_vector(t, c, query) for t, c in zip(tables, configs, strict=True)]
    z = noise_multiplier(EPSILON, DELTA)
    noise = layout.noise_in_sum(z, Placement.LOCAL, contributors=len(vectors))
    source = SeededSource(15)
    checked = 0
    for _ in range(200):
        released = sum(layout.noisy(v, z, Placement.LOCAL, source) for v in vectors)
        for answer in query_answers(query, released, noise).answers:
            step = answer["granularity"]
            assert step == (granularity or 5.0 if answer["aggregate"] == "sum" else 1)
            for value in (answer["value"], *answer["interval"]):
                assert _exact_multiple(value, step), (answer, value)
                checked += 1
    assert checked == 200 * 3 * (4 + 4 + 4 * 5)
