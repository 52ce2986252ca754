"""The wire contract of a silofed round.

Every round is a Flower *train* message (the only kind Flower's SecAgg+ covers), whatever it asks
for: a phase tells the BU whether to train or to evaluate. The instruction travels in the message's
config, the BU's answer as parameters plus one metrics entry holding a typed report. Both sides turn
these dicts into typed objects on the first line and never pass the dicts on.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from federation.job import Job
from privacy.errors import RunFailed

_PREFIX = "silofed."


class Phase(StrEnum):
    RANGES = "ranges"  # before training: histograms of the scalar features (federation.ranges)
    TRAIN = "train"  # a model update (DP-SGD, or a clipped update for central/distributed noise)
    EVALUATE = "evaluate"  # score statistics of the held-out customers
    QUERY = "query"  # a query's integer vector
    SEGMENTS = "segments"  # one k-means iteration: per-cluster sums and counts


@dataclass(frozen=True)
class Instruction:
    """What the coordinator asks every BU to do in one exchange."""

    phase: Phase
    server_round: int
    run_id: str
    started_at: datetime
    job: Job
    seed: int | None = None  # simulation only; a deployment refuses it
    units: int = 0  # the number of BUs the coordinator plans the run with (public)

    def to_config(self) -> dict[str, int | float | str | bool]:
        return {
            _PREFIX + "phase": self.phase.value,
            _PREFIX + "round": self.server_round,
            _PREFIX + "run_id": self.run_id,
            _PREFIX + "started_at": self.started_at.isoformat(),
            _PREFIX + "job": self.job.model_dump_json(),
            _PREFIX + "seed": -1 if self.seed is None else self.seed,
            _PREFIX + "units": self.units,
        }

    @classmethod
    def from_config(cls, config: dict) -> Instruction:
        try:
            seed = int(config[_PREFIX + "seed"])
            return cls(
                phase=Phase(config[_PREFIX + "phase"]),
                server_round=int(config[_PREFIX + "round"]),
                run_id=str(config[_PREFIX + "run_id"]),
                started_at=datetime.fromisoformat(str(config[_PREFIX + "started_at"])),
                job=Job.model_validate_json(config[_PREFIX + "job"]),
                seed=None if seed < 0 else seed,
                units=int(config.get(_PREFIX + "units", 0)),
            )
        except (KeyError, ValueError, ValidationError) as err:
            raise RunFailed(
                f"the coordinator's instruction is not a silofed instruction ({err}); "
                "this client only serves silofed's ServerApp (server.app:app)"
            ) from None


class DroppedColumn(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    column: str
    reason: str


# The fields of a BU's audit summary (`UnitReport.audit_summary`) that a run's report states too
# (`privacy.per_unit[]`): the BU's own log, the coordinator's log and the report agree on each.
AUDITED_FIELDS = (
    "purpose",
    "legal_basis",
    "epsilon",
    "epsilon_total",
    "epsilon_unit_total",
    "records_used",
    "records_test",
    "excluded",
    "columns_used",
    "columns_dropped",
    "releases",
    "encrypted_at_rest",
)


class UnitReport(BaseModel):
    """What a BU tells the coordinator about a training round besides its parameters. Every field is
    either DP-accounted (epsilon) or metadata listed as disclosed in the run's report."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    unit: str
    purpose: str = ""
    legal_basis: str = Field("", description="the purpose's legal basis, as the BU declared it")
    jurisdictions: list[str] = Field(default_factory=list)
    encrypted_at_rest: bool = False
    quality: dict = Field(default_factory=dict, description="data-quality counts, never values")
    records_used: int = Field(ge=0)
    records_test: int = Field(ge=0)
    excluded: dict[str, int]
    columns_used: list[str]
    columns_dropped: list[DroppedColumn]
    epsilon: float = Field(ge=0, description="cumulative over this run's rounds so far")
    epsilon_total: float = Field(
        0.0, ge=0, description="the ledger's composed epsilon for the purpose"
    )
    epsilon_unit_total: float = Field(
        0.0, ge=0, description="the ledger's epsilon over all purposes"
    )
    budget: float | None = Field(None, description="the BU's budget for the purpose, if any")
    budget_unit: float | None = Field(None, description="the BU's budget over all purposes, if any")
    noise_multiplier: float = Field(gt=0)
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=0, description="DP-SGD steps taken in this run so far")
    releases: int = Field(
        0, ge=0, description="statistics releases (evaluation, query, k-means) in this run so far"
    )

    KEY: ClassVar[str] = _PREFIX + "unit_report"

    def audit_summary(self) -> dict:
        """What an audit log records of this report, on either side: counts, columns, epsilon,
        releases; nothing but disclosed metadata and DP figures."""
        return {
            "unit": self.unit,
            "purpose": self.purpose,
            "legal_basis": self.legal_basis,
            "jurisdictions": list(self.jurisdictions),
            "budget": self.budget,
            "budget_unit": self.budget_unit,
            "noise_multiplier": self.noise_multiplier,
            "records_used": self.records_used,
            "records_test": self.records_test,
            "excluded": dict(self.excluded),
            "columns_used": list(self.columns_used),
            "columns_dropped": [d.model_dump() for d in self.columns_dropped],
            "epsilon": self.epsilon,
            "epsilon_total": self.epsilon_total,
            "epsilon_unit_total": self.epsilon_unit_total,
            "releases": self.releases,
            "encrypted_at_rest": self.encrypted_at_rest,
        }

    def to_metrics(self) -> dict[str, str]:
        return {self.KEY: self.model_dump_json()}

    @classmethod
    def from_metrics(cls, metrics: dict) -> UnitReport:
        try:
            return cls.model_validate_json(metrics[cls.KEY])
        except (KeyError, ValidationError) as err:
            raise RunFailed(f"a BU's reply carries no valid silofed report ({err})") from None


UNIT_KEY = _PREFIX + "unit"


def unit_of(metrics: dict) -> str:
    """The BU name an evaluation reply carries."""
    if UNIT_KEY in metrics:
        return str(metrics[UNIT_KEY])
    return UnitReport.from_metrics(metrics).unit


class Refusal(BaseModel):
    """A BU's answer when it refuses the job (no consent records, budget): no parameters, a reason."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    unit: str
    reason: str

    KEY: ClassVar[str] = _PREFIX + "refusal"

    def to_metrics(self) -> dict[str, str]:
        return {self.KEY: self.model_dump_json()}


def refusal_of(metrics: dict) -> Refusal | None:
    if Refusal.KEY not in metrics:
        return None
    return Refusal.model_validate_json(metrics[Refusal.KEY])
