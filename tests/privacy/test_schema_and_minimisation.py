"""The silo schema and its purpose policies (privacy/schema.py), and purpose-bound minimisation
(privacy/minimisation.py): special categories never leave, undeclared columns are reported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from privacy.errors import ConfigurationError, PolicyViolation
from privacy.minimisation import ColumnDrop, DropReason, minimise
from privacy.schema import SiloSchema
from simulations.synthetic import unit_schema

SPECIAL = ("religion", "health_condition")


@pytest.fixture(scope="module")
def schema() -> SiloSchema:
    return unit_schema("retail_stores")


def declaration(schema: SiloSchema) -> dict[str, Any]:
    """The schema as it appears in schema.json, ready to be edited."""
    return schema.model_dump(mode="json")


def write(path: Path, content: dict[str, Any] | str) -> Path:
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def test_synthetic_schema_survives_a_json_round_trip(schema: SiloSchema, tmp_path: Path) -> None:
    assert SiloSchema.model_validate(declaration(schema)) == schema
    assert SiloSchema.load(write(tmp_path / "schema.json", schema.dump())) == schema


# --- policies ------------------------------------------------------------------------------------


@pytest.mark.parametrize("column", ["customers.religion", "customers.health_condition"])
@pytest.mark.parametrize("use", ["features", "label", "join_keys"])
def test_policy_allowing_a_special_category_is_rejected(
    schema: SiloSchema, column: str, use: str
) -> None:
    data = declaration(schema)
    policy = data["purposes"]["churn_model"]
    if use == "label":
        policy["label"] = column
    else:
        policy[use] = [*policy[use], column]

    with pytest.raises(PolicyViolation) as raised:
        SiloSchema.model_validate(data)

    message = str(raised.value)
    assert f"'{column}'" in message
    assert "'churn_model'" in message
    assert "special category" in message


def test_policy_naming_an_undeclared_column_is_rejected(schema: SiloSchema) -> None:
    data = declaration(schema)
    data["purposes"]["response_model"]["features"].append("customers.income")

    with pytest.raises(PolicyViolation) as raised:
        SiloSchema.model_validate(data)

    message = str(raised.value)
    assert "'customers.income'" in message
    assert "purposes.response_model" in message


def test_policy_naming_an_undeclared_table_is_rejected(schema: SiloSchema) -> None:
    data = declaration(schema)
    data["purposes"]["churn_model"]["features"].append("loyalty.points")

    with pytest.raises(PolicyViolation, match=r"'loyalty\.points'"):
        SiloSchema.model_validate(data)


def test_loading_a_schema_with_a_special_category_policy_names_the_file(
    schema: SiloSchema, tmp_path: Path
) -> None:
    data = declaration(schema)
    data["purposes"]["churn_model"]["features"].append("customers.religion")
    path = write(tmp_path / "schema.json", data)

    with pytest.raises(PolicyViolation) as raised:
        SiloSchema.load(path)

    message = str(raised.value)
    assert str(path) in message
    assert "'customers.religion'" in message
    assert "'churn_model'" in message


def test_loading_a_schema_with_an_undeclared_policy_column_names_the_file(
    schema: SiloSchema, tmp_path: Path
) -> None:
    data = declaration(schema)
    data["purposes"]["churn_model"]["features"].append("customers.income")
    path = write(tmp_path / "schema.json", data)

    with pytest.raises(PolicyViolation) as raised:
        SiloSchema.load(path)

    assert str(path) in str(raised.value)
    assert "'customers.income'" in str(raised.value)


def test_loading_a_missing_schema_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "schema.json"

    with pytest.raises(ConfigurationError) as raised:
        SiloSchema.load(path)

    assert str(path) in str(raised.value)
    assert "no schema file" in str(raised.value)


def test_loading_invalid_json_names_the_path(tmp_path: Path) -> None:
    path = write(tmp_path / "schema.json", '{"unit": "retail", "tables": {')

    with pytest.raises(ConfigurationError) as raised:
        SiloSchema.load(path)

    assert str(path) in str(raised.value)
    assert "not valid JSON" in str(raised.value)


def test_loading_a_category_without_domain_names_the_path_and_the_key(
    schema: SiloSchema, tmp_path: Path
) -> None:
    data = declaration(schema)
    del data["tables"]["customers"]["columns"]["gender"]["domain"]
    path = write(tmp_path / "schema.json", data)

    with pytest.raises(ConfigurationError) as raised:
        SiloSchema.load(path)

    message = str(raised.value)
    assert str(path) in message
    assert "tables.customers.columns.gender" in message
    assert "domain" in message


def test_loading_an_unknown_column_type_names_the_path_and_the_key(
    schema: SiloSchema, tmp_path: Path
) -> None:
    data = declaration(schema)
    data["tables"]["transactions"]["columns"]["amount"]["type"] = "decimal"
    path = write(tmp_path / "schema.json", data)

    with pytest.raises(ConfigurationError) as raised:
        SiloSchema.load(path)

    message = str(raised.value)
    assert str(path) in message
    assert "tables.transactions.columns.amount.type" in message


def test_loading_one_sided_bounds_names_the_path_and_the_key(
    schema: SiloSchema, tmp_path: Path
) -> None:
    data = declaration(schema)
    del data["tables"]["customers"]["columns"]["age"]["upper"]
    path = write(tmp_path / "schema.json", data)

    with pytest.raises(ConfigurationError) as raised:
        SiloSchema.load(path)

    assert str(path) in str(raised.value)
    assert "tables.customers.columns.age" in str(raised.value)


def test_unknown_purpose_is_a_configuration_error_naming_it(schema: SiloSchema) -> None:
    with pytest.raises(ConfigurationError) as raised:
        schema.policy("unknown_purpose")

    message = str(raised.value)
    assert "'unknown_purpose'" in message
    assert "churn_model" in message  # the declared purposes are listed


# --- minimisation --------------------------------------------------------------------------------


def declared_tables(schema: SiloSchema) -> dict[str, pd.DataFrame]:
    """Two rows per table, with every declared column (values are irrelevant to minimisation)."""
    return {
        table: pd.DataFrame({name: ["v1", "v2"] for name in spec.columns})
        for table, spec in schema.tables.items()
    }


def all_columns(tables: dict[str, pd.DataFrame]) -> set[str]:
    return {f"{table}.{name}" for table, frame in tables.items() for name in frame.columns}


@pytest.mark.parametrize("purpose", sorted(unit_schema("retail_stores").purposes))
def test_special_categories_never_leave_for_any_purpose(schema: SiloSchema, purpose: str) -> None:
    result = minimise(declared_tables(schema), schema, purpose)

    for frame in result.tables.values():
        assert not set(SPECIAL) & set(frame.columns)
    assert not {f"customers.{name}" for name in SPECIAL} & set(result.used)
    assert {
        ColumnDrop(f"customers.{name}", DropReason.SPECIAL_CATEGORY) for name in SPECIAL
    } <= set(result.dropped)


@pytest.mark.parametrize("purpose", sorted(unit_schema("retail_stores").purposes))
def test_minimise_keeps_exactly_the_allowed_columns_and_reports_every_drop(
    schema: SiloSchema, purpose: str
) -> None:
    tables = declared_tables(schema)
    tables["customers"]["loyalty_tier"] = ["gold", "silver"]  # present in the file, not declared
    allowed = set(schema.policy(purpose).allowed)

    result = minimise(tables, schema, purpose)

    assert set(result.used) == allowed
    assert len(result.used) == len(allowed)
    assert all_columns(result.tables) == allowed
    expected_drops = {ColumnDrop("customers.loyalty_tier", DropReason.UNDECLARED)}
    for qualified in all_columns(tables) - allowed - {"customers.loyalty_tier"}:
        table, _, name = qualified.partition(".")
        special = schema.tables[table].columns[name].is_special
        reason = DropReason.SPECIAL_CATEGORY if special else DropReason.NOT_ALLOWED
        expected_drops.add(ColumnDrop(qualified, reason))
    assert set(result.dropped) == expected_drops
    assert len(result.dropped) == len(expected_drops)
    # Rows are untouched; only columns go.
    assert all(len(frame) == 2 for frame in result.tables.values())


def test_minimise_for_churn_drops_the_expected_columns(schema: SiloSchema) -> None:
    result = minimise(declared_tables(schema), schema, "churn_model")

    assert result.used == (
        "customers.customer_id",
        "customers.age",
        "customers.gender",
        "customers.region",
        "customers.signup_date",
        "customers.churned",
        "transactions.customer_id",
        "transactions.timestamp",
        "transactions.amount",
        "transactions.channel",
    )
    assert result.dropped == (
        ColumnDrop("customers.person_id", DropReason.NOT_ALLOWED),
        ColumnDrop("customers.religion", DropReason.SPECIAL_CATEGORY),
        ColumnDrop("customers.health_condition", DropReason.SPECIAL_CATEGORY),
        ColumnDrop("transactions.category", DropReason.NOT_ALLOWED),
    )


def test_undeclared_column_is_dropped_and_reported(schema: SiloSchema) -> None:
    tables = declared_tables(schema)
    tables["transactions"]["card_number"] = ["4111", "4242"]

    result = minimise(tables, schema, "response_model")

    assert "card_number" not in result.tables["transactions"].columns
    assert ColumnDrop("transactions.card_number", DropReason.UNDECLARED) in result.dropped
    assert "transactions.card_number" not in result.used


def test_used_lists_only_allowed_columns_present(schema: SiloSchema) -> None:
    tables = declared_tables(schema)
    tables["customers"] = tables["customers"].drop(columns=["region", "gender"])

    result = minimise(tables, schema, "churn_model")

    assert set(result.used) == set(schema.policy("churn_model").allowed) - {
        "customers.region",
        "customers.gender",
    }
    assert list(result.tables["customers"].columns) == [
        "customer_id",
        "age",
        "signup_date",
        "churned",
    ]


def test_minimise_for_an_unknown_purpose_refuses(schema: SiloSchema) -> None:
    with pytest.raises(ConfigurationError, match="'unknown_purpose'"):
        minimise(declared_tables(schema), schema, "unknown_purpose")
