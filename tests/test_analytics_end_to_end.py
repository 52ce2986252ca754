"""Query and segments jobs through the command line and the Flower Simulation Engine (slow: a Ray
start each, so `make test-all`; the default suite runs the same jobs in process, tests/test_jobs.py).
The secure query covers SecAgg+ on a statistics release with the distributed placement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.command import silofed
from tests.report_contract import assert_report_contract

pytestmark = [pytest.mark.slow, pytest.mark.flower]

SECURE_QUERY = """
kind = "query"
epsilon = 1.0
noise = "distributed"

[secure_aggregation]
enabled = true

[query]
purpose = "analytics"
recipe = "churn_rate_by_segment"
segment = "customers.region"
"""


def test_a_secure_distributed_query_runs_on_flower(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(SECURE_QUERY)
    run = silofed(
        "simulate", "--job", "job.toml", "--units", "4", "--customers", "800", "--out", "run",
        cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert_report_contract(report)
    assert report["federation"]["secure_aggregation"] is True
    rates = [a for a in report["results"]["answers"] if a["name"] == "churn_rate"]
    assert len(rates) == 5 and all(0 <= a["value"] <= 1 for a in rates)
    assert all(u["epsilon"] <= 1.0 for u in report["privacy"]["per_unit"])


def test_a_segments_job_runs_on_flower(tmp_path: Path) -> None:
    run = silofed(
        "simulate", "--task", "segments", "--rounds", "3", "--units", "3", "--customers", "800",
        "--out", "run", cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert_report_contract(report)
    assert report["federation"]["rounds_completed"] == 3
    assert len(report["results"]["segments"]) == 4
    assert "days since the last purchase" in run.stdout
