"""Robust aggregation: Flower's trimmed mean, median and Krum behind `aggregation.rule`, the bound
each rule's constructor enforces, and 20 BUs of which 2 send scaled updates, in process."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from flwr.server.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum

from federation.job import Aggregation, Job
from privacy.errors import ConfigurationError
from privacy.unit_config import UnitConfig
from server.aggregation import minimum_units, model_strategy, quorum
from simulations.faults import Fault
from simulations.inprocess import run_in_process
from simulations.synthetic import synthesize


@pytest.mark.parametrize(
    ("rule", "fewest", "kind"),
    [
        ({"rule": "mean"}, 1, FedAvg),
        ({"rule": "trimmed-mean", "trim": 0.2}, 5, FedTrimmedAvg),
        ({"rule": "trimmed-mean", "trim": 0.1}, 10, FedTrimmedAvg),
        ({"rule": "median"}, 3, FedMedian),
        ({"rule": "krum", "byzantine": 2}, 7, Krum),
    ],
)
def test_each_rule_refuses_fewer_bus_than_it_needs(rule: dict, fewest: int, kind: type) -> None:
    aggregation = Aggregation.model_validate(rule)
    assert minimum_units(aggregation) == fewest
    assert isinstance(model_strategy(aggregation, fewest), kind)
    if fewest > 1:
        with pytest.raises(ConfigurationError, match=f"needs at least {fewest} BUs"):
            model_strategy(aggregation, fewest - 1)


def test_the_quorum_is_the_jobs_share_and_never_below_the_rules_bound() -> None:
    assert quorum(Aggregation(), 20) == 10
    assert quorum(Aggregation(quorum=0.75), 4) == 3
    assert quorum(Aggregation(quorum=0.1), 3) == 1
    assert quorum(Aggregation(rule="krum", byzantine=2, quorum=0.1), 20) == 7


def test_robust_rules_need_each_update() -> None:
    segments = {"kind": "segments", "segments": {"k": 3}}
    for section in ({"secure_aggregation": {"enabled": True}}, segments):
        with pytest.raises(ConfigurationError, match=r"aggregation\.rule = 'median'"):
            Job.parse({**section, "aggregation": {"rule": "median"}}, source="test")


@pytest.fixture(scope="module")
def twenty_units(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[str]]:
    """20 synthetic BUs; the attackers are the two largest, which FedAvg weighs the most."""
    out = tmp_path_factory.mktemp("robust-silos") / "silos"
    synthesize(out, units=20, customers=300, seed=3)
    configs = sorted(out.glob("*/bu.toml"))
    sizes = {
        UnitConfig.load(p).unit: len(pd.read_parquet(p.parent / "customers.parquet"))
        for p in configs
    }
    return configs, sorted(sizes, key=lambda u: (sizes[u], u))[-2:]


def _auc(
    configs: list[Path], homes: Path, attackers: list[str], aggregation: dict | None = None
) -> float:
    job = Job.parse(
        {"rounds": 5, "evaluation": {"mode": "exact"}, "aggregation": aggregation or {}},
        source="test",
    )
    faults = [Fault("scaled", unit, r) for unit in attackers for r in range(1, job.rounds + 1)]
    run = run_in_process(job, configs, homes, faults=faults, seed=3)
    assert run.record.rejected == []  # well-formed: validation cannot catch a scaled update
    return run.record.rounds[-1].metrics["auc"]


@pytest.fixture(scope="module")
def clean_auc(twenty_units, tmp_path_factory: pytest.TempPathFactory) -> float:
    configs, _ = twenty_units
    return _auc(configs, tmp_path_factory.mktemp("clean"), [])


def test_fedavg_is_pulled_off_course_by_two_scaled_updates(twenty_units, clean_auc, tmp_path):
    configs, attackers = twenty_units
    assert clean_auc > 0.85
    assert _auc(configs, tmp_path, attackers) < clean_auc - 0.1  # the control must fail


@pytest.mark.parametrize(
    "aggregation",
    [
        {"rule": "trimmed-mean"},
        {"rule": "median"},
        pytest.param({"rule": "krum", "byzantine": 2}, marks=pytest.mark.slow),
    ],
)
def test_a_robust_rule_keeps_the_model_within_003_auc_of_the_clean_run(
    aggregation: dict, twenty_units, clean_auc: float, tmp_path: Path
) -> None:
    configs, attackers = twenty_units
    assert abs(_auc(configs, tmp_path, attackers, aggregation) - clean_auc) <= 0.03
