"""One run as the coordinator sees it: the resolved plan, and what it records round by round.

The recorder holds only what BUs released: DP parameters, per-unit reports (DP epsilon plus metadata
listed as disclosed), and the summed evaluation statistics. The report is rendered from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

from federation.job import Job
from federation.wire import UnitReport


@dataclass(frozen=True)
class RoundSummary:
    server_round: int
    metrics: dict[str, float]  # global evaluation of the model after this round
    epsilon: dict[str, float]  # per unit, cumulative over the run so far


RoundCallback = Callable[[RoundSummary], None]


@dataclass(frozen=True)
class RunPlan:
    run_id: str
    job: Job  # resolved: features filled in
    expected_units: int
    mode: Literal["simulation", "deployment"]
    out: Path  # the directory the ServerApp writes the run's artefacts into
    started_at: datetime
    seed: int | None = None
    auc_ceiling: float | None = None
    on_round: RoundCallback | None = None


@dataclass
class RunRecord:
    plan: RunPlan
    rounds: list[RoundSummary] = field(default_factory=list)
    unit_reports: dict[str, UnitReport] = field(default_factory=dict)  # latest per unit
    refused: dict[str, str] = field(default_factory=dict)  # unit -> reason
    dropouts: list[dict] = field(default_factory=list)  # round, phase, reason
    _pending_epsilon: dict[str, float] = field(default_factory=dict)

    def record_training(self, reports: list[UnitReport]) -> None:
        for report in reports:
            self.unit_reports[report.unit] = report
        self._pending_epsilon = {r.unit: r.epsilon for r in reports}

    def record_evaluation(self, server_round: int, metrics: dict[str, float]) -> RoundSummary:
        summary = RoundSummary(server_round, metrics, dict(sorted(self._pending_epsilon.items())))
        self.rounds.append(summary)
        if self.plan.on_round is not None:
            self.plan.on_round(summary)
        return summary

    @property
    def rounds_completed(self) -> int:
        return len(self.rounds)

    @property
    def units(self) -> list[str]:
        return sorted(self.unit_reports)
