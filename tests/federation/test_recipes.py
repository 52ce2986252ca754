"""Customer-analytics recipes on the synthetic silos: each resolves against the BUs' declarations,
and its exact (noise-free) answers equal the same statistic computed directly with pandas."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clients.queries import query_vector
from clients.silo import load_silo
from federation.queries import QueryResult, QuerySpec, query_answers, resolve_query
from federation.recipes import (
    DEFAULT_STAGES,
    Stage,
    cohort_retention,
    funnel,
    quintile_edges,
    rfm_edges,
    rfm_segments,
)
from privacy.errors import ConfigurationError, PolicyViolation
from privacy.mechanisms import Placement, noise_multiplier
from privacy.minimisation import minimise
from privacy.samplers import SeededSource
from privacy.schema import PurposePolicy
from privacy.unit_config import UnitConfig
from simulations.synthetic import CHANNELS, PERIOD_END, PRODUCTS, REGIONS, unit_schema

ANALYTICS = unit_schema("retail_stores").purposes["analytics"]  # the synthetic BUs' purpose
WINDOW_START = pd.Timestamp(PERIOD_END) - pd.Timedelta(days=365)


def with_analytics(config: UnitConfig) -> UnitConfig:
    if "analytics" in config.purposes:
        return config
    return config.model_copy(update={"purposes": {**config.purposes, "analytics": ANALYTICS}})


@pytest.fixture(scope="module")
def silos(small_silos: Path) -> tuple[list[UnitConfig], list[dict[str, pd.DataFrame]]]:
    configs = [
        with_analytics(UnitConfig.load(path)) for path in sorted(small_silos.glob("*/bu.toml"))
    ]
    return configs, [minimise(load_silo(c).tables, c, "analytics").tables for c in configs]


@pytest.fixture(scope="module")
def pooled(silos) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every BU's customers and their transactions (ids are unique across the synthetic BUs)."""
    people = pd.concat([t["customers"] for t in silos[1]], ignore_index=True)
    tx = pd.concat([t["transactions"] for t in silos[1]], ignore_index=True)
    return people, tx[tx["customer_id"].isin(people["customer_id"])]


def exact(spec: QuerySpec, silos) -> QueryResult:
    configs, tables = silos
    spec.check_against(configs)
    total = sum(query_vector(t, c, spec) for t, c in zip(tables, configs, strict=True))
    return query_answers(
        spec, total, spec.layout().noise_in_sum(None, Placement.LOCAL, contributors=3)
    )


def values(result: QueryResult, name: str) -> np.ndarray:
    return np.array([a["value"] for a in result.answers_of(name)], dtype=np.float64)


def test_churn_rate_by_region_is_churned_over_all(silos, pooled) -> None:
    spec = resolve_query({"recipe": "churn_rate_by_segment"}, silos[0])
    result = exact(spec, silos)
    people = pooled[0]
    rate = people.groupby("region")["churned"].mean().reindex(REGIONS)
    assert values(result, "churn_rate") == pytest.approx(rate.to_numpy())
    assert (
        values(result, "customers").tolist()
        == people.groupby("region").size().reindex(REGIONS).tolist()
    )
    chart = result.to_json()["chart"]
    assert chart["kind"] == "bars" and chart["series"][0]["labels"] == list(REGIONS)


def test_churn_rate_by_an_rfm_segment_uses_the_declared_rfm_bins(silos) -> None:
    spec = resolve_query(
        {"recipe": "churn_rate_by_segment", "segment": "derived.recency_days"}, silos[0]
    )
    (key,) = spec.group_by
    assert (
        key.bins == rfm_edges(silos[0], lookback_days=365)["recency"] == (0, 73, 146, 219, 292, 365)
    )
    rates = values(exact(spec, silos), "churn_rate")
    assert np.all(np.diff(rates) > 0)  # the ground truth: churn rises with recency


def _window_stats(tx: pd.DataFrame) -> pd.DataFrame:
    window = tx[(tx["timestamp"] > WINDOW_START) & (tx["timestamp"] <= pd.Timestamp(PERIOD_END))]
    per_channel = window.groupby(["customer_id", "channel"]).size().rename("n").reset_index()
    main = per_channel.sort_values(["customer_id", "n", "channel"], ascending=[True, False, True])
    return pd.DataFrame(
        {
            "frequency": window.groupby("customer_id").size(),
            "main_channel": main.drop_duplicates("customer_id").set_index("customer_id")["channel"],
        }
    )


def test_the_funnel_counts_customers_reaching_each_stage_per_main_channel(silos, pooled) -> None:
    spec = resolve_query({"recipe": "funnel"}, silos[0])
    result = exact(spec, silos)
    stats = _window_stats(pooled[1])
    thresholds = {"purchased": 1, "repeat": 2, "regular": 6, "loyal": 12}
    for stage, least in thresholds.items():
        expected = stats[stats["frequency"] >= least].groupby("main_channel").size()
        assert values(result, stage).tolist() == expected.reindex(CHANNELS, fill_value=0).tolist()
    chart = result.to_json()["chart"]
    assert chart["stages"] == list(thresholds) and chart["groups"] == list(CHANNELS)
    store = chart["counts"][0]
    assert chart["conversion"][0] == pytest.approx([b / a for a, b in itertools_pairs(store)])


def itertools_pairs(values: list) -> list[tuple]:
    return list(itertools.pairwise(values))


def test_funnel_stages_and_groups_come_from_the_query_table(silos) -> None:
    section = {
        "recipe": "funnel",
        "by": ["customers.region"],
        "stages": [
            {"name": "any", "where": []},
            {"name": "big", "where": [{"column": "derived.monetary", "op": "ge", "value": 100}]},
        ],
    }
    spec = resolve_query(section, silos[0])
    direct = funnel(
        silos[0],
        by=("customers.region",),
        stages=(Stage(name="any"), Stage.model_validate(section["stages"][1])),
    )
    assert spec.model_dump() == resolve_query(direct, silos[0]).model_dump()
    assert spec.group_by[0].domain == REGIONS
    assert [a.name for a in spec.aggregates] == ["any", "big", "any_to_big"]
    overall = resolve_query({"recipe": "funnel", "by": []}, silos[0])
    assert overall.group_by == () and overall.layout().size == len(DEFAULT_STAGES)


def test_the_cohort_matrix_is_active_customers_over_the_cohort_size(silos, pooled) -> None:
    spec = resolve_query({"recipe": "cohort_retention", "cohorts": 6, "months": 4}, silos[0])
    assert {p.name: p.sensitivity for p in spec.layout().parts} == {
        "cohort_size": 1.0,
        "active": 2.0,
    }
    result = exact(spec, silos)
    people, tx = pooled
    signup = people.set_index("customer_id")["signup_date"]
    cohort = signup.dt.strftime("%Y-%m")
    months = [str(p) for p in pd.period_range("2024-01", periods=6, freq="M")]
    bought = tx["timestamp"].dt.year * 12 + tx["timestamp"].dt.month
    joined = (signup.dt.year * 12 + signup.dt.month).reindex(tx["customer_id"]).to_numpy()
    active = tx.assign(since=bought - joined, cohort=cohort.reindex(tx["customer_id"]).to_numpy())
    active = active[active["since"].between(0, 3)].drop_duplicates(["customer_id", "since"])
    cells = active.groupby(["cohort", "since"]).size()
    sizes = cohort.value_counts().reindex(months, fill_value=0)
    expected = [[cells.get((m, s), 0) / sizes[m] for s in range(4)] for m in months]
    chart = result.to_json()["chart"]
    assert chart["kind"] == "matrix"
    assert (chart["rows"], chart["columns"]) == (months, ["0", "1", "2", "3"])
    assert np.array(chart["values"]) == pytest.approx(np.array(expected))
    assert chart["row_totals"] == sizes.tolist()


def test_top_categories_rank_categories_per_segment(silos, pooled) -> None:
    spec = resolve_query({"recipe": "top_categories", "k": 2}, silos[0])
    (part,) = spec.layout().parts
    assert part.sensitivity == pytest.approx(math.sqrt(len(PRODUCTS)))
    result = exact(spec, silos)
    people, tx = pooled
    region = people.set_index("customer_id")["region"]
    buyers = tx.drop_duplicates(["customer_id", "category"]).assign(
        region=lambda f: region.reindex(f["customer_id"]).to_numpy()
    )
    counts = (
        buyers.groupby(["region", "category"])
        .size()
        .unstack()
        .reindex(index=REGIONS, columns=PRODUCTS)
    )
    assert values(result, "buyers").tolist() == counts.to_numpy().ravel().tolist()
    chart = result.to_json()["chart"]
    assert "noisy counts" in chart["post_processing"]
    for segment in chart["segments"]:
        ranked = counts.loc[segment["segment"]].sort_values(ascending=False, kind="stable")
        assert [t["value"] for t in segment["top"]] == ranked.iloc[:2].tolist()


def test_rfm_segments_count_each_customer_once_per_dimension(silos, pooled) -> None:
    spec = resolve_query({"recipe": "rfm_segments"}, silos[0])
    assert [p.sensitivity for p in spec.layout().parts] == [1.0, 1.0, 1.0]
    result = exact(spec, silos)
    customers = len(pooled[0])
    for name in ("recency", "frequency", "monetary"):
        assert values(result, name).sum() == customers  # beyond the end edges: the end bins
    joint = exact(resolve_query({"recipe": "rfm_segments", "joint": True}, silos[0]), silos)
    assert (
        values(joint, "customers").reshape(5, 5, 5).sum(axis=(1, 2)).tolist()
        == values(result, "recency").tolist()
    )


def test_dp_quintiles_give_segment_bins_for_a_second_release(silos) -> None:
    configs, tables = silos
    spec = resolve_query({"recipe": "rfm_quantiles"}, configs)
    layout = spec.layout()
    z = noise_multiplier(1.0, 1e-6)
    source = SeededSource(3)
    released = sum(
        layout.noisy(query_vector(t, c, spec), z, Placement.LOCAL, source)
        for t, c in zip(tables, configs, strict=True)
    )
    result = query_answers(spec, released, layout.noise_in_sum(z, Placement.LOCAL, contributors=3))
    edges = quintile_edges(result)
    declared = rfm_edges(configs, lookback_days=365)
    for name, cuts in edges.items():
        assert (cuts[0], cuts[-1]) == (declared[name][0], declared[name][-1])
        assert all(b > a for a, b in itertools_pairs(list(cuts)))
    second = rfm_segments(configs, bins=edges)
    assert second.aggregate("recency").bins == edges["recency"]
    exact(resolve_query(second, configs), silos)


def test_a_noisy_recipe_result_is_plain_json(silos) -> None:
    configs, tables = silos
    spec = resolve_query({"recipe": "cohort_retention"}, configs)
    layout = spec.layout()
    z = noise_multiplier(1.0, 1e-6)
    released = layout.central_noise(
        sum(query_vector(t, c, spec) for t, c in zip(tables, configs, strict=True)),
        z,
        SeededSource(5),
    )
    result = query_answers(
        spec, released, layout.noise_in_sum(z, Placement.CENTRAL, contributors=3)
    )
    document = json.loads(json.dumps(result.to_json(), allow_nan=False))
    assert document["recipe"] == "cohort_retention"
    rates = [a for a in document["answers"] if a["name"] == "retention" and a["value"] is not None]
    assert all(0.0 <= a["value"] <= 1.0 and a["post_processing"] for a in rates)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"recipe": "lifetime_value"}, "is not a recipe"),
        ({"recipe": "funnel", "stage": []}, "stage: Unexpected keyword argument"),
        ({"recipe": "cohort_retention", "months": 0}, "greater than or equal to 1"),
        ({"recipe": "cohort_retention", "first_cohort": "2024-13"}, "first_cohort"),
        ({"recipe": "funnel", "stages": [{"name": "only"}]}, "at least two stages"),
        ({"recipe": "rfm_segments", "bins": {"tenure": [0, 1]}}, "only"),
        (
            {"recipe": "churn_rate_by_segment", "segment": "customers.age"},
            "no declared domain or bins",
        ),
        ({"recipe": "top_categories", "units": ["nobody"]}, "nobody"),
    ],
)
def test_a_bad_recipe_table_is_a_configuration_error(silos, section, message) -> None:
    with pytest.raises(ConfigurationError, match=message):
        resolve_query(section, silos[0])


def test_a_recipe_reading_a_column_the_purpose_does_not_allow_is_refused(silos) -> None:
    narrow = PurposePolicy(join_keys=ANALYTICS.join_keys, features=("customers.age",))
    configs = [
        c.model_copy(update={"purposes": {**c.purposes, "narrow": narrow}}) for c in silos[0]
    ]
    with pytest.raises(PolicyViolation, match=r"does not allow 'customers\.region'"):
        resolve_query({"recipe": "churn_rate_by_segment", "purpose": "narrow"}, configs)


def test_the_default_funnel_counts_purchases_in_the_window() -> None:
    assert [s.name for s in DEFAULT_STAGES] == ["purchased", "repeat", "regular", "loyal"]
    assert [s.where[0].value for s in DEFAULT_STAGES] == [1, 2, 6, 12]


def test_cohorts_default_to_the_start_of_the_declared_period(silos) -> None:
    spec = cohort_retention(silos[0], cohorts=2, months=1)
    assert spec.aggregate("cohort_size").group_by[0].domain == ("2024-01", "2024-02")
