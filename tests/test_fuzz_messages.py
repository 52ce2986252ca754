"""Message and query parsers under arbitrary input (issue #9, safe inputs).

What crosses the network (the coordinator's instruction, a BU's report, refusal or name) either
parses into its typed object or fails with silofed's `RunFailed` naming the field; a query table
or a recipe's parameters either resolve into a query or fail with `ConfigurationError`. Never
another exception, never a hang. An oversized field is refused before any parser sees it, and
JSON nested 100,000 deep gives the same clean error.
"""

from __future__ import annotations

import inspect
import json
import math
import tracemalloc
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.exchanges import resolve_job
from federation.job import Job, JobKind, NoisePlacement, Task
from federation.queries import DERIVED_COLUMNS, QuerySpec, parse_query, resolve_query
from federation.recipes import RECIPES
from federation.wire import (
    MAX_JOB_BYTES,
    MAX_REPORT_BYTES,
    UNIT_KEY,
    DroppedColumn,
    Instruction,
    Phase,
    Refusal,
    UnitReport,
    refusal_of,
    unit_of,
)
from privacy.errors import ConfigurationError, RunFailed
from simulations.synthetic import unit_names, unit_schema
from tests.strategies import nested_values

FUZZ = settings(max_examples=150, deadline=None)

# Three BUs' declared schemas (public metadata; no data is read anywhere in this file).
CONFIGS = [unit_schema(name) for name in unit_names(3)]
INSTRUCTION = Instruction(
    phase=Phase.QUERY,
    server_round=1,
    run_id="20260101T000000Z-abcdef",
    started_at=datetime(2026, 1, 1, tzinfo=UTC),
    job=resolve_job(
        Job.model_validate(
            {"kind": "query", "query": {"purpose": "analytics", "recipe": "funnel"}}
        ),
        CONFIGS,
    ),
    units=3,
)
CONFIG = INSTRUCTION.to_config()
REPORT = UnitReport(
    unit="retail_stores",
    purpose="analytics",
    quality={"customers": {"rows": 400, "invalid_rows": 0}},
    records_used=400,
    records_test=80,
    excluded={"consent": 12},
    columns_used=["customers.region", "transactions.timestamp"],
    columns_dropped=[DroppedColumn(column="customers.religion", reason="special category")],
    epsilon=1.0,
    noise_multiplier=1.2,
    sample_rate=0.05,
    steps=0,
)
REFUSAL = Refusal(unit="ecommerce", reason="the job would exceed the purpose's budget")

# --- strategies ---------------------------------------------------------------------------------

scalars, values = nested_values(integer_bits=71)


def mostly(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """`strategy` nine times in ten, any value otherwise: inputs close enough to valid ones to
    reach the checks behind the first, and wrong enough to hit them."""
    return st.integers(0, 9).flatmap(lambda roll: values if roll == 9 else strategy)


def table(required: dict, **optional: st.SearchStrategy) -> st.SearchStrategy[dict]:
    """A TOML-like table: the `required` keys (mostly well-formed) and any subset of the others."""
    return st.fixed_dictionaries(
        {k: mostly(s) for k, s in required.items()},
        optional={k: mostly(s) for k, s in optional.items()},
    )


CATEGORIES = ["north", "south", "store", "online", "groceries", "true", "false", "elsewhere"]
MONTHS = ["0000-01", "0001-01", "2023-01", "2024-06", "9999-01", "9999-12", "2024-13"]
columns = st.sampled_from(
    [
        *DERIVED_COLUMNS,
        "customers.age",
        "customers.region",
        "customers.gender",
        "customers.churned",
        "customers.religion",
        "customers.signup_date",
        "transactions.amount",
        "transactions.category",
        "transactions.channel",
        "transactions.timestamp",
        "nowhere.nothing",
    ]
)
numbers = st.one_of(
    st.integers(min_value=-3, max_value=400),
    st.floats(min_value=-1e3, max_value=1e4),
    st.sampled_from([0.0, 5e-324, 1e300, -1e300, float("inf"), float("nan"), 2**63]),
)
# what sizes a loop: in range, just past a cap, far past it
sizes = st.integers(min_value=1, max_value=12_000) | st.sampled_from([0, 10**6, 2**64, 10**400])
edges = st.lists(numbers, max_size=6).map(sorted) | st.lists(numbers, max_size=4)
domains = st.lists(st.sampled_from(CATEGORIES), min_size=1, max_size=4, unique=True)
names = st.sampled_from(["customers", "churned", "spend", "rate"])
operands = st.sampled_from(CATEGORIES) | numbers | st.booleans() | st.dates().map(str)
conditions = st.one_of(
    table({"column": columns, "op": st.sampled_from(["eq", "ne", "lt", "ge"]), "value": operands}),
    table({"column": columns, "op": st.sampled_from(["in", "not_in"]), "values": domains}),
    table({"column": columns, "op": st.just("present")}, value=operands),
)
group_keys = st.one_of(
    table({"column": columns}, domain=domains, labels=domains),
    table({"column": columns, "bins": edges}, outside=st.sampled_from(["drop", "clip"])),
)
scoped = {
    "rows": st.sampled_from(["customers", "transactions"]),
    "where": st.lists(conditions, max_size=2),
    "group_by": st.lists(group_keys, max_size=2),
    "max_groups": sizes,
    "max_rows": sizes,
}
bounded = {
    "lower": numbers | st.floats(),
    "upper": numbers | st.floats(),
    "granularity": st.floats(),
}
aggregates = st.one_of(
    table({"name": names, "kind": st.just("count")}, **scoped),
    table({"name": names, "kind": st.sampled_from(["sum", "mean"]), "column": columns}, **bounded),
    table(
        {"name": names, "kind": st.just("histogram"), "column": columns}, domain=domains, bins=edges
    ),
    table(
        {"name": names, "kind": st.just("quantiles"), "column": columns, "bins": edges},
        probabilities=st.lists(st.floats(min_value=0, max_value=1), max_size=4).map(sorted),
    ),
    table({"name": names, "kind": st.just("ratio"), "numerator": names, "denominator": names}),
)
queries = table(
    {"purpose": st.just("analytics"), "aggregates": st.lists(aggregates, min_size=1, max_size=3)},
    units=st.lists(st.sampled_from([*unit_names(3), "elsewhere"]), max_size=2),
    where=st.lists(conditions, max_size=2),
    group_by=st.lists(group_keys, max_size=2),
    max_groups=sizes,
    max_rows=sizes,
    observation_date=st.datetimes(timezones=st.none() | st.just(UTC)).map(datetime.isoformat),
    lookback_days=sizes,
    chart=table({"kind": st.sampled_from(["bars", "funnel"]), "series": st.lists(names)}),
)
stages = st.lists(table({"name": names}, where=st.lists(conditions, max_size=2)), max_size=4)
RECIPE_VALUES = {
    "purpose": st.just("analytics"),
    "units": st.lists(st.sampled_from([*unit_names(3), "elsewhere"]), max_size=2),
    "lookback_days": sizes,
    "frequency_upper": numbers | sizes,
    "resolution": sizes,
    "probabilities": st.lists(st.floats(min_value=0, max_value=1), max_size=4).map(sorted),
    "bins": st.dictionaries(st.sampled_from(["recency", "frequency", "monetary", "age"]), edges),
    "joint": st.booleans(),
    "segment": columns,
    "churned": columns,
    "stages": stages,
    "by": st.lists(columns, max_size=2),
    "first_cohort": st.sampled_from(MONTHS),
    "cohorts": sizes,
    "months": sizes,
    "category": columns,
    "segment_bins": edges,
    "k": sizes,
    "max_categories": sizes,
    "extra": values,
}
recipe_tables = st.sampled_from(sorted(RECIPES)).flatmap(
    lambda name: table(
        {"recipe": st.just(name)},
        **{
            p: RECIPE_VALUES[p]
            for p in inspect.signature(RECIPES[name]).parameters
            if p != "configs"
        },
        extra=values,
    )
)
jobs = table(
    {"kind": st.sampled_from(list(JobKind))},
    task=st.sampled_from(list(Task)),
    purpose=st.just("analytics"),
    rounds=sizes,
    epsilon=numbers,
    noise=st.sampled_from(list(NoisePlacement)),
    query=queries | recipe_tables,
    segments=table({"k": sizes}, iterations=sizes, purpose=st.just("analytics")),
)
# What a text field of a message may hold: the valid message's own text cut short, a job-shaped
# table or any JSON value as JSON, any text, bytes.
job_texts = st.one_of(
    st.integers(0, len(CONFIG["silofed.job"])).map(lambda n: CONFIG["silofed.job"][:n]),
    jobs.map(json.dumps),
    values.map(json.dumps),
    st.text(max_size=50),
    st.binary(max_size=50),
)
fields = st.one_of(job_texts, scalars, st.lists(scalars, max_size=3))


def _with(base: dict, changes: dict, dropped: set) -> dict:
    return {k: v for k, v in {**base, **changes}.items() if k not in dropped}


# --- messages -----------------------------------------------------------------------------------


@FUZZ
@given(
    changes=st.dictionaries(st.sampled_from(sorted(CONFIG)), fields, max_size=3),
    dropped=st.sets(st.sampled_from(sorted(CONFIG)), max_size=2),
)
def test_any_instruction_config_gives_an_instruction_or_a_clean_error(changes, dropped) -> None:
    config = _with(CONFIG, changes, dropped)
    try:
        instruction = Instruction.from_config(config)
    except RunFailed as err:
        assert "not a silofed instruction" in str(err)
        assert any(key in str(err) for key in CONFIG), str(err)
    else:
        assert Instruction.from_config(instruction.to_config()) == instruction


@FUZZ
@given(job=jobs)
def test_any_job_in_an_instruction_gives_a_job_or_a_clean_error(job) -> None:
    try:
        instruction = Instruction.from_config({**CONFIG, "silofed.job": json.dumps(job)})
    except RunFailed as err:
        assert "silofed.job" in str(err)
    else:
        assert isinstance(instruction.job, Job)


@FUZZ
@given(
    changes=st.dictionaries(st.sampled_from(sorted(UnitReport.model_fields)), values, max_size=3),
    dropped=st.sets(st.sampled_from(sorted(UnitReport.model_fields)), max_size=2),
    text=job_texts,
    key=st.sampled_from([UnitReport.KEY, Refusal.KEY, UNIT_KEY]),
)
def test_any_reply_metrics_give_a_report_or_a_clean_error(changes, dropped, text, key) -> None:
    report = json.dumps(_with(REPORT.model_dump(), changes, dropped))
    for metrics in ({UnitReport.KEY: report}, {Refusal.KEY: report}, {key: text}, {}):
        for parse, expected in (
            (UnitReport.from_metrics, UnitReport),
            (refusal_of, Refusal | None),
            (unit_of, str),
        ):
            try:
                parsed = parse(metrics)
            except RunFailed as err:
                assert any(k in str(err) for k in (UnitReport.KEY, Refusal.KEY, UNIT_KEY))
            else:
                assert isinstance(parsed, expected)


def test_valid_messages_parse_back_to_what_was_sent() -> None:
    assert Instruction.from_config(CONFIG) == INSTRUCTION
    assert UnitReport.from_metrics(REPORT.to_metrics()) == REPORT
    assert refusal_of(REFUSAL.to_metrics()) == REFUSAL
    assert refusal_of(REPORT.to_metrics()) is None
    assert unit_of({UNIT_KEY: "telecom"}) == "telecom"
    assert unit_of(REPORT.to_metrics()) == "retail_stores"


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("silofed.round", "3", "str, not an integer"),
        ("silofed.round", True, "bool, not an integer"),
        ("silofed.seed", 1.5, "float, not an integer"),
        ("silofed.run_id", ["r"], "list, not text"),
        ("silofed.phase", "sleep", "'sleep' is not a valid Phase"),
        ("silofed.started_at", "yesterday", "Invalid isoformat string"),
        # a query that is not a table: named by the section's own validation
        (
            "silofed.job",
            '{"kind": "query", "query": [1]}',
            "query.QueryRecipe: Input should be an object",
        ),
        ("silofed.job", '{"rounds": 0}', "rounds: Input should be greater than or equal to 1"),
    ],
)
def test_a_malformed_instruction_field_is_named(field, value, problem) -> None:
    with pytest.raises(RunFailed, match="not a silofed instruction") as raised:
        Instruction.from_config({**CONFIG, field: value})
    assert f"({field}: " in str(raised.value)
    assert problem in str(raised.value)
    with pytest.raises(RunFailed, match=f"{field} is missing"):
        Instruction.from_config({k: v for k, v in CONFIG.items() if k != field})


# --- oversized and deeply nested messages -------------------------------------------------------

FIFTY_MB = 50_000_000
DEEP = 100_000


def _never(*args, **kwargs):
    raise AssertionError("an oversized message reached the parser")


@pytest.mark.parametrize("huge", [b"{" * FIFTY_MB, '{"unit": "' + "x" * FIFTY_MB + '"}'])
def test_a_50_mb_field_is_refused_unread_in_fixed_memory(huge, monkeypatch) -> None:
    for model in (Job, UnitReport, Refusal):
        monkeypatch.setattr(model, "model_validate_json", _never)
    cases = [
        (lambda: Instruction.from_config({**CONFIG, "silofed.job": huge}), MAX_JOB_BYTES),
        (lambda: UnitReport.from_metrics({UnitReport.KEY: huge}), MAX_REPORT_BYTES),
        (lambda: refusal_of({Refusal.KEY: huge}), MAX_REPORT_BYTES),
        (lambda: unit_of({UNIT_KEY: huge}), 1_000),
    ]
    for parse, limit in cases:
        tracemalloc.start()
        try:
            with pytest.raises(RunFailed, match=f"more than {limit:,} bytes") as raised:
                parse()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert f"at least {len(huge):,}" in str(raised.value)
        assert "refused unread" in str(raised.value)
        assert peak < 100_000  # nothing the size of the field was copied or encoded


def test_a_field_at_its_limit_reaches_the_parser() -> None:
    at_limit = '"' + "x" * (MAX_REPORT_BYTES - 2) + '"'  # a JSON string, not an object
    with pytest.raises(RunFailed, match="Input should be an object"):
        UnitReport.from_metrics({UnitReport.KEY: at_limit})
    # four-byte characters: 1,000,001 of them are over the limit as UTF-8, not as characters
    over = "\U0001f600" * (MAX_REPORT_BYTES // 4 + 1)
    with pytest.raises(RunFailed, match=f"at least {4 * len(over):,}"):
        UnitReport.from_metrics({UnitReport.KEY: over})


@pytest.mark.parametrize(
    "nested",
    [
        "[" * DEEP + "]" * DEEP,
        '{"a": ' * DEEP + "1" + "}" * DEEP,
        '{"kind": "query", "query": ' + "[" * DEEP + "]" * DEEP + "}",
        '{"unit": "x", "quality": ' + '{"a": ' * DEEP + "1" + "}" * DEEP + "}",
    ],
)
def test_json_nested_100000_deep_gives_the_clean_error(nested) -> None:
    assert len(nested) < min(MAX_JOB_BYTES, MAX_REPORT_BYTES)  # it reaches the parser
    cases = [
        (lambda: Instruction.from_config({**CONFIG, "silofed.job": nested}), "silofed.job"),
        (lambda: UnitReport.from_metrics({UnitReport.KEY: nested}), UnitReport.KEY),
        (lambda: refusal_of({Refusal.KEY: nested}), Refusal.KEY),
    ]
    for parse, field in cases:
        with pytest.raises(RunFailed, match="recursion limit exceeded") as raised:
            parse()
        assert f"({field}: " in str(raised.value)


# --- the query parser and the recipes -----------------------------------------------------------


@FUZZ
@given(section=queries)
def test_any_query_table_gives_a_query_or_a_clean_error(section) -> None:
    try:
        parsed = parse_query(section)
    except ConfigurationError as err:
        assert "[query]" in str(err)
    else:
        assert QuerySpec.model_validate_json(parsed.model_dump_json()) == parsed
    try:
        size = resolve_query(section, CONFIGS).layout().size  # what the coordinator computes next
    except ConfigurationError:
        pass
    else:
        assert size >= 1


@FUZZ
@given(
    kind=st.sampled_from(["sum", "mean"]),
    column=st.sampled_from(["customers.age", "derived.monetary", "derived.tenure_days"]),
    bounds=st.none() | st.tuples(st.floats(max_value=0), st.floats(min_value=0)),
    granularity=st.none() | st.floats(min_value=0, exclude_min=True),
    observation_date=st.none() | st.datetimes(timezones=st.none() | st.just(UTC)),
)
def test_any_bounds_of_a_sum_give_a_query_or_a_clean_error(
    kind, column, bounds, granularity, observation_date
) -> None:
    """The numeric corner of the parser: bounds and grids at overflow and underflow, declared
    bounds filled in against an observation date with or without a UTC offset."""
    aggregate = {"name": "total", "kind": kind, "column": column}
    if bounds is not None:
        aggregate |= {"lower": bounds[0], "upper": bounds[1]}
    if granularity is not None:
        aggregate["granularity"] = granularity
    section = {"purpose": "analytics", "aggregates": [aggregate]}
    if observation_date is not None:
        section |= {"observation_date": observation_date.isoformat(), "lookback_days": 365}
    try:
        size = resolve_query(section, CONFIGS).layout().size
    except ConfigurationError:
        pass
    else:
        assert size == (1 if kind == "sum" else 2)


@FUZZ
@given(section=recipe_tables)
def test_any_recipe_parameters_give_a_query_or_a_clean_error(section) -> None:
    try:
        resolved = resolve_query(section, CONFIGS)
        size = resolved.layout().size
    except ConfigurationError:
        pass
    else:
        assert resolved.recipe == section["recipe"]
        assert size >= 1


@pytest.mark.parametrize(
    ("recipe", "parameters", "problem"),
    [
        ("rfm_quantiles", {"frequency_upper": 1e9}, "less than or equal to 10000"),
        ("rfm_quantiles", {"frequency_upper": float("inf")}, "less than or equal to 10000"),
        ("rfm_quantiles", {"resolution": 10**7}, "less than or equal to 10000"),
        ("cohort_retention", {"months": 10**6}, "less than or equal to 10000"),
        ("cohort_retention", {"first_cohort": "0000-01"}, "leave the calendar"),
        ("cohort_retention", {"first_cohort": "9999-01", "cohorts": 13}, "leave the calendar"),
    ],
)
def test_recipe_parameters_that_would_exhaust_memory_are_refused(
    recipe, parameters, problem
) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        resolve_query({"recipe": recipe, **parameters}, CONFIGS)


def _sum(**fields) -> dict:
    return {"purpose": "analytics", "aggregates": [{"name": "s", "kind": "sum", **fields}]}


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        (_sum(column="customers.age", lower=0, upper=5e-324), "room for a grid"),
        (_sum(column="customers.age", lower=-1e308, upper=1e308), "room for a grid"),
        (_sum(column="customers.age", lower=-math.inf, upper=0), "room for a grid"),
        (
            _sum(column="customers.age", lower=0, upper=1e300, granularity=1e-300),
            "granularity 1e-300 is too fine",
        ),
        ({**_sum(column="customers.age"), "max_groups": 10**400}, "less than or equal to"),
        ({**_sum(column="customers.age"), "max_rows": 2**53 + 1}, "less than or equal to"),
        ({**_sum(column="derived.recency_days"), "lookback_days": 10**400}, "less than or equal"),
        (
            {**_sum(column="derived.tenure_days"), "observation_date": "2025-01-01T00:00:00Z"},
            "must both carry a UTC offset or both not",
        ),
    ],
)
def test_query_values_at_the_edges_of_floats_are_refused(section, problem) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        resolve_query(section, CONFIGS).layout()
