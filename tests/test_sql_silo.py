"""A BU's silo in a SQL database (clients/sql.py), read read-only through SQLAlchemy.

The same rows give the same silo from Parquet, CSV, SQLite and PostgreSQL (frame for frame, dtypes
included) and train the same model, bit for bit, with the same seed. The database is never written
to (SQLite opened read-only, PostgreSQL in a READ ONLY transaction), a missing SQLite file is never
created, and every bad bu.toml or database answer is an error naming the unit, the table, the key
and the fix, without ever showing the password. PostgreSQL tests run on a throw-away local server
(tests/postgres.py) and are skipped, with the reason, where it cannot run.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import time
import tomllib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import tomli_w
import torch
from sqlalchemy import create_engine
from sqlalchemy.exc import DBAPIError

from clients.silo import Silo, load_silo
from clients.sql import read_only_engine, source_url
from clients.steward import access_report, encrypt_silo, erase_customer, prepare_simulated_home
from federation.job import Job
from privacy.errors import ConfigurationError, SiloError
from privacy.unit_config import UNIT_CONFIG_FILE, UnitConfig
from server.report import build_report
from simulations.inprocess import InProcessRun, run_in_process
from simulations.sql import ROW_ORDER, to_database, to_sqlite
from simulations.synthetic import synthesize
from tests.postgres import another_database, postgres_server

SEED = 3
TRAINING = {"rounds": 2, "epsilon": 3.0}
PASSWORD = "s3cret-Pa55"
SQL_SOURCE = {"kind": "sql", "url": "sqlite:///silo.db"}
NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def file_silos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("sql-silos") / "parquet"
    synthesize(out, units=2, customers=300, seed=SEED)
    return sorted(out.glob(f"*/{UNIT_CONFIG_FILE}"))


@pytest.fixture(scope="module")
def sqlite_silos(file_silos: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("sql-silos") / "sqlite"
    return [to_sqlite(config.parent, out / config.parent.name / "silo.db") for config in file_silos]


@pytest.fixture(scope="module")
def parquet_run(file_silos: list[Path], tmp_path_factory: pytest.TempPathFactory) -> InProcessRun:
    job = Job.parse(TRAINING, source="test")
    return run_in_process(job, file_silos, tmp_path_factory.mktemp("parquet-homes"), seed=SEED)


@pytest.fixture
def sqlite_silo(sqlite_silos: list[Path], tmp_path: Path) -> Path:
    """A private, editable copy of one SQLite silo's directory; its bu.toml."""
    return shutil.copytree(sqlite_silos[0].parent, tmp_path / "silo") / UNIT_CONFIG_FILE


def load(config: Path) -> Silo:
    return load_silo(UnitConfig.load(config))


def edit(config: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    data = tomllib.loads(config.read_text(encoding="utf-8"))
    change(data)
    config.write_text(tomli_w.dumps(data), encoding="utf-8")
    return config


def set_query(config: Path, table: str, query: str) -> Path:
    return edit(config, lambda d: d["tables"][table].update(query=query))


def set_source(config: Path, **source: Any) -> Path:
    return edit(config, lambda d: d.update(source=source))


def assert_same_silo(expected: Silo, actual: Silo) -> None:
    assert expected.tables.keys() == actual.tables.keys()
    for table, frame in expected.tables.items():
        pd.testing.assert_frame_equal(actual.tables[table], frame, check_exact=True)
    assert actual.quality == expected.quality


def assert_same_training(expected: InProcessRun, actual: InProcessRun) -> None:
    assert len(actual.parameters) == len(expected.parameters)
    for mine, theirs in zip(actual.parameters, expected.parameters, strict=True):
        assert torch.equal(torch.from_numpy(mine), torch.from_numpy(theirs))
    assert actual.record.unit_reports == expected.record.unit_reports
    assert actual.record.rounds == expected.record.rounds
    mine, theirs = build_report(actual.record), build_report(expected.record)
    assert mine["privacy"]["per_unit"] == theirs["privacy"]["per_unit"]
    assert mine["model"]["metrics"] == theirs["model"]["metrics"]


# -- the same rows, the same silo, the same model ---------------------------------------------------


def test_a_sqlite_silo_loads_the_same_frames_as_its_parquet_files(file_silos, sqlite_silos):
    for files, database in zip(file_silos, sqlite_silos, strict=True):
        sql = UnitConfig.load(database)
        assert sql.source.kind == "sql" and sql.source.url == "sqlite:///silo.db"
        assert all(spec.file is None and spec.query for spec in sql.tables.values())
        silo = load_silo(sql)
        assert_same_silo(load(files), silo)
        assert not silo.encrypted
        assert len(silo.tables["customers"]) > 250 and len(silo.tables["transactions"]) > 4000


def test_csv_parquet_and_sqlite_give_equal_frames_datetimes_to_the_microsecond(
    file_silos, tmp_path
):
    synthesize(tmp_path / "csv", units=2, customers=300, seed=SEED, file_format="csv")
    csv_silo = tmp_path / "csv" / file_silos[0].parent.name
    from_csv = to_sqlite(csv_silo, tmp_path / "sqlite" / "silo.db")
    parquet = load(file_silos[0])
    assert_same_silo(parquet, load(csv_silo / UNIT_CONFIG_FILE))
    assert_same_silo(parquet, load(from_csv))
    assert parquet.tables["transactions"]["timestamp"].dtype == "datetime64[us]"
    assert parquet.tables["customers"]["signup_date"].dtype == "datetime64[us]"


def test_a_bu_trains_bit_for_bit_the_same_from_sqlite_as_from_parquet(
    sqlite_silos, parquet_run, tmp_path
):
    job = Job.parse(TRAINING, source="test")
    from_sqlite = run_in_process(job, sqlite_silos, tmp_path / "homes", seed=SEED)
    assert_same_training(parquet_run, from_sqlite)
    assert {r.records_used for r in from_sqlite.record.unit_reports.values()} == {204, 251}


def test_a_config_without_source_kind_is_a_files_source(file_silos, tmp_path):
    silo = shutil.copytree(file_silos[0].parent, tmp_path / "silo")
    config = edit(silo / UNIT_CONFIG_FILE, lambda d: d.pop("source", None))
    assert "kind" not in config.read_text()
    loaded = UnitConfig.load(config)
    assert loaded.source.kind == "files" and loaded.source.directory == silo.resolve()
    assert_same_silo(load(file_silos[0]), load_silo(loaded))


def test_a_boolean_stored_as_1_or_0_with_a_null_types_as_a_missing_value_in_a_file(
    file_silos, sqlite_silo
):
    columns = "customer_id, person_id, age, gender, region, signup_date, religion, "
    columns += "health_condition, responded"
    set_query(
        sqlite_silo,
        "customers",
        f"SELECT {columns}, CASE WHEN silo_row = 1 THEN NULL ELSE churned END AS churned "
        "FROM customers ORDER BY silo_row",
    )
    edit(
        sqlite_silo, lambda d: d["tables"]["customers"]["columns"]["churned"].update(nullable=True)
    )
    churned = load(sqlite_silo).tables["customers"]["churned"]
    expected = load(file_silos[0]).tables["customers"]["churned"].astype(object)
    expected.iloc[1] = float("nan")
    pd.testing.assert_series_equal(churned, expected)


# -- read-only -----------------------------------------------------------------------------------


def test_sqlite_is_opened_read_only_and_left_unchanged(sqlite_silo):
    database = sqlite_silo.parent / "silo.db"
    before = hashlib.sha256(database.read_bytes()).hexdigest()
    config = UnitConfig.load(sqlite_silo)
    load_silo(config)
    engine = read_only_engine(source_url(config), timeout=5)
    try:
        with engine.connect() as connection, pytest.raises(DBAPIError, match="readonly"):
            connection.exec_driver_sql("DELETE FROM customers")
    finally:
        engine.dispose()
    assert hashlib.sha256(database.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in sqlite_silo.parent.iterdir()) == [
        UNIT_CONFIG_FILE,
        "consent.parquet",
        "silo.db",
    ]


def test_a_missing_sqlite_file_is_an_error_and_is_not_created(sqlite_silo):
    set_source(sqlite_silo, kind="sql", url="sqlite:///elsewhere/missing.db")
    before = sorted(sqlite_silo.parent.rglob("*"))
    with pytest.raises(SiloError, match=r"unit 'ecommerce': .*/elsewhere/missing\.db: no SQLite"):
        load(sqlite_silo)
    assert sorted(sqlite_silo.parent.rglob("*")) == before


def test_a_sqlite_query_past_the_statement_timeout_is_stopped(sqlite_silo):
    set_source(sqlite_silo, **SQL_SOURCE, statement_timeout=0.2)
    endless = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT x FROM n"
    set_query(sqlite_silo, "customers", endless)
    started = time.monotonic()
    with pytest.raises(
        SiloError, match=r"interrupted \(stopped after \[source\] statement_timeout"
    ):
        load(sqlite_silo)
    assert time.monotonic() - started < 5


def test_a_relative_sqlite_path_is_taken_from_the_source_directory(sqlite_silo, tmp_path):
    moved = tmp_path / "data"
    moved.mkdir()
    (sqlite_silo.parent / "silo.db").rename(moved / "silo.db")
    set_source(sqlite_silo, kind="sql", url="sqlite:///silo.db", directory="../data")
    assert source_url(UnitConfig.load(sqlite_silo)).database == str(moved / "silo.db")
    assert len(load(sqlite_silo).tables["customers"]) > 250


# -- database answers: errors name the unit, the table, the key; never the password -------------


def test_a_query_error_names_the_unit_the_table_and_the_databases_words(sqlite_silo):
    set_query(sqlite_silo, "transactions", "SELECT * FROM purchases")
    with pytest.raises(SiloError) as caught:
        load(sqlite_silo)
    message = str(caught.value)
    assert "unit 'ecommerce', table 'transactions' (tables.transactions.query" in message
    assert "no such table: purchases" in message and "Fix the query" in message


def test_a_result_missing_a_declared_column_is_an_error(sqlite_silo):
    set_query(sqlite_silo, "customers", "SELECT customer_id, person_id FROM customers")
    with pytest.raises(SiloError) as caught:
        load(sqlite_silo)
    message = str(caught.value)
    assert "unit 'ecommerce', table 'customers' (the result of tables.customers.query" in message
    assert "missing column(s) ['age', 'gender'" in message and "SELECT list" in message


def test_an_empty_or_ambiguous_result_is_an_error(sqlite_silo):
    set_query(sqlite_silo, "customers", "SELECT * FROM customers WHERE 0")
    with pytest.raises(SiloError, match=r"table 'customers'.*the query returned no rows"):
        load(sqlite_silo)
    set_query(sqlite_silo, "customers", "SELECT *, age FROM customers")
    with pytest.raises(SiloError, match=r"returns column\(s\) \['age'\] more than once"):
        load(sqlite_silo)


def test_an_invalid_value_names_the_query_the_column_and_the_row(sqlite_silo):
    set_query(
        sqlite_silo,
        "customers",
        "SELECT customer_id, person_id, CASE WHEN silo_row = 2 THEN 'old' ELSE age END AS age, "
        "gender, region, signup_date, religion, health_condition, churned, responded "
        "FROM customers ORDER BY silo_row",
    )
    with pytest.raises(SiloError) as caught:
        load(sqlite_silo)
    assert str(caught.value).startswith(
        "unit 'ecommerce', table 'customers' (the result of tables.customers.query in "
        "bu.toml): column 'age', row 3: not an integer (value 'old')"
    )


def test_the_password_never_appears_in_a_connection_error(sqlite_silo, monkeypatch):
    pytest.importorskip("psycopg")
    url = f"postgresql://reader:{PASSWORD}@127.0.0.1:9/crm?sslmode=disable&password={PASSWORD}x"
    monkeypatch.setenv("SILOFED_TEST_DB_URL", url)
    set_source(sqlite_silo, kind="sql", url_env="SILOFED_TEST_DB_URL")
    with pytest.raises(SiloError) as caught:
        load(sqlite_silo)
    message = str(caught.value)
    assert PASSWORD not in message
    assert "postgresql://reader:***@127.0.0.1:9/crm?sslmode=disable&password=***" in message
    assert "unit 'ecommerce': cannot read the database" in message
    assert "Connection refused" in message or "connection failed" in message


def test_an_unset_url_environment_variable_is_named(sqlite_silo, monkeypatch):
    monkeypatch.delenv("SILOFED_TEST_DB_URL", raising=False)
    set_source(sqlite_silo, kind="sql", url_env="SILOFED_TEST_DB_URL")
    with pytest.raises(ConfigurationError, match="environment variable SILOFED_TEST_DB_URL"):
        load(sqlite_silo)
    monkeypatch.setenv("SILOFED_TEST_DB_URL", f"mysql://reader:{PASSWORD}@db/crm")
    with pytest.raises(ConfigurationError) as caught:
        load(sqlite_silo)
    assert "reads sqlite and postgresql databases" in str(caught.value)
    assert PASSWORD not in str(caught.value)


# -- bu.toml validation ------------------------------------------------------------------------


def refusal(config: Path, change: Callable[[dict[str, Any]], None]) -> str:
    edit(config, change)
    with pytest.raises(ConfigurationError) as caught:
        UnitConfig.load(config)
    return str(caught.value)


def test_a_query_table_in_a_files_source_is_refused(file_silos, tmp_path):
    config = shutil.copy(file_silos[0], tmp_path / UNIT_CONFIG_FILE)
    message = refusal(
        config, lambda d: d["tables"]["customers"].update(query="SELECT * FROM customers")
    )
    assert "'file' (a files source) or its 'query' (a SQL source), exactly one" in message
    message = refusal(config, lambda d: d["tables"]["customers"].pop("file"))
    assert (
        "tables.customers.query: a query reads a table from a SQL source, and [source] kind is "
        '"files"; set [source] kind = "sql" with url or url_env' in message
    )


def test_a_file_table_in_a_sql_source_is_refused(sqlite_silo):
    def declare_file(data: dict[str, Any]) -> None:
        data["tables"]["customers"].pop("query")
        data["tables"]["customers"]["file"] = "customers.parquet"

    message = refusal(sqlite_silo, declare_file)
    assert (
        'tables.customers.file: a [source] of kind = "sql" reads every table with a query; '
        'replace file with query = "SELECT ... FROM ..."' in message
    )
    message = refusal(sqlite_silo, lambda d: d["tables"]["customers"].pop("file"))
    assert "'file' (a files source) or its 'query' (a SQL source), exactly one" in message


def test_an_encrypted_sql_source_is_refused_as_the_databases_business(sqlite_silo, tmp_path):
    message = refusal(sqlite_silo, lambda d: d["source"].update(encrypted=True))
    assert "source: Value error, encrypted = true is for files sources" in message
    assert "encryption at rest of a database is the database's business" in message
    edit(sqlite_silo, lambda d: d["source"].pop("encrypted"))
    home = prepare_simulated_home(UnitConfig.load(sqlite_silo), tmp_path / "home")
    with pytest.raises(ConfigurationError, match="the database's business"):
        encrypt_silo(sqlite_silo, home)


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://reader:{PASSWORD}@db.example:5432/crm",
        f"postgresql://reader@db.example/crm?password={PASSWORD}",
        f"postgresql://reader@db.example/crm?sslpassword={PASSWORD}",
    ],
)
def test_a_password_written_in_the_file_is_refused_without_repeating_it(sqlite_silo, url):
    message = refusal(sqlite_silo, lambda d: d.update(source={"kind": "sql", "url": url}))
    assert "url holds a secret" in message and "url_env" in message
    assert PASSWORD not in message


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"kind": "sql"}, "needs url, or url_env"),
        (
            {"kind": "sql", "url": "sqlite:///silo.db", "url_env": "DB_URL"},
            "needs url, or url_env",
        ),
        ({"kind": "sql", "url": "oracle://reader@db/crm"}, "not 'oracle'"),
        ({"kind": "sql", "url": "not a url"}, "url: not a database URL"),
        ({"kind": "sql", "url": "sqlite://"}, "names no database file"),
        ({"kind": "sql", "url": "sqlite:///silo.db?mode=rwc"}, "without a driver or options"),
        ({"kind": "sql", "url_env": "not a name"}, "source.url_env"),
        ({"kind": "sql", "url": "sqlite:///silo.db", "statement_timeout": 0}, "statement_timeout"),
        ({"kind": "files", "url": "sqlite:///silo.db"}, "url belong(s) to a SQL source"),
        ({"kind": "odbc", "url": "sqlite:///silo.db"}, "source.kind"),
    ],
)
def test_a_bad_sql_source_is_refused_with_the_key(sqlite_silo, source, expected):
    assert expected in refusal(sqlite_silo, lambda d: d.update(source=source))


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("SELECT * FROM customers; DROP TABLE customers", "holds ';'"),
        ("SELECT * FROM customers;", "holds ';'"),
        ("SELECT ';' AS x, * FROM customers", "holds ';'"),
        ("DELETE FROM customers RETURNING *", "is not a SELECT"),
        ("-- reads\nUPDATE customers SET age = 0 RETURNING *", "is not a SELECT"),
        ("/* a /* nested */ comment */ SELECT * FROM customers", "is not a SELECT"),
        ("PRAGMA table_info(customers)", "is not a SELECT"),
        ("   ", "is not a SELECT"),
    ],
)
def test_a_query_that_is_not_one_select_is_refused(sqlite_silo, query, expected):
    message = refusal(sqlite_silo, lambda d: d["tables"]["customers"].update(query=query))
    assert f"tables.customers.query {expected}" in message


def test_select_and_with_queries_with_comments_and_parentheses_are_read(sqlite_silo):
    columns = "customer_id, person_id, age, gender, region, signup_date, religion, "
    columns += "health_condition, churned, responded"
    expected = load(sqlite_silo).tables["customers"]
    for query in (
        f"with c as (select {columns}, silo_row from customers) select {columns} from c "
        "order by silo_row",
        f"-- the customers\n/* all of them */ SELECT {columns} FROM customers ORDER BY silo_row",
        f"SELECT {columns} FROM customers WHERE customer_id LIKE '%' AND ':x' <> '' "
        "ORDER BY silo_row",
    ):
        set_query(sqlite_silo, "customers", query)
        pd.testing.assert_frame_equal(load(sqlite_silo).tables["customers"], expected)
    # PostgreSQL (not SQLite) also takes a parenthesised SELECT
    set_query(sqlite_silo, "customers", "/* c */ ( SELECT * FROM customers)")
    assert UnitConfig.load(sqlite_silo).tables["customers"].query is not None


# -- the steward's duties on a SQL silo ------------------------------------------------------------


def test_erasure_waits_for_the_rows_to_be_deleted_in_the_database(sqlite_silo, tmp_path):
    config = UnitConfig.load(sqlite_silo)
    home = prepare_simulated_home(config, tmp_path / "home")
    customer = str(load_silo(config).tables["customers"]["customer_id"].iloc[0])
    held = access_report(config, home, customer)
    assert len(held["tables"]["customers"]) == 1 and len(held["tables"]["transactions"]) > 0
    with pytest.raises(ConfigurationError, match=r"still has rows in the SQL silo \(customers: 1"):
        erase_customer(config, home, customer, now=NOW)
    with home.registry() as registry:
        assert registry.export_events(customer)  # nothing erased yet
    with sqlite3.connect(sqlite_silo.parent / "silo.db") as database:  # the steward's own work
        for table in ("customers", "transactions"):
            database.execute(f"DELETE FROM {table} WHERE customer_id = ?", (customer,))
    erased = erase_customer(config, home, customer, now=NOW)
    assert erased.rows_removed == {"customers": 0, "transactions": 0}
    assert erased.consent_events_removed > 0
    with home.registry() as registry:
        assert not registry.export_events(customer)


# -- the SQLite copy tool ------------------------------------------------------------------------


def test_to_sqlite_writes_the_queries_and_refuses_to_overwrite(file_silos, sqlite_silos, tmp_path):
    config = UnitConfig.load(sqlite_silos[0])
    query = config.tables["customers"].query
    assert query is not None and query.startswith("SELECT customer_id, person_id, age")
    assert query.endswith(f"FROM customers ORDER BY {ROW_ORDER}")
    with pytest.raises(ConfigurationError, match=r"holds a bu\.toml already"):
        to_sqlite(file_silos[0].parent, file_silos[0].parent / "silo.db")
    with pytest.raises(ConfigurationError, match="exists; choose another path"):
        to_sqlite(file_silos[0].parent, sqlite_silos[0].parent / "silo.db")
    with pytest.raises(ConfigurationError, match="already a SQL silo"):
        to_sqlite(sqlite_silos[0].parent, tmp_path / "again.db")
    assert not (tmp_path / "again.db").exists()


# -- PostgreSQL ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A database on a PostgreSQL server of this module's own (skipped where none can run)."""
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="module")
def postgres_silos(
    file_silos: list[Path], postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> list[Path]:
    """Each BU in a database of its own on the test server, named in bu.toml by its url."""
    out = tmp_path_factory.mktemp("sql-silos") / "postgres"
    return [
        to_database(config.parent, another_database(postgres_url, config.parent.name), out / name)
        for config, name in ((c, c.parent.name) for c in file_silos)
    ]


def test_a_postgres_silo_loads_the_same_frames_as_its_parquet_files(file_silos, postgres_silos):
    for files, database in zip(file_silos, postgres_silos, strict=True):
        assert UnitConfig.load(database).source.url.startswith("postgresql+psycopg://silofed@")
        assert_same_silo(load(files), load(database))


def test_a_bu_trains_bit_for_bit_the_same_from_postgres_as_from_parquet(
    postgres_silos, parquet_run, tmp_path
):
    job = Job.parse(TRAINING, source="test")
    assert_same_training(parquet_run, run_in_process(job, postgres_silos, tmp_path, seed=SEED))


def test_postgres_reads_in_one_read_only_repeatable_read_transaction(postgres_silos, tmp_path):
    config = shutil.copy(postgres_silos[0], tmp_path / UNIT_CONFIG_FILE)
    query = UnitConfig.load(config).tables["customers"].query or ""
    settings = ", ".join(
        f"current_setting('{name}') AS {name}"
        for name in ("transaction_read_only", "transaction_isolation", "statement_timeout")
    )
    query = query.replace(" FROM", f", {settings} FROM", 1)
    # '%' and ':' reach the server as written (no parameter parsing)
    query = query.replace(" ORDER BY", " WHERE customer_id LIKE '%' AND ':x' <> '' ORDER BY")
    set_query(config, "customers", query)
    edit(config, lambda d: d["source"].update(statement_timeout=30))
    customers = load(config).tables["customers"]
    assert customers["transaction_read_only"].unique().tolist() == ["on"]
    assert customers["transaction_isolation"].unique().tolist() == ["repeatable read"]
    assert customers["statement_timeout"].unique().tolist() == ["30s"]
    assert len(customers) == len(load(postgres_silos[0]).tables["customers"])


def test_postgres_refuses_a_write_hidden_in_a_query(postgres_silos, tmp_path):
    config = shutil.copy(postgres_silos[0], tmp_path / UNIT_CONFIG_FILE)
    rows = len(load(config).tables["customers"])
    hidden_delete = "WITH gone AS (DELETE FROM customers RETURNING *) SELECT * FROM gone"
    set_query(config, "customers", hidden_delete)
    with pytest.raises(SiloError, match=r"ReadOnlySqlTransaction: cannot execute .* read-only"):
        load(config)
    set_query(config, "customers", "SELECT * INTO stolen FROM customers")
    with pytest.raises(SiloError, match="cannot execute SELECT INTO in a read-only transaction"):
        load(config)
    engine = read_only_engine(source_url(UnitConfig.load(config)), timeout=5)
    try:
        with engine.connect() as connection, pytest.raises(DBAPIError, match="read-only"):
            connection.exec_driver_sql("DELETE FROM customers")
    finally:
        engine.dispose()
    writer = create_engine(UnitConfig.load(postgres_silos[0]).source.url or "")
    try:
        with writer.connect() as connection:
            count = connection.exec_driver_sql("SELECT count(*) FROM customers").scalar()
    finally:
        writer.dispose()
    assert count == rows


def test_a_postgres_query_past_the_statement_timeout_is_cancelled(postgres_silos, tmp_path):
    config = shutil.copy(postgres_silos[0], tmp_path / UNIT_CONFIG_FILE)
    edit(config, lambda d: d["source"].update(statement_timeout=0.2))
    set_query(config, "customers", "SELECT pg_sleep(5), * FROM customers")
    started = time.monotonic()
    with pytest.raises(SiloError, match="QueryCanceled: canceling statement due to statement"):
        load(config)
    assert time.monotonic() - started < 4


def test_a_postgres_url_from_the_environment_keeps_the_file_free_of_it(
    file_silos, postgres_silos, monkeypatch, tmp_path
):
    url = UnitConfig.load(postgres_silos[0]).source.url or ""
    config = shutil.copy(postgres_silos[0], tmp_path / UNIT_CONFIG_FILE)
    set_source(config, kind="sql", url_env="SILOFED_TEST_PG_URL")
    monkeypatch.setenv("SILOFED_TEST_PG_URL", url)
    assert "postgresql" not in config.read_text()
    assert_same_silo(load(file_silos[0]), load(config))
