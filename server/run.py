"""One run as the coordinator sees it: the resolved plan, and what it records round by round.

The recorder holds only what BUs released: DP parameters, per-unit reports (DP epsilon plus metadata
listed as disclosed), and the summed evaluation statistics. The report is rendered from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Literal

from federation.features import FeatureSpec
from federation.job import Job
from federation.wire import UnitReport
from privacy.audit import AuditLog


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
    privacy_unit: Literal["customer", "record"] = "customer"  # record: one row per customer assumed
    display_names: dict[str, str] = field(
        default_factory=dict
    )  # unit -> original name (data split)
    on_round: RoundCallback | None = None
    enrolled: tuple[str, ...] = ()  # the BUs expected to answer, by name (deployment)
    connect_timeout: float | None = None  # seconds for every BU node to be connected
    round_timeout: float | None = None  # seconds for one exchange's replies
    node_units: dict[int, str] = field(default_factory=dict)  # Flower node id -> BU (deployment)
    max_customers: dict[str, int] = field(default_factory=dict)  # BU -> declared size bound
    checkpoints: bool = True  # write the coordinator's checkpoint after each round (out)
    resume: bool = False  # go on from the checkpoint in `out` (same run id and start time)
    audit_key: Path | None = None  # the coordinator's audit signing key (None: SILOFED_HOME's)


@dataclass
class RunRecord:
    plan: RunPlan
    rounds: list[RoundSummary] = field(default_factory=list)
    unit_reports: dict[str, UnitReport] = field(default_factory=dict)  # latest per unit
    refused: dict[str, str] = field(default_factory=dict)  # unit -> reason
    dropouts: list[dict] = field(default_factory=list)  # round, phase, unit, node, reason
    rejected: list[dict] = field(default_factory=list)  # unit, round, phase, reason: not combined
    error: str | None = None  # why the run failed, when it did
    audit: AuditLog | None = None  # the run's audit log, written as the run goes
    evaluation: dict | None = None  # the DP evaluation: metrics, curves, intervals
    results: dict | None = None  # a query's answers or the segments (results.json)
    _pending_epsilon: dict[str, float] = field(default_factory=dict)
    _pending_metrics: dict[str, float] = field(default_factory=dict)

    def record_training(self, reports: list[UnitReport]) -> None:
        for report in reports:
            self.unit_reports[report.unit] = report
        self._pending_epsilon.update({r.unit: r.epsilon for r in reports})  # cumulative per BU

    def record_spent(self, report: UnitReport) -> None:
        """A BU's report on a release the coordinator rejected: what it spent still counts."""
        self.unit_reports[report.unit] = report
        self._pending_epsilon[report.unit] = report.epsilon

    def record_ranges(
        self, reports: list[UnitReport], windows: dict[str, tuple[float, float]]
    ) -> None:
        """The ranges exchange: the feature windows read off the BUs' noisy histograms become
        part of the job (every later exchange, and the saved model, applies them)."""
        self.record_training(reports)
        job = self.plan.job
        features = FeatureSpec.model_validate({**job.feature_spec.model_dump(), "ranges": windows})
        self.plan = replace(self.plan, job=job.model_copy(update={"features": features}))
        if self.audit is not None:
            self.audit.append(
                "ranges.released",
                {"windows": {name: list(w) for name, w in sorted(windows.items())}},
            )

    def record_release(self, reports: list[UnitReport]) -> None:
        """A query or k-means release: the BUs' reports are the run's figures."""
        self.record_training(reports)

    def record_evaluation_release(self, reports: list[UnitReport], evaluation: dict) -> None:
        """The DP evaluation: epsilon figures from the release, DP-SGD figures from training."""
        for report in reports:
            trained = self.unit_reports.get(report.unit)
            if trained is None:
                self.unit_reports[report.unit] = report
                continue
            self.unit_reports[report.unit] = trained.model_copy(
                update={
                    "epsilon": report.epsilon,
                    "epsilon_total": report.epsilon_total,
                    "epsilon_unit_total": report.epsilon_unit_total,
                    "records_test": report.records_test,
                    "releases": report.releases,  # the BU's count over the run
                }
            )
            self._pending_epsilon[report.unit] = report.epsilon
        self.evaluation = evaluation
        self.record_metrics(
            {k: float(v) for k, v in evaluation.items() if isinstance(v, int | float)}
        )

    def record_metrics(self, metrics: dict[str, float]) -> None:
        self._pending_metrics.update(metrics)

    def finish_round(self, server_round: int) -> RoundSummary:
        summary = RoundSummary(
            server_round, dict(self._pending_metrics), dict(sorted(self._pending_epsilon.items()))
        )
        self._pending_metrics = {}
        self.rounds.append(summary)
        if self.audit is not None:
            self.audit.append(
                "round.finished",
                {"round": server_round, "epsilon": summary.epsilon, "metrics": summary.metrics},
            )
        if self.plan.on_round is not None:
            self.plan.on_round(summary)
        return summary

    def record_evaluation(self, server_round: int, metrics: dict[str, float]) -> RoundSummary:
        """An exact evaluation that ends round `server_round`."""
        self.record_metrics(metrics)
        return self.finish_round(server_round)

    @property
    def rounds_completed(self) -> int:
        return len(self.rounds)

    @property
    def units(self) -> list[str]:
        return sorted(self.unit_reports)
