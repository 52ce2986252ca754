"""The issue's real-data runs through the command line and the Flower Simulation Engine (slow: one
Ray start each, so `make test-all`): UCI bank marketing split by job and trained for campaign
response; CDNOW split by acquisition month and trained for lifetime value. Skipped without the
data in ../shared/data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.command import silofed
from tests.report_contract import assert_report_contract

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BANK = DATA / "bank_marketing" / "bank-full.csv"
CDNOW = DATA / "cdnow" / "CDNOW_master.txt"

pytestmark = [pytest.mark.slow, pytest.mark.flower]


@pytest.mark.skipif(not BANK.exists(), reason="bank marketing data not present")
def test_bank_marketing_split_by_job_trains_a_response_model(tmp_path: Path) -> None:
    split = silofed(
        "data", "split", str(BANK), "--sep", ";", "--by", "job", "--label", "y",
        "--positive", "yes", "--drop", "duration", "--out", "D", cwd=tmp_path,
    )  # fmt: skip
    assert split.returncode == 0, split.stdout + split.stderr
    run = silofed(
        "simulate", "--data", "D", "--task", "response", "--rounds", "2", "--out", "run",
        cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert_report_contract(report)
    names = report["federation"]["display_names"]
    assert {"admin.", "blue-collar", "technician", "management"} <= set(names.values())
    assert report["job"]["task"] == "response" and report["privacy"]["unit"] == "record"
    assert report["model"]["metrics"]["auc"] > 0.70
    assert all(u["epsilon"] <= 3.0 for u in report["privacy"]["per_unit"])
    assert "blue-collar" in run.stdout  # the summary names the BUs by job


@pytest.mark.skipif(not CDNOW.exists(), reason="CDNOW data not present")
def test_cdnow_split_by_acquisition_month_trains_a_lifetime_value_model(tmp_path: Path) -> None:
    split = silofed(
        "data", "split", str(CDNOW), "--transactions", "--id", "customer_id",
        "--timestamp", "date", "--amount", "dollar_value", "--by", "acquisition_month",
        "--out", "D", cwd=tmp_path,
    )  # fmt: skip
    assert split.returncode == 0, split.stdout + split.stderr
    run = silofed(
        "simulate", "--data", "D", "--task", "ltv", "--rounds", "2", "--out", "run", cwd=tmp_path
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert_report_contract(report)
    metrics = report["model"]["metrics"]
    assert (
        report["job"]["task"] == "ltv"
        and report["model"]["type"] == "fractional_logistic_regression"
    )
    assert metrics["rmse"] > 0 and metrics["mae"] > 0
    assert metrics["rmse_interval"][0] <= metrics["rmse"] <= metrics["rmse_interval"][1]
    assert len(report["federation"]["units"]) == 3
