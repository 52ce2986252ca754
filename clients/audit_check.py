"""A BU checks a coordinator's report against its own audit log (`silofed audit compare`).

The coordinator's report says what each BU released; the BU's own log, written by the BU's node
and signed with the BU's key, says what it released. They must agree on every field of
`federation.wire.AUDITED_FIELDS` (purpose and legal basis, customers used and held out,
exclusions by reason, columns used and dropped, releases, encryption at rest, epsilon for the run,
the purpose and the BU) and on the epsilon after every round. Any difference is a finding: a
report that credits a BU with less epsilon than it spent, or with data it never released, is
caught by the BU itself, without trusting the coordinator.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federation.wire import AUDITED_FIELDS
from privacy.audit import Verification, read_entries, verify_home
from privacy.errors import ConfigurationError


@dataclass(frozen=True)
class Comparison:
    unit: str
    run_id: str
    own_log: Verification
    exchanges: int  # the BU's logged exchanges of the run
    mismatches: list[str]

    @property
    def agrees(self) -> bool:
        return self.own_log.status != "tampered" and self.exchanges > 0 and not self.mismatches


def compare_with_report(home: Path, unit: str, run_dir: Path) -> Comparison:
    """Compare the report in `run_dir` with what the BU's log in `home` records for that run."""
    report_file = Path(run_dir) / "report.json"
    try:
        report = json.loads(report_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigurationError(
            f"{report_file}: no report; give the run directory the coordinator published"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigurationError(f"{report_file}: not a JSON report ({err})") from None
    run_id = str(report.get("run_id", ""))
    own = verify_home(home)
    entries = read_entries(Path(home) / "audit.jsonl", own.entries)
    ours = [
        (e["event"], e["data"])
        for e in entries
        if e["event"] in ("exchange.answered", "job.refused") and e["data"].get("run_id") == run_id
    ]
    mismatches = [] if own.status != "tampered" else [f"the BU's own log is {own.message}"]
    if not ours:
        mismatches.append(
            f"the BU's log records no exchange of run {run_id}: the report names a run this BU "
            "did not take part in (or its home is not the one the node used)"
        )
        return Comparison(unit, run_id, own, 0, mismatches)
    stated = _stated(report, unit)
    refused = [data for event, data in ours if event == "job.refused"]
    if refused:
        if stated is None or not stated.get("refused"):
            mismatches.append(
                f"the BU refused the job ({refused[-1]['reason']}); the report does not say so"
            )
        return Comparison(unit, run_id, own, len(ours), mismatches)
    released = [data for event, data in ours if "records_used" in data]
    if stated is None:
        mismatches.append("the BU released results in this run; the report does not list it")
        return Comparison(unit, run_id, own, len(ours), mismatches)
    last = released[-1]
    for key in AUDITED_FIELDS:
        if not _same(stated.get(key), last.get(key)):
            mismatches.append(
                f"{key}: the report says {stated.get(key)!r}, the BU's log {last.get(key)!r}"
            )
    # epsilon after each round: the BU's last exchange of the round against the report's rounds
    after_round: dict[int, float] = {}
    for data in released:
        after_round[int(data["round"])] = float(data["epsilon"])
    for summary in report.get("rounds", []):
        reported = summary.get("epsilon", {}).get(unit)
        logged = after_round.get(int(summary["round"]))
        if reported is not None and not _same(reported, logged):
            mismatches.append(
                f"epsilon after round {summary['round']}: the report says {reported!r}, the "
                f"BU's log {logged!r}"
            )
    return Comparison(unit, run_id, own, len(ours), mismatches)


def _stated(report: dict[str, Any], unit: str) -> dict[str, Any] | None:
    for entry in report.get("privacy", {}).get("per_unit", []):
        if entry.get("unit") == unit:
            return entry
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return (
            isinstance(a, int | float)
            and isinstance(b, int | float)
            and math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
        )
    return a == b
