"""Records of processing (GDPR Art. 30) and a DPIA input pack, per BU over a period.

`silofed audit records --unit NAME --since DATE` reads the run directories under `--runs`,
verifies each run's audit log and takes every fact from the verified log (never from the report):
each run in which the BU released results is one processing activity, with every field of
Art. 30(1)(a)-(g) that silofed knows. What silofed cannot know (the controller's contact details,
the data protection officer, transfers to third countries outside silofed, retention periods of
the BU's own systems) is written as `null` with a note saying who fills it in, never guessed.

The export is JSON (the full record), CSV (one row per activity) and a Markdown DPIA input pack
(data categories, purposes, recipients, safeguards with their figures, residual risks).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from privacy.atomic import write_atomic
from privacy.errors import ConfigurationError
from privacy.minimisation import DropReason
from server.audit_trail import LOG_FILE, verify_run
from server.compliance import NOISE_WORDS, OUT_OF_SCOPE, ComplianceRecord

FILLED_IN_BY_CONTROLLER = "not recorded by silofed; the controller fills this in"


@dataclass(frozen=True)
class Activity:
    """One run in which the BU released results: a processing activity."""

    run_id: str
    started: str
    mode: str
    kind: str
    task: str
    purpose: str
    legal_basis: str
    jurisdictions: list[str]
    records_used: int
    records_held_out: int
    excluded: dict[str, int]
    columns_used: list[str]
    special_categories_excluded: list[str]
    other_units: list[str]
    epsilon: float
    delta: float
    epsilon_purpose_total: float
    noise: str
    secure_aggregation: bool
    encrypted_at_rest: bool
    audit_status: str

    @classmethod
    def of(cls, record: ComplianceRecord, unit: dict[str, Any]) -> Activity:
        job = record.job
        return cls(
            run_id=record.run_id,
            started=record.opened,
            mode=job["mode"],
            kind=job["kind"],
            task=job["task"],
            purpose=unit["purpose"],
            legal_basis=unit.get("legal_basis") or "not stated",
            jurisdictions=list(unit.get("jurisdictions") or []),
            records_used=unit["records_used"],
            records_held_out=unit["records_test"],
            excluded=dict(unit["excluded"]),
            columns_used=list(unit["columns_used"]),
            special_categories_excluded=[
                d["column"]
                for d in unit["columns_dropped"]
                if d["reason"] == DropReason.SPECIAL_CATEGORY
            ],
            other_units=[u["unit"] for u in record.units if u["unit"] != unit["unit"]],
            epsilon=unit["epsilon"],
            delta=job["delta"],
            epsilon_purpose_total=unit["epsilon_total"],
            noise=job["noise"],
            secure_aggregation=job["secure_aggregation"],
            encrypted_at_rest=unit["encrypted_at_rest"],
            audit_status=record.status,
        )

    def controllers(self, unit: str) -> str:
        joint = f" (joint with {', '.join(self.other_units)})" if self.other_units else ""
        return unit + joint

    def recipients(self) -> list[str]:
        coordinator = (
            "the coordinator: only the securely aggregated sum of the BUs' replies"
            if self.secure_aggregation
            else "the coordinator: the BU's differentially private model updates and statistics"
        )
        return [
            coordinator,
            "the other business units of the run"
            + (f" ({', '.join(self.other_units)})" if self.other_units else "")
            + ": the differentially private results",
            "the analysts who read the run's results: differentially private outputs and the "
            "metadata listed as disclosed in the report",
        ]

    def measures(self) -> list[str]:
        measures = [
            f"differential privacy: (ε = {self.epsilon:.3f}, δ = {self.delta:g}) per customer for "
            f"this run; noise placement '{self.noise}' ({NOISE_WORDS.get(self.noise, self.noise)})",
            f"privacy budget accounting: ε = {self.epsilon_purpose_total:.3f} spent for the "
            f"purpose '{self.purpose}' so far",
            "consent filter before any computation (no consent, revoked, erased and minors without "
            "a guardian's consent excluded)",
            "data minimisation: only the columns the purpose allows; special categories never used",
            "pseudonymisation of identifiers with a key the BU keeps",
            "secure aggregation (SecAgg+)" if self.secure_aggregation else "no secure aggregation",
            "silo encrypted at rest (AES-GCM)"
            if self.encrypted_at_rest
            else "silo not encrypted at rest by silofed",
            "TLS and node authentication on every link"
            if self.mode == "deployment"
            else "simulation on one machine: no network",
            f"hash-chained, signed audit log ({self.audit_status})",
        ]
        return measures


@dataclass(frozen=True)
class ProcessingRecords:
    unit: str
    since: date
    until: date
    activities: list[Activity]
    unverified: list[dict[str, str]] = field(default_factory=list)  # run, status

    def to_json(self) -> dict[str, Any]:
        purposes: dict[tuple[str, str], int] = {}
        for a in self.activities:
            purposes[(a.purpose, a.legal_basis)] = purposes.get((a.purpose, a.legal_basis), 0) + 1
        columns = sorted({c for a in self.activities for c in a.columns_used})
        special = sorted({c for a in self.activities for c in a.special_categories_excluded})
        recipients = sorted({r for a in self.activities for r in a.recipients()})
        measures = sorted({m.split(":")[0] for a in self.activities for m in a.measures()})
        return {
            "unit": self.unit,
            "period": {"since": self.since.isoformat(), "until": self.until.isoformat()},
            "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "source": "the runs' verified audit logs",
            "article_30_1": {
                "a_controller": {
                    "business_unit": self.unit,
                    "name_and_contact": None,
                    "joint_controllers": sorted(
                        {u for a in self.activities for u in a.other_units}
                    ),
                    "representative": None,
                    "data_protection_officer": None,
                    "note": FILLED_IN_BY_CONTROLLER
                    + " (name and contact details of the controller, representative and DPO); "
                    "the joint controllers are the BUs that took part in the same runs",
                },
                "b_purposes": [
                    {"purpose": p, "legal_basis": basis, "runs": n}
                    for (p, basis), n in sorted(purposes.items())
                ],
                "c_categories": {
                    "data_subjects": [
                        f"customers of {self.unit} with consent for the purpose (minors only "
                        "with a guardian's consent)"
                    ],
                    "personal_data": columns,
                    "special_categories": "none processed; excluded whatever the purpose: "
                    + (", ".join(special) if special else "none declared"),
                },
                "d_recipients": recipients,
                "e_third_country_transfers": {
                    "value": None,
                    "note": FILLED_IN_BY_CONTROLLER
                    + "; silofed moves no customer data: only differentially private results "
                    "leave the BU, to the coordinator's location",
                },
                "f_erasure_time_limits": {
                    "value": None,
                    "note": FILLED_IN_BY_CONTROLLER
                    + "; the customer data stays in the BU's silo under the BU's retention; "
                    "`silofed erase` removes a customer and logs the erasure",
                },
                "g_security_measures": measures,
            },
            "activities": [
                {**a.__dict__, "recipients": a.recipients(), "security_measures": a.measures()}
                for a in self.activities
            ],
            "runs_not_verified": self.unverified,
        }

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for a in self.activities:
            writer.writerow(
                [
                    a.run_id,
                    a.started,
                    a.mode,
                    a.controllers(self.unit),
                    a.purpose,
                    a.legal_basis,
                    "; ".join(a.jurisdictions),
                    f"customers of {self.unit}",
                    a.records_used,
                    a.records_held_out,
                    "; ".join(f"{k}: {n}" for k, n in a.excluded.items()),
                    "; ".join(a.columns_used),
                    "; ".join(a.special_categories_excluded),
                    "; ".join(a.recipients()),
                    FILLED_IN_BY_CONTROLLER,
                    FILLED_IN_BY_CONTROLLER,
                    "; ".join(a.measures()),
                    f"{a.epsilon:.6g}",
                    f"{a.delta:g}",
                    a.audit_status,
                ]
            )
        return buffer.getvalue()

    def to_dpia(self) -> str:
        data = self.to_json()
        art = data["article_30_1"]
        lines = [
            f"# DPIA input pack: {self.unit}",
            "",
            f"Period {self.since} to {self.until}; {len(self.activities)} processing "
            "activit(y/ies) (runs) in which the BU released results. Every figure below is taken "
            "from the runs' verified audit logs. This pack is input to a data protection impact "
            "assessment (GDPR Art. 35); the assessment itself is the controller's.",
            "",
            "## Processing",
            "",
            "| run | started | mode | job | purpose | legal basis | ε | δ |",
            "|---|---|---|---|---|---|---|---|",
            *(
                f"| {a.run_id} | {a.started} | {a.mode} | {a.kind} ({a.task}) | {a.purpose} | "
                f"{a.legal_basis} | {a.epsilon:.3f} | {a.delta:g} |"
                for a in self.activities
            ),
            "",
            "## Purposes and legal basis",
            "",
            *(
                f"- {p['purpose']}: {p['legal_basis']} ({p['runs']} run(s))"
                for p in art["b_purposes"]
            ),
            "",
            "## Data categories",
            "",
            "Data subjects: " + "; ".join(art["c_categories"]["data_subjects"]) + ".",
            "",
            "Personal data used (table.column):",
            "",
            *(f"- {c}" for c in art["c_categories"]["personal_data"]),
            "",
            f"Special categories: {art['c_categories']['special_categories']}.",
            "",
            "Customers per run:",
            "",
            "| run | used | held out | excluded by reason |",
            "|---|---|---|---|",
            *(
                f"| {a.run_id} | {a.records_used} | {a.records_held_out} | "
                + ", ".join(f"{k} {n}" for k, n in a.excluded.items())
                + " |"
                for a in self.activities
            ),
            "",
            "## Recipients",
            "",
            *(f"- {r}" for r in art["d_recipients"]),
            "",
            "## Safeguards",
            "",
            *(f"- {m}" for m in sorted({m for a in self.activities for m in a.measures()})),
            "",
            "## Residual risks",
            "",
            *(f"- Out of scope of the guarantees: {item}." for item in OUT_OF_SCOPE),
            "- Disclosed without differential privacy: the number of customers each BU used and "
            "held out, the exclusions by reason, data-quality counts and the column names used "
            "and dropped (each run's report lists them).",
            f"- The largest ε spent in one run in the period: "
            f"{max((a.epsilon for a in self.activities), default=0.0):.3f}; the largest ε "
            f"spent for one purpose so far: "
            f"{max((a.epsilon_purpose_total for a in self.activities), default=0.0):.3f}.",
            *(
                [
                    "- Runs whose audit log did not verify and are left out of this pack: "
                    + ", ".join(f"{u['run']} ({u['status']})" for u in self.unverified)
                    + "."
                ]
                if self.unverified
                else []
            ),
            "",
            "## To be completed by the controller",
            "",
            "- name and contact details of the controller, its representative and the DPO (Art. 30(1)(a))",
            "- transfers to third countries and their safeguards (Art. 30(1)(e))",
            "- time limits for erasure of the silo's data (Art. 30(1)(f))",
            "- the assessment of necessity, proportionality and the risks to the data subjects (Art. 35(7))",
            "",
        ]
        return "\n".join(lines)


CSV_COLUMNS = [
    "run_id",
    "started",
    "mode",
    "controller",
    "purpose",
    "legal_basis",
    "jurisdictions",
    "data_subjects",
    "records_used",
    "records_held_out",
    "excluded",
    "personal_data_categories",
    "special_categories_excluded",
    "recipients",
    "third_country_transfers",
    "erasure_time_limits",
    "security_measures",
    "epsilon",
    "delta",
    "audit_status",
]


def processing_records(
    runs: Path,
    unit: str,
    since: date,
    until: date | None = None,
    *,
    public_key: str | None = None,
) -> ProcessingRecords:
    """The BU's processing activities in the run directories under `runs`, started between
    `since` and `until` (inclusive, UTC dates; `until` defaults to today)."""
    until = until or datetime.now(UTC).date()
    if until < since:
        raise ConfigurationError(f"--until {until} is before --since {since}; swap them")
    if not Path(runs).is_dir():
        raise ConfigurationError(
            f"{runs}: no such directory; give the coordinator's runs directory with --runs"
        )
    activities, unverified = [], []
    for log_file in sorted(Path(runs).glob(f"*/{LOG_FILE}")):
        run_dir = log_file.parent
        result, problems = verify_run(run_dir, public_key)
        if result.status == "tampered" or problems:
            reasons = [result.message] * (result.status == "tampered") + problems
            unverified.append({"run": run_dir.name, "status": "; ".join(reasons)})
            continue
        record = ComplianceRecord.of_log(log_file, result)
        started = datetime.fromisoformat(record.opened).astimezone(UTC).date()
        if not since <= started <= until:
            continue
        for released in record.units:
            if released["unit"] == unit:
                activities.append(Activity.of(record, released))
    activities.sort(key=lambda a: (a.started, a.run_id))
    return ProcessingRecords(unit, since, until, activities, unverified)


def write_records(records: ProcessingRecords, out: Path) -> list[Path]:
    """Write the JSON, CSV and DPIA files into `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{records.unit}-{records.since}-{records.until}"
    paths = [
        out / f"records-{stem}.json",
        out / f"records-{stem}.csv",
        out / f"dpia-{stem}.md",
    ]
    write_atomic(paths[0], json.dumps(records.to_json(), indent=2, ensure_ascii=False) + "\n")
    write_atomic(paths[1], records.to_csv())
    write_atomic(paths[2], records.to_dpia())
    return paths
