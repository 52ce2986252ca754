"""The coordinator's audit log of a run: `audit.jsonl` in the run directory (`privacy.audit`).

Written as the run goes, not afterwards: the job accepted (with the SHA-256 of its resolved
form), each round's end with the epsilon every BU reported, refusals and dropouts, and, when the
run directory is written, what each BU released (counts, columns, epsilon; never a customer id or
a value) and every artefact with its SHA-256, closed by a final signed checkpoint. A run killed on
the way leaves a log that verifies as intact but incomplete. The signing key is the coordinator's
(`$SILOFED_HOME/coordinator/audit.key`, or the deployment's `coordinator/audit.key`); its public
half is written beside the log (`audit.pub`) and into `report.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from privacy.atomic import write_atomic
from privacy.audit import (
    AuditLog,
    Verification,
    load_or_create_signing_key,
    load_public_key,
    public_key_text,
    read_entries,
    verify,
)
from privacy.errors import ConfigurationError
from server.compliance import ComplianceRecord, report_mismatches
from server.run import RunPlan, RunRecord

LOG_FILE = "audit.jsonl"
PUBLIC_KEY_FILE = "audit.pub"


def default_key_path() -> Path:
    home = Path(os.environ.get("SILOFED_HOME", Path.home() / ".silofed"))
    return home / "coordinator" / "audit.key"


def open_run_log(plan: RunPlan) -> AuditLog:
    key = load_or_create_signing_key(plan.audit_key or default_key_path())
    plan.out.mkdir(parents=True, exist_ok=True)
    write_atomic(plan.out / PUBLIC_KEY_FILE, public_key_text(key.public_key()) + "\n")
    log = AuditLog(plan.out / LOG_FILE, actor="coordinator", key=key)
    if plan.resume:
        return log  # the log goes on where it ends; the resumed run appends `run.resumed`
    job = plan.job
    log.append(
        "job.accepted",
        {
            "run_id": plan.run_id,
            "mode": plan.mode,
            "kind": job.kind.value,
            "task": job.task.value,
            "purpose": job.purpose,
            "rounds": job.rounds,
            "epsilon": job.epsilon,
            "delta": job.delta,
            "noise": job.noise.value,
            "secure_aggregation": job.secure_aggregation.enabled,
            "units_expected": plan.expected_units,
            "job_sha256": hashlib.sha256(job.model_dump_json().encode()).hexdigest(),
        },
    )
    return log


def log_outcome(log: AuditLog, record: RunRecord) -> None:
    """What each BU released over the run, who refused and who dropped out."""
    for unit in record.units:
        log.append("unit.released", record.unit_reports[unit].audit_summary())
    for unit, reason in sorted(record.refused.items()):
        log.append("unit.refused", {"unit": unit, "reason": reason})
    for dropout in record.dropouts:
        log.append("unit.dropped", dict(dropout))
    if record.error is not None:
        log.append("run.failed", {"error": record.error})


def log_artefacts(log: AuditLog, out: Path, names: list[str]) -> None:
    for name in names:
        data = (out / name).read_bytes()
        log.append(
            "artefact.written",
            {"name": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)},
        )


def logged_record(log: AuditLog) -> ComplianceRecord:
    """The compliance record of the log as written so far (read back and verified first)."""
    return ComplianceRecord.of_log(log.path, verify(log.path, log.key.public_key()))


def run_public_key(run_dir: Path, public_key: str | None = None) -> str:
    """`public_key` if given, else the run's own `audit.pub`."""
    if public_key is not None:
        return public_key
    key_file = run_dir / PUBLIC_KEY_FILE
    if not key_file.exists():
        raise ConfigurationError(
            f"{run_dir}: no {PUBLIC_KEY_FILE}; pass the coordinator's audit key with --public-key"
        )
    return key_file.read_text(encoding="utf-8").strip()


def verify_run(
    run_dir: Path, public_key: str | None = None, *, renderings: bool = True
) -> tuple[Verification, list[str]]:
    """Verify a run directory's audit log against `public_key` (default: the run's `audit.pub`,
    which proves integrity only as far as that file is trusted), every artefact the log lists
    against its SHA-256, and `report.json` against the log. Returns the log's verification and
    the problems found with the artefacts and the report."""
    log_file = run_dir / LOG_FILE
    if not log_file.exists():
        raise ConfigurationError(
            f"{run_dir}: no {LOG_FILE}; give a run directory written by silofed"
        )
    result = verify(log_file, load_public_key(run_public_key(run_dir, public_key)))
    problems = []
    entries = read_entries(log_file, result.entries)
    for entry in entries:
        if entry["event"] != "artefact.written":
            continue
        name, expected = entry["data"]["name"], entry["data"]["sha256"]
        path = run_dir / name
        if not path.exists():
            problems.append(f"{name}: listed in the log (sequence {entry['seq']}) but missing")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != expected:
            problems.append(
                f"{name}: changed after the run (its SHA-256 is not the one logged at "
                f"sequence {entry['seq']})"
            )
    report_file = run_dir / "report.json"
    if report_file.exists() and any(e["event"] == "job.accepted" for e in entries):
        try:
            report = json.loads(report_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            problems.append(f"report.json: not JSON ({err})")
        else:
            record = ComplianceRecord.from_entries(entries, result)
            problems += [
                f"report.json disagrees with the log: {p}"
                for p in report_mismatches(report, record)
            ]
    if renderings and result.ok and not problems:
        problems += _renderings(run_dir, ComplianceRecord.from_entries(entries, result))
    return result, problems


RENDERINGS = ("audit-report.html", "report.pdf")  # written by `silofed audit report`


def render_record(record: ComplianceRecord, name: str) -> bytes:
    from server.html import render_compliance_page
    from server.pdf import pdf_bytes

    if name == "report.pdf":
        return pdf_bytes(record)
    return render_compliance_page(record).encode("utf-8")


def _renderings(run_dir: Path, record: ComplianceRecord) -> list[str]:
    """The closed record's renderings are not in the log (they come after it), but they are
    reproducible: each one present must be what the verified log renders to, byte for byte."""
    return [
        f"{name}: not what the verified audit log renders to (edited after it was rendered, or "
        "rendered by another silofed version); render it again with `silofed audit report`"
        for name in RENDERINGS
        if (run_dir / name).exists()
        and (run_dir / name).read_bytes() != render_record(record, name)
    ]
