"""Job specifications: what the analyst asks the federation to do.

A `Job` is validated once, at the edge (command line, job file, Flower run config), and travels to
every BU inside each round's instruction. It never carries a seed: seeds exist only in simulation
(`simulations.runner.SimulationSettings`) and are refused elsewhere.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from federation.features import FeatureSpec
from privacy.errors import ConfigurationError


class NoisePlacement(StrEnum):
    """Where the noise is added (DESIGN.md, Guarantees 3)."""

    LOCAL = "local"  # DP-SGD inside each BU: holds against the coordinator without any trust
    CENTRAL = "central"  # BUs clip their updates, send under SecAgg+; the coordinator adds noise
    DISTRIBUTED = "distributed"  # each BU adds a share of integer noise; only the sum is noised


class Task(StrEnum):
    CHURN = "churn"


DEFAULT_PURPOSE = {Task.CHURN: "churn_model"}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Training(_Frozen):
    """Local DP-SGD inside each BU. Defaults chosen on the synthetic BUs (docs/training.md)."""

    expected_batch_size: int = Field(256, ge=8, description="Poisson sampling: expected batch size")
    local_epochs: int = Field(1, ge=1, le=100)
    learning_rate: float = Field(2.0, gt=0)
    momentum: float = Field(0.5, ge=0, lt=1)
    clip_norm: float = Field(1.0, gt=0, description="per-customer gradient clipping norm")


class Evaluation(_Frozen):
    """Held-out test customers are chosen by a keyed hash of the customer id, never by the data."""

    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    holdout_key: str = Field("silofed-holdout-v1", min_length=8)


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


class Job(_Frozen):
    schema_version: Literal[1] = 1
    task: Task = Task.CHURN
    purpose: str = ""
    rounds: int = Field(5, ge=1, le=10_000)
    epsilon: float = Field(3.0, gt=0, le=100, description="per-BU epsilon target for this run")
    delta: float = Field(1e-6, gt=0, lt=1e-2)
    training: Training = Training()
    evaluation: Evaluation = Evaluation()
    secure_aggregation: SecureAggregation = SecureAggregation()
    noise: NoisePlacement = NoisePlacement.LOCAL
    consent_as_of: datetime | None = Field(
        None, description="consent is evaluated as of this time; the job's start when empty"
    )
    features: FeatureSpec | None = Field(
        None, description="resolved by the coordinator from the silos' declared schemas"
    )

    @model_validator(mode="before")
    @classmethod
    def _default_purpose(cls, data: object) -> object:
        if isinstance(data, dict) and not data.get("purpose"):
            try:
                task = Task(data.get("task", Task.CHURN))
            except ValueError:
                return data  # the field validator names the bad task
            return {**data, "purpose": DEFAULT_PURPOSE[task]}
        return data

    @model_validator(mode="after")
    def _central_noise_needs_secure_aggregation(self) -> Job:
        if self.noise is not NoisePlacement.LOCAL and not self.secure_aggregation.enabled:
            raise ValueError(
                f"noise = '{self.noise}' needs secure_aggregation: a BU's clipped update is not "
                "private on its own and must reach the coordinator only as a sum "
                "(add --secure-aggregation)"
            )
        return self

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
