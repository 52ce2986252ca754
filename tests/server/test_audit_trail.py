"""The coordinator's audit log of a run, written as the run goes: a completed run verifies with
`silofed audit verify`, and any edit to the log or to an artefact it lists makes it fail."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from clients.audit_check import compare_with_report
from federation.cli import app
from federation.job import Job
from privacy.audit import Status, verify
from privacy.errors import ConfigurationError
from server.audit_trail import LOG_FILE, verify_run
from server.compliance import ComplianceRecord, report_mismatches
from server.records import processing_records
from simulations.inprocess import run_in_process
from simulations.synthetic import synthesize


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


def test_no_customer_id_is_in_the_run_directory(run, tmp_path: Path) -> None:
    """Every file of the run directory, the rendered compliance record (HTML, and the PDF's
    text) and every BU's own audit log: not one synthetic customer id."""
    import pypdfium2 as pdfium

    run_dir, silos = run
    run_dir = _copy(run_dir, tmp_path)
    assert CliRunner().invoke(app, ["audit", "report", str(run_dir), "--pdf"]).exit_code == 0
    ids = set()
    for customers in silos.glob("*/customers.parquet"):
        ids |= set(pd.read_parquet(customers)["customer_id"].astype(str))
    files = [*run_dir.iterdir(), *(run[0].parent / "homes").glob("*/audit.jsonl")]
    text = "\n".join(p.read_bytes().decode("latin-1") for p in files if p.is_file())
    document = pdfium.PdfDocument(run_dir / "report.pdf")
    text += "".join(document[i].get_textpage().get_text_range() for i in range(len(document)))
    assert len(ids) > 500 and not [i for i in ids if i in text]


def test_an_edited_artefact_fails_verification(run, tmp_path: Path) -> None:
    run_dir = _copy(run[0], tmp_path)
    report = json.loads((run_dir / "report.json").read_text())
    report["privacy"]["per_unit"][0]["epsilon"] = 0.01
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    result, problems = verify_run(run_dir)
    assert result.status is Status.COMPLETE
    assert problems[0].startswith("report.json: changed after the run")
    # and the report no longer says what the log says
    unit = report["privacy"]["per_unit"][0]["unit"]
    assert problems[1:] == [
        f"report.json disagrees with the log: {unit}.epsilon: the report says 0.01, the log "
        f"{_released(run[0])[unit]['epsilon']!r}"
    ]
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
            (1, "ranges"),  # the feature windows' histograms, before the first training
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


def _entries(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / LOG_FILE).read_text().splitlines()]


def _released(run_dir: Path) -> dict[str, dict]:
    return {
        e["data"]["unit"]: e["data"] for e in _entries(run_dir) if e["event"] == "unit.released"
    }


def test_the_reports_numbers_are_the_logs(run) -> None:
    """Re-derived from the raw log lines, without silofed's reader: every BU's figures, the
    epsilon after every round, and what report.html's compliance record shows."""
    run_dir, _ = run
    report = json.loads((run_dir / "report.json").read_text())
    released = _released(run_dir)
    per_unit = {u["unit"]: u for u in report["privacy"]["per_unit"]}
    assert sorted(released) == sorted(per_unit) == report["federation"]["units"]
    for unit, logged in released.items():
        for key in (
            "purpose", "legal_basis", "records_used", "records_test", "excluded", "columns_used",
            "columns_dropped", "epsilon", "epsilon_total", "epsilon_unit_total", "releases",
            "encrypted_at_rest", "budget", "noise_multiplier",
        ):  # fmt: skip
            assert per_unit[unit][key] == logged[key], (unit, key)
    rounds = [e["data"] for e in _entries(run_dir) if e["event"] == "round.finished"]
    assert [(r["round"], r["epsilon"]) for r in rounds] == [
        (r["round"], r["epsilon"]) for r in report["rounds"]
    ]
    page = (run_dir / "report.html").read_text()
    record = page[page.index("<h1>Compliance record</h1>") :]
    for unit, logged in released.items():
        assert f"<td>{unit}</td><td>churn_model</td><td>consent</td><td>gdpr</td>" in record
        assert f'<td>{unit}</td><td class="n">{logged["records_used"]}</td>' in record
        assert f'<td class="n">{logged["epsilon"]:.3f}</td>' in record
    for artefact in ("job.json", "model.pt", "report.json"):
        digest = hashlib.sha256((run_dir / artefact).read_bytes()).hexdigest()
        assert f"<td>{artefact}</td>" in record and f"<td>{digest}</td>" in record


def test_report_mismatches_name_the_field(run) -> None:
    run_dir, _ = run
    report = json.loads((run_dir / "report.json").read_text())
    result = verify(run_dir / LOG_FILE, _public_key(run_dir))
    record = ComplianceRecord.of_log(run_dir / LOG_FILE, result)
    assert report_mismatches(report, record) == []
    unit = report["privacy"]["per_unit"][1]
    unit["records_used"] += 1
    unit["columns_dropped"] = []
    report["rounds"][0]["epsilon"][unit["unit"]] /= 2
    assert report_mismatches(report, record) == [
        f"{unit['unit']}.records_used: the report says {unit['records_used']}, the log "
        f"{unit['records_used'] - 1}",
        f"{unit['unit']}.columns_dropped: the report says [], the log "
        f"{_released(run_dir)[unit['unit']]['columns_dropped']!r}",
        "rounds: the epsilon after each round differs between report and log",
    ]


# anything a browser would fetch; SVG's references inside the page (url(#id), href="#id") are not
_EXTERNAL = re.compile(
    r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|<script|<link|<img|<iframe|@import|url\((?!#)|src=|href=\"(?!#)",
    re.I,
)


def test_the_html_reports_fetch_nothing(run, tmp_path: Path) -> None:
    run_dir = _copy(run[0], tmp_path)
    cli = CliRunner().invoke(app, ["audit", "report", str(run_dir)])
    assert cli.exit_code == 0, cli.output
    for page in ("report.html", "audit-report.html"):
        text = (run_dir / page).read_text()
        assert "<h2>Threat model and what is out of scope</h2>" in text
        assert not _EXTERNAL.findall(text), page
    standalone = (run_dir / "audit-report.html").read_text()
    assert "The audit log verified as intact and complete" in standalone
    assert "<td>report.html</td>" in standalone  # the closed log lists report.html too


def test_the_pdf_renders_and_says_what_the_log_says(run, tmp_path: Path) -> None:
    import pypdfium2 as pdfium

    run_dir = _copy(run[0], tmp_path)
    cli = CliRunner().invoke(app, ["audit", "report", str(run_dir), "--pdf"])
    assert cli.exit_code == 0, cli.output
    first = (run_dir / "report.pdf").read_bytes()
    document = pdfium.PdfDocument(first)
    assert len(document) >= 2
    pixels = np.asarray(document[0].render(scale=1).to_pil().convert("L"))
    assert (pixels < 128).mean() > 0.01  # ink: text and table rules, not a blank page
    assert len(np.unique(pixels)) > 16
    text = "".join(document[i].get_textpage().get_text_range() for i in range(len(document)))
    assert "Compliance record of run inprocess-run" in text and "ε" in text
    for unit, logged in _released(run_dir).items():
        assert f"{logged['epsilon']:.3f}" in text and unit in text
    CliRunner().invoke(app, ["audit", "report", str(run_dir), "--pdf"])
    assert (run_dir / "report.pdf").read_bytes() == first  # reproducible


def test_audit_report_says_when_the_run_does_not_verify(run, tmp_path: Path) -> None:
    run_dir = _copy(run[0], tmp_path)
    (run_dir / "model.pt").write_bytes(b"replaced")
    cli = CliRunner().invoke(app, ["audit", "report", str(run_dir)])
    assert cli.exit_code == 1
    page = (run_dir / "audit-report.html").read_text()
    assert "model.pt: changed after the run" in page


def test_a_bu_checks_the_report_against_its_own_log(run, tmp_path: Path) -> None:
    run_dir, silos = run
    report = json.loads((run_dir / "report.json").read_text())
    unit = report["federation"]["units"][0]
    home = run_dir.parent / "homes" / unit
    args = ["--bu-config", str(silos / unit / "bu.toml"), "--home", str(home)]
    cli = CliRunner().invoke(app, ["audit", "compare", str(run_dir), *args])
    assert cli.exit_code == 0, cli.output
    assert "the report agrees with the BU's own log" in cli.output
    assert compare_with_report(home, unit, run_dir).exchanges == 4  # ranges, 2 x train, eval

    edited = _copy(run_dir, tmp_path)
    report["privacy"]["per_unit"][0]["epsilon"] = 1.0  # the report understates what it spent
    (edited / "report.json").write_text(json.dumps(report))
    comparison = compare_with_report(home, unit, edited)
    assert comparison.mismatches == [
        f"epsilon: the report says 1.0, the BU's log {_released(run_dir)[unit]['epsilon']!r}"
    ]
    cli = CliRunner().invoke(app, ["audit", "compare", str(edited), *args])
    assert cli.exit_code == 1 and "differs: epsilon" in cli.output

    report["run_id"] = "another-run"
    (edited / "report.json").write_text(json.dumps(report))
    assert (
        "records no exchange of run another-run"
        in compare_with_report(home, unit, edited).mismatches[0]
    )


def test_records_of_processing(run, tmp_path: Path) -> None:
    run_dir, _ = run
    runs = tmp_path / "runs"
    shutil.copytree(run_dir, runs / "r1")
    report = json.loads((run_dir / "report.json").read_text())
    unit = report["federation"]["units"][1]
    today = datetime.now(UTC).date().isoformat()
    out = tmp_path / "records"
    args = ["audit", "records", "--unit", unit, "--since", today, "--runs", str(runs)]
    cli = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert cli.exit_code == 0, cli.output
    stem = f"{unit}-{today}-{today}"
    records = json.loads((out / f"records-{stem}.json").read_text())
    article = records["article_30_1"]
    assert sorted(article) == [
        "a_controller", "b_purposes", "c_categories", "d_recipients",
        "e_third_country_transfers", "f_erasure_time_limits", "g_security_measures",
    ]  # fmt: skip
    logged = _released(run_dir)[unit]
    assert article["b_purposes"] == [
        {"purpose": "churn_model", "legal_basis": "consent", "runs": 1}
    ]
    assert article["c_categories"]["personal_data"] == sorted(logged["columns_used"])
    assert article["a_controller"]["joint_controllers"] == [report["federation"]["units"][0]]
    assert article["e_third_country_transfers"]["value"] is None
    [activity] = records["activities"]
    assert activity["records_used"] == logged["records_used"]
    assert activity["epsilon"] == logged["epsilon"]
    assert "customers.religion" in activity["special_categories_excluded"]
    rows = list(csv.DictReader(io.StringIO((out / f"records-{stem}.csv").read_text())))
    assert len(rows) == 1 and rows[0]["run_id"] == report["run_id"]
    assert int(rows[0]["records_used"]) == logged["records_used"]
    dpia = (out / f"dpia-{stem}.md").read_text()
    for heading in ("## Data categories", "## Purposes and legal basis", "## Recipients",
                    "## Safeguards", "## Residual risks"):  # fmt: skip
        assert heading in dpia

    # a period without the run: no activity; a tampered run is left out and named
    assert processing_records(runs, unit, date(2020, 1, 1), date(2020, 12, 31)).activities == []
    (runs / "r1" / "report.json").write_text("{}")
    cli = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert cli.exit_code == 1
    assert str(cli.exception).startswith(
        "runs left out because their audit record does not verify: r1: report.json: changed"
    )
    with pytest.raises(ConfigurationError, match="before --since"):
        processing_records(runs, unit, date(2026, 2, 1), date(2026, 1, 1))


def test_any_edit_to_any_file_of_the_run_directory_fails_verification(run, tmp_path: Path) -> None:
    """The artefacts are in the log; the log and its head are chained and signed; audit.pub
    must verify the signatures; the closed record's renderings must re-render byte for byte."""
    rendered = _copy(run[0], tmp_path)
    assert CliRunner().invoke(app, ["audit", "report", str(rendered), "--pdf"]).exit_code == 0
    result, problems = verify_run(rendered)
    assert result.ok and problems == []
    names = sorted(p.name for p in rendered.iterdir())
    assert {"audit-report.html", "report.pdf", "audit.pub", LOG_FILE + ".head"} <= set(names)
    for name in names:
        edited = tmp_path / f"edited-{name}"
        shutil.copytree(rendered, edited)
        data = bytearray((edited / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (edited / name).write_bytes(bytes(data))
        try:
            result, problems = verify_run(edited)
        except ConfigurationError as err:  # audit.pub no longer a key at all: a clear error
            assert name == "audit.pub" and "not an Ed25519 audit public key" in str(err)
        else:
            assert not result.ok or problems, name
        assert CliRunner().invoke(app, ["audit", "verify", str(edited)]).exit_code != 0, name
