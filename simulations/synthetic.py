"""Synthetic business units with a known ground truth.

A seeded generator of K BU silos that look like a company's customer data: per BU a customers table
(with a global person id so that a share of people are customers of several BUs, quasi-identifiers,
and special-category columns no purpose may use), a transactions table, consent events, a churn
label drawn from a known logistic model of the very features the churn task computes (RFM, tenure,
channel mix, age), and a campaign-response label drawn from another known logistic model of the
response task's features (RFM, tenure, product mix, age, region). BUs differ in size, behaviour and
therefore base rate (non-IID). Because the ground truth is known, the generator reports the Bayes
ceiling: the true model's AUC on the held-out test customers. The ltv task needs no drawn label: it
predicts the spend in the period's last months, which the transactions already hold.

The response label and the consent to the purposes added after the first version (`ltv_model`,
`segmentation`, `analytics`) come from a second random stream, so that the churn data, its consent
and its ground truth are what they were for the same seed.

Layout written under OUT/: `manifest.json`, `ground_truth.parquet` (simulation only, never read by a
BU), and one directory per BU with its `bu.toml`, `customers.*`, `transactions.*`, and `consent.*` (an
export of the BU's consent events, imported into the BU's consent registry before a run).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from clients.features import compute_features
from clients.pipeline import held_out
from federation.evaluation import exact_auc
from federation.features import churn_features
from federation.job import DEFAULT_PURPOSE, Evaluation, Task
from federation.tasks import adapter
from privacy.errors import ConfigurationError
from privacy.schema import ColumnRole, ColumnSpec, ColumnType, PurposePolicy, Sensitive, TableSpec
from privacy.unit_config import UNIT_CONFIG_FILE, UnitConfig

MANIFEST = "manifest.json"
GROUND_TRUTH = "ground_truth.parquet"

PERIOD_START = datetime(2024, 1, 1)
PERIOD_END = datetime(2025, 12, 31)
SIGNUP_START = datetime(2016, 1, 1)
CHANNELS = ("store", "online", "phone", "app")
REGIONS = ("north", "south", "east", "west", "central")
GENDERS = ("female", "male", "other")
PRODUCTS = ("groceries", "electronics", "fashion", "services", "insurance")
RELIGIONS = ("none", "christian", "muslim", "jewish", "hindu", "buddhist", "other")
HEALTH = ("none", "diabetes", "asthma", "cardiac", "other")
PURPOSES = ("churn_model", "response_model")  # consent drawn from the first random stream
LATER_PURPOSES = ("ltv_model", "segmentation", "analytics")  # from the second stream

# The churn ground truth: logit = intercept + sum(coefficient x feature), features in [0, 1] as the
# churn task computes them. Known, so the Bayes ceiling is known.
TRUE_INTERCEPT = -1.2
TRUE_COEFFICIENTS = {
    "recency": 4.0,
    "frequency": -2.5,
    "monetary": -1.0,
    "tenure": -1.2,
    "channel=online": 0.8,
    "channel=app": -0.6,
    "age": -1.0,
}
# The campaign-response ground truth, over the response task's features (see `unit_schema`).
RESPONSE_INTERCEPT = -2.5
RESPONSE_COEFFICIENTS = {
    "recency": -3.0,
    "frequency": 3.0,
    "tenure": 1.0,
    "category=electronics": 4.0,
    "category=insurance": -3.0,
    "age": -2.5,
    "region=north": 0.8,
}


@dataclass(frozen=True)
class UnitProfile:
    """How one kind of BU's customers behave; the differences make the BUs non-IID."""

    name: str
    size: float  # relative number of customers
    channels: tuple[float, ...]  # channel mix, CHANNELS order
    purchases_per_year: float
    amount_median: float
    age_mean: float
    dormancy_days: float  # mean days since a customer's last activity
    consent_rate: float


PROFILES = (
    UnitProfile("retail_stores", 1.3, (0.70, 0.15, 0.05, 0.10), 14.0, 45.0, 48, 120, 0.90),
    UnitProfile("ecommerce", 1.1, (0.02, 0.70, 0.03, 0.25), 9.0, 70.0, 36, 160, 0.85),
    UnitProfile("card_services", 1.0, (0.40, 0.35, 0.05, 0.20), 24.0, 60.0, 44, 90, 0.92),
    UnitProfile("telecom", 0.8, (0.25, 0.30, 0.30, 0.15), 6.0, 35.0, 41, 200, 0.88),
    UnitProfile("insurance", 0.7, (0.15, 0.30, 0.45, 0.10), 3.0, 220.0, 52, 260, 0.80),
)


def unit_names(units: int) -> list[str]:
    if units < 1:
        raise ConfigurationError(f"--units must be at least 1, got {units}")
    return [
        p.name if i < len(PROFILES) else f"{p.name}_{i // len(PROFILES) + 1}"
        for i, p in ((i, PROFILES[i % len(PROFILES)]) for i in range(units))
    ]


def declared_size(customers: int) -> int:
    """The size bound a generated BU declares (`max_customers`): the power of ten at or above
    twice its customers, room to grow without saying more about its size than that."""
    return 10 ** math.ceil(math.log10(2 * max(customers, 1)))


def unit_schema(
    unit: str, file_format: str = "parquet", *, max_customers: int | None = None
) -> UnitConfig:
    """The declared schema of a synthetic BU: types, roles, domains and bounds, and its purposes."""

    def col(type_: ColumnType, role: ColumnRole = ColumnRole.ATTRIBUTE, **kw) -> ColumnSpec:
        return ColumnSpec(type=type_, role=role, **kw)

    customers = {
        "customer_id": col(ColumnType.STRING, ColumnRole.IDENTIFIER),
        "person_id": col(ColumnType.STRING, ColumnRole.IDENTIFIER),
        "age": col(ColumnType.INTEGER, ColumnRole.QUASI_IDENTIFIER, lower=14, upper=100),
        "gender": col(ColumnType.CATEGORY, ColumnRole.QUASI_IDENTIFIER, domain=GENDERS),
        "region": col(ColumnType.CATEGORY, ColumnRole.QUASI_IDENTIFIER, domain=REGIONS),
        "signup_date": col(
            ColumnType.DATE, ColumnRole.QUASI_IDENTIFIER, lower=SIGNUP_START, upper=PERIOD_END
        ),
        "religion": col(
            ColumnType.CATEGORY,
            ColumnRole.SPECIAL_CATEGORY,
            domain=RELIGIONS,
            sensitive=Sensitive.RELIGIOUS_BELIEFS,
        ),
        "health_condition": col(
            ColumnType.CATEGORY,
            ColumnRole.SPECIAL_CATEGORY,
            domain=HEALTH,
            sensitive=Sensitive.HEALTH,
        ),
        "churned": col(ColumnType.BOOLEAN, ColumnRole.LABEL),
        "responded": col(ColumnType.BOOLEAN, ColumnRole.LABEL),
    }
    transactions = {
        "customer_id": col(ColumnType.STRING, ColumnRole.IDENTIFIER),
        "timestamp": col(ColumnType.DATETIME, lower=PERIOD_START, upper=PERIOD_END),
        "amount": col(ColumnType.FLOAT, lower=0.0, upper=5000.0),
        "channel": col(ColumnType.CATEGORY, domain=CHANNELS),
        "category": col(ColumnType.CATEGORY, domain=PRODUCTS),
    }
    join = ("customers.customer_id", "transactions.customer_id")
    return UnitConfig(
        unit=unit,
        max_customers=max_customers,
        tables={
            "customers": TableSpec(
                file=f"customers.{file_format}", columns=customers, key="customer_id"
            ),
            "transactions": TableSpec(
                file=f"transactions.{file_format}", columns=transactions, key="customer_id"
            ),
        },
        purposes={
            "churn_model": PurposePolicy(
                join_keys=join,
                features=(
                    "customers.age",
                    "customers.gender",
                    "customers.region",
                    "customers.signup_date",
                    "transactions.timestamp",
                    "transactions.amount",
                    "transactions.channel",
                ),
                label="customers.churned",
            ),
            "response_model": PurposePolicy(
                join_keys=join,
                features=(
                    "customers.age",
                    "customers.gender",
                    "customers.region",
                    "customers.signup_date",
                    "transactions.timestamp",
                    "transactions.amount",
                    "transactions.category",
                ),
                label="customers.responded",
            ),
            "ltv_model": PurposePolicy(
                join_keys=join,
                features=(
                    "customers.signup_date",
                    "transactions.timestamp",
                    "transactions.amount",
                ),
                label="transactions.amount",
            ),
            "segmentation": PurposePolicy(
                join_keys=join, features=("transactions.timestamp", "transactions.amount")
            ),
            "analytics": PurposePolicy(
                join_keys=join,
                features=(
                    "customers.age",
                    "customers.gender",
                    "customers.region",
                    "customers.signup_date",
                    "customers.churned",
                    "transactions.timestamp",
                    "transactions.amount",
                    "transactions.channel",
                    "transactions.category",
                ),
            ),
        },
    )


@dataclass(frozen=True)
class SynthResult:
    directory: Path
    units: list[str]
    auc_ceiling: float
    base_rates: dict[str, float]
    response_auc_ceiling: float
    response_base_rates: dict[str, float]


def _people(rng: np.random.Generator, count: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "person_id": [f"P{i:07d}" for i in range(count)],
            "gender": rng.choice(GENDERS, size=count, p=[0.49, 0.49, 0.02]),
            "region": rng.choice(REGIONS, size=count, p=[0.25, 0.2, 0.2, 0.15, 0.2]),
            "religion": rng.choice(RELIGIONS, size=count),
            "health_condition": rng.choice(HEALTH, size=count, p=[0.7, 0.1, 0.08, 0.07, 0.05]),
            "age_offset": rng.normal(0.0, 12.0, size=count),
        }
    )


def _unit_tables(
    rng: np.random.Generator,
    later: np.random.Generator,
    unit: str,
    profile: UnitProfile,
    people: pd.DataFrame,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    n = len(people)
    prefix = unit[:3]
    ids = np.array([f"{prefix}-{i:06d}" for i in range(n)])
    age = np.clip(np.round(profile.age_mean + people["age_offset"].to_numpy()), 14, 90).astype(int)
    span = (PERIOD_END - SIGNUP_START).days - 180
    signup = pd.to_datetime(SIGNUP_START) + pd.to_timedelta(
        np.floor(span * rng.beta(2.0, 1.4, size=n)), unit="D"
    )
    customers = pd.DataFrame(
        {
            "customer_id": ids,
            "person_id": people["person_id"].to_numpy(),
            "age": age,
            "gender": people["gender"].to_numpy(),
            "region": people["region"].to_numpy(),
            "signup_date": signup.normalize(),
            "religion": people["religion"].to_numpy(),
            "health_condition": people["health_condition"].to_numpy(),
        }
    )

    # Transactions: each customer is active from max(signup, period start) until a dormancy point,
    # buying at a personal rate; younger customers buy more online.
    rate = profile.purchases_per_year * rng.gamma(2.0, 0.5, size=n)
    dormancy = rng.exponential(profile.dormancy_days, size=n)
    active_from = np.maximum(signup, pd.Timestamp(PERIOD_START))
    active_to = pd.Timestamp(PERIOD_END) - pd.to_timedelta(dormancy, unit="D")
    years = np.clip(((active_to - active_from) / pd.Timedelta(days=365)).to_numpy(), 0.0, None)
    counts = rng.poisson(rate * years)
    owner = np.repeat(np.arange(n), counts)
    offsets = rng.random(len(owner)) * (active_to - active_from).to_numpy()[owner]
    timestamps = active_from.to_numpy()[owner] + offsets
    youth = (90 - age[owner]) / 72.0
    channel_p = np.asarray(profile.channels)
    shift = np.array([-0.15, 0.1, -0.05, 0.1])  # younger -> online/app
    probs = np.clip(channel_p[None, :] + shift[None, :] * (youth[:, None] - 0.5), 0.01, None)
    probs /= probs.sum(axis=1, keepdims=True)
    channel = np.array(CHANNELS)[
        (probs.cumsum(axis=1) > rng.random((len(owner), 1))).argmax(axis=1)
    ]
    amount = np.clip(
        np.round(profile.amount_median * rng.lognormal(0.0, 0.6, size=len(owner)), 2), 1.0, 4999.0
    )
    transactions = pd.DataFrame(
        {
            "customer_id": ids[owner],
            "timestamp": pd.to_datetime(timestamps).floor("s"),
            "amount": amount,
            "channel": channel,
            "category": rng.choice(PRODUCTS, size=len(owner)),
        }
    ).sort_values(["timestamp", "customer_id"], ignore_index=True)

    # Consent: most customers grant at signup; some never do; a few revoke later. For about half of
    # the minors (under 16) the grant was given by a guardian.
    guardian = (age < 16) & (rng.random(n) < 0.5)
    rows = [
        *_consent_events(rng, PURPOSES, ids, signup, guardian, profile.consent_rate),
        *_consent_events(later, LATER_PURPOSES, ids, signup, guardian, profile.consent_rate),
    ]
    consent = pd.concat(rows, ignore_index=True).sort_values(
        ["timestamp", "customer_id"], ignore_index=True
    )
    return customers, transactions, consent


def _consent_events(
    rng: np.random.Generator,
    purposes: tuple[str, ...],
    ids: np.ndarray,
    signup: pd.DatetimeIndex,
    guardian: np.ndarray,
    consent_rate: float,
) -> list[pd.DataFrame]:
    """Per purpose: grants shortly after signup at the BU's consent rate, and a few revocations."""
    n = len(ids)
    rows = []
    for purpose in purposes:
        grants = rng.random(n) < consent_rate
        grant_time = signup + pd.to_timedelta(rng.integers(0, 30, size=n), unit="D")
        revokes = grants & (rng.random(n) < 0.04)
        revoke_time = grant_time + pd.to_timedelta(rng.integers(1, 600, size=n), unit="D")
        for mask, times, granted in ((grants, grant_time, True), (revokes, revoke_time, False)):
            rows.append(
                pd.DataFrame(
                    {
                        "customer_id": ids[mask],
                        "purpose": purpose,
                        "granted": granted,
                        "guardian": guardian[mask] & granted,
                        "timestamp": times[mask],
                    }
                )
            )
    return rows


def true_churn_probability(features: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    return _logistic(features, names, TRUE_INTERCEPT, TRUE_COEFFICIENTS)


def true_response_probability(features: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    return _logistic(features, names, RESPONSE_INTERCEPT, RESPONSE_COEFFICIENTS)


def _logistic(
    features: np.ndarray, names: tuple[str, ...], intercept: float, coefficients: dict[str, float]
) -> np.ndarray:
    logit = np.full(len(features), intercept)
    for name, coefficient in coefficients.items():
        logit += coefficient * features[:, names.index(name)]
    return 1.0 / (1.0 + np.exp(-logit))


def synthesize(
    out: Path,
    *,
    units: int = 5,
    customers: int = 3000,
    seed: int = 0,
    overlap: float = 0.2,
    file_format: str = "parquet",
    overwrite: bool = False,
) -> SynthResult:
    """Write `units` BU silos of about `customers` customers each under `out` (atomically)."""
    if customers < 50:
        raise ConfigurationError(f"--customers must be at least 50, got {customers}")
    if not 0 <= overlap < 1:
        raise ConfigurationError(f"overlap must be in [0, 1), got {overlap}")
    if file_format not in ("parquet", "csv"):
        raise ConfigurationError(f"format must be 'parquet' or 'csv', got '{file_format}'")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigurationError(f"{out} exists; choose another --out or pass --overwrite")

    rng = np.random.default_rng(seed)
    later = np.random.default_rng([seed, 1])  # the second stream (module docstring)
    names = unit_names(units)
    profiles = [PROFILES[i % len(PROFILES)] for i in range(units)]
    sizes = [max(50, round(customers * p.size)) for p in profiles]
    # A pool of people; a share `overlap` of each BU's customers are drawn from people shared
    # with other BUs, the rest are unique to the BU.
    shared_pool = max(1, int(overlap * sum(sizes) / 2))
    unique_total = sum(sizes)
    people = _people(rng, shared_pool + unique_total)
    next_unique = shared_pool

    staging = Path(
        tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None)
    )
    truth_rows = []
    base_rates: dict[str, float] = {}
    response_rates: dict[str, float] = {}
    try:
        for unit, profile, size in zip(names, profiles, sizes, strict=True):
            shared = round(overlap * size)
            chosen = np.concatenate(
                [
                    rng.choice(shared_pool, size=min(shared, shared_pool), replace=False),
                    np.arange(next_unique, next_unique + size - min(shared, shared_pool)),
                ]
            )
            next_unique += size - min(shared, shared_pool)
            customers_df, transactions, consent = _unit_tables(
                rng, later, unit, profile, people.iloc[chosen].reset_index(drop=True)
            )
            schema = unit_schema(unit, file_format, max_customers=declared_size(size))
            spec = churn_features(schema)
            matrix = compute_features(
                {"customers": customers_df.assign(churned=False), "transactions": transactions},
                spec,
            )
            p_true = true_churn_probability(matrix.features, spec.output_names)
            churned = rng.random(len(p_true)) < p_true
            customers_df["churned"] = churned
            base_rates[unit] = float(churned.mean())
            response_spec = adapter(Task.RESPONSE).feature_spec(
                [schema], DEFAULT_PURPOSE[Task.RESPONSE]
            )
            response_matrix = compute_features(
                {"customers": customers_df.assign(responded=False), "transactions": transactions},
                response_spec,
            )
            p_response = true_response_probability(
                response_matrix.features, response_spec.output_names
            )
            responded = later.random(len(p_response)) < p_response
            customers_df["responded"] = responded
            response_rates[unit] = float(responded.mean())
            truth_rows.append(
                pd.DataFrame(
                    {
                        "unit": unit,
                        "customer_id": customers_df["customer_id"],
                        "p_true": p_true,
                        "churned": churned,
                        "p_response": p_response,
                        "responded": responded,
                    }
                )
            )
            unit_dir = staging / unit
            unit_dir.mkdir()
            (unit_dir / UNIT_CONFIG_FILE).write_text(schema.dump(), encoding="utf-8")
            for stem, frame in (
                ("customers", customers_df),
                ("transactions", transactions),
                ("consent", consent),
            ):
                if file_format == "parquet":
                    frame.to_parquet(unit_dir / f"{stem}.parquet", index=False)
                else:
                    frame.to_csv(unit_dir / f"{stem}.csv", index=False)
        truth = pd.concat(truth_rows, ignore_index=True)
        truth.to_parquet(staging / GROUND_TRUTH, index=False)
        ceiling = ceiling_auc(truth, Evaluation())
        response_ceiling = ceiling_auc(truth, Evaluation(), task=Task.RESPONSE)
        manifest = {
            "generator": "silofed.simulations.synthetic",
            "version": 1,
            "seed": seed,
            "units": names,
            "customers": dict(zip(names, sizes, strict=True)),
            "overlap": overlap,
            "format": file_format,
            "ground_truth": {"intercept": TRUE_INTERCEPT, "coefficients": TRUE_COEFFICIENTS},
            "base_rates": base_rates,
            "auc_ceiling": {"holdout_key": Evaluation().holdout_key, "value": ceiling},
            "response": {
                "ground_truth": {
                    "intercept": RESPONSE_INTERCEPT,
                    "coefficients": RESPONSE_COEFFICIENTS,
                },
                "base_rates": response_rates,
                "auc_ceiling": {"holdout_key": Evaluation().holdout_key, "value": response_ceiling},
            },
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return SynthResult(out, names, ceiling, base_rates, response_ceiling, response_rates)


# The ground truth's (probability, label) columns of each task with a drawn binary label.
_TRUTH_COLUMNS = {Task.CHURN: ("p_true", "churned"), Task.RESPONSE: ("p_response", "responded")}


def ceiling_auc(truth: pd.DataFrame, evaluation: Evaluation, *, task: Task = Task.CHURN) -> float:
    """AUC of the true probabilities of `task` on the held-out customers (all of them, consented
    or not: consent is drawn independently of the labels, so the ceiling is the same in
    expectation)."""
    probability, label = _TRUTH_COLUMNS[task]
    test = held_out(
        truth["customer_id"].to_numpy(), evaluation.holdout_key, evaluation.holdout_fraction
    )
    return exact_auc(truth[probability].to_numpy()[test], truth[label].to_numpy()[test])


def read_ceiling(silos: Path, evaluation: Evaluation, *, task: Task = Task.CHURN) -> float | None:
    """The Bayes ceiling of `task` for `evaluation`'s split, when `silos` were written by this
    generator; None for other silos and for a task without a drawn label (ltv)."""
    path = Path(silos) / GROUND_TRUTH
    if task not in _TRUTH_COLUMNS or not path.exists():
        return None
    truth = pd.read_parquet(path)
    if _TRUTH_COLUMNS[task][0] not in truth.columns:
        return None  # written before the task's label existed
    return ceiling_auc(truth, evaluation, task=task)
