"""Budgets are enforced by each BU before it touches any data, and runs compose."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest
import tomli_w

from clients.app import BusinessUnitClient, Node
from clients.budget import PolicyRefusal, admit
from clients.steward import prepare_simulated_home
from federation.features import resolve_feature_spec
from federation.job import Job
from federation.models import initial_parameters
from federation.wire import Instruction, Phase, UnitReport, refusal_of
from privacy.accounting import DpSgdEvent
from privacy.ledger import BudgetExceeded
from privacy.unit_config import UnitConfig
from simulations.synthetic import synthesize

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def _with_policy(bu_config: Path, **policy) -> None:
    data = tomllib.loads(bu_config.read_text())
    data["privacy"] = policy
    bu_config.write_text(tomli_w.dumps(data))


@pytest.fixture()
def unit(tmp_path: Path):
    synthesize(tmp_path / "silos", units=3, customers=150, seed=2)
    bu_config = tmp_path / "silos" / "card_services" / "bu.toml"
    _with_policy(bu_config, budget=4.0)
    home = prepare_simulated_home(UnitConfig.load(bu_config), tmp_path / "homes" / "card_services")
    return bu_config, home


def _exchange(bu_config: Path, home, run_id: str, phase: Phase, epsilon: float = 3.0):
    config = UnitConfig.load(bu_config)
    job = Job(rounds=1, epsilon=epsilon, features=resolve_feature_spec("churn", [config]))
    instruction = Instruction(
        phase=phase, server_round=1, run_id=run_id, started_at=NOW, job=job, seed=1
    ).to_config()
    client = BusinessUnitClient(Node(bu_config, home.directory, True))
    return client.fit(initial_parameters(job.task, job.feature_spec.dim), instruction)


def test_a_second_job_over_budget_is_refused_before_any_data_is_read(unit) -> None:
    bu_config, home = unit
    _, _, metrics = _exchange(bu_config, home, "run-1", Phase.TRAIN)
    spent = UnitReport.from_metrics(metrics)
    # training and the DP evaluation touch disjoint customers: each spends up to the target
    assert 2.7 <= spent.epsilon_total <= 3.0 and spent.budget_unit == 4.0
    _, _, metrics = _exchange(bu_config, home, "run-1", Phase.EVALUATE)  # the last exchange
    assert 2.7 <= UnitReport.from_metrics(metrics).epsilon_total <= 3.0
    # Remove the silo's data: a BU that read any of it now would fail with a SiloError.
    for table in ("customers.parquet", "transactions.parquet"):
        (bu_config.parent / table).unlink()
    parameters, n, metrics = _exchange(bu_config, home, "run-2", Phase.TRAIN)
    assert (parameters, n) == ([], 0)
    reason = refusal_of(metrics).reason
    assert (
        "unit 'card_services' refuses run 'run-2'" in reason and "exceed a privacy budget" in reason
    )
    assert BudgetExceeded("x").exit_code == 3
    with home.ledger() as ledger:
        # run 1 trained and evaluated (DP); run 2 released nothing
        assert [e.run_id for e in ledger.entries()] == ["run-1", "run-1"]
        assert ledger.reservations() == []


def test_runs_compose_in_the_ledger(unit) -> None:
    bu_config, home = unit
    _with_policy(bu_config)  # no budget
    reports = []
    for run in ("run-1", "run-2"):
        _, _, metrics = _exchange(bu_config, home, run, Phase.TRAIN, epsilon=1.0)
        reports.append(UnitReport.from_metrics(metrics))
    first, second = reports
    with home.ledger() as ledger:
        events = [e.event for e in ledger.entries()]
        assert ledger.epsilon(1e-6) == second.epsilon_total
    assert events == [DpSgdEvent(first.noise_multiplier, first.sample_rate, first.steps)] * 2
    assert second.epsilon == first.epsilon  # this run alone
    assert second.epsilon_total > first.epsilon_total == first.epsilon  # the purpose, both runs


def test_a_job_weaker_than_the_units_policy_is_refused(unit) -> None:
    bu_config, home = unit
    _with_policy(bu_config, max_epsilon_per_run=2.0, max_delta=1e-7)
    config = UnitConfig.load(bu_config)
    job = Job(epsilon=3.0, delta=1e-8, features=resolve_feature_spec("churn", [config]))
    with pytest.raises(PolicyRefusal, match=r"accepts at most epsilon 2\.0 per run"):
        admit(config, home, job, "run-1", now=NOW)
    with pytest.raises(PolicyRefusal, match=r"accepts at most delta 1e-07"):
        admit(
            config, home, job.model_copy(update={"epsilon": 1.0, "delta": 1e-6}), "run-1", now=NOW
        )


def test_simulate_exits_3_naming_the_units_when_every_budget_is_spent(unit, tmp_path) -> None:
    for bu_config in sorted((tmp_path / "silos").glob("*/bu.toml")):
        _with_policy(bu_config, budget=4.0)
        config = UnitConfig.load(bu_config)
        home = prepare_simulated_home(config, tmp_path / "homes" / config.unit)
        with home.ledger() as ledger:  # an earlier run spent about 3 on churn_model
            ledger.record("earlier", 1, "churn_model", DpSgdEvent(1.2, 0.5, 4), now=NOW)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "federation.cli",
            "simulate",
            "--data",
            "silos",
            "--homes",
            "homes",
            "--epsilon",
            "3",
            "--out",
            "run",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 3, done.stderr
    message = " ".join(done.stderr.split())
    for unit_name in ("card_services", "ecommerce", "retail_stores"):
        assert f"unit '{unit_name}'" in message
    assert not (tmp_path / "run").exists()
    shown = subprocess.run(
        [
            sys.executable,
            "-m",
            "federation.cli",
            "budget",
            "show",
            "--bu-config",
            str(tmp_path / "silos" / "card_services" / "bu.toml"),
            "--home",
            str(tmp_path / "homes" / "card_services"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert shown.returncode == 0, shown.stderr
    assert "churn_model" in shown.stdout and "4.0000" in shown.stdout
