"""The task adapters: each task's label, features (from declared schemas only), model, loss,
predictions and metrics; and the features and labels a BU computes from them."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from clients.features import compute_features
from clients.silo import load_silo
from clients.training import entropy_generator, train_dp_sgd
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
    churn_features,
    purpose_features,
    resolve_feature_spec,
)
from federation.job import DEFAULT_PURPOSE, Evaluation, Task, Training
from federation.models import build_model, initial_parameters, predict_proba, set_parameters
from federation.tasks import LTV_HORIZON_DAYS, BinaryTask, SpendTask, adapter
from privacy.errors import ConfigurationError, PolicyViolation
from privacy.schema import ColumnRole, ColumnSpec, ColumnType, PurposePolicy, TableSpec
from privacy.unit_config import UnitConfig
from simulations.synthetic import (
    CHANNELS,
    GENDERS,
    GROUND_TRUTH,
    MANIFEST,
    PERIOD_END,
    PRODUCTS,
    REGIONS,
    SIGNUP_START,
    read_ceiling,
    unit_schema,
)


def _with_purpose(config: UnitConfig, purpose: str, policy: PurposePolicy) -> UnitConfig:
    return UnitConfig.model_validate(
        {
            **config.model_dump(),
            "purposes": {**config.model_dump()["purposes"], purpose: policy.model_dump()},
        }
    )


def _tabular(unit: str = "bank", **overrides: ColumnSpec) -> UnitConfig:
    """A customers-only schema like a split of UCI Bank Marketing."""
    columns = {
        "record_id": ColumnSpec(type=ColumnType.STRING, role=ColumnRole.IDENTIFIER),
        "age": ColumnSpec(
            type=ColumnType.INTEGER, role=ColumnRole.QUASI_IDENTIFIER, lower=18, upper=95
        ),
        "balance": ColumnSpec(type=ColumnType.INTEGER, lower=-8100, upper=110000),
        "housing": ColumnSpec(type=ColumnType.CATEGORY, domain=("no", "yes")),
        "vip": ColumnSpec(type=ColumnType.BOOLEAN, nullable=True),
        "religion": ColumnSpec(
            type=ColumnType.CATEGORY,
            role=ColumnRole.SPECIAL_CATEGORY,
            sensitive="religious_beliefs",
            domain=("a", "b"),
        ),
        "y": ColumnSpec(type=ColumnType.BOOLEAN, role=ColumnRole.LABEL),
        **overrides,
    }
    features = tuple(f"customers.{c}" for c in columns if c not in ("record_id", "y", "religion"))
    return UnitConfig(
        unit=unit,
        tables={"customers": TableSpec(file="customers.csv", columns=columns, key="record_id")},
        purposes={
            "response_model": PurposePolicy(
                join_keys=("customers.record_id",), features=features, label="customers.y"
            )
        },
    )


# --- the churn task keeps its features ------------------------------------------------------------


def test_churn_spec_on_the_synthetic_silos_is_what_it_has_always_been() -> None:
    schema = unit_schema("retail_stores")
    spec = adapter(Task.CHURN).feature_spec([schema], "churn_model")

    # The spec of the churn task before the adapters existed, written out.
    assert spec == FeatureSpec(
        observation_date=PERIOD_END,
        lookback_days=365,
        label="customers.churned",
        features=(
            Recency(name="recency", upper_days=365),
            Frequency(name="frequency", upper=52.0),
            Monetary(name="monetary", upper=5000.0),
            Tenure(name="tenure", upper_days=float((PERIOD_END - SIGNUP_START).days)),
            ChannelMix(name="channel", domain=CHANNELS),
            Numeric(name="age", column="customers.age", lower=14.0, upper=100.0),
            Categorical(name="gender", column="customers.gender", domain=GENDERS),
            Categorical(name="region", column="customers.region", domain=REGIONS),
        ),
    )
    assert churn_features(schema) == spec
    assert resolve_feature_spec("churn", [schema, unit_schema("telecom")]) == spec
    assert spec.dim == 17


def test_response_spec_reads_the_response_purpose_and_its_label() -> None:
    spec = resolve_feature_spec("response", [unit_schema("ecommerce")])

    assert spec.label == "customers.responded"
    assert spec.target is None
    assert [f.name for f in spec.features] == [
        "recency",
        "frequency",
        "monetary",
        "tenure",
        "category",
        "age",
        "gender",
        "region",
    ]
    assert spec.output_names[4:9] == tuple(f"category={p}" for p in PRODUCTS)
    assert spec.observation_date == PERIOD_END


def test_ltv_spec_observes_before_the_horizon_and_targets_the_spend_after_it() -> None:
    spec = resolve_feature_spec("ltv", [unit_schema("ecommerce"), unit_schema("insurance")])

    observed = datetime(2025, 7, 2)  # 2025-12-31 minus 182 days
    assert spec.observation_date == observed
    assert spec.lookback_days == 365
    assert spec.label == "transactions.amount"
    assert spec.target == FutureSpend(horizon_days=LTV_HORIZON_DAYS, upper=5000.0)
    assert spec.features == (
        Recency(name="recency", upper_days=365),
        Frequency(name="frequency", upper=52.0),
        Monetary(name="monetary", upper=5000.0),
        Tenure(name="tenure", upper_days=float((observed - SIGNUP_START).days)),
    )
    assert set(spec.columns) == {
        "transactions.timestamp",
        "transactions.amount",
        "customers.signup_date",
    }


# --- errors name the unit, the purpose, the column and the fix ------------------------------------


def test_units_that_disagree_on_a_domain_are_refused_naming_both() -> None:
    other = unit_schema("telecom").model_dump()
    other["tables"]["customers"]["columns"]["region"]["domain"] = ["north", "south"]
    with pytest.raises(
        ConfigurationError, match=r"'retail_stores' and 'telecom'.*feature 'region'"
    ):
        adapter("churn").feature_spec(
            [unit_schema("retail_stores"), UnitConfig.model_validate(other)], "churn_model"
        )


def test_no_schema_and_unknown_task_and_undeclared_purpose_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="no BU schema"):
        adapter("response").feature_spec([], "response_model")
    with pytest.raises(ConfigurationError, match=r"unknown task 'uplift'.*churn, response, ltv"):
        adapter("uplift")
    with pytest.raises(ConfigurationError, match="unknown task 'uplift'"):
        resolve_feature_spec("uplift", [unit_schema("x")])
    with pytest.raises(ConfigurationError, match="not declared purpose 'ltv_model'"):
        adapter("ltv").feature_spec([_tabular()], "ltv_model")


def test_a_binary_task_needs_a_boolean_customers_label() -> None:
    schema = unit_schema("retail_stores")
    unlabelled = _with_purpose(schema, "response_model", PurposePolicy(features=("customers.age",)))
    with pytest.raises(ConfigurationError, match=r"purpose 'response_model'.*needs a label"):
        adapter("response").feature_spec([unlabelled], "response_model")
    numeric = _with_purpose(
        schema,
        "response_model",
        PurposePolicy(features=("customers.region",), label="customers.age"),
    )
    with pytest.raises(ConfigurationError, match=re.escape("'customers.age' must be a boolean")):
        adapter("response").feature_spec([numeric], "response_model")


def test_the_ltv_task_needs_a_bounded_transactions_amount_as_label() -> None:
    schema = unit_schema("retail_stores")
    policy = schema.policy("ltv_model")
    wrong = _with_purpose(
        schema, "ltv_model", policy.model_copy(update={"label": "customers.churned"})
    )
    with pytest.raises(ConfigurationError, match="numeric column of the transactions"):
        adapter("ltv").feature_spec([wrong], "ltv_model")
    none = _with_purpose(schema, "ltv_model", policy.model_copy(update={"label": None}))
    with pytest.raises(ConfigurationError, match=re.escape('label = "transactions.amount"')):
        adapter("ltv").feature_spec([none], "ltv_model")
    data = schema.model_dump()
    data["tables"]["transactions"]["columns"]["amount"].update(lower=None, upper=None)
    with pytest.raises(ConfigurationError, match="declare lower = 0"):
        adapter("ltv").feature_spec([UnitConfig.model_validate(data)], "ltv_model")
    no_time = _with_purpose(
        schema, "ltv_model", policy.model_copy(update={"features": ("transactions.amount",)})
    )
    with pytest.raises(ConfigurationError, match=re.escape("allow 'transactions.timestamp'")):
        adapter("ltv").feature_spec([no_time], "ltv_model")


def test_a_period_shorter_than_the_horizon_is_refused() -> None:
    data = unit_schema("retail_stores").model_dump()
    data["tables"]["transactions"]["columns"]["timestamp"]["lower"] = datetime(2025, 10, 1)
    with pytest.raises(ConfigurationError, match="not longer than the ltv task's horizon of 182"):
        adapter("ltv").feature_spec([UnitConfig.model_validate(data)], "ltv_model")


def test_features_without_declared_bounds_or_encodable_type_are_refused() -> None:
    unbounded = _tabular(balance=ColumnSpec(type=ColumnType.INTEGER))
    with pytest.raises(
        ConfigurationError, match=re.escape("'customers.balance' by its declared bounds")
    ):
        adapter("response").feature_spec([unbounded], "response_model")
    text = _tabular(balance=ColumnSpec(type=ColumnType.STRING))
    with pytest.raises(ConfigurationError, match=r"'customers.balance' \(string\) cannot be"):
        adapter("response").feature_spec([text], "response_model")


def test_a_purpose_naming_an_undeclared_column_is_refused_by_the_schema() -> None:
    with pytest.raises(PolicyViolation, match=re.escape("customers.income")):
        _with_purpose(
            _tabular(),
            "response_model",
            PurposePolicy(features=("customers.income",), label="customers.y"),
        )


# --- tabular features (a customers table without time) --------------------------------------------


def test_tabular_features_follow_the_declared_types_and_bounds() -> None:
    spec = adapter("response").feature_spec([_tabular("a"), _tabular("b")], "response_model")

    assert spec.observation_date is None and spec.lookback_days is None
    assert spec.label == "customers.y"
    assert spec.features == (
        Numeric(name="age", column="customers.age", lower=18.0, upper=95.0),
        # range 118,100 > 100: a heavy-tailed amount, on a log scale
        Numeric(
            name="balance",
            column="customers.balance",
            lower=-8100.0,
            upper=110000.0,
            log_scale=True,
        ),
        Categorical(name="housing", column="customers.housing", domain=("no", "yes")),
        Numeric(name="vip", column="customers.vip", lower=0.0, upper=1.0),
    )
    customers = pd.DataFrame(
        {
            "record_id": ["r1", "r2", "r3"],
            "age": [18, 95, 200],
            "balance": [-8100, 110000, np.nan],
            "housing": ["yes", "no", None],
            "vip": [True, False, None],
            "y": [True, False, True],
        }
    )
    matrix = compute_features({"customers": customers}, spec, customer_key="record_id")
    np.testing.assert_array_equal(
        matrix.features,
        np.array(
            [
                [0, 0, 0, 1, 1],
                [1, 1, 1, 0, 0],
                [1, 0, 0, 0, 0],  # age clipped; missing number: its lower bound; missing: none
            ],
            dtype=np.float32,
        ),
    )
    np.testing.assert_array_equal(matrix.labels, [1.0, 0.0, 1.0])


def test_a_customers_date_without_transactions_observes_at_its_declared_end() -> None:
    joined = ColumnSpec(
        type=ColumnType.DATE, lower=datetime(2020, 1, 1), upper=datetime(2020, 12, 31)
    )
    spec = adapter("response").feature_spec([_tabular(joined=joined)], "response_model")
    assert spec.observation_date == datetime(2020, 12, 31)
    assert Tenure(name="tenure", signup="customers.joined", upper_days=365.0) in spec.features


# --- labels computed in the BU --------------------------------------------------------------------


def test_future_spend_is_clipped_and_scaled_and_inverts() -> None:
    target = FutureSpend(horizon_days=30, upper=400.0)
    np.testing.assert_allclose(target.scale([0.0, 100.0, 400.0, 900.0, -5.0]), [0, 0.5, 1, 1, 0])
    spend = np.array([0.0, 3.5, 100.0, 399.0, 1000.0])
    np.testing.assert_allclose(target.natural(target.scale(spend)), np.minimum(spend, 400.0))
    np.testing.assert_allclose(target.natural([-0.2, 1.3]), [0.0, 400.0])


def test_ltv_label_is_the_spend_in_the_window_after_the_observation_date() -> None:
    spec = FeatureSpec(
        observation_date=datetime(2024, 6, 30),
        lookback_days=180,
        label="transactions.amount",
        target=FutureSpend(horizon_days=10, upper=400.0),
        features=(Monetary(name="monetary", upper=400.0),),
    )
    customers = pd.DataFrame({"customer_id": ["a", "b", "c"]})
    transactions = pd.DataFrame(
        {
            "customer_id": ["a", "a", "a", "a", "b", "b"],
            "timestamp": pd.to_datetime(
                [
                    "2024-06-30",  # the observation date: a feature, not the label
                    "2024-07-01",
                    "2024-07-10",  # the window's last day: in the label
                    "2024-07-11",  # after the window: neither
                    "2024-07-05",
                    "2024-07-06",
                ]
            ),
            "amount": [50.0, 25.0, 75.0, 1000.0, 300.0, 200.0],
        }
    )
    matrix = compute_features({"customers": customers, "transactions": transactions}, spec)
    np.testing.assert_allclose(
        matrix.labels, np.sqrt([100.0 / 400.0, 1.0, 0.0]), rtol=1e-6
    )  # b's 500 is clipped to 400
    np.testing.assert_allclose(
        matrix.features[:, 0], [np.log1p(50.0) / np.log1p(400.0), 0.0, 0.0], rtol=1e-6
    )


def test_a_spec_needs_the_time_its_features_read() -> None:
    with pytest.raises(ValueError, match="lookback_days"):
        FeatureSpec(
            observation_date=datetime(2024, 1, 1), features=(Recency(name="r", upper_days=9),)
        )
    with pytest.raises(ValueError, match="observation_date"):
        FeatureSpec(features=(Tenure(name="t", upper_days=9),))
    with pytest.raises(ValueError, match="must name the target's amount"):
        FeatureSpec(
            observation_date=datetime(2024, 1, 1),
            lookback_days=9,
            label="customers.x",
            target=FutureSpend(horizon_days=5, upper=1.0),
            features=(Recency(name="r", upper_days=9),),
        )


# --- models, losses, predictions ------------------------------------------------------------------


def test_adapters_declare_their_kind_metrics_and_model() -> None:
    assert isinstance(adapter(Task.CHURN), BinaryTask)
    assert isinstance(adapter("ltv"), SpendTask)
    assert adapter("response").kind == "binary"
    assert adapter("response").metrics == ("auc", "log_loss", "brier")
    assert adapter("ltv").kind == "regression"
    assert adapter("ltv").metrics == ("rmse", "mae")
    for task in Task:
        model = adapter(task).build_model(7)
        assert [tuple(t.shape) for t in model.state_dict().values()] == [(1, 7), (1,)]
        assert type(build_model(task, 7)) is type(model)
        assert [a.shape for a in initial_parameters(task, 7)] == [(1, 7), (1,)]
        assert DEFAULT_PURPOSE[task] in unit_schema("x").purposes


def test_losses_are_per_customer() -> None:
    outputs = torch.tensor([0.0, 2.0, -1.0])
    labels = torch.tensor([1.0, 0.0, 0.25])
    for task in Task:
        values = adapter(task).loss()(outputs, labels)
        assert values.shape == (3,)
    expected = nn.functional.binary_cross_entropy_with_logits(outputs, labels, reduction="none")
    torch.testing.assert_close(adapter("ltv").loss()(outputs, labels), expected)


def _model(weights: list[float], bias: float) -> nn.Module:
    model = nn.Linear(len(weights), 1)
    set_parameters(model, [np.array([weights], dtype=np.float32), np.array([bias], np.float32)])
    return model


def test_binary_predictions_are_probabilities_and_labels_stay_as_they_are() -> None:
    model = _model([2.0, -1.0], 0.5)
    features = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    expected = 1 / (1 + np.exp(-np.array([0.5, 2.5, -0.5])))
    task = adapter("response")
    np.testing.assert_allclose(task.predict(model, features), expected, rtol=1e-6)
    np.testing.assert_array_equal(predict_proba(model, features), task.predict(model, features))
    np.testing.assert_array_equal(task.natural_labels(np.array([0.0, 1.0])), [0.0, 1.0])
    assert (
        task.upper is None
        and task.upper_of(resolve_feature_spec("churn", [unit_schema("x")])) is None
    )


def test_ltv_predictions_and_labels_are_in_natural_units_once_bound_to_the_spec() -> None:
    spec = resolve_feature_spec("ltv", [unit_schema("x")])
    model = _model([0.0, 0.0, 0.0, 0.0], 0.0)  # sigmoid(0) = 0.5: a quarter of the upper bound
    features = np.zeros((2, spec.dim), dtype=np.float32)
    with pytest.raises(ConfigurationError, match=r"adapter\(job.task, job.feature_spec\)"):
        adapter("ltv").predict(model, features)
    with pytest.raises(ConfigurationError, match="feature spec"):
        _ = adapter("ltv").upper
    task = adapter("ltv", spec)
    np.testing.assert_allclose(task.predict(model, features), [1250.0, 1250.0])
    np.testing.assert_allclose(task.natural_labels(np.array([0.0, 0.1, 1.0])), [0, 50.0, 5000.0])
    assert task.upper == task.upper_of(spec) == 5000.0
    churn_spec = resolve_feature_spec("churn", [unit_schema("x")])
    with pytest.raises(ConfigurationError, match="no regression target"):
        adapter("ltv").upper_of(churn_spec)


def test_ltv_trains_with_dp_sgd_on_the_synthetic_silos(small_silos: Path) -> None:
    configs = [UnitConfig.load(p) for p in sorted(small_silos.glob("*/bu.toml"))]
    spec = adapter("ltv").feature_spec(configs, "ltv_model")
    task = adapter("ltv", spec)
    silo = load_silo(configs[0])
    matrix = compute_features(silo.tables, spec)
    assert 0.0 < matrix.labels.mean() < 1.0 and matrix.labels.max() <= 1.0
    parameters = initial_parameters(Task.LTV, spec.dim)
    for round_ in range(3):
        update = train_dp_sgd(
            task.build_model(spec.dim),
            parameters,
            matrix.features,
            matrix.labels,
            Training(expected_batch_size=64),
            0.8,
            (),
            entropy_generator(round_),
            loss=task.loss(),
        )
        parameters = update.parameters
    model = task.build_model(spec.dim)
    set_parameters(model, parameters)
    natural = task.natural_labels(matrix.labels)
    rmse = float(np.sqrt(np.mean((task.predict(model, matrix.features) - natural) ** 2)))
    untrained = task.predict(task.build_model(spec.dim), matrix.features) * 0  # predicts 0
    assert rmse < float(np.sqrt(np.mean((untrained - natural) ** 2)))


def test_the_binary_loss_trains_exactly_as_before() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((300, 4)).astype(np.float32)
    y = (rng.random(300) < 0.3).astype(np.float32)
    training = Training(expected_batch_size=32)
    params = initial_parameters(Task.CHURN, 4)
    default, explicit = (
        train_dp_sgd(
            build_model(Task.CHURN, 4), params, x, y, training, 1.1, (), entropy_generator(3), **kw
        )
        for kw in ({}, {"loss": adapter("churn").loss()})
    )
    for a, b in zip(default.parameters, explicit.parameters, strict=True):
        np.testing.assert_array_equal(a, b)


def test_purpose_features_never_use_identifiers_special_categories_or_the_label() -> None:
    schema = _tabular()
    spec = purpose_features(
        schema, "response_model", task="response", label="customers.y", target=None
    )
    used = set(spec.columns)
    assert "customers.record_id" not in used and "customers.religion" not in used
    assert [f.name for f in spec.features] == ["age", "balance", "housing", "vip"]


# --- the synthetic BUs' labels --------------------------------------------------------------------


def test_the_response_label_comes_from_its_own_stream_and_churn_data_is_unchanged(
    small_silos: Path,
) -> None:
    manifest = json.loads((small_silos / MANIFEST).read_text())
    # The churn ceiling of these silos (seed 7) before the response label existed.
    assert manifest["auc_ceiling"]["value"] == pytest.approx(0.9128781125571998, abs=1e-15)
    assert read_ceiling(small_silos, Evaluation()) == manifest["auc_ceiling"]["value"]
    response = read_ceiling(small_silos, Evaluation(), task=Task.RESPONSE)
    assert response == manifest["response"]["auc_ceiling"]["value"]
    assert 0.75 < response < 0.95
    assert read_ceiling(small_silos, Evaluation(), task=Task.LTV) is None
    truth = pd.read_parquet(small_silos / GROUND_TRUTH)
    config = UnitConfig.load(small_silos / "ecommerce" / "bu.toml")
    customers = load_silo(config).tables["customers"]
    mine = truth[truth["unit"] == "ecommerce"]
    assert customers["responded"].tolist() == mine["responded"].tolist()
    assert 0.05 < mine["responded"].mean() < 0.4
    consent = pd.read_parquet(small_silos / "ecommerce" / "consent.parquet")
    assert set(consent["purpose"]) == set(config.purposes)
