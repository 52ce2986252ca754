"""The simulation runner's set-up around Flower's Simulation Engine, with the engine replaced by a
stand-in that does what the ServerApp does first (`RunPlan.ready`) and, when asked, writes what a
completed run writes: no Ray is started here."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

import simulations.runner as runner
from federation.job import Job
from privacy.errors import ConfigurationError
from privacy.registry import ConsentRegistry
from privacy.unit_config import UnitConfig
from simulations.runner import SimulationSettings, simulate
from simulations.synthetic import synthesize


def _engine(calls: list[str], *, complete: bool, after_ready=lambda plan, nodes: None):
    def engine(plan, nodes, *, mods, verbose, workers) -> None:
        calls.append("engine")
        plan.ready()  # as `server.app.run_federation` does before anything else
        calls.append("ready")
        after_ready(plan, nodes)
        if complete:
            (plan.out / "report.json").write_text(
                json.dumps({"federation": {"rounds_completed": plan.job.rounds}})
            )

    return engine


def _events(node) -> int:
    config = UnitConfig.load(node.bu_config)
    path = Path(node.home) / "consent.sqlite"
    if not path.exists():
        return 0
    registry = ConsentRegistry.open(path, unit=config.unit)
    try:
        return len(registry.events("churn_model"))
    finally:
        registry.close()


def test_the_first_exchange_waits_for_every_consent_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    silos = tmp_path / "silos"
    synthesize(silos, units=3, customers=80, seed=2)
    real = runner.prepare_simulated_home

    def slow(config, directory):
        time.sleep(0.3)  # the engine would run ahead of an import it did not wait for
        return real(config, directory)

    monkeypatch.setattr(runner, "prepare_simulated_home", slow)
    calls: list[str] = []
    counts: list[int] = []
    monkeypatch.setattr(
        runner,
        "_run_engine",
        _engine(
            calls, complete=True, after_ready=lambda _p, nodes: counts.extend(map(_events, nodes))
        ),
    )
    simulate(SimulationSettings(out=tmp_path / "run", data=silos), Job(rounds=1))
    assert calls == ["engine", "ready"]
    assert len(counts) == 3 and min(counts) > 0  # every BU's consent was in its home


def test_a_malformed_consent_export_stops_the_run_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    silos = tmp_path / "silos"
    synthesize(silos, units=2, customers=60, seed=1, file_format="csv")
    export = silos / "retail_stores" / "consent.csv"
    export.write_text("customer_id,purpose,granted,timestamp\nc1,churn_model,maybe,2024-01-01\n")
    calls: list[str] = []
    monkeypatch.setattr(runner, "_run_engine", _engine(calls, complete=True))
    with pytest.raises(ConfigurationError, match=re.escape("consent.csv: column 'granted', row 1")):
        simulate(SimulationSettings(out=tmp_path / "runs" / "bad", data=silos), Job(rounds=1))
    assert calls == ["engine"]  # the first exchange never came
    assert list((tmp_path / "runs").iterdir()) == []  # neither the run nor a staging directory
