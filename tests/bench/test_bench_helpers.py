"""The pure helpers of the utility and query benchmarks: metrics, weighting, the fractional fit, the
exact pooled answers and the Markdown they render. No benchmark runs here."""

from __future__ import annotations

import math
from datetime import datetime

import numpy as np
import pandas as pd
import pytest

from bench.datasets import spread
from bench.queries import binned_counts, cell_errors, cell_of, rfm_values
from bench.queries import markdown as queries_markdown
from bench.utility import (
    fit_logistic,
    markdown,
    metric,
    plain_fedavg,
    predictions,
    scored_units,
    weighted_mean,
)
from clients.features import FeatureMatrix
from clients.pipeline import PreparedUnit
from federation.features import FeatureSpec, FutureSpend, Numeric
from federation.job import Job, Task
from federation.queries import QuerySpec
from federation.tasks import adapter


def _matrix(labels: list[float], features: list[list[float]] | None = None) -> FeatureMatrix:
    rows = features if features is not None else [[0.0]] * len(labels)
    return FeatureMatrix(
        np.array([f"c{i}" for i in range(len(labels))]),
        np.asarray(rows, dtype=np.float32),
        np.asarray(labels, dtype=np.float32),
    )


def _unit(name: str, train: list[float], test: list[float], **excluded: int) -> PreparedUnit:
    return PreparedUnit(
        unit=name,
        purpose="response_model",
        train=_matrix(train),
        test=_matrix(test),
        excluded=excluded,
        columns_used=(),
        columns_dropped=(),
        quality={},
        encrypted_at_rest=False,
    )


def _ltv_task():
    spec = FeatureSpec(
        features=(Numeric(name="x", column="customers.x", lower=0.0, upper=1.0),),
        target=FutureSpend(amount="transactions.amount", horizon_days=182, upper=100.0),
        observation_date=datetime(1998, 1, 1),
        lookback_days=365,
        label="transactions.amount",
    )
    return adapter(Task.LTV, spec)


def test_weighted_mean_weights_each_unit_by_its_held_out_customers() -> None:
    assert weighted_mean([0.6, 0.9], [100, 300]) == pytest.approx(0.825)


def test_auc_is_undefined_on_a_held_out_set_with_one_class() -> None:
    task = adapter(Task.RESPONSE)
    assert metric(task, _matrix([0, 0, 0]), np.array([0.1, 0.2, 0.3])) is None
    assert metric(task, _matrix([0, 1, 0, 1]), np.array([0.1, 0.8, 0.3, 0.9])) == 1.0
    assert metric(task, _matrix([]), np.array([])) is None


def test_rmse_is_in_the_amounts_units() -> None:
    task = _ltv_task()
    # scaled labels 0 and 1 are spends 0 and 100 (the declared upper bound)
    value = metric(task, _matrix([0.0, 1.0]), np.array([10.0, 70.0]))
    assert value == pytest.approx(math.sqrt((10.0**2 + 30.0**2) / 2))


def test_units_without_customers_or_with_one_class_are_left_out_with_the_reason() -> None:
    units = [
        _unit("minors", [], [], minor=123, revoked=0),
        _unit("fine", [0, 1, 0], [1, 0]),
        _unit("one_class_test", [0, 1], [0, 0]),
        _unit("one_class_train", [0, 0], [0, 1]),
    ]
    scored, skipped = scored_units(adapter(Task.RESPONSE), units)
    assert scored == [1]
    assert skipped == {
        "minors": "no eligible customer; the pipeline excluded minor 123 "
        "(the minors rule: no guardian's consent)",
        "one_class_test": "one class only among its held-out customers",
        "one_class_train": "one class only among its training customers",
    }


def test_fractional_fit_equals_the_fit_on_the_mean_label_of_identical_rows() -> None:
    # Ten identical customers with scaled spend 0.3: the fitted probability is 0.3 (up to the
    # L2 penalty, small next to ten customers' loss).
    features = np.zeros((10, 1), dtype=np.float32)
    labels = np.full(10, 0.3, dtype=np.float32)
    parameters = fit_logistic(features, labels)
    assert [p.shape for p in parameters] == [(1, 1), (1,)]
    assert predictions(adapter(Task.CHURN), parameters, features)[0] == pytest.approx(0.3, abs=1e-3)


def test_logistic_fit_ranks_customers_by_the_feature_that_separates_them() -> None:
    rng = np.random.default_rng(0)
    features = rng.random((400, 2)).astype(np.float32)
    labels = (features[:, 0] > 0.5).astype(np.float32)
    parameters = fit_logistic(features, labels)
    task = adapter(Task.RESPONSE)
    test = _matrix(labels.tolist(), features.tolist())
    assert metric(task, test, predictions(task, parameters, features)) > 0.99


def test_plain_fedavg_learns_a_separable_label_across_units_of_different_sizes() -> None:
    rng = np.random.default_rng(1)
    spec = FeatureSpec(
        features=(
            Numeric(name="x", column="customers.x", lower=0.0, upper=1.0),
            Numeric(name="y", column="customers.y", lower=0.0, upper=1.0),
        ),
        label="customers.label",
    )
    job = Job(task=Task.RESPONSE, features=spec)
    units = []
    for size in (50, 400):
        features = rng.random((size, 2)).astype(np.float32)
        units.append(_matrix((features[:, 0] > 0.5).tolist(), features.tolist()))
    task = adapter(Task.RESPONSE)
    parameters = plain_fedavg(task, job, [*units, _matrix([])], seed=1)
    assert [p.shape for p in parameters] == [(1, 2), (1,)]
    assert parameters[0][0, 0] > abs(parameters[0][0, 1])
    test = units[1]
    assert metric(task, test, predictions(task, parameters, test.features)) > 0.95


def test_spread_gives_mean_and_range_over_seeds() -> None:
    assert spread([1.0, 2.0, 4.0]) == {
        "mean": pytest.approx(7 / 3),
        "min": 1.0,
        "max": 4.0,
        "runs": [1.0, 2.0, 4.0],
    }


def _figures(metric_name: str = "auc") -> dict:
    one = {"mean": 0.70, "min": 0.70, "max": 0.70, "runs": [0.70]}
    return {
        "data": "Toy",
        "split_by": "region",
        "task": "response",
        "metric": metric_name,
        "privacy_unit": "record",
        "defaults": {"rounds": 5, "delta": 1e-6, "training": {"learning_rate": 2.0}},
        "units": {
            "a": {"display_name": "A", "train": 8, "test": 2, "label_mean": 0.5, "excluded": {}},
            "kids": {
                "display_name": "1",
                "train": 0,
                "test": 0,
                "label_mean": None,
                "excluded": {"minor": 5},
            },
        },
        "scored_units": ["a"],
        "skipped_units": {"kids": "no eligible customer (the pipeline excluded 5 minor)"},
        "centralised": {"all": 0.75, "per_unit": 0.74},
        "local_only": {"per_unit": 0.72},
        "federated": {"all": one, "per_unit": one},
        "dp": {
            "1": {
                "all": {"mean": 0.73, "min": 0.72, "max": 0.74, "runs": [0.72, 0.74]},
                "per_unit": one,
                "reported": one,
                "epsilon_spent": {"a": 0.99},
                "refused": {"kids": "no eligible customer"},
            },
            "3": {
                "all": one,
                "per_unit": one,
                "reported": one,
                "epsilon_spent": {"a": 2.98},
                "refused": {},
            },
        },
    }


def test_utility_markdown_shows_every_model_the_gaps_and_the_excluded_unit() -> None:
    text = markdown(_figures())
    assert "| centralised logistic regression (pooled, non-private) | 0.7500 | 0.7400 |" in text
    assert (
        "| silofed DP, epsilon=1 per BU | 0.7300 (0.7200-0.7400) | 0.7000 | 0.7000 | 0.990 |"
        in (text)
    )
    assert "DP epsilon=3 minus centralised: -0.0500" in text
    assert "DP epsilon=3 per-BU weighted minus local-only: -0.0200" in text
    assert "`kids` (1) left out: no eligible customer (the pipeline excluded 5 minor)." in text
    assert "Refused silofed's DP runs (no eligible customer, so no part in them): `kids`." in text
    assert "| kids | 1 | 0 | 0 |  | minor 5 |" in text


def test_utility_markdown_names_the_regression_model_and_rmse() -> None:
    text = markdown(_figures("rmse"))
    assert "centralised fractional logistic regression" in text
    assert "RMSE, all held-out customers" in text and "lower is better" in text


def test_answer_errors_and_coverage() -> None:
    answer = {"name": "n", "group": {"c": "x"}, "value": 110, "interval": [95, 125]}
    assert cell_of(answer) == ("n", ("x",), "")
    assert cell_errors(answer, 100.0) == {"abs_error": 10.0, "rel_error": 0.1, "covered": True}
    assert cell_errors(answer, 90.0)["covered"] is False
    assert cell_errors(answer, 0.0)["rel_error"] is None
    missing = {**answer, "value": None, "interval": [None, None]}
    assert cell_errors(missing, 1.0) == {"abs_error": None, "rel_error": None, "covered": False}


def test_bins_are_closed_left_and_the_last_is_closed_with_ends_clipped() -> None:
    values = pd.Series([-5.0, 0.0, 0.99, 1.0, 2.0, 3.0, 7.0])
    assert binned_counts(values, (0.0, 1.0, 2.0, 3.0)).tolist() == [3.0, 1.0, 3.0]


def test_rfm_values_over_the_query_window() -> None:
    spec = QuerySpec.model_validate(
        {
            "purpose": "analytics",
            "observation_date": "1998-06-30",
            "lookback_days": 100,
            "aggregates": [{"kind": "count", "name": "n"}],
        }
    )
    customers = pd.DataFrame({"customer_id": ["a", "b", "c"]})
    purchases = pd.DataFrame(
        {
            "customer_id": ["a", "a", "b", "a"],
            "timestamp": pd.to_datetime(["1998-06-20", "1998-06-30", "1998-01-01", "1998-07-01"]),
            "amount": [10.0, 30.0, 99.0, 1000.0],
        }
    )
    values = rfm_values(spec, [{"customers": customers, "transactions": purchases}], "customer_id")
    assert values.to_dict("list") == {
        "recency": [0.0, 100.0, 100.0],
        "frequency": [2.0, 0.0, 0.0],
        "monetary": [20.0, 0.0, 0.0],
    }


def test_queries_markdown_reports_coverage_and_cell_errors() -> None:
    figures = {
        "epsilons": ["1"],
        "seeds": [1],
        "queries": {
            "q": {
                "title": "Toy funnel",
                "customers": 1000,
                "summary": {
                    "1": {
                        "answers": 2,
                        "coverage": 0.5,
                        "median_rel_error": 0.05,
                        "max_rel_error": 0.1,
                        "without_value": 0,
                    }
                },
                "cells": [
                    {
                        "name": "viewed",
                        "group": ["new"],
                        "bin": "",
                        "exact": 100.0,
                        "errors": {"1": {"abs_error": 5.0, "rel_error": 0.05, "covered": 1.0}},
                    }
                ],
            }
        },
    }
    text = queries_markdown(figures)
    assert "| 1 | 2 | 50.0% | 0.05 | 0.1 | 0 |" in text
    assert "| viewed | new | - | 100 | 5 | 0.05 |" in text
