"""Pseudonymised identifiers, key material and generalised quasi-identifiers
(privacy/pseudonyms.py): no clear id leaves pseudonymisation, joins still work, and only a purpose's
linkage columns link people across BUs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clients.silo import Silo, load_silo
from privacy.errors import ConfigurationError
from privacy.pseudonyms import (
    GENERALISATION_RULE_PATTERN,
    generalise,
    key_from_environment,
    load_or_create_key,
    pseudonymise,
    pseudonymise_tables,
)
from privacy.unit_config import UNIT_CONFIG_FILE, UnitConfig
from simulations.synthetic import synthesize

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
LINKAGE_KEY = b"l" * 32
PERSON = "customers.person_id"


def all_cells(frame: pd.DataFrame) -> set[str]:
    return {str(value) for column in frame.columns for value in frame[column].tolist()}


def clear_ids(silo: Silo) -> set[str]:
    customers = silo.tables["customers"]
    return set(customers["customer_id"]) | set(customers["person_id"])


def load(directory: Path) -> Silo:
    return load_silo(UnitConfig.load(directory / UNIT_CONFIG_FILE))


@pytest.fixture(scope="module")
def silo(tmp_path_factory: pytest.TempPathFactory) -> Silo:
    out = tmp_path_factory.mktemp("one") / "s"
    result = synthesize(out, units=1, customers=60, seed=1)
    return load(result.directory / result.units[0])


@pytest.fixture(scope="module")
def two_silos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Silo, Silo]:
    out = tmp_path_factory.mktemp("two") / "s"
    result = synthesize(out, units=2, customers=60, seed=1, overlap=0.5)
    first, second = (load(result.directory / unit) for unit in result.units)
    return first, second


# --- pseudonymise ----------------------------------------------------------------------------


def test_pseudonym_is_the_hex_hmac_sha256_of_the_id() -> None:
    out = pseudonymise(pd.Series(["ret-000001", "ret-000002"]), KEY)
    assert out.tolist() == [
        hmac.new(KEY, b"ret-000001", hashlib.sha256).hexdigest(),
        hmac.new(KEY, b"ret-000002", hashlib.sha256).hexdigest(),
    ]
    assert all(re.fullmatch(r"[0-9a-f]{64}", value) for value in out)


def test_pseudonyms_are_deterministic_per_key_and_unrelated_across_keys() -> None:
    ids = pd.Series([f"c{i}" for i in range(500)])
    first, again = pseudonymise(ids, KEY), pseudonymise(ids, KEY)
    other = pseudonymise(ids, OTHER_KEY)
    assert first.equals(again)
    assert first.nunique() == 500
    assert set(first).isdisjoint(set(other))


def test_repeated_ids_get_one_pseudonym_and_missing_ids_stay_missing() -> None:
    ids = pd.Series(["a", None, "b", np.nan, "a"], index=[10, 11, 12, 13, 14], name="customer_id")
    out = pseudonymise(ids, KEY)
    assert out.isna().tolist() == [False, True, False, True, False]
    assert out[10] == out[14] != out[12]
    assert out.index.tolist() == [10, 11, 12, 13, 14]
    assert out.name == "customer_id"
    text = pd.Series(["a", None], dtype="string")
    assert pseudonymise(text, KEY).dtype == text.dtype
    assert pseudonymise(text, KEY).isna().tolist() == [False, True]


def test_a_key_shorter_than_32_bytes_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="at least 32 random bytes"):
        pseudonymise(pd.Series(["a"]), b"short")


# --- pseudonymise_tables ---------------------------------------------------------------------


def test_joins_still_work_after_pseudonymisation(silo: Silo) -> None:
    out = pseudonymise_tables(silo.tables, silo.schema, KEY)
    before = silo.tables["transactions"].merge(silo.tables["customers"], on="customer_id")
    after = out["transactions"].merge(out["customers"], on="customer_id")
    assert len(after) == len(before) > 0
    per_customer_before = before.groupby("customer_id")["amount"].sum()
    per_customer_after = after.groupby("customer_id")["amount"].sum()
    mapping = dict(
        zip(silo.tables["customers"]["customer_id"], out["customers"]["customer_id"], strict=True)
    )
    assert per_customer_after.to_dict() == {
        mapping[c]: total for c, total in per_customer_before.items()
    }


def test_no_clear_identifier_appears_anywhere_after_pseudonymisation(silo: Silo) -> None:
    out = pseudonymise_tables(silo.tables, silo.schema, KEY)
    clear = clear_ids(silo)
    assert len(clear) == 2 * len(silo.tables["customers"])
    for table, frame in out.items():
        assert all_cells(frame).isdisjoint(clear), table
    # the other columns are untouched
    customers = silo.tables["customers"]
    assert (
        out["customers"]
        .drop(columns=["customer_id", "person_id"])
        .equals(customers.drop(columns=["customer_id", "person_id"]))
    )


def test_input_frames_are_not_changed(silo: Silo) -> None:
    copies = {name: frame.copy() for name, frame in silo.tables.items()}
    pseudonymise_tables(
        silo.tables,
        silo.schema,
        KEY,
        linkage_key=LINKAGE_KEY,
        linkage_columns=frozenset({PERSON}),
    )
    for name, frame in silo.tables.items():
        assert frame.equals(copies[name])


def test_columns_the_schema_does_not_declare_are_left_alone(silo: Silo) -> None:
    tables = {
        **silo.tables,
        "customers": silo.tables["customers"].assign(loyalty_card="LC-1"),
    }
    out = pseudonymise_tables(tables, silo.schema, KEY)
    assert out["customers"]["loyalty_card"].tolist() == ["LC-1"] * len(tables["customers"])


def test_linkage_column_links_shared_people_across_units_but_customer_ids_do_not(
    two_silos: tuple[Silo, Silo],
) -> None:
    first, second = two_silos
    shared = set(first.tables["customers"]["person_id"]) & set(
        second.tables["customers"]["person_id"]
    )
    assert len(shared) >= 10

    def by_person(silo: Silo, key: bytes, linkage: frozenset[str]) -> pd.DataFrame:
        out = pseudonymise_tables(
            silo.tables, silo.schema, key, linkage_key=LINKAGE_KEY, linkage_columns=linkage
        )["customers"]
        people = silo.tables["customers"]["person_id"]
        return out.assign(clear_person=people.to_numpy()).set_index("clear_person")

    linked_first = by_person(first, KEY, frozenset({PERSON}))
    linked_second = by_person(second, OTHER_KEY, frozenset({PERSON}))
    common = sorted(shared)
    assert (
        linked_first.loc[common, "person_id"].tolist()
        == linked_second.loc[common, "person_id"].tolist()
    )
    assert linked_first.loc[common, "person_id"].nunique() == len(common)
    # the customer ids of the same people stay unlinkable ...
    assert set(linked_first.loc[common, "customer_id"]).isdisjoint(
        linked_second.loc[common, "customer_id"]
    )
    # ... and so does the person id when the purpose declares no linkage
    unlinked_first = by_person(first, KEY, frozenset())
    unlinked_second = by_person(second, OTHER_KEY, frozenset())
    assert set(unlinked_first.loc[common, "person_id"]).isdisjoint(
        unlinked_second.loc[common, "person_id"]
    )


def test_linkage_column_without_a_linkage_key_is_refused(silo: Silo) -> None:
    with pytest.raises(ConfigurationError) as raised:
        pseudonymise_tables(silo.tables, silo.schema, KEY, linkage_columns=frozenset({PERSON}))
    message = str(raised.value)
    assert "declares cross-BU linkage" in message
    assert "has no linkage key" in message
    assert silo.unit in message


def test_linkage_column_absent_from_the_frames_needs_no_linkage_key(silo: Silo) -> None:
    tables = {"transactions": silo.tables["transactions"]}
    out = pseudonymise_tables(tables, silo.schema, KEY, linkage_columns=frozenset({PERSON}))
    assert out["transactions"]["customer_id"].tolist() == (
        pseudonymise(silo.tables["transactions"]["customer_id"], KEY).tolist()
    )


def test_linkage_key_equal_to_the_unit_key_is_refused(silo: Silo) -> None:
    with pytest.raises(ConfigurationError, match="linkage key is the BU's own pseudonym key"):
        pseudonymise_tables(
            silo.tables, silo.schema, KEY, linkage_key=KEY, linkage_columns=frozenset({PERSON})
        )


def test_linkage_column_that_is_not_an_identifier_is_refused(silo: Silo) -> None:
    with pytest.raises(
        ConfigurationError, match=re.escape("'customers.region' is not declared as an identifier")
    ):
        pseudonymise_tables(
            silo.tables,
            silo.schema,
            KEY,
            linkage_key=LINKAGE_KEY,
            linkage_columns=frozenset({"customers.region"}),
        )


# --- key material ----------------------------------------------------------------------------


def test_new_key_file_is_private_and_the_key_is_stable(tmp_path: Path) -> None:
    path = tmp_path / "home" / "keys" / "pseudonym.key"
    key = load_or_create_key(path)
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_or_create_key(path) == key
    assert load_or_create_key(tmp_path / "home" / "keys" / "linkage.key") != key


def test_key_file_holds_base64_usable_as_an_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keys" / "pseudonym.key"
    key = load_or_create_key(path)
    assert base64.b64decode(path.read_text(encoding="ascii").strip()) == key
    monkeypatch.setenv("SILOFED_TEST_PSEUDONYM_KEY", path.read_text(encoding="ascii"))
    assert key_from_environment("SILOFED_TEST_PSEUDONYM_KEY") == key


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "pseudonym.key"
    load_or_create_key(path)
    path.chmod(0o644)
    with pytest.raises(ConfigurationError, match=re.escape(f"key file {path} is accessible")):
        load_or_create_key(path)


def test_key_file_that_is_not_a_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pseudonym.key"
    path.write_text("not a key\n", encoding="ascii")
    path.chmod(0o600)
    with pytest.raises(ConfigurationError, match=re.escape(str(path))):
        load_or_create_key(path)


def test_missing_or_invalid_environment_key_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SILOFED_TEST_KEY", raising=False)
    with pytest.raises(ConfigurationError, match="SILOFED_TEST_KEY is not set"):
        key_from_environment("SILOFED_TEST_KEY")
    for invalid in ("not base64!", base64.b64encode(b"too short").decode()):
        monkeypatch.setenv("SILOFED_TEST_KEY", invalid)
        with pytest.raises(ConfigurationError, match="SILOFED_TEST_KEY does not hold"):
            key_from_environment("SILOFED_TEST_KEY")
    monkeypatch.setenv("SILOFED_TEST_KEY", base64.b64encode(KEY).decode())
    assert key_from_environment("SILOFED_TEST_KEY") == KEY


# --- generalisation --------------------------------------------------------------------------


def test_band_rule_maps_numbers_to_the_lower_edge_of_their_band() -> None:
    ages = pd.Series([37, 18, 90, 9, 40], name="age")
    out = generalise(ages, "band:10")
    assert out.tolist() == [30, 10, 90, 0, 40]
    assert out.dtype == ages.dtype
    amounts = generalise(pd.Series([12.5, np.nan, 99.99]), "band:25")
    assert amounts.iloc[[0, 2]].tolist() == [0.0, 75.0]
    assert np.isnan(amounts.iloc[1])


def test_prefix_rule_keeps_the_first_characters() -> None:
    postcodes = pd.Series(["SW1A 1AA", "EC1", "N", None], dtype="str")
    out = generalise(postcodes, "prefix:3")
    assert out.iloc[:3].tolist() == ["SW1", "EC1", "N"]
    assert pd.isna(out.iloc[3])


def test_month_and_year_rules_give_the_first_day_in_the_same_dtype() -> None:
    stamps = pd.Series(
        pd.to_datetime(["2024-05-31 13:45:00", "2023-02-01", None], format="ISO8601")
    ).astype("datetime64[s]")
    month = generalise(stamps, "month")
    year = generalise(stamps, "year")
    assert month.dtype == year.dtype == stamps.dtype
    assert month.iloc[:2].tolist() == [pd.Timestamp("2024-05-01"), pd.Timestamp("2023-02-01")]
    assert year.iloc[:2].tolist() == [pd.Timestamp("2024-01-01"), pd.Timestamp("2023-01-01")]
    assert month.isna().tolist() == year.isna().tolist() == [False, False, True]


@pytest.mark.parametrize("rule", ["band:0", "band:x", "band", "prefix:", "week", "month ", "Year"])
def test_malformed_rule_is_refused_naming_it_and_the_valid_forms(rule: str) -> None:
    assert re.fullmatch(GENERALISATION_RULE_PATTERN, rule) is None
    with pytest.raises(ConfigurationError) as raised:
        generalise(pd.Series([1, 2]), rule)
    message = str(raised.value)
    assert f"'{rule}'" in message
    assert all(form in message for form in ("band:N", "prefix:N", "month", "year"))


@pytest.mark.parametrize("rule", ["band:1", "band:10", "prefix:3", "month", "year"])
def test_valid_rules_match_the_published_pattern(rule: str) -> None:
    assert re.fullmatch(GENERALISATION_RULE_PATTERN, rule)


@pytest.mark.parametrize(
    ("values", "rule"),
    [
        (pd.Series(["37"], name="age"), "band:10"),
        (pd.Series([37], name="age"), "prefix:2"),
        (pd.Series(["2024-05-31"], name="signup_date"), "month"),
    ],
)
def test_rule_for_another_kind_of_column_is_refused(values: pd.Series, rule: str) -> None:
    with pytest.raises(ConfigurationError, match=f"rule '{rule}' needs"):
        generalise(values, rule)
