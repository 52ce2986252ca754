"""The coordinator's audit log of a run, written as the run goes: a completed run verifies with
`silofed audit verify`, and any edit to the log or to an artefact it lists makes it fail."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from federation.cli import app
from federation.job import Job
from privacy.audit import Status, verify
from server.audit_trail import LOG_FILE, verify_run
from simulations.synthetic import synthesize
from tests.inprocess import run_in_process


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("audited")
    synthesize(base / "silos", units=2, customers=300, seed=5)
    silos = sorted((base / "silos").glob("*/bu.toml"))
    run_in_process(Job(rounds=2), silos, base / "homes", out=base / "run", seed=1)
    return base / "run", base / "silos"


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def test_a_completed_run_verifies_and_logs_what_happened(run) -> None:
    run_dir, _ = run
    result = CliRunner().invoke(app, ["audit", "verify", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "intact and complete" in result.output
    entries = [json.loads(line) for line in (run_dir / LOG_FILE).read_text().splitlines()]
    events = [e["event"] for e in entries]
    assert events[:2] == ["log.opened", "job.accepted"]
    assert events.count("round.finished") == 2
    assert events.count("unit.released") == 2
    logged = {e["data"]["name"] for e in entries if e["event"] == "artefact.written"}
    assert logged == {p.name for p in run_dir.iterdir()} - {LOG_FILE, LOG_FILE + ".head"}
    assert events[-1] == "checkpoint" and entries[-1]["data"]["final"] is True
    report = json.loads((run_dir / "report.json").read_text())
    assert report["audit"]["public_key"] == (run_dir / "audit.pub").read_text().strip()


def test_no_customer_id_is_in_the_run_directory(run) -> None:
    run_dir, silos = run
    ids = set()
    for customers in silos.glob("*/customers.parquet"):
        ids |= set(pd.read_parquet(customers)["customer_id"].astype(str))
    text = "\n".join(p.read_bytes().decode("latin-1") for p in run_dir.iterdir() if p.is_file())
    assert ids and not [i for i in ids if i in text]


def test_an_edited_artefact_fails_verification(run, tmp_path: Path) -> None:
    run_dir = _copy(run[0], tmp_path)
    report = json.loads((run_dir / "report.json").read_text())
    report["privacy"]["per_unit"][0]["epsilon"] = 0.01
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    result, problems = verify_run(run_dir)
    assert result.status is Status.COMPLETE
    assert problems == [problems[0]] and problems[0].startswith(
        "report.json: changed after the run"
    )
    cli = CliRunner().invoke(app, ["audit", "verify", str(run_dir)])
    assert cli.exit_code == 1


def test_an_edited_log_fails_verification(run, tmp_path: Path) -> None:
    run_dir = _copy(run[0], tmp_path)
    log = run_dir / LOG_FILE
    log.write_bytes(log.read_bytes().replace(b'"records_used":', b'"records_used":1', 1))
    result = verify(log, _public_key(run_dir))
    assert result.status is Status.TAMPERED
    cli = CliRunner().invoke(app, ["audit", "verify", str(run_dir)])
    assert cli.exit_code == 1 and "tampered at sequence" in cli.output


def _public_key(run_dir: Path):
    from privacy.audit import load_public_key

    return load_public_key((run_dir / "audit.pub").read_text().strip())


def test_every_bu_keeps_its_own_log_which_agrees_with_the_report(run) -> None:
    run_dir, silos = run
    report = json.loads((run_dir / "report.json").read_text())
    homes = run_dir.parent / "homes"
    ids = set()
    for customers in silos.glob("*/customers.parquet"):
        ids |= set(pd.read_parquet(customers)["customer_id"].astype(str))
    for unit in report["federation"]["units"]:
        home = homes / unit
        cli = CliRunner().invoke(app, ["audit", "verify", str(home)])
        assert cli.exit_code == 0 and "intact and complete" in cli.output, cli.output
        entries = [json.loads(line) for line in (home / LOG_FILE).read_text().splitlines()]
        answered = [e for e in entries if e["event"] == "exchange.answered"]
        assert [(e["data"]["round"], e["data"]["phase"]) for e in answered] == [
            (1, "train"),
            (2, "train"),
            (2, "evaluate"),  # the DP evaluation follows the last round's training
        ]
        assert all(e["actor"] == f"bu:{unit}" for e in entries)
        logged = answered[-1]["data"]["epsilon"]
        reported = {u["unit"]: u["epsilon"] for u in report["privacy"]["per_unit"]}[unit]
        assert logged == reported  # what the BU says it released = what the report says
        text = (home / LOG_FILE).read_text()
        assert not [i for i in ids if f'"{i}"' in text]
