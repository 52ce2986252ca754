"""Feature specifications: what a model sees of a customer, and how it is scaled.

A `FeatureSpec` is public: every bound and every categorical domain in it comes from the silos'
declared schemas (or from the job), never from the data, because data-dependent preprocessing would
void DP-SGD's per-customer bound. The coordinator resolves one spec for the whole federation and every
BU computes the same vector layout from it; the spec is saved beside the model so that scoring later
builds exactly the same features.

Each feature maps to values in [0, 1]: numeric values are clipped to their declared bounds and scaled
linearly (or on a log1p scale for counts and amounts); categories are one-hot over the declared domain.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from privacy.errors import ConfigurationError
from privacy.schema import ColumnType, SiloSchema


class _Feature(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str

    @property
    def output_names(self) -> tuple[str, ...]:
        return (self.name,)

    @property
    def columns(self) -> tuple[str, ...]:
        """The silo columns (qualified `table.column`) this feature reads."""
        raise NotImplementedError


class Numeric(_Feature):
    """A customer attribute clipped to [lower, upper] and scaled to [0, 1]."""

    kind: Literal["numeric"] = "numeric"
    column: str
    lower: float
    upper: float
    log_scale: bool = False

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column,)


class Categorical(_Feature):
    """A customer attribute one-hot encoded over its declared domain."""

    kind: Literal["categorical"] = "categorical"
    column: str
    domain: tuple[str, ...]

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(f"{self.name}={value}" for value in self.domain)

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column,)


class Recency(_Feature):
    """Days from the last purchase to the observation date, capped at `upper_days` (no purchase in
    the look-back window counts as `upper_days`)."""

    kind: Literal["recency"] = "recency"
    timestamp: str = "transactions.timestamp"
    upper_days: float

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.timestamp,)


class Frequency(_Feature):
    """Purchases in the look-back window, capped at `upper`, on a log1p scale."""

    kind: Literal["frequency"] = "frequency"
    timestamp: str = "transactions.timestamp"
    upper: float

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.timestamp,)


class Monetary(_Feature):
    """Mean purchase amount in the look-back window, clipped to the declared amount bounds, log1p."""

    kind: Literal["monetary"] = "monetary"
    amount: str = "transactions.amount"
    timestamp: str = "transactions.timestamp"
    upper: float

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.amount, self.timestamp)


class Tenure(_Feature):
    """Days from signup to the observation date, capped at `upper_days`."""

    kind: Literal["tenure"] = "tenure"
    signup: str = "customers.signup_date"
    upper_days: float

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.signup,)


class ChannelMix(_Feature):
    """Share of the customer's purchases in the look-back window made in each declared channel."""

    kind: Literal["channel_mix"] = "channel_mix"
    channel: str = "transactions.channel"
    timestamp: str = "transactions.timestamp"
    domain: tuple[str, ...]

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(f"{self.name}={value}" for value in self.domain)

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.channel, self.timestamp)


Feature = Annotated[
    Numeric | Categorical | Recency | Frequency | Monetary | Tenure | ChannelMix,
    Field(discriminator="kind"),
]


class FeatureSpec(BaseModel):
    """The features of one task, the label, and the observation window they are computed over."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    observation_date: datetime
    lookback_days: int = Field(ge=1)
    label: str
    features: tuple[Feature, ...]

    @model_validator(mode="after")
    def _unique_names(self) -> FeatureSpec:
        names = self.output_names
        if len(set(names)) != len(names):
            raise ValueError(f"feature names must be unique: {names}")
        return self

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(n for f in self.features for n in f.output_names)

    @property
    def dim(self) -> int:
        return len(self.output_names)

    @property
    def columns(self) -> tuple[str, ...]:
        """Every silo column the features and the label read, in a stable order."""
        seen: dict[str, None] = {}
        for feature in self.features:
            seen.update(dict.fromkeys(feature.columns))
        seen[self.label] = None
        return tuple(seen)


def churn_features(schema: SiloSchema, *, lookback_days: int = 365) -> FeatureSpec:
    """The churn task's features (RFM, tenure, channel mix, age, gender, region), with bounds and
    domains read from a schema's declarations. The observation date is the declared upper bound
    of the transactions' timestamps: the end of the period the silo covers."""

    def declared(qualified: str, *types: ColumnType):
        column = schema.column(qualified)
        if types and column.type not in types:
            raise ConfigurationError(
                f"unit '{schema.unit}': the churn task needs '{qualified}' of type "
                f"{'/'.join(types)}, but the schema declares '{column.type}'."
            )
        return column

    def bounds(qualified: str, *types: ColumnType):
        column = declared(qualified, *types)
        if column.lower is None:
            raise ConfigurationError(
                f"unit '{schema.unit}': the churn task scales '{qualified}' by its declared bounds; "
                "declare 'lower' and 'upper' for it in the schema."
            )
        return column.lower, column.upper

    ts_lower, ts_upper = bounds("transactions.timestamp", ColumnType.DATETIME, ColumnType.DATE)
    signup_lower, _ = bounds("customers.signup_date", ColumnType.DATE, ColumnType.DATETIME)
    _, amount_upper = bounds("transactions.amount", ColumnType.FLOAT, ColumnType.INTEGER)
    age_lower, age_upper = bounds("customers.age", ColumnType.INTEGER, ColumnType.FLOAT)
    window = min(lookback_days, (ts_upper - ts_lower).days)
    return FeatureSpec(
        observation_date=ts_upper,
        lookback_days=window,
        label="customers.churned",
        features=(
            Recency(name="recency", upper_days=window),
            Frequency(name="frequency", upper=52.0),
            Monetary(name="monetary", upper=amount_upper),
            Tenure(name="tenure", upper_days=float((ts_upper - signup_lower).days)),
            ChannelMix(
                name="channel",
                domain=declared("transactions.channel", ColumnType.CATEGORY).domain,
            ),
            Numeric(name="age", column="customers.age", lower=age_lower, upper=age_upper),
            Categorical(
                name="gender",
                column="customers.gender",
                domain=declared("customers.gender", ColumnType.CATEGORY).domain,
            ),
            Categorical(
                name="region",
                column="customers.region",
                domain=declared("customers.region", ColumnType.CATEGORY).domain,
            ),
        ),
    )


def resolve_feature_spec(task: str, schemas: list[SiloSchema]) -> FeatureSpec:
    """One feature spec for the whole federation, from the BUs' declared schemas (public
    metadata, no data). Every BU must declare the same bounds and domains for the task's columns;
    otherwise their feature vectors would not mean the same thing."""
    if task != "churn":
        raise ConfigurationError(f"unknown task '{task}'")
    if not schemas:
        raise ConfigurationError("no BU schema to resolve the features from")
    specs = {schema.unit: churn_features(schema) for schema in schemas}
    first_unit, first = next(iter(specs.items()))
    for unit, spec in specs.items():
        if spec != first:
            raise ConfigurationError(
                f"units '{first_unit}' and '{unit}' declare different bounds or domains for the "
                f"{task} task's columns; align their schemas (types, bounds, domains) first."
            )
    return first
