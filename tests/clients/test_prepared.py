"""A BU's prepared data shared through its home by the processes that serve it (clients/prepared.py)."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import clients.app
from clients.app import BusinessUnitClient, _customers_only
from clients.features import compute_features
from clients.pipeline import UnitKeys, prepare_tables
from clients.prepared import (
    PREPARED_DIR,
    RETENTION_SECONDS,
    discard_prepared,
    load_prepared,
    save_prepared,
)
from clients.silo import load_silo
from clients.steward import erase_customer, prepare_simulated_home
from federation.exchanges import job_columns
from federation.features import resolve_feature_spec
from federation.job import Job
from federation.models import initial_parameters
from federation.wire import Phase
from privacy.home import UnitHome
from privacy.unit_config import UnitConfig
from simulations.synthetic import unit_schema
from tests.clients.test_training import _counting_silo_loads, _instruction, _node

JOB = Job(rounds=3, features=resolve_feature_spec("churn", [unit_schema("x")]))


def _prepared_ecommerce(silos: Path, home_dir: Path):
    config = UnitConfig.load(silos / "ecommerce" / "bu.toml")
    home = prepare_simulated_home(config, home_dir)
    with home.registry() as registry:
        tables = prepare_tables(
            load_silo(config),
            JOB,
            columns=job_columns(JOB),
            registry=registry,
            keys=UnitKeys(home.pseudonym_key(), home.linkage_key()),
            as_of=datetime(2026, 6, 1, tzinfo=UTC),
        )
    matrix = compute_features(tables.tables, JOB.feature_spec, customer_key=tables.customer_key)
    return home, _customers_only(tables), matrix


def test_what_is_kept_is_read_back_exactly(small_silos: Path, tmp_path: Path) -> None:
    home, tables, matrix = _prepared_ecommerce(small_silos, tmp_path / "home")
    event = pd.Timestamp("2026-07-01 09:30:00.123456")
    assert save_prepared(home.directory, "f" * 64, tables, matrix, event)
    loaded = load_prepared(home.directory, "f" * 64)
    assert loaded is not None
    back, back_matrix, back_event = loaded
    pd.testing.assert_frame_equal(back.tables["customers"], tables.tables["customers"])
    np.testing.assert_array_equal(back.held_out, tables.held_out)
    for field in ("unit", "purpose", "customer_key", "excluded", "columns_used", "quality"):
        assert getattr(back, field) == getattr(tables, field)
    assert back.columns_dropped == tables.columns_dropped
    assert (back.legal_basis, back.jurisdictions, back.encrypted_at_rest) == (
        tables.legal_basis,
        tables.jurisdictions,
        tables.encrypted_at_rest,
    )
    for name in ("customer_ids", "features", "labels"):
        kept, read = getattr(matrix, name), getattr(back_matrix, name)
        assert read.dtype == kept.dtype
        np.testing.assert_array_equal(read, kept)
    assert back_event == event


def test_one_entry_per_unit_and_a_foreign_or_broken_one_is_deleted(
    small_silos: Path, tmp_path: Path
) -> None:
    home, tables, matrix = _prepared_ecommerce(small_silos, tmp_path / "home")
    store = home.directory / PREPARED_DIR
    save_prepared(home.directory, "a" * 64, tables, matrix, None)
    save_prepared(home.directory, "b" * 64, tables, matrix, None)
    assert [p.name for p in store.iterdir()] == ["b" * 64 + ".npz"]  # the stale one went
    (store / ("b" * 64 + ".npz")).rename(store / ("c" * 64 + ".npz"))
    assert load_prepared(home.directory, "c" * 64) is None  # written for other inputs
    (store / ("d" * 64 + ".npz")).write_bytes(b"not a zip file")
    assert load_prepared(home.directory, "d" * 64) is None
    assert list(store.iterdir()) == []
    assert load_prepared(home.directory, "e" * 64) is None  # never kept


def test_an_entry_untouched_past_retention_is_deleted(small_silos: Path, tmp_path: Path) -> None:
    home, tables, matrix = _prepared_ecommerce(small_silos, tmp_path / "home")
    save_prepared(home.directory, "a" * 64, tables, matrix, None)
    entry = home.directory / PREPARED_DIR / ("a" * 64 + ".npz")
    old = time.time() - RETENTION_SECONDS - 60
    os.utime(entry, (old, old))
    assert load_prepared(home.directory, "a" * 64) is None
    assert not entry.exists()


def test_only_the_keys_of_customers_are_kept(small_silos: Path, tmp_path: Path) -> None:
    home, tables, matrix = _prepared_ecommerce(small_silos, tmp_path / "home")
    with_spend = tables.tables["customers"].assign(spend=1.0)
    wider = replace(tables, tables={"customers": with_spend})
    with pytest.raises(ValueError, match="only the customers' keys"):
        save_prepared(home.directory, "a" * 64, wider, matrix, None)
    assert not (home.directory / PREPARED_DIR).exists()


def test_a_second_process_reads_what_the_first_prepared_and_the_last_exchange_deletes_it(
    small_silos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads = _counting_silo_loads(monkeypatch)
    node = _node(small_silos, tmp_path)
    job = Job(
        rounds=2,
        evaluation={"mode": "exact"},
        features=resolve_feature_spec("churn", [unit_schema("x")]),
    )
    store = node.home / PREPARED_DIR
    params = initial_parameters(job.task, job.feature_spec.dim)
    answers = []
    for server_round, phase in ((1, Phase.TRAIN), (2, Phase.TRAIN), (2, Phase.EVALUATE)):
        clients.app._PREPARED.clear()  # as another worker process would find it
        arrays, n, _metrics = BusinessUnitClient(node).fit(
            params, _instruction(phase, server_round, job)
        )
        answers.append((arrays, n))
        if phase is Phase.TRAIN:
            params = arrays
            assert len(list(store.iterdir())) == 1
    assert loads == ["ecommerce"]  # prepared once, read back twice
    assert list(store.iterdir()) == []  # the job's last exchange: nothing kept

    # the same exchanges prepared in one process throughout give the same answers
    shutil.rmtree(tmp_path / "home")
    clients.app._PREPARED.clear()
    node = _node(small_silos, tmp_path)
    params = initial_parameters(job.task, job.feature_spec.dim)
    for (kept_arrays, kept_n), (server_round, phase) in zip(
        answers, ((1, Phase.TRAIN), (2, Phase.TRAIN), (2, Phase.EVALUATE)), strict=True
    ):
        arrays, n, _metrics = BusinessUnitClient(node).fit(
            params, _instruction(phase, server_round, job)
        )
        assert n == kept_n
        for a, b in zip(arrays, kept_arrays, strict=True):
            np.testing.assert_array_equal(a, b)
        if phase is Phase.TRAIN:
            params = arrays


def test_an_erasure_deletes_what_is_kept(small_silos: Path, tmp_path: Path) -> None:
    shutil.copytree(small_silos / "ecommerce", tmp_path / "silos" / "ecommerce")
    home, tables, matrix = _prepared_ecommerce(tmp_path / "silos", tmp_path / "home")
    save_prepared(home.directory, "a" * 64, tables, matrix, None)
    config = UnitConfig.load(tmp_path / "silos" / "ecommerce" / "bu.toml")
    customer = str(load_silo(config).tables["customers"][config.tables["customers"].key].iloc[0])
    erase_customer(config, UnitHome(home.directory, config), customer, now=datetime.now(UTC))
    assert list((home.directory / PREPARED_DIR).iterdir()) == []


def test_discard_without_a_fingerprint_empties_the_store(small_silos: Path, tmp_path: Path) -> None:
    home, tables, matrix = _prepared_ecommerce(small_silos, tmp_path / "home")
    discard_prepared(home.directory)  # nothing kept yet: nothing to do
    save_prepared(home.directory, "a" * 64, tables, matrix, None)
    discard_prepared(home.directory)
    assert list((home.directory / PREPARED_DIR).iterdir()) == []
