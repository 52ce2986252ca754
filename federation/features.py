"""Feature specifications: what a model sees of a customer, and how it is scaled.

A `FeatureSpec` is public: every bound and every categorical domain in it comes from the silos'
declared schemas (or from the job), never from the data, because data-dependent preprocessing would
void DP-SGD's per-customer bound. The coordinator resolves one spec for the whole federation and every
BU computes the same vector layout from it; the spec is saved beside the model so that scoring later
builds exactly the same features.

Each feature maps to values in [0, 1]: numeric values are clipped to their declared bounds and scaled
linearly (or on a log1p scale for counts and amounts); categories are one-hot over the declared domain.

`purpose_features` derives a spec from one purpose of a schema: the columns the purpose allows become
features by their declared type and table (a customers attribute is scaled or one-hot encoded; the
transactions of a customer become recency, frequency, mean amounts and category mixes over a look-back
window; a customer date becomes a tenure). The label is a boolean customers column, or `FutureSpend`:
what the customer spends in a holdout window after the observation date (Fader, Hardie & Lee 2005,
"RFM and CLV", calibration and holdout periods), clipped to a public bound and scaled to [0, 1].
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from privacy.errors import ConfigurationError
from privacy.schema import NUMERIC_TYPES, TEMPORAL_TYPES, ColumnRole, ColumnType, SiloSchema


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


class FutureSpend(BaseModel):
    """A regression label: the customer's total `amount` in the `horizon_days` after the observation
    date, clipped to the public bound `upper` and scaled to [0, 1] as sqrt(spend / upper).

    The square root (a variance-stabilising transform for counts and amounts) keeps the label's
    signal large against DP-SGD's noise although most customers spend nothing in the window and a
    few spend a lot, while distorting the mean less than a log scale: on CDNOW and the synthetic
    BUs it gave the lowest mean absolute error and, within 1.5%, the lowest RMSE of the log, square
    root and linear scales (docs/tasks.md). `natural` inverts it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["future_spend"] = "future_spend"
    amount: str = "transactions.amount"
    timestamp: str = "transactions.timestamp"
    horizon_days: int = Field(ge=1)
    upper: float = Field(gt=0)

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.amount, self.timestamp)

    def scale(self, spend: np.ndarray) -> np.ndarray:
        clipped = np.clip(np.asarray(spend, dtype=np.float64), 0.0, self.upper)
        return np.sqrt(clipped / self.upper)

    def natural(self, scaled: np.ndarray) -> np.ndarray:
        """Scaled values back in the amount's units (values outside [0, 1] are clipped first)."""
        clipped = np.clip(np.asarray(scaled, dtype=np.float64), 0.0, 1.0)
        return clipped * clipped * self.upper


_WINDOWED = (Recency, Frequency, Monetary, ChannelMix)
SCALAR = (Numeric, Recency, Frequency, Monetary, Tenure)  # one scaled value each


class FeatureSpec(BaseModel):
    """The features of one task, the label, and the observation window they are computed over.

    `observation_date` is None for a spec that reads no time (a table of customer attributes);
    `target` is set for a regression label derived from the transactions (then `label` names the
    amount column it sums)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    observation_date: datetime | None = None
    lookback_days: int | None = Field(None, ge=1)
    label: str | None = None  # None: unsupervised (segmentation)
    target: FutureSpend | None = None
    features: tuple[Feature, ...]
    ranges: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="scalar output -> (low, high) within [0, 1], from DP statistics "
        "(federation.ranges): the scaled value is clipped to it and rescaled to [0, 1]",
    )

    @model_validator(mode="after")
    def _consistent(self) -> FeatureSpec:
        names = self.output_names
        if len(set(names)) != len(names):
            raise ValueError(f"feature names must be unique: {names}")
        windowed = self.target is not None or any(isinstance(f, _WINDOWED) for f in self.features)
        timed = windowed or any(isinstance(f, Tenure) for f in self.features)
        if windowed and self.lookback_days is None:
            raise ValueError("features over transactions need 'lookback_days'")
        if timed and self.observation_date is None:
            raise ValueError("features over time need an 'observation_date'")
        if self.target is not None and self.label != self.target.amount:
            raise ValueError(f"'label' must name the target's amount column '{self.target.amount}'")
        for name, (low, high) in self.ranges.items():
            if name not in self.scalar_outputs:
                raise ValueError(
                    f"ranges: '{name}' is not a scalar feature of this spec "
                    f"({', '.join(self.scalar_outputs) or 'none'})"
                )
            if not 0.0 <= low < high <= 1.0:
                raise ValueError(
                    f"ranges: '{name}' needs 0 <= low < high <= 1, not ({low}, {high})"
                )
        return self

    @property
    def scalar_outputs(self) -> tuple[str, ...]:
        """The outputs that are one scaled value each (not one-hot encodings or shares)."""
        return tuple(f.name for f in self.features if isinstance(f, SCALAR))

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
        if self.label is not None:
            seen[self.label] = None
        if self.target is not None:
            seen.update(dict.fromkeys(self.target.columns))
        return tuple(seen)


LOOKBACK_DAYS = 365  # transactions older than a year before the observation date are not read
FREQUENCY_UPPER = 52.0  # purchases per look-back window; more count as 52 (log1p scale)
# A customers attribute whose declared range is wider than this is a count or an amount (balance,
# calls, days since contact) with a heavy tail: it is scaled on log1p(value - lower), so that the
# bulk of customers does not sit in a sliver near zero. Narrower ranges (age, day of month) are linear.
LOG_SCALE_RANGE = 100.0
TIMESTAMP = "transactions.timestamp"


def purpose_features(
    schema: SiloSchema,
    purpose: str,
    *,
    task: str,
    label: str | None,
    target: FutureSpend | None = None,
) -> FeatureSpec:
    """The spec of `task` over the columns `purpose` allows, from `schema`'s declarations only.

    Identifiers, special categories and the label are never features. Customers columns: numbers
    and booleans scaled by their declared bounds (`Numeric`), categories one-hot over their declared
    domain, dates as the days to the observation date (`Tenure`). Transactions: recency and
    frequency from `transactions.timestamp`, the mean of each numeric column (`Monetary`) and the
    share of each category (`ChannelMix`) over the look-back window.

    The observation date is the declared end of the transactions' period (or of the latest
    customers date when the purpose reads no transactions; none when it reads no time), moved back
    by the target's horizon so that the label's window is inside the declared period. The order
    (recency, frequency, amounts, tenures, mixes, then attributes in the purpose's order) makes the
    synthetic BUs' churn spec what it has always been.
    """
    policy = schema.policy(purpose)
    where = f"unit '{schema.unit}', purpose '{purpose}'"
    fix = f"purposes.{purpose}.features"

    def declared(qualified: str):
        return schema.column(qualified, purpose=purpose)

    def bounds(qualified: str) -> tuple:
        column = declared(qualified)
        if column.lower is None:
            raise ConfigurationError(
                f"{where}: the {task} task scales '{qualified}' by its declared bounds; declare "
                f"'lower' and 'upper' for it in the schema, or remove it from {fix}."
            )
        return column.lower, column.upper

    timestamp: str | None = None
    amounts: list[str] = []
    mixes: list[str] = []
    dates: list[str] = []
    attributes: list[str] = []
    for qualified in policy.features:
        column = declared(qualified)
        # A binary label is never a feature; the amount a target sums is one (its past mean).
        is_label = qualified == label and target is None
        if is_label or column.role is ColumnRole.IDENTIFIER or schema.is_special(qualified):
            continue
        table, _, name = qualified.partition(".")
        kind = column.type
        if table == "transactions" and name == "timestamp" and kind in TEMPORAL_TYPES:
            timestamp = qualified
        elif table == "transactions" and kind in NUMERIC_TYPES:
            amounts.append(qualified)
        elif table == "transactions" and kind is ColumnType.CATEGORY:
            mixes.append(qualified)
        elif table == "customers" and kind in TEMPORAL_TYPES:
            dates.append(qualified)
        elif table == "customers" and kind in (
            *NUMERIC_TYPES,
            ColumnType.BOOLEAN,
            ColumnType.CATEGORY,
        ):
            attributes.append(qualified)
        else:
            raise ConfigurationError(
                f"{where}: '{qualified}' ({kind}) cannot be a model feature: the tasks read "
                "customers attributes (numbers, booleans, categories, dates) and transactions "
                "(timestamp, numbers, categories). Declare it as a category with a domain, or "
                f"remove it from {fix}."
            )
    needs_window = bool(amounts or mixes) or target is not None
    if needs_window and timestamp is None:
        raise ConfigurationError(
            f"{where}: the {task} task reads transactions over a look-back window; allow "
            f"'{TIMESTAMP}' (a date or datetime with declared bounds) in {fix}."
        )

    observation: datetime | None = None
    window: int | None = None
    if timestamp is not None:
        lower, upper = bounds(timestamp)
        observation = upper - timedelta(days=target.horizon_days if target else 0)
        if observation <= lower:
            raise ConfigurationError(
                f"{where}: the declared period of '{timestamp}' ({lower:%Y-%m-%d} to "
                f"{upper:%Y-%m-%d}) is not longer than the {task} task's horizon of "
                f"{target.horizon_days if target else 0} days; declare the silo's full period."
            )
        # + 1: the window (observation - window, observation] includes the period's first day
        window = min(LOOKBACK_DAYS, (observation - lower).days + 1)
    elif dates:
        observation = max(bounds(d)[1] for d in dates)

    features: list = []
    if timestamp is not None:
        features += [
            Recency(name="recency", timestamp=timestamp, upper_days=window),
            Frequency(name="frequency", timestamp=timestamp, upper=FREQUENCY_UPPER),
        ]
    for qualified in amounts:
        lower, upper = bounds(qualified)
        name = qualified.partition(".")[2]
        if lower < 0:
            raise ConfigurationError(
                f"{where}: the {task} task averages '{qualified}' on a log scale from 0; its "
                f"declared lower bound is {lower}. Declare amounts from 0, or remove it from {fix}."
            )
        features.append(
            Monetary(
                name="monetary" if name == "amount" else f"{name}_mean",
                amount=qualified,
                timestamp=timestamp,
                upper=upper,
            )
        )
    for qualified in dates:
        lower, _ = bounds(qualified)
        assert observation is not None
        days = float((observation - lower).days)
        if days <= 0:
            raise ConfigurationError(
                f"{where}: '{qualified}' is declared from {lower:%Y-%m-%d}, not before the "
                f"observation date {observation:%Y-%m-%d}; fix its bounds or remove it from {fix}."
            )
        name = "tenure" if len(dates) == 1 else f"tenure_{qualified.partition('.')[2]}"
        features.append(Tenure(name=name, signup=qualified, upper_days=days))
    for qualified in mixes:
        features.append(
            ChannelMix(
                name=qualified.partition(".")[2],
                channel=qualified,
                timestamp=timestamp,
                domain=declared(qualified).domain,
            )
        )
    for qualified in attributes:
        column = declared(qualified)
        name = qualified.partition(".")[2]
        if column.type is ColumnType.CATEGORY:
            features.append(Categorical(name=name, column=qualified, domain=column.domain))
        elif column.type is ColumnType.BOOLEAN:
            features.append(Numeric(name=name, column=qualified, lower=0.0, upper=1.0))
        else:
            lower, upper = bounds(qualified)
            features.append(
                Numeric(
                    name=name,
                    column=qualified,
                    lower=lower,
                    upper=upper,
                    log_scale=upper - lower > LOG_SCALE_RANGE,
                )
            )
    if not features:
        raise ConfigurationError(
            f"{where}: the purpose allows no column the {task} task can use as a feature; "
            f"list some in {fix}."
        )
    try:
        return FeatureSpec(
            observation_date=observation,
            lookback_days=window,
            label=label,
            target=target,
            features=tuple(features),
        )
    except ValidationError as err:
        problems = "; ".join(e["msg"] for e in err.errors())
        raise ConfigurationError(
            f"{where}: {problems}; rename the columns in the schema."
        ) from None


def churn_features(schema: SiloSchema) -> FeatureSpec:
    """The churn task's spec over the schema's `churn_model` purpose (on the synthetic BUs: RFM,
    tenure, channel mix, age, gender, region, label `customers.churned`)."""
    from federation.job import DEFAULT_PURPOSE, Task
    from federation.tasks import adapter

    return adapter(Task.CHURN).feature_spec([schema], DEFAULT_PURPOSE[Task.CHURN])


def resolve_feature_spec(task: str, schemas: list[SiloSchema]) -> FeatureSpec:
    """One feature spec for the whole federation, from the BUs' declared schemas (public
    metadata, no data), for the task's default purpose (see `federation.tasks`)."""
    from federation.job import DEFAULT_PURPOSE, Task
    from federation.tasks import adapter

    try:
        known = Task(task)
    except ValueError:
        raise ConfigurationError(
            f"unknown task '{task}'; choose one of {', '.join(t.value for t in Task)}"
        ) from None
    return adapter(known).feature_spec(schemas, DEFAULT_PURPOSE[known])
