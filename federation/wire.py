"""The wire contract of a silofed round.

Every round is a Flower *train* message (the only kind Flower's SecAgg+ covers), whatever it asks
for: a phase tells the BU whether to train or to evaluate. The instruction travels in the message's
config, the BU's answer as parameters plus one metrics entry holding a typed report. Both sides turn
these dicts into typed objects on the first line and never pass the dicts on.

Whatever arrives is the other side's: every field is refused unread when it is larger than its
limit (`MAX_JOB_BYTES`, `MAX_REPORT_BYTES`, `MAX_NAME_BYTES`), so the work a message causes is
bounded whatever its size, and every way it can fail to parse (missing, wrong type, not JSON,
nested deeper than pydantic's JSON parser allows, invalid) is a `RunFailed` naming the field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from federation.job import Job
from federation.queries import validation_problems
from privacy.errors import RunFailed

_PREFIX = "silofed."

MAX_JOB_BYTES = 4_000_000
"""The most a job may weigh as JSON in an instruction. Resolved jobs for eight synthetic BUs weigh
1 to 10 kB (the largest: an `rfm_quantiles` query at 1,000 bins per histogram; a 120 x 120 cohort
retention matrix weighs 5 kB); a job file is at most `MAX_TOML_BYTES` (1 MB), and resolving it adds
only the BUs' declared domains and bounds. Four times a job file's limit leaves room for any real
job while bounding what one message makes a BU parse."""

MAX_REPORT_BYTES = 4_000_000
"""The most a BU's report or refusal may weigh as JSON in a reply. A synthetic BU's report weighs
3 kB for its 15 declared columns, about 200 bytes a column (its name, its quality counts): 4 MB
holds a BU declaring some 20,000 columns, beyond any real silo."""

MAX_NAME_BYTES = 1_000
"""The most a name or a time in a message may weigh: a phase, a run id, an ISO timestamp or a BU's
name takes tens of bytes. (Numbers travel as integers, bounded by their protobuf type.)"""

# What parsing a malformed value raises: a wrong type or value (pydantic's ValidationError, with
# JSON nested too deeply among its causes, is a ValueError), and whatever a validator raises on a
# value it did not expect (a before-validator reading an attribute of what is not a table).
_MALFORMED = (ValueError, TypeError, AttributeError)

_T = TypeVar("_T")


def _size_checked(value: _T, *, field: str, limit: int, what: str) -> _T:
    """`value` itself, refused unread when it is text or bytes of more than `limit` bytes."""
    if isinstance(value, str):
        # A character takes at least one byte of UTF-8: the length alone refuses a huge string
        # without encoding it, and only a short one is encoded to be measured exactly.
        size = len(value) if len(value) > limit else len(value.encode("utf-8", "surrogatepass"))
    elif isinstance(value, bytes | bytearray):
        size = len(value)
    else:
        return value  # not text: its parser refuses the type
    if size > limit:
        raise RunFailed(
            f"{what} ({field}: more than {limit:,} bytes, at least {size:,}; refused unread)"
        )
    return value


def _parsed(
    message: Mapping,
    field: str,
    parse: Callable[[object], _T],
    *,
    limit: int,
    what: str,
    default: object = None,
) -> _T:
    """`parse` of `message[field]` (or of `default` when given and the field is absent), after the
    size check; a missing or malformed value is a RunFailed starting with `what` and naming the
    field."""
    if field not in message and default is None:
        raise RunFailed(f"{what} ({field} is missing)")
    value = _size_checked(message.get(field, default), field=field, limit=limit, what=what)
    try:
        return parse(value)
    except _MALFORMED as err:
        problem = validation_problems(err) if isinstance(err, ValidationError) else str(err)
        raise RunFailed(f"{what} ({field}: {problem})") from None


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{type(value).__name__}, not text")
    return value


def _integer(value: object) -> int:
    """An integer field; int() would also read "12" or 1.5 or True as one."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{type(value).__name__}, not an integer")
    return value


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
        what = "the coordinator's instruction is not a silofed instruction"

        def field(name: str, parse: Callable[[object], _T], **kw) -> _T:
            return _parsed(config, _PREFIX + name, parse, limit=MAX_NAME_BYTES, what=what, **kw)

        try:
            seed = field("seed", _integer)
            return cls(
                phase=field("phase", lambda v: Phase(_text(v))),
                server_round=field("round", _integer),
                run_id=field("run_id", _text),
                started_at=field("started_at", lambda v: datetime.fromisoformat(_text(v))),
                job=_parsed(
                    config,
                    _PREFIX + "job",
                    Job.model_validate_json,
                    limit=MAX_JOB_BYTES,
                    what=what,
                ),
                seed=None if seed < 0 else seed,
                units=field("units", _integer, default=0),
            )
        except RunFailed as err:
            raise RunFailed(
                f"{err}; this client only serves silofed's ServerApp (server.app:app)"
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
        return _parsed(
            metrics,
            cls.KEY,
            cls.model_validate_json,
            limit=MAX_REPORT_BYTES,
            what="a BU's reply carries no valid silofed report",
        )


UNIT_KEY = _PREFIX + "unit"
EXCHANGE_KEY = _PREFIX + "exchange"  # every reply names the exchange it answers


def exchange_tag(run_id: str, server_round: int, phase: Phase) -> str:
    """What a reply carries under `EXCHANGE_KEY`: the run, round and phase it answers, so that a
    late reply to an earlier exchange, or one from another run, is told apart."""
    return f"{run_id}/{server_round}/{phase}"


def unit_of(metrics: dict) -> str:
    """The BU name an evaluation reply carries."""
    if UNIT_KEY in metrics:
        return _parsed(
            metrics, UNIT_KEY, _text, limit=MAX_NAME_BYTES, what="a BU's reply names no valid BU"
        )
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
    return _parsed(
        metrics,
        Refusal.KEY,
        Refusal.model_validate_json,
        limit=MAX_REPORT_BYTES,
        what="a BU's refusal is not a silofed refusal",
    )
