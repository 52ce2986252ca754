"""Job specifications: what the analyst asks the federation to do.

A `Job` is validated once, at the edge (command line, job file, Flower run config), and travels to
every BU inside each round's instruction. It never carries a seed: seeds exist only in simulation
(`simulations.runner.SimulationSettings`) and are refused elsewhere.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from federation.evaluation import DP_SCORE_BINS
from federation.features import FeatureSpec
from federation.queries import QuerySpec
from federation.segments import SegmentsSpec
from privacy.errors import ConfigurationError
from privacy.tomlfile import read_toml


class NoisePlacement(StrEnum):
    """Where the noise is added (DESIGN.md, Guarantees 3)."""

    LOCAL = "local"  # DP-SGD inside each BU: holds against the coordinator without any trust
    CENTRAL = "central"  # BUs clip their updates, send under SecAgg+; the coordinator adds noise
    DISTRIBUTED = "distributed"  # each BU adds a share of integer noise; only the sum is noised


class JobKind(StrEnum):
    MODEL = "model"  # train a task's model (and evaluate it)
    QUERY = "query"  # answer an analytics query with error bars
    SEGMENTS = "segments"  # federated k-means segmentation


class Task(StrEnum):
    CHURN = "churn"  # binary: will the customer leave?
    RESPONSE = "response"  # binary: will the customer answer a campaign?
    LTV = "ltv"  # regression: the customer's spend in a coming period


DEFAULT_PURPOSE = {
    Task.CHURN: "churn_model",
    Task.RESPONSE: "response_model",
    Task.LTV: "ltv_model",
}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Training(_Frozen):
    """Local DP-SGD inside each BU. Defaults chosen on validation customers of three real data
    sets (`bench/tuning.py`, docs/training.md)."""

    expected_batch_size: int = Field(256, ge=8, description="Poisson sampling: expected batch size")
    local_epochs: int = Field(3, ge=1, le=100)
    learning_rate: float = Field(2.0, gt=0)
    momentum: float = Field(0.5, ge=0, lt=1)
    clip_norm: float = Field(1.0, gt=0, description="per-customer gradient clipping norm")
    ranges_share: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="feature ranges from DP histograms before training (federation.ranges): "
        "their release costs this share of the RDP of one Gaussian release at the job's epsilon; "
        "0 keeps the declared bounds",
    )


class Evaluation(_Frozen):
    """Held-out test customers are chosen by a keyed hash of the customer id, never by the data.

    `dp` (the default): after the last round each BU releases score histograms of its held-out
    customers with discrete Gaussian noise, spending `epsilon` (the job's epsilon by default). The
    held-out customers never train, so the evaluation and the training compose in parallel: each
    customer's loss is that of one of them, and both may spend the job's epsilon. `exact`: exact
    histograms after every round, not DP; for development on synthetic data, and listed as
    disclosed in the report."""

    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    holdout_key: str = Field("silofed-holdout-v1", min_length=8)
    mode: Literal["dp", "exact"] = "dp"
    epsilon: float | None = Field(
        None, gt=0, description="what the DP evaluation spends (default: the job's epsilon)"
    )
    bins: int = Field(DP_SCORE_BINS, ge=3, le=1000, description="public score bins (dp)")


class SecureAggregation(_Frozen):
    """Flower's SecAgg+ (Bell et al. 2020): the coordinator sees only the sum of the BUs' replies.

    Every range is public and fixed before any data is read: model parameters must lie in
    [-clipping_range, clipping_range] (a BU whose model leaves it refuses to send rather than be
    clipped), and are quantised on a grid of `quantization_range` steps. FedAvg weights are uniform
    under SecAgg+ (no BU's size enters the sum)."""

    enabled: bool = False
    clipping_range: float = Field(32.0, gt=0)
    quantization_range: int = Field(2**22, ge=2**8, le=2**24)
    timeout: float = Field(300.0, gt=0, description="seconds each SecAgg+ stage waits for replies")
    colluding: int = Field(
        0, ge=0, description="distributed noise: BUs assumed to collude with the coordinator"
    )


class AggregationRule(StrEnum):
    MEAN = "mean"  # FedAvg: the weighted mean
    TRIMMED_MEAN = "trimmed-mean"  # Flower's FedTrimmedAvg (Yin et al. 2018)
    MEDIAN = "median"  # Flower's FedMedian: the coordinate-wise median
    KRUM = "krum"  # Flower's Krum (Blanchard et al. 2017)


class Aggregation(_Frozen):
    """How the coordinator combines the BUs' model updates, and how many valid replies an exchange
    needs.

    Every reply is validated before it is combined (finite values, the model's shapes and dtypes,
    a weight within the BU's declared size); an exchange continues with the valid replies of at
    least `quorum` of the BUs taking part, and the run stops otherwise. The robust rules bound
    what a few BUs sending hostile but well-formed updates can do: `trimmed-mean` drops the
    `trim` share of values at each end of every coordinate, `median` takes the coordinate-wise
    median, and `krum` keeps the update closest to its neighbours, tolerating `byzantine` BUs.
    They need each BU's update, so they exclude secure aggregation, and the noise must be each
    BU's own (local): the central and distributed calibrations hold for a sum only."""

    rule: AggregationRule = AggregationRule.MEAN
    trim: float = Field(0.2, gt=0, lt=0.5, description="trimmed-mean: share cut at each end")
    byzantine: int = Field(1, ge=0, description="krum: BUs it tolerates sending hostile updates")
    quorum: float = Field(
        0.5, gt=0, le=1, description="share of the BUs taking part whose valid replies must arrive"
    )


class QueryRecipe(BaseModel):
    """A query by recipe name (`federation.recipes`) and its parameters, expanded into a full query
    spec by the coordinator from the silos' declared bounds and domains."""

    model_config = ConfigDict(frozen=True, extra="allow")
    purpose: str
    recipe: str
    units: tuple[str, ...] = ()


class Job(_Frozen):
    schema_version: Literal[1] = 1
    kind: JobKind = JobKind.MODEL
    task: Task = Task.CHURN
    purpose: str = ""
    rounds: int = Field(5, ge=1, le=10_000)
    epsilon: float = Field(3.0, gt=0, le=100, description="per-BU epsilon target for this run")
    delta: float = Field(1e-6, gt=0, lt=1e-2)
    training: Training = Training()
    evaluation: Evaluation = Evaluation()
    secure_aggregation: SecureAggregation = SecureAggregation()
    aggregation: Aggregation = Aggregation()
    noise: NoisePlacement = NoisePlacement.LOCAL
    consent_as_of: datetime | None = Field(
        None, description="consent is evaluated as of this time; the job's start when empty"
    )
    features: FeatureSpec | None = Field(
        None, description="resolved by the coordinator from the silos' declared schemas"
    )
    query: QuerySpec | QueryRecipe | None = Field(
        None, description="kind = query: the query, or a recipe the coordinator expands"
    )
    segments: SegmentsSpec | None = Field(None, description="kind = segments: the k-means job")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        kind = data.get("kind", JobKind.MODEL)
        if kind == JobKind.SEGMENTS and data.get("segments") is None:
            data["segments"] = {}
        if not data.get("purpose"):
            query = data.get("query")
            if kind == JobKind.QUERY and query is not None:
                data["purpose"] = _section_value(query, "purpose", "")
            elif kind == JobKind.SEGMENTS:
                segments = data["segments"]
                data["purpose"] = _section_value(
                    segments, "purpose", SegmentsSpec.model_fields["purpose"].default
                )
            else:
                try:
                    data["purpose"] = DEFAULT_PURPOSE[Task(data.get("task", Task.CHURN))]
                except ValueError:
                    return data  # the field validator names the bad task
        if kind in (JobKind.QUERY, JobKind.SEGMENTS) and "rounds" not in data:
            segments = data.get("segments")
            data["rounds"] = (
                1
                if kind == JobKind.QUERY
                else _section_value(
                    segments, "iterations", SegmentsSpec.model_fields["iterations"].default
                )
            )
        return data

    @model_validator(mode="after")
    def _kind_has_its_section(self) -> Job:
        if self.kind is JobKind.QUERY and self.query is None:
            raise ValueError("kind = 'query' needs a [query] table (a query or a recipe)")
        if self.kind is not JobKind.QUERY and self.query is not None:
            raise ValueError(f"a [query] table needs kind = 'query', not '{self.kind}'")
        if self.kind is not JobKind.SEGMENTS and self.segments is not None:
            raise ValueError(f"a [segments] table needs kind = 'segments', not '{self.kind}'")
        if self.kind is JobKind.QUERY and self.rounds != 1:
            raise ValueError("a query job runs in one round; drop 'rounds'")
        if self.kind is JobKind.SEGMENTS and self.rounds != self.segments_spec.iterations:
            raise ValueError("a segments job runs one round per iteration; set segments.iterations")
        for section in (self.query, self.segments):
            if section is not None and section.purpose != self.purpose:
                raise ValueError(
                    f"the job's purpose '{self.purpose}' differs from its section's "
                    f"'{section.purpose}'; name it once"
                )
        if self.evaluation_epsilon > self.epsilon:
            raise ValueError(
                f"evaluation.epsilon ({self.evaluation_epsilon}) exceeds the job's epsilon "
                f"({self.epsilon}), the most any customer's data may cost in this run"
            )
        return self

    @model_validator(mode="after")
    def _central_noise_needs_secure_aggregation(self) -> Job:
        if self.noise is not NoisePlacement.LOCAL and not self.secure_aggregation.enabled:
            raise ValueError(
                f"noise = '{self.noise}' needs secure_aggregation: a BU's clipped update is not "
                "private on its own and must reach the coordinator only as a sum "
                "(add --secure-aggregation)"
            )
        return self

    @model_validator(mode="after")
    def _robust_rules_need_each_update(self) -> Job:
        rule = self.aggregation.rule
        if rule is AggregationRule.MEAN:
            return self
        if self.kind is not JobKind.MODEL:
            raise ValueError(
                f"aggregation.rule = '{rule}' combines model updates; a {self.kind} job sums "
                "statistics. Drop aggregation.rule"
            )
        if self.secure_aggregation.enabled:
            raise ValueError(
                f"aggregation.rule = '{rule}' needs each BU's update, and secure aggregation "
                "shows the coordinator only their sum; use rule = 'mean' or turn secure "
                "aggregation off"
            )
        return self

    @property
    def evaluation_epsilon(self) -> float:
        """What the DP evaluation spends: `evaluation.epsilon`, or the job's epsilon."""
        if self.evaluation.epsilon is not None:
            return self.evaluation.epsilon
        return self.epsilon

    @property
    def query_spec(self) -> QuerySpec:
        if not isinstance(self.query, QuerySpec):
            raise ConfigurationError(
                "this job's query is not resolved; the coordinator expands recipes from the "
                "silos' declared schemas before the first round"
            )
        return self.query

    @property
    def segments_spec(self) -> SegmentsSpec:
        if self.segments is None:
            raise ConfigurationError("this job is not a segments job")
        return self.segments

    @property
    def feature_spec(self) -> FeatureSpec:
        if self.features is None:
            raise ConfigurationError(
                "the job's features are not resolved; the coordinator resolves them from the "
                "silos' schemas before the first round"
            )
        return self.features

    @classmethod
    def parse(cls, data: dict, *, source: str) -> Job:
        """Validate `data` into a Job; errors name `source` and the offending key."""
        if "seed" in data:
            raise ConfigurationError(
                f"{source}: a job never carries a seed; pass --seed to `silofed simulate` instead."
            )
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
            )
            raise ConfigurationError(f"{source}: invalid job: {problems}") from None


def _section_value(section: object, name: str, default: object) -> object:
    """A key of a [query] or [segments] section, given as a table or as a spec; anything else
    gives `default` and is named by the section's own validation."""
    if isinstance(section, dict):
        return section.get(name, default)
    if isinstance(section, BaseModel):
        return getattr(section, name, default)
    return default


def load_job_file(path: Path) -> dict:
    """A job file's TOML as a dict; errors name the file and what is wrong with it."""
    return read_toml(path, what="job file", missing="no such job file")
