"""The query spec, its checks against declared configurations, its release layout and the answers
read off a summed release: all without data."""

from __future__ import annotations

import json
import math
import tomllib
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from federation.queries import (
    Condition,
    Count,
    GroupKey,
    Histogram,
    Mean,
    QuerySpec,
    Ratio,
    Sum,
    default_granularity,
    parse_query,
    preview_answers,
    query_answers,
    resolve_query,
)
from privacy.errors import ConfigurationError, PolicyViolation
from privacy.mechanisms import NoiseInSum, ratio_interval
from privacy.schema import (
    ColumnRole,
    ColumnSpec,
    ColumnType,
    PurposePolicy,
    Sensitive,
    TableSpec,
)
from privacy.unit_config import Source, UnitConfig

REGIONS = ("north", "south", "east")
CHANNELS = ("store", "online")
JOIN = ("customers.customer_id", "transactions.customer_id")
ANALYTICS = (
    "customers.age",
    "customers.region",
    "customers.signup_date",
    "customers.churned",
    "customers.income",
    "transactions.timestamp",
    "transactions.amount",
    "transactions.channel",
)


def unit(name: str, *, regions=REGIONS, purposes=None, income_nullable=True) -> UnitConfig:
    """A BU configuration whose silo directory does not exist: every check below reads only it."""

    def col(type_, role=ColumnRole.ATTRIBUTE, **kw) -> ColumnSpec:
        return ColumnSpec(type=type_, role=role, **kw)

    customers = {
        "customer_id": col(ColumnType.STRING, ColumnRole.IDENTIFIER),
        "age": col(ColumnType.INTEGER, ColumnRole.QUASI_IDENTIFIER, lower=18.0, upper=90.0),
        "region": col(ColumnType.CATEGORY, domain=regions),
        "signup_date": col(
            ColumnType.DATE, lower=datetime(2020, 1, 1), upper=datetime(2025, 12, 31)
        ),
        "churned": col(ColumnType.BOOLEAN, ColumnRole.LABEL),
        "income": col(ColumnType.FLOAT, lower=0.0, upper=1e5, nullable=income_nullable),
        "religion": col(
            ColumnType.CATEGORY,
            ColumnRole.SPECIAL_CATEGORY,
            domain=("a", "b"),
            sensitive=Sensitive.RELIGIOUS_BELIEFS,
        ),
    }
    transactions = {
        "customer_id": col(ColumnType.STRING, ColumnRole.IDENTIFIER),
        "timestamp": col(
            ColumnType.DATETIME, lower=datetime(2024, 1, 1), upper=datetime(2025, 12, 31)
        ),
        "amount": col(ColumnType.FLOAT, lower=0.0, upper=5000.0),
        "channel": col(ColumnType.CATEGORY, domain=CHANNELS),
    }
    if purposes is None:
        purposes = {
            "analytics": PurposePolicy(join_keys=JOIN, features=ANALYTICS),
            "narrow": PurposePolicy(join_keys=JOIN, features=("customers.age",)),
            "keyless": PurposePolicy(features=("customers.age",)),
        }
    return UnitConfig(
        unit=name,
        source=Source(directory=Path("/nonexistent/silo")),
        tables={
            "customers": TableSpec(file="customers.csv", columns=customers, key="customer_id"),
            "transactions": TableSpec(
                file="transactions.csv", columns=transactions, key="customer_id"
            ),
        },
        purposes=purposes,
    )


CONFIGS = [unit("alpha"), unit("beta"), unit("gamma")]


def spec(**fields) -> QuerySpec:
    return QuerySpec.model_validate({"purpose": "analytics", **fields})


def count(name="customers", **kw) -> dict:
    return {"kind": "count", "name": name, **kw}


# --- parsing -----------------------------------------------------------------------------------


QUERY_TOML = """
[query]
purpose = "analytics"
units = ["alpha", "beta"]
where = [{ column = "customers.signup_date", op = "ge", value = 2021-01-01 }]
group_by = [{ column = "customers.region", domain = ["north", "south", "east"] }]

[[query.aggregates]]
kind = "count"
name = "customers"

[[query.aggregates]]
kind = "count"
name = "churned"
where = [{ column = "customers.churned", op = "eq", value = true }]

[[query.aggregates]]
kind = "ratio"
name = "churn_rate"
numerator = "churned"
denominator = "customers"
rate = true

[[query.aggregates]]
kind = "mean"
name = "age"
column = "customers.age"
lower = 18
upper = 90
"""


def test_a_query_table_parses_and_round_trips_through_json() -> None:
    parsed = parse_query(tomllib.loads(QUERY_TOML)["query"])
    assert parsed.units == ("alpha", "beta")
    assert parsed.where[0].value == "2021-01-01"  # a TOML date is kept as ISO text
    assert [a.kind for a in parsed.aggregates] == ["count", "count", "ratio", "mean"]
    assert QuerySpec.model_validate(json.loads(parsed.model_dump_json())) == parsed
    parsed.check_against(CONFIGS)


@pytest.mark.parametrize(
    ("section", "field"),
    [
        (
            {
                "aggregates": [
                    count(
                        group_by=[{"column": "customers.region", "domain": ["a"], "bins": [0, 1]}]
                    )
                ]
            },
            "not both",
        ),
        (
            {
                "aggregates": [
                    {"kind": "histogram", "name": "h", "column": "customers.age", "bins": [0, 5, 5]}
                ]
            },
            "increase strictly",
        ),
        (
            {
                "aggregates": [
                    count(),
                    {"kind": "ratio", "name": "r", "numerator": "x", "denominator": "customers"},
                ]
            },
            "numerator 'x'",
        ),
        ({"aggregates": [count(), count()]}, "unique"),
        (
            {"aggregates": [count(where=[{"column": "derived.loyalty", "op": "present"}])]},
            "not a derived column",
        ),
        (
            {"aggregates": [count(where=[{"column": "customers.region", "op": "in"}])]},
            "non-empty 'values'",
        ),
        (
            {
                "aggregates": [
                    {
                        "kind": "quantiles",
                        "name": "q",
                        "column": "customers.age",
                        "bins": [0, 50, 100],
                        "probabilities": [0.5, 1.0],
                    }
                ]
            },
            "(0, 1)",
        ),
        (
            {
                "aggregates": [
                    {"kind": "sum", "name": "s", "column": "customers.age", "lower": 5, "upper": 5}
                ]
            },
            "below",
        ),
        (
            {
                "aggregates": [
                    count(group_by=[{"column": "derived.months_since_signup", "bins": [0, 1]}])
                ]
            },
            "rows = 'transactions'",
        ),
        (
            {
                "aggregates": [
                    {
                        "kind": "sum",
                        "name": "s",
                        "column": "transactions.amount",
                        "lower": 0,
                        "upper": 9,
                    }
                ]
            },
            "cannot read 'transactions.amount'",
        ),
        ({"aggregates": []}, "at least 1"),
        ({"aggregates": [count()], "chart": {"kind": "bars", "series": ["nope"]}}, "chart names"),
        (
            {"aggregates": [count(group_by=[{"column": "customers.region", "labels": ["x"]}])]},
            "labels",
        ),
        ({"aggregates": [count(where=[{"column": "region", "op": "present"}])]}, "table.column"),
    ],
)
def test_a_malformed_query_is_a_configuration_error_naming_the_problem(section, field) -> None:
    with pytest.raises(ConfigurationError, match=field.replace("(", r"\(").replace(")", r"\)")):
        parse_query({"purpose": "analytics", **section})
    with pytest.raises(ValidationError):
        QuerySpec.model_validate({"purpose": "analytics", **section})


def test_a_ratio_denominator_must_group_by_keys_of_the_numerator() -> None:
    region = {"column": "customers.region", "domain": list(REGIONS)}
    with pytest.raises(ValidationError, match="group key of the numerator"):
        spec(
            aggregates=[
                count("all"),
                count("by_region", group_by=[region]),
                {"kind": "ratio", "name": "r", "numerator": "all", "denominator": "by_region"},
            ]
        )


# --- checks against the declared configurations, before any data is read -------------------


def test_a_group_key_without_domain_or_bins_is_refused_before_data_is_read() -> None:
    query = spec(aggregates=[count(group_by=[{"column": "customers.age"}])])
    with pytest.raises(ConfigurationError, match="no declared domain or bins"):
        query.check_against(CONFIGS)
    with pytest.raises(ConfigurationError, match="no declared domain or bins"):
        query.layout()
    # resolve_query fills declared categories, never bins: age has no categories to fill
    with pytest.raises(
        ConfigurationError, match=r"'customers\.age' has no declared domain or bins"
    ):
        resolve_query(
            {"purpose": "analytics", "aggregates": [count(group_by=[{"column": "customers.age"}])]},
            CONFIGS,
        )


def test_a_sum_without_bounds_is_refused_and_declared_bounds_fill_it() -> None:
    unbounded = spec(
        observation_date="2025-12-31T00:00:00",
        lookback_days=365,
        aggregates=[{"kind": "sum", "name": "f", "column": "derived.frequency"}],
    )
    with pytest.raises(ConfigurationError, match="no clipping bounds"):
        unbounded.check_against(CONFIGS)
    with pytest.raises(ConfigurationError, match="no clipping bounds"):
        resolve_query(unbounded, CONFIGS)  # purchases per customer have no declared bound
    resolved = resolve_query(
        {
            "purpose": "analytics",
            "aggregates": [{"kind": "mean", "name": "age", "column": "customers.age"}],
        },
        CONFIGS,
    )
    assert (resolved.aggregates[0].lower, resolved.aggregates[0].upper) == (18.0, 90.0)


def test_a_purpose_the_unit_has_not_declared_is_refused() -> None:
    other = unit(
        "delta",
        purposes={"churn_model": PurposePolicy(join_keys=JOIN, features=("customers.age",))},
    )
    with pytest.raises(
        ConfigurationError, match="unit 'delta' has not declared purpose 'analytics'"
    ):
        spec(aggregates=[count()]).check_against([*CONFIGS, other])
    # a BU not taking part is not checked
    spec(units=["alpha"], aggregates=[count()]).check_against([*CONFIGS, other])


def test_a_column_the_purpose_does_not_allow_is_refused() -> None:
    query = QuerySpec(
        purpose="narrow",
        group_by=(GroupKey(column="customers.region", domain=REGIONS),),
        aggregates=(Count(name="customers"),),
    )
    with pytest.raises(PolicyViolation, match=r"does not allow 'customers\.region'"):
        query.check_against(CONFIGS)


def test_a_special_category_is_never_queryable() -> None:
    query = spec(
        aggregates=[count(group_by=[{"column": "customers.religion", "domain": ["a", "b"]}])]
    )
    with pytest.raises(PolicyViolation, match="special category"):
        query.check_against(CONFIGS)
    filtered = spec(
        aggregates=[count(where=[{"column": "customers.religion", "op": "eq", "value": "a"}])]
    )
    with pytest.raises(PolicyViolation, match="special category"):
        filtered.check_against(CONFIGS)


def test_a_table_whose_key_the_purpose_does_not_allow_is_refused() -> None:
    query = QuerySpec(purpose="keyless", aggregates=(Count(name="customers"),))
    with pytest.raises(PolicyViolation, match=r"key 'customers\.customer_id'"):
        query.check_against(CONFIGS)


def test_unknown_units_are_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"names \['omega'\]"):
        spec(units=["omega"], aggregates=[count()]).check_against(CONFIGS)


@pytest.mark.parametrize(
    ("aggregate", "message"),
    [
        (
            count(group_by=[{"column": "customers.region", "domain": ["north", "nort"]}]),
            r"\['nort'\] are not in the declared domain",
        ),
        (
            {"kind": "sum", "name": "s", "column": "customers.region", "lower": 0, "upper": 1},
            "needs a numeric column",
        ),
        (
            count(where=[{"column": "customers.region", "op": "lt", "value": "north"}]),
            "compares numbers",
        ),
        (
            count(where=[{"column": "customers.age", "op": "ge", "value": "40"}]),
            "compare it with a number",
        ),
        (count(where=[{"column": "customers.churned", "op": "eq", "value": 1}]), "true or false"),
        (
            count(where=[{"column": "customers.signup_date", "op": "ge", "value": "last year"}]),
            "ISO date",
        ),
        (count(group_by=[{"column": "customers.age", "domain": ["18"]}]), "group it by bins"),
        (count(group_by=[{"column": "customers.region", "bins": [0, 1]}]), "bins are for numeric"),
        (
            {"kind": "quantiles", "name": "q", "column": "customers.churned", "bins": [0, 1]},
            "quantiles need a numeric",
        ),
        (
            count(group_by=[{"column": "customers.churned", "domain": ["yes", "no"]}]),
            "'false' and 'true'",
        ),
    ],
)
def test_a_use_that_does_not_fit_the_declaration_is_refused(aggregate, message) -> None:
    with pytest.raises(ConfigurationError, match=message):
        spec(aggregates=[aggregate]).check_against(CONFIGS)


def test_a_nullable_column_is_summed_only_over_rows_where_it_is_present() -> None:
    income = {
        "kind": "mean",
        "name": "income",
        "column": "customers.income",
        "lower": 0,
        "upper": 1e5,
    }
    with pytest.raises(ConfigurationError, match="may be missing"):
        spec(aggregates=[income]).check_against(CONFIGS)
    present = {**income, "where": [{"column": "customers.income", "op": "present"}]}
    spec(aggregates=[present]).check_against(CONFIGS)
    spec(aggregates=[income]).check_against([unit("alpha", income_nullable=False)])


def test_resolve_fills_the_declared_window_domains_and_bounds() -> None:
    other = unit("delta", regions=("north", "west"))
    resolved = resolve_query(
        {
            "purpose": "analytics",
            "group_by": [{"column": "customers.region"}],
            "aggregates": [
                count(),
                {"kind": "histogram", "name": "main", "column": "derived.main_channel"},
                {"kind": "mean", "name": "recency", "column": "derived.recency_days"},
            ],
        },
        [*CONFIGS, other],
    )
    assert resolved.group_by[0].domain == ("north", "south", "east", "west")  # the union
    assert resolved.observation_date == datetime(2025, 12, 31)
    assert resolved.lookback_days == 365
    assert resolved.aggregate("main").domain == CHANNELS
    assert (resolved.aggregate("recency").lower, resolved.aggregate("recency").upper) == (0, 365)
    assert resolved.columns == (
        "customers.region",
        "transactions.channel",
        "transactions.timestamp",
    )
    assert resolved.tables == ("customers", "transactions")


def test_resolve_fills_signup_months_within_the_declared_bounds() -> None:
    resolved = resolve_query(
        {
            "purpose": "analytics",
            "aggregates": [{"kind": "histogram", "name": "m", "column": "derived.signup_month"}],
        },
        CONFIGS,
    )
    months = resolved.aggregate("m").domain
    assert (months[0], months[-1], len(months)) == ("2020-01", "2025-12", 72)


# --- the release layout -----------------------------------------------------------------------


def test_parts_carry_the_sensitivity_of_the_declared_bounding() -> None:
    region = {"column": "customers.region", "domain": list(REGIONS)}
    channel = {"column": "transactions.channel", "domain": list(CHANNELS)}
    query = spec(
        group_by=[region],
        aggregates=[
            count(),
            {
                "kind": "mean",
                "name": "age",
                "column": "customers.age",
                "lower": 18,
                "upper": 90,
                "granularity": 0.5,
            },
            count("young", where=[{"column": "customers.age", "op": "lt", "value": 30}]),
            {
                "kind": "ratio",
                "name": "young_share",
                "numerator": "young",
                "denominator": "customers",
            },
            {
                "kind": "sum",
                "name": "spend",
                "rows": "transactions",
                "column": "transactions.amount",
                "lower": -100,
                "upper": 400,
                "group_by": [channel],
                "max_groups": 2,
                "max_rows": 3,
            },
            {
                "kind": "histogram",
                "name": "ages",
                "column": "customers.age",
                "bins": [18, 30, 50, 90],
            },
        ],
    )
    layout = query.layout()
    assert [(p.name, p.size) for p in layout.parts] == [
        ("customers", 3),
        ("age.sum", 3),  # the mean's count is the count 'customers': released once
        ("young", 3),
        ("spend", 2),
        ("ages", 9),
    ]
    sensitivity = {p.name: p.sensitivity for p in layout.parts}
    assert sensitivity["customers"] == 1.0
    assert sensitivity["age.sum"] == 180.0  # 90 / 0.5
    assert sensitivity["spend"] == pytest.approx(math.sqrt(2) * 3 * (400 / 0.5))
    assert query.measures["spend"].granularity == 0.5  # default: (400 + 100) / 1000
    assert query.parts_of("age") == ("age.sum", "customers")
    assert query.parts_of("young_share") == ("young", "customers")


@pytest.mark.parametrize(
    ("lower", "upper", "step"),
    [(0, 5000, 5.0), (18, 90, 0.05), (0, 1, 0.001), (0, 3, 0.002), (-1e6, 1e6, 2000.0)],
)
def test_the_default_granularity_is_a_decimal_step_near_a_thousandth_of_the_range(
    lower, upper, step
) -> None:
    assert default_granularity(lower, upper) == step


def test_a_granularity_coarser_than_the_bounds_is_refused() -> None:
    query = spec(
        aggregates=[
            {
                "kind": "sum",
                "name": "s",
                "column": "customers.age",
                "lower": 0,
                "upper": 1,
                "granularity": 5,
            }
        ]
    )
    with pytest.raises(ConfigurationError, match="coarser"):
        query.layout()


# --- answers ------------------------------------------------------------------------------------


def _noise(query: QuerySpec, sigma: float) -> dict[str, NoiseInSum]:
    return {p.name: NoiseInSum((sigma, sigma)) for p in query.layout().parts}


def test_count_and_sum_answers_are_grid_values_with_the_exact_noise_interval() -> None:
    query = QuerySpec(
        purpose="analytics",
        group_by=(GroupKey(column="customers.region", domain=REGIONS),),
        aggregates=(
            Count(name="customers"),
            Sum(name="age_total", column="customers.age", lower=18, upper=90, granularity=0.05),
        ),
    )
    noise = _noise(query, 3.0)
    total = np.array([10, -2, 0, 401, 3, -7], dtype=np.int64)
    result = query_answers(query, total, noise)
    half = noise["customers"].quantile(0.95)
    counts = result.answers_of("customers")
    assert [a["value"] for a in counts] == [10, -2, 0]  # raw: a negative count stays negative
    assert counts[1]["interval"] == [-2 - half, -2 + half]
    assert counts[0]["group"] == {"customers.region": "north"}
    assert counts[0]["noise_std"] == pytest.approx(noise["customers"].std)
    sums = result.answers_of("age_total")
    assert [a["value"] for a in sums] == [20.05, 0.15, -0.35]  # 401 x 0.05 exactly, in decimal
    assert sums[0]["interval"] == [round((401 - half) * 0.05, 10), round((401 + half) * 0.05, 10)]
    assert sums[0]["granularity"] == 0.05
    assert json.loads(json.dumps(result.to_json(), allow_nan=False))["answers"][0]["value"] == 10


def test_a_mean_carries_the_delta_method_interval_of_its_parts() -> None:
    query = QuerySpec(
        purpose="analytics",
        aggregates=(Mean(name="age", column="customers.age", lower=18, upper=90, granularity=0.5),),
    )
    noise = {"age.sum": NoiseInSum((400.0,)), "age.count": NoiseInSum((2.0,))}
    (answer,) = query_answers(query, np.array([8000, 200]), noise).answers
    assert answer["value"] == pytest.approx(20.0)  # 8000 x 0.5 / 200
    lo, hi = ratio_interval(8000, 200, noise["age.sum"], noise["age.count"])
    assert answer["interval"] == pytest.approx([lo * 0.5, hi * 0.5])
    assert answer["denominator"] == 200
    assert answer["granularity"] is None


def test_a_ratio_is_broadcast_over_the_numerators_extra_keys_and_a_rate_is_clipped_visibly() -> (
    None
):
    region = GroupKey(column="customers.region", domain=REGIONS)
    channel = GroupKey(column="transactions.channel", domain=CHANNELS)
    query = QuerySpec(
        purpose="analytics",
        aggregates=(
            Count(name="size", group_by=(region,)),
            Count(
                name="active",
                rows="transactions",
                group_by=(region, channel),
                max_groups=2,
            ),
            Ratio(name="share", numerator="active", denominator="size", rate=True),
        ),
    )
    total = np.array([100, 50, -3, 60, 40, 120, 0, 0, 7], dtype=np.int64)
    result = query_answers(query, total, _noise(query, 2.0))
    shares = result.answers_of("share")
    assert [a["group"] for a in shares][:2] == [
        {"customers.region": "north", "transactions.channel": "store"},
        {"customers.region": "north", "transactions.channel": "online"},
    ]
    assert [a["denominator"] for a in shares] == [100, 100, 50, 50, -3, -3]
    assert shares[0]["value"] == pytest.approx(0.6)
    assert shares[2]["value"] == 1.0 and shares[2]["raw_value"] == pytest.approx(2.4)
    assert "clipped to [0, 1]" in shares[2]["post_processing"]
    assert shares[3]["value"] == 0.0 and "raw_value" not in shares[3]
    assert shares[4]["value"] is None and shares[4]["interval"] == [None, None]
    assert result.tables["share"]["dims"][1]["labels"] == list(CHANNELS)
    assert result.tables["share"]["values"][0][1] == pytest.approx(0.4)


def test_histogram_answers_and_tables_follow_groups_then_bins() -> None:
    query = QuerySpec(
        purpose="analytics",
        group_by=(GroupKey(column="customers.churned", domain=("false", "true")),),
        aggregates=(Histogram(name="ages", column="customers.age", bins=(18, 40, 90)),),
    )
    result = query_answers(query, np.array([5, 6, 7, 8]), _noise(query, 1.0))
    assert [(a["group"]["customers.churned"], a["bin"], a["value"]) for a in result.answers] == [
        ("false", "[18, 40)", 5),
        ("false", "[40, 90]", 6),
        ("true", "[18, 40)", 7),
        ("true", "[40, 90]", 8),
    ]
    assert result.tables["ages"]["values"] == [[5, 6], [7, 8]]


def test_quantiles_are_read_off_the_cumulative_histogram() -> None:
    query = spec(
        aggregates=[
            {
                "kind": "quantiles",
                "name": "q",
                "column": "customers.age",
                "bins": [0, 10, 20, 30, 40],
                "probabilities": [0.25, 0.5],
            }
        ]
    )
    counts = np.array([10, 30, 40, 20])
    exact = query_answers(query, counts, {"q": NoiseInSum(())})
    first, median = exact.answers
    assert first["value"] == pytest.approx(15.0)  # rank 25 of 100: 15 of the 30 in [10, 20)
    assert first["interval"] == [10.0, 20.0]  # no noise: the quantile's own bin
    assert median["value"] == pytest.approx(22.5)
    # the median: D_j = C_j - N / 2 = (-40, -10, 30) at edges 10, 20, 30; each of variance
    # v (j / 4 + (4 - j) / 4) = v, so h = 1.96 sigma; sigma = 10 widens the interval by a bin
    noisy = query_answers(query, counts, {"q": NoiseInSum((10.0,))}).answers[1]
    assert noisy["interval"] == [10.0, 30.0]
    assert query_answers(query, counts, {"q": NoiseInSum((4.0,))}).answers[1]["interval"] == [
        20.0,
        30.0,
    ]


def test_a_missing_noise_description_is_an_error() -> None:
    query = spec(aggregates=[count()])
    with pytest.raises(ValueError, match="no noise description"):
        query_answers(query, np.array([1]), {})


def test_preview_states_each_expected_error_and_the_denominator_it_assumes() -> None:
    query = spec(
        aggregates=[
            count(),
            {"kind": "mean", "name": "age", "column": "customers.age", "lower": 18, "upper": 90},
            {"kind": "sum", "name": "total", "column": "customers.age", "lower": 18, "upper": 90},
        ]
    )
    noise = _noise(query, 4.0)
    assert query.parts_of("total") == ("age.sum",)  # the same sum as the mean's: shared
    preview = {p["name"]: p for p in preview_answers(query, noise, denominator=500)}
    assert preview["customers"]["half_width"] == noise["customers"].quantile(0.95)
    assert preview["total"]["half_width"] == pytest.approx(noise["age.sum"].quantile(0.95) * 0.05)
    mean = preview["age"]
    assert (mean["at_denominator"], mean["at_ratio"]) == (500, 90)
    lo, hi = ratio_interval(90 / 0.05 * 500, 500, noise["age.sum"], noise["customers"])
    assert mean["half_width"] == pytest.approx((hi - lo) / 2 * 0.05)


def test_conditions_accept_dates_and_booleans_from_toml() -> None:
    condition = Condition.model_validate(
        {"column": "customers.signup_date", "op": "in", "values": [datetime(2024, 1, 1)]}
    )
    assert condition.values == ("2024-01-01T00:00:00",)
    assert GroupKey.model_validate(
        {"column": "customers.churned", "domain": [False, True]}
    ).domain == ("false", "true")
