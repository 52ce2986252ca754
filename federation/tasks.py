"""Model tasks behind one adapter: what each task predicts, from which features, with which model,
loss and metrics. The BU client, the coordinator and scoring call the adapter; none of them holds a
per-task copy of the training or evaluation code.

- `churn` and `response`: binary labels (a boolean customers column named by the purpose's `label`),
  logistic regression, binary cross-entropy, metrics AUC, log-loss and Brier score.
- `ltv`: a customer's spend in a holdout window after the observation date (`FutureSpend`), scaled
  to [0, 1] by a square root; metrics RMSE and MAE in the amount's units. The model is a fractional
  logistic regression (Papke & Wooldridge 1996): the same linear layer and sigmoid link as the binary
  tasks, fitted by cross-entropy against the scaled spend. Its minimiser is the conditional mean of
  the scaled label, as with squared error, but its curvature is bounded like logistic regression's,
  so the binary tasks' DP-SGD settings (learning rate 2) train it; a linear model under squared
  error diverges at that rate on CDNOW (measured: docs/tasks.md).

Features come from the declared schemas only (`federation.features.purpose_features`), and every BU
must declare the same bounds and domains for them, or their vectors would not mean the same thing.
The models are a single linear layer on features in [0, 1]: a convex problem that DP-SGD solves well,
and the model family of the synthetic ground truth.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import nn

from federation.features import FeatureSpec, FutureSpend, purpose_features
from federation.job import Task
from privacy.errors import ConfigurationError
from privacy.schema import NUMERIC_TYPES, ColumnType, SiloSchema

# The ltv task's holdout window: the last six months of the declared period. Public and the same
# for every BU, so that all labels measure the same thing.
LTV_HORIZON_DAYS = 182


@dataclass(frozen=True)
class TaskAdapter(ABC):
    """One task's label, features, model, loss, predictions and metrics.

    `spec` is the job's resolved feature spec when the adapter is bound to one (`adapter(task,
    spec)`): a regression task needs it to turn predictions and labels back into natural units."""

    kind: ClassVar[Literal["binary", "regression"]]
    metrics: ClassVar[tuple[str, ...]]

    task: Task
    spec: FeatureSpec | None = None

    @abstractmethod
    def label_of(self, schema: SiloSchema, purpose: str) -> tuple[str, FutureSpend | None]:
        """The label column and (regression) target of `schema`'s `purpose`, checked."""

    def feature_spec(self, configs: Sequence[SiloSchema], purpose: str) -> FeatureSpec:
        """One spec for the whole federation from the BUs' declared schemas (public metadata, no
        data); every BU must derive the same one."""
        if not configs:
            raise ConfigurationError(
                f"no BU schema to resolve the {self.task} task's features from"
            )
        specs = {}
        for schema in configs:
            label, target = self.label_of(schema, purpose)
            specs[schema.unit] = purpose_features(
                schema, purpose, task=self.task.value, label=label, target=target
            )
        first_unit, first = next(iter(specs.items()))
        for unit, spec in specs.items():
            if spec != first:
                raise ConfigurationError(
                    f"units '{first_unit}' and '{unit}' declare different columns, bounds or "
                    f"domains for the {self.task} task (purpose '{purpose}', "
                    f"{_difference(first, spec)}); align their schemas (types, bounds, domains, "
                    "the purpose's features and label) first."
                )
        return first

    def build_model(self, dim: int) -> nn.Module:
        """A fresh model: one linear layer on the [0, 1] features, whose output is a logit (the
        loss and `predict` apply the sigmoid)."""
        return nn.Linear(dim, 1)

    @abstractmethod
    def loss(self) -> nn.Module:
        """The loss of the model's output (squeezed to one value per customer) against the label,
        per customer (`reduction="none"`): training sums it and divides by the batch's size, so
        that an empty Poisson batch gives a zero loss (and still a noisy, accounted step).
        Per-customer gradients come from the loss at the model's output (`clients.training`)."""

    @abstractmethod
    def predict(self, model: nn.Module, features: np.ndarray) -> np.ndarray:
        """Binary: probabilities. Regression: predictions in natural units (e.g. currency)."""

    @abstractmethod
    def natural_labels(self, labels: np.ndarray) -> np.ndarray:
        """Labels as `clients.features.compute_features` returns them, in natural units."""

    @abstractmethod
    def upper_of(self, spec: FeatureSpec) -> float | None:
        """Regression: the public upper bound of the label in natural units, for DP error
        metrics; None for a binary task."""

    @property
    @abstractmethod
    def upper(self) -> float | None:
        """`upper_of` the bound spec (a regression task refuses without one)."""

    @staticmethod
    def _outputs(model: nn.Module, features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.as_tensor(features, dtype=torch.float32)).squeeze(-1).numpy()


@dataclass(frozen=True)
class BinaryTask(TaskAdapter):
    """A yes/no label of the customer (churned, responded): logistic regression."""

    kind: ClassVar[Literal["binary", "regression"]] = "binary"
    metrics: ClassVar[tuple[str, ...]] = ("auc", "log_loss", "brier")

    def label_of(self, schema: SiloSchema, purpose: str) -> tuple[str, None]:
        label = schema.policy(purpose).label
        where = f"unit '{schema.unit}', purpose '{purpose}'"
        if label is None:
            raise ConfigurationError(
                f"{where}: the {self.task} task needs a label; set purposes.{purpose}.label to a "
                'boolean customers column (e.g. "customers.churned").'
            )
        column = schema.column(label, purpose=purpose)
        if label.partition(".")[0] != "customers" or column.type is not ColumnType.BOOLEAN:
            raise ConfigurationError(
                f"{where}: the {self.task} task's label '{label}' must be a boolean column of the "
                f"customers table (one yes/no per customer), not {column.type}; declare it "
                'type = "boolean" (`silofed data split --positive VALUE` writes one).'
            )
        return label, None

    def loss(self) -> nn.Module:
        return nn.BCEWithLogitsLoss(reduction="none")

    def predict(self, model: nn.Module, features: np.ndarray) -> np.ndarray:
        logits = torch.as_tensor(self._outputs(model, features))
        return torch.sigmoid(logits).numpy().astype(np.float64)

    def natural_labels(self, labels: np.ndarray) -> np.ndarray:
        return np.asarray(labels, dtype=np.float64)

    def upper_of(self, spec: FeatureSpec) -> None:
        return None

    @property
    def upper(self) -> None:
        return None


@dataclass(frozen=True)
class SpendTask(TaskAdapter):
    """The customer's spend in the `horizon_days` after the observation date (customer lifetime
    value over a horizon), scaled as sqrt(spend / upper), where `upper` is the declared
    upper bound of one purchase's amount, a public number every BU already declares; fractional
    logistic regression on it (module docstring)."""

    kind: ClassVar[Literal["binary", "regression"]] = "regression"
    metrics: ClassVar[tuple[str, ...]] = ("rmse", "mae")
    horizon_days: int = LTV_HORIZON_DAYS

    def label_of(self, schema: SiloSchema, purpose: str) -> tuple[str, FutureSpend]:
        label = schema.policy(purpose).label
        where = f"unit '{schema.unit}', purpose '{purpose}'"
        if label is None:
            raise ConfigurationError(
                f"{where}: the {self.task} task sums a transactions amount over its horizon; set "
                f'purposes.{purpose}.label = "transactions.amount" (the column it sums).'
            )
        column = schema.column(label, purpose=purpose)
        if label.partition(".")[0] != "transactions" or column.type not in NUMERIC_TYPES:
            raise ConfigurationError(
                f"{where}: the {self.task} task's label '{label}' must be a numeric column of the "
                "transactions table (the amount it sums per customer)."
            )
        if column.lower is None or column.lower < 0:
            raise ConfigurationError(
                f"{where}: the {self.task} task clips spend to the declared bounds of '{label}'; "
                "declare lower = 0 (or more) and an upper bound for it."
            )
        return label, FutureSpend(
            amount=label, horizon_days=self.horizon_days, upper=float(column.upper)
        )

    def loss(self) -> nn.Module:
        return nn.BCEWithLogitsLoss(reduction="none")  # against a label in [0, 1]

    def predict(self, model: nn.Module, features: np.ndarray) -> np.ndarray:
        scaled = torch.sigmoid(torch.as_tensor(self._outputs(model, features))).numpy()
        return self._target().natural(scaled)

    def natural_labels(self, labels: np.ndarray) -> np.ndarray:
        return self._target().natural(labels)

    def upper_of(self, spec: FeatureSpec) -> float:
        return self._target(spec).upper

    @property
    def upper(self) -> float:
        return self._target().upper

    def _target(self, spec: FeatureSpec | None = None) -> FutureSpend:
        spec = spec if spec is not None else self.spec
        if spec is None:
            raise ConfigurationError(
                f"the {self.task} task reports in natural units, which needs the job's feature "
                "spec: use adapter(job.task, job.feature_spec)"
            )
        if spec.target is None:
            raise ConfigurationError(
                f"the feature spec has no regression target; it was not resolved for the "
                f"{self.task} task"
            )
        return spec.target


def _difference(first: FeatureSpec, other: FeatureSpec) -> str:
    """Where two unequal specs first differ, for the error message."""
    for field in ("observation_date", "lookback_days", "label", "target"):
        if getattr(first, field) != getattr(other, field):
            return f"{field} {getattr(first, field)} against {getattr(other, field)}"
    for one, two in zip(first.features, other.features, strict=False):
        if one != two:
            return f"feature '{one.name}': {one.model_dump()} against {two.model_dump()}"
    return f"features {first.output_names} against {other.output_names}"


def adapter(task: Task | str, spec: FeatureSpec | None = None) -> TaskAdapter:
    """The adapter of `task`, bound to the job's resolved `spec` when given."""
    try:
        known = Task(task)
    except ValueError:
        raise ConfigurationError(
            f"unknown task '{task}'; choose one of {', '.join(t.value for t in Task)}"
        ) from None
    if known is Task.LTV:
        return SpendTask(known, spec)
    return BinaryTask(known, spec)
