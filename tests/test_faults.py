"""Injected faults: parsing, and SecAgg+ dropouts through the Simulation Engine (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from privacy.errors import ConfigurationError
from simulations.faults import Fault

UNITS = ["retail_stores", "ecommerce", "card_services"]


def test_a_fault_names_a_unit_by_name_or_index_and_a_round_from_one() -> None:
    assert Fault.parse("crash:ecommerce:2", UNITS) == Fault("crash", "ecommerce", 2)
    assert Fault.parse("crash:2:1", UNITS) == Fault("crash", "card_services", 1)
    for bad, phrase in (
        ("crash:ecommerce", "KIND:BU:ROUND"),
        ("melt:ecommerce:1", "unknown kind 'melt'"),
        ("crash:telecom:1", "no BU named 'telecom'"),
        ("crash:3:1", "index 3 out of range"),
        ("crash:ecommerce:0", "a number from 1"),
    ):
        with pytest.raises(ConfigurationError, match=phrase):
            Fault.parse(bad, UNITS)


def _simulate(tmp_path: Path, *faults: str) -> subprocess.CompletedProcess:
    args = [
        "simulate",
        "--units",
        "5",
        "--customers",
        "300",
        "--rounds",
        "1",
        "--seed",
        "4",
        "--secure-aggregation",
        "--out",
        "run",
    ]
    for fault in faults:
        args += ["--fault", fault]
    return subprocess.run(
        [sys.executable, "-m", "federation.cli", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200"},
    )


@pytest.mark.slow
@pytest.mark.flower
def test_secure_aggregation_survives_dropouts_up_to_its_threshold(tmp_path: Path) -> None:
    done = _simulate(tmp_path, "crash:ecommerce:1")  # 5 BUs, threshold 4: one may drop
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["federation"]["units"] == [
        "card_services",
        "insurance",
        "retail_stores",
        "telecom",
    ]


@pytest.mark.slow
@pytest.mark.flower
def test_more_dropouts_than_the_threshold_fail_the_run_loudly(tmp_path: Path) -> None:
    done = _simulate(tmp_path, "crash:0:1", "crash:ecommerce:1")
    assert done.returncode == 1
    assert "the train exchange did not complete" in " ".join(done.stderr.split())
    assert not (tmp_path / "run").exists()
