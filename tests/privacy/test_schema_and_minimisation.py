"""The silo schema and its purpose policies (privacy/schema.py) as a BU declares them in its
`bu.toml` (privacy/unit_config.py), and purpose-bound minimisation (privacy/minimisation.py): special
categories never leave (PIPL's sensitive categories too, under "pipl"), undeclared columns are
reported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import tomli_w
from pydantic import ValidationError

from privacy.errors import ConfigurationError, PolicyViolation
from privacy.minimisation import ColumnDrop, DropReason, minimise
from privacy.schema import ColumnSpec, ColumnType, Jurisdiction, Sensitive, propose_sensitive
from privacy.unit_config import UNIT_CONFIG_FILE, UnitConfig
from simulations.synthetic import unit_schema

SPECIAL = ("religion", "health_condition")
PIPL = ["gdpr", "pipl"]


@pytest.fixture(scope="module")
def schema() -> UnitConfig:
    return unit_schema("retail_stores")


def declaration(schema: UnitConfig) -> dict[str, Any]:
    """The configuration as it appears in bu.toml, ready to be edited."""
    return schema.model_dump(mode="json", exclude_none=True)


def write(path: Path, content: dict[str, Any] | str) -> Path:
    path.write_text(
        content if isinstance(content, str) else tomli_w.dumps(content), encoding="utf-8"
    )
    return path


def test_synthetic_schema_survives_a_toml_round_trip(schema: UnitConfig, tmp_path: Path) -> None:
    assert UnitConfig.model_validate(declaration(schema)) == schema

    loaded = UnitConfig.load(write(tmp_path / UNIT_CONFIG_FILE, schema.dump()))

    assert loaded.source.directory == tmp_path.resolve()
    assert loaded.model_copy(update={"source": schema.source}) == schema


def test_relative_paths_are_taken_from_the_files_directory(
    schema: UnitConfig, tmp_path: Path
) -> None:
    data = declaration(schema)
    data["source"]["directory"] = "data"
    data["home"] = "../homes/retail_stores"
    (tmp_path / "config").mkdir()

    loaded = UnitConfig.load(write(tmp_path / "config" / UNIT_CONFIG_FILE, data))

    assert loaded.source.directory == (tmp_path / "config" / "data").resolve()
    assert loaded.home is not None
    assert loaded.home.resolve() == (tmp_path / "homes" / "retail_stores").resolve()


# --- policies ------------------------------------------------------------------------------------


@pytest.mark.parametrize("column", ["customers.religion", "customers.health_condition"])
@pytest.mark.parametrize("use", ["features", "label", "join_keys"])
def test_policy_allowing_a_special_category_is_rejected(
    schema: UnitConfig, column: str, use: str
) -> None:
    data = declaration(schema)
    policy = data["purposes"]["churn_model"]
    if use == "label":
        policy["label"] = column
    else:
        policy[use] = [*policy[use], column]

    with pytest.raises(PolicyViolation) as raised:
        UnitConfig.model_validate(data)

    message = str(raised.value)
    assert f"'{column}'" in message
    assert "'churn_model'" in message
    assert "special category" in message


def test_policy_naming_an_undeclared_column_is_rejected(schema: UnitConfig) -> None:
    data = declaration(schema)
    data["purposes"]["response_model"]["features"].append("customers.income")

    with pytest.raises(PolicyViolation) as raised:
        UnitConfig.model_validate(data)

    message = str(raised.value)
    assert "'customers.income'" in message
    assert "purposes.response_model" in message


def test_policy_naming_an_undeclared_table_is_rejected(schema: UnitConfig) -> None:
    data = declaration(schema)
    data["purposes"]["churn_model"]["features"].append("loyalty.points")

    with pytest.raises(PolicyViolation, match=r"'loyalty\.points'"):
        UnitConfig.model_validate(data)


def test_loading_a_config_with_a_special_category_policy_names_the_file(
    schema: UnitConfig, tmp_path: Path
) -> None:
    data = declaration(schema)
    data["purposes"]["churn_model"]["features"].append("customers.religion")
    path = write(tmp_path / UNIT_CONFIG_FILE, data)

    with pytest.raises(PolicyViolation) as raised:
        UnitConfig.load(path)

    message = str(raised.value)
    assert str(path) in message
    assert "'customers.religion'" in message
    assert "'churn_model'" in message
    assert "purposes.churn_model" in message


def test_loading_a_config_with_an_undeclared_policy_column_names_the_file(
    schema: UnitConfig, tmp_path: Path
) -> None:
    data = declaration(schema)
    data["purposes"]["churn_model"]["features"].append("customers.income")
    path = write(tmp_path / UNIT_CONFIG_FILE, data)

    with pytest.raises(PolicyViolation) as raised:
        UnitConfig.load(path)

    assert str(path) in str(raised.value)
    assert "'customers.income'" in str(raised.value)


def test_loading_a_missing_config_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / UNIT_CONFIG_FILE

    with pytest.raises(ConfigurationError) as raised:
        UnitConfig.load(path)

    assert str(path) in str(raised.value)
    assert "no BU configuration file" in str(raised.value)


def test_loading_invalid_toml_names_the_path(tmp_path: Path) -> None:
    path = write(tmp_path / UNIT_CONFIG_FILE, 'unit = "retail"\n[tables\n')

    with pytest.raises(ConfigurationError) as raised:
        UnitConfig.load(path)

    assert str(path) in str(raised.value)
    assert "not valid TOML" in str(raised.value)


def test_loading_a_category_without_domain_names_the_path_and_the_key(
    schema: UnitConfig, tmp_path: Path
) -> None:
    data = declaration(schema)
    del data["tables"]["customers"]["columns"]["gender"]["domain"]
    path = write(tmp_path / UNIT_CONFIG_FILE, data)

    with pytest.raises(ConfigurationError) as raised:
        UnitConfig.load(path)

    message = str(raised.value)
    assert str(path) in message
    assert "tables.customers.columns.gender" in message
    assert "domain" in message


def test_loading_an_unknown_column_type_names_the_path_and_the_key(
    schema: UnitConfig, tmp_path: Path
) -> None:
    data = declaration(schema)
    data["tables"]["transactions"]["columns"]["amount"]["type"] = "decimal"
    path = write(tmp_path / UNIT_CONFIG_FILE, data)

    with pytest.raises(ConfigurationError) as raised:
        UnitConfig.load(path)

    message = str(raised.value)
    assert str(path) in message
    assert "tables.transactions.columns.amount.type" in message


def test_loading_one_sided_bounds_names_the_path_and_the_key(
    schema: UnitConfig, tmp_path: Path
) -> None:
    data = declaration(schema)
    del data["tables"]["customers"]["columns"]["age"]["upper"]
    path = write(tmp_path / UNIT_CONFIG_FILE, data)

    with pytest.raises(ConfigurationError) as raised:
        UnitConfig.load(path)

    assert str(path) in str(raised.value)
    assert "tables.customers.columns.age" in str(raised.value)


def test_unknown_purpose_is_a_configuration_error_naming_it(schema: UnitConfig) -> None:
    with pytest.raises(ConfigurationError) as raised:
        schema.policy("unknown_purpose")

    message = str(raised.value)
    assert "'unknown_purpose'" in message
    assert "churn_model" in message  # the declared purposes are listed


# --- minimisation --------------------------------------------------------------------------------


def declared_tables(schema: UnitConfig) -> dict[str, pd.DataFrame]:
    """Two rows per table, with every declared column (values are irrelevant to minimisation)."""
    return {
        table: pd.DataFrame({name: ["v1", "v2"] for name in spec.columns})
        for table, spec in schema.tables.items()
    }


def all_columns(tables: dict[str, pd.DataFrame]) -> set[str]:
    return {f"{table}.{name}" for table, frame in tables.items() for name in frame.columns}


@pytest.mark.parametrize("purpose", sorted(unit_schema("retail_stores").purposes))
def test_special_categories_never_leave_for_any_purpose(schema: UnitConfig, purpose: str) -> None:
    result = minimise(declared_tables(schema), schema, purpose)

    for frame in result.tables.values():
        assert not set(SPECIAL) & set(frame.columns)
    assert not {f"customers.{name}" for name in SPECIAL} & set(result.used)
    assert {
        ColumnDrop(f"customers.{name}", DropReason.SPECIAL_CATEGORY) for name in SPECIAL
    } <= set(result.dropped)


@pytest.mark.parametrize("purpose", sorted(unit_schema("retail_stores").purposes))
def test_minimise_keeps_exactly_the_allowed_columns_and_reports_every_drop(
    schema: UnitConfig, purpose: str
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
        special = schema.is_special(qualified)
        reason = DropReason.SPECIAL_CATEGORY if special else DropReason.NOT_ALLOWED
        expected_drops.add(ColumnDrop(qualified, reason))
    assert set(result.dropped) == expected_drops
    assert len(result.dropped) == len(expected_drops)
    # Rows are untouched; only columns go.
    assert all(len(frame) == 2 for frame in result.tables.values())


def test_minimise_for_churn_drops_the_expected_columns(schema: UnitConfig) -> None:
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
        ColumnDrop("customers.responded", DropReason.NOT_ALLOWED),
        ColumnDrop("transactions.category", DropReason.NOT_ALLOWED),
    )


def test_undeclared_column_is_dropped_and_reported(schema: UnitConfig) -> None:
    tables = declared_tables(schema)
    tables["transactions"]["card_number"] = ["4111", "4242"]

    result = minimise(tables, schema, "response_model")

    assert "card_number" not in result.tables["transactions"].columns
    assert ColumnDrop("transactions.card_number", DropReason.UNDECLARED) in result.dropped
    assert "transactions.card_number" not in result.used


def test_used_lists_only_allowed_columns_present(schema: UnitConfig) -> None:
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


def test_minimise_for_an_unknown_purpose_refuses(schema: UnitConfig) -> None:
    with pytest.raises(ConfigurationError, match="'unknown_purpose'"):
        minimise(declared_tables(schema), schema, "unknown_purpose")


# --- jurisdictions and sensitive categories -------------------------------------------------------


def with_iban(schema: UnitConfig, *, jurisdictions: list[str], allowed: bool) -> dict[str, Any]:
    """The declaration with a `customers.iban` column tagged as a financial account (sensitive under
    PIPL Art. 28, not a GDPR special category), allowed for `response_model` if `allowed`."""
    data = declaration(schema)
    data["jurisdictions"] = jurisdictions
    data["tables"]["customers"]["columns"]["iban"] = {
        "type": "string",
        "sensitive": "financial_account",
    }
    if allowed:
        data["purposes"]["response_model"]["features"].append("customers.iban")
    return data


def test_financial_account_is_usable_under_gdpr_only(schema: UnitConfig) -> None:
    config = UnitConfig.model_validate(with_iban(schema, jurisdictions=["gdpr"], allowed=True))
    column = config.tables["customers"].columns["iban"]

    result = minimise(declared_tables(config), config, "response_model")

    assert column.sensitive is Sensitive.FINANCIAL_ACCOUNT
    assert not column.is_special((Jurisdiction.GDPR,))
    assert column.is_special((Jurisdiction.GDPR, Jurisdiction.PIPL))
    assert not config.is_special("customers.iban")
    assert "customers.iban" in result.used
    assert "iban" in result.tables["customers"].columns


def test_financial_account_is_refused_under_pipl(schema: UnitConfig, tmp_path: Path) -> None:
    data = with_iban(schema, jurisdictions=PIPL, allowed=True)
    path = write(tmp_path / UNIT_CONFIG_FILE, data)

    with pytest.raises(PolicyViolation) as in_memory:
        UnitConfig.model_validate(data)
    with pytest.raises(PolicyViolation) as from_file:
        UnitConfig.load(path)

    for message in (str(in_memory.value), str(from_file.value)):
        assert "'customers.iban'" in message
        assert "'response_model'" in message
        assert "purposes.response_model" in message
    assert str(path) in str(from_file.value)


def test_financial_account_not_allowed_is_dropped_as_special_under_pipl(
    schema: UnitConfig,
) -> None:
    config = UnitConfig.model_validate(with_iban(schema, jurisdictions=PIPL, allowed=False))

    result = minimise(declared_tables(config), config, "response_model")

    assert config.jurisdictions == (Jurisdiction.GDPR, Jurisdiction.PIPL)
    assert config.is_special("customers.iban")
    assert ColumnDrop("customers.iban", DropReason.SPECIAL_CATEGORY) in result.dropped
    assert "iban" not in result.tables["customers"].columns


@pytest.mark.parametrize("name", ["religion", "health_condition"])
def test_gdpr_special_categories_are_special_under_every_jurisdiction(
    schema: UnitConfig, name: str
) -> None:
    column = schema.tables["customers"].columns[name]

    assert column.is_special((Jurisdiction.GDPR,))
    assert column.is_special((Jurisdiction.GDPR, Jurisdiction.PIPL))


def test_a_sensitive_tag_alone_makes_a_column_special() -> None:
    tagged = ColumnSpec(type=ColumnType.STRING, sensitive=Sensitive.HEALTH)

    assert tagged.is_special()
    assert not ColumnSpec(type=ColumnType.STRING).is_special((Jurisdiction.GDPR, Jurisdiction.PIPL))


@pytest.mark.parametrize(
    ("name", "tag"),
    [
        ("religion", Sensitive.RELIGIOUS_BELIEFS),
        ("health_condition", Sensitive.HEALTH),
        ("iban", Sensitive.FINANCIAL_ACCOUNT),
        ("IBAN", Sensitive.FINANCIAL_ACCOUNT),
        ("gps_lat", Sensitive.PRECISE_LOCATION),
        ("age", None),
    ],
)
def test_propose_sensitive_tags_columns_by_name(name: str, tag: Sensitive | None) -> None:
    assert propose_sensitive(name) == tag


@pytest.mark.parametrize("jurisdictions", [["pipl"], []])
def test_jurisdictions_without_gdpr_are_refused(
    schema: UnitConfig, tmp_path: Path, jurisdictions: list[str]
) -> None:
    data = declaration(schema)
    data["jurisdictions"] = jurisdictions
    path = write(tmp_path / UNIT_CONFIG_FILE, data)

    with pytest.raises(ValidationError, match="must include 'gdpr'"):
        UnitConfig.model_validate(data)
    with pytest.raises(ConfigurationError) as raised:
        UnitConfig.load(path)

    assert str(path) in str(raised.value)
    assert "must include 'gdpr'" in str(raised.value)
