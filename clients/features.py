"""Feature engineering inside a BU: RFM, tenure, channel mix and customer attributes, and labels.

One row per customer (the privacy unit), computed from the customer's own rows only, scaled to
[0, 1] with the public bounds and domains of a `FeatureSpec`. No statistic of the BU's data (mean,
standard deviation, observed categories, observed maximum) enters the scaling; a missing number
counts as its declared lower bound, a missing category as none of the domain's values.

The label is a boolean customers column, or (`FeatureSpec.target`) the customer's spend in the
window after the observation date, scaled as the target says.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from federation.features import (
    Categorical,
    ChannelMix,
    FeatureSpec,
    Frequency,
    FutureSpend,
    Monetary,
    Numeric,
    Recency,
    Tenure,
)
from federation.ranges import apply_ranges
from privacy.frames import among

_DAY = pd.Timedelta(days=1)


@dataclass(frozen=True)
class FeatureMatrix:
    customer_ids: np.ndarray  # str, one per row
    features: np.ndarray  # float32, (customers, spec.dim)
    labels: np.ndarray  # float32: {0, 1} for a binary label, [0, 1] for a scaled target


def _column(tables: dict[str, pd.DataFrame], qualified: str) -> pd.Series:
    table, _, name = qualified.partition(".")
    return tables[table][name]


def _unit_scale(values: np.ndarray, lower: float, upper: float, *, log: bool = False) -> np.ndarray:
    clipped = np.clip(values.astype(np.float64), lower, upper)
    if log:
        return np.log1p(clipped - lower) / np.log1p(upper - lower)
    return (clipped - lower) / (upper - lower)


def _one_hot(values: pd.Series, domain: tuple[str, ...]) -> np.ndarray:
    codes = pd.Categorical(values.astype("string"), categories=list(domain)).codes
    out = np.zeros((len(values), len(domain)), dtype=np.float64)
    rows = np.flatnonzero(codes >= 0)
    out[rows, codes[rows]] = 1.0
    return out


def compute_features(
    tables: dict[str, pd.DataFrame], spec: FeatureSpec, *, customer_key: str = "customer_id"
) -> FeatureMatrix:
    """The feature matrix of every customer in `tables["customers"]`, in that table's order."""
    customers = tables["customers"]
    ids = customers[customer_key].astype(str)
    index = pd.Index(ids)
    observed = pd.Timestamp(spec.observation_date) if spec.observation_date is not None else None
    start = observed - spec.lookback_days * _DAY if spec.lookback_days is not None else None

    tx = tables.get("transactions")
    per_customer = None
    if tx is not None and any(
        isinstance(f, Recency | Frequency | Monetary | ChannelMix) for f in spec.features
    ):
        window = tx[(tx["timestamp"] > start) & (tx["timestamp"] <= observed)]
        window = window[among(window[customer_key].astype(str), index)]
        per_customer = window.assign(_id=window[customer_key].astype(str)).groupby("_id")

    blocks: list[np.ndarray] = []
    for feature in spec.features:
        if isinstance(feature, Numeric):
            values = pd.to_numeric(_column(tables, feature.column).astype("Float64"))
            block = _unit_scale(
                values.to_numpy(dtype=np.float64, na_value=feature.lower),
                feature.lower,
                feature.upper,
                log=feature.log_scale,
            )
        elif isinstance(feature, Categorical):
            block = _one_hot(_column(tables, feature.column), feature.domain)
        elif isinstance(feature, Tenure):
            signup = pd.to_datetime(_column(tables, feature.signup))
            days = ((observed - signup) / _DAY).to_numpy()
            block = _unit_scale(days, 0.0, feature.upper_days)
        elif isinstance(feature, Recency):
            last = (
                per_customer["timestamp"].max().reindex(index) if per_customer is not None else None
            )
            days = (
                ((observed - last) / _DAY).to_numpy()
                if last is not None
                else np.full(len(ids), np.nan)
            )
            days = np.where(np.isnan(days), feature.upper_days, days)
            block = _unit_scale(days, 0.0, feature.upper_days)
        elif isinstance(feature, Frequency):
            counts = (
                per_customer.size().reindex(index, fill_value=0).to_numpy()
                if per_customer is not None
                else np.zeros(len(ids))
            )
            block = _unit_scale(counts, 0.0, feature.upper, log=True)
        elif isinstance(feature, Monetary):
            mean = (
                per_customer[feature.amount.partition(".")[2]]
                .mean()
                .reindex(index)
                .fillna(0.0)
                .to_numpy()
                if per_customer is not None
                else np.zeros(len(ids))
            )
            block = _unit_scale(mean, 0.0, feature.upper, log=True)
        elif isinstance(feature, ChannelMix):
            if per_customer is not None:
                channel = feature.channel.partition(".")[2]
                counts = (
                    per_customer[channel]
                    .value_counts()
                    .unstack(fill_value=0)
                    .reindex(index=index, columns=list(feature.domain), fill_value=0)
                    .to_numpy(dtype=np.float64)
                )
                totals = counts.sum(axis=1, keepdims=True)
                block = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
            else:
                block = np.zeros((len(ids), len(feature.domain)))
        else:  # pragma: no cover - the discriminated union is closed
            raise TypeError(f"unknown feature {feature!r}")
        blocks.append(block[:, None] if block.ndim == 1 else block)

    matrix = apply_ranges(np.concatenate(blocks, axis=1), spec)  # DP-derived windows, if any
    if spec.target is not None:
        labels = _future_spend(tables, spec.target, observed, index, customer_key)
    elif spec.label is not None:
        labels = _column(tables, spec.label).astype(bool).to_numpy().astype(np.float32)
    else:
        labels = np.zeros(len(ids), dtype=np.float32)
    return FeatureMatrix(customer_ids=ids.to_numpy(dtype=str), features=matrix, labels=labels)


def _future_spend(
    tables: dict[str, pd.DataFrame],
    target: FutureSpend,
    observed: pd.Timestamp,
    index: pd.Index,
    customer_key: str,
) -> np.ndarray:
    """Each customer's total amount in (observed, observed + horizon], scaled by `target`."""
    table, _, timestamp = target.timestamp.partition(".")
    amount = target.amount.partition(".")[2]
    rows = tables[table]
    end = observed + target.horizon_days * _DAY
    after = rows[(rows[timestamp] > observed) & (rows[timestamp] <= end)]
    spend = (
        after.groupby(after[customer_key].astype(str))[amount]
        .sum()
        .reindex(index, fill_value=0.0)
        .to_numpy(dtype=np.float64)
    )
    return target.scale(spend).astype(np.float32)
