"""Feature ranges from DP statistics (`federation.ranges`): the histograms a BU would release, the
windows the coordinator reads off their noisy sums, and their use in the feature matrix."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from clients.features import compute_features
from federation.exchanges import ranges_multiplier
from federation.features import Categorical, FeatureSpec, Frequency, Numeric
from federation.job import Job
from federation.ranges import (
    RANGE_BINS,
    histogram_vector,
    natural_window,
    ranges_layout,
    sensitivity,
    windows_from_histograms,
)

SPEC = FeatureSpec(
    label="customers.y",
    features=(
        Numeric(name="age", column="customers.age", lower=0.0, upper=100.0),
        Categorical(name="job", column="customers.job", domain=("a", "b")),
        Numeric(name="balance", column="customers.balance", lower=0.0, upper=1000.0),
    ),
)


def test_one_histogram_per_scalar_feature_and_its_sensitivity() -> None:
    features = np.array([[0.0, 1, 0, 0.99], [0.5, 0, 1, 1.0], [0.51, 1, 0, 0.2]])
    counts = histogram_vector(features, SPEC, bins=4)
    assert SPEC.scalar_outputs == ("age", "balance")
    assert counts.tolist() == [1, 0, 2, 0, 1, 0, 0, 2]  # 1.0 falls in the last bin
    assert sensitivity(SPEC) == math.sqrt(2)
    layout = ranges_layout(SPEC)
    assert layout.size == 2 * RANGE_BINS and layout.parts[0].sensitivity == math.sqrt(2)
    with pytest.raises(ValueError, match="declared scale"):
        histogram_vector(features, SPEC.model_copy(update={"ranges": {"age": (0.1, 0.9)}}))


def _one_pass(values: np.ndarray, units: int, noise_std: float, seed: int):
    """The coordinator's windows from the histograms of `units` BUs, each adding Gaussian noise
    of `noise_std` per bin."""
    rng = np.random.default_rng(seed)
    features = np.zeros((len(values), 4))
    features[:, 0] = values
    features[:, 3] = values
    summed = sum(
        histogram_vector(p, SPEC) + rng.normal(0, noise_std, 2 * RANGE_BINS)
        for p in np.array_split(features, units)
    )
    return windows_from_histograms(summed, SPEC, noise_std * math.sqrt(units), len(values))


def test_one_pass_finds_a_narrow_feature() -> None:
    """36,000 customers in 12 BUs, values in a sliver of the unit interval (a balance scaled by
    wide declared bounds), each BU's noise that of the default ranges exchange at epsilon 1 (the
    noisiest default): whatever the noise draw, the window holds the central 90% of the customers
    and is at most 12 standard deviations wide (a robust window, not exact quantiles), instead of
    the whole unit interval."""
    job = Job(features=SPEC, epsilon=1.0)
    noise_std = ranges_multiplier(job) * sensitivity(SPEC)
    assert 20 < noise_std < 22  # z(1) / sqrt(0.1) x sqrt(2)
    rng = np.random.default_rng(3)
    values = np.clip(rng.normal(0.8, 0.018, 36_000), 0, 1)
    q05, q95 = np.quantile(values, [0.05, 0.95])
    for seed in range(20):
        low, high = _one_pass(values, units=12, noise_std=noise_std, seed=seed)["balance"]
        assert low <= q05 and high >= q95 and high - low <= 12 * 0.018, (seed, low, high)


def test_noise_alone_leaves_the_unit_interval() -> None:
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 50.0, 2 * RANGE_BINS)  # no customer at all, only noise
    assert windows_from_histograms(noise, SPEC, 50.0, 0) == {
        "age": (0.0, 1.0),
        "balance": (0.0, 1.0),
    }
    with pytest.raises(ValueError, match=f"need {2 * RANGE_BINS}"):
        windows_from_histograms(noise[:10], SPEC, 50.0, 0)


def test_a_window_that_would_clip_thinly_spread_customers_is_not_taken() -> None:
    """1,200 customers: 12% at zero purchases, the rest spread evenly (a frequency feature of a
    small company). Only the spike stands above the noise floor, and a window around it alone
    would clip 88% of the customers: the feature keeps the unit interval, whatever the noise
    draw. The same spike among 36,000 customers with 2% spread out gets its narrow window."""
    thin = np.concatenate([np.zeros(144), np.linspace(0.02, 1.0, 1056)])
    for seed in range(20):
        assert _one_pass(thin, units=3, noise_std=14.0, seed=seed)["age"] == (0.0, 1.0)
    rng = np.random.default_rng(1)
    concentrated = np.concatenate([rng.uniform(0.5, 0.52, 35_280), rng.uniform(0, 1, 720)])
    for seed in range(20):
        low, high = _one_pass(concentrated, units=12, noise_std=14.0, seed=seed)["age"]
        assert low >= 0.45 and high <= 0.57, (seed, low, high)


def test_natural_windows_invert_the_declared_scaling() -> None:
    assert natural_window(SPEC, "balance", (0.1, 0.5)) == pytest.approx((100.0, 500.0))
    logged = FeatureSpec(
        features=(
            Numeric(name="calls", column="c.calls", lower=1.0, upper=64.0, log_scale=True),
            Frequency(name="frequency", upper=52.0),
        ),
        observation_date="2026-01-01",
        lookback_days=90,
    )
    low, high = natural_window(logged, "calls", (0.0, 0.5))
    assert low == 1.0 and high == pytest.approx(math.sqrt(64.0) - 1 + 1.0)  # expm1(log1p(63)/2)
    assert natural_window(logged, "frequency", (0.0, 1.0)) == pytest.approx((0.0, 52.0))
    with pytest.raises(ValueError, match="not a scalar feature"):
        natural_window(SPEC, "job", (0.0, 1.0))


def test_ranges_rescale_the_feature_and_are_validated() -> None:
    tables = {
        "customers": pd.DataFrame(
            {
                "customer_id": ["1", "2", "3"],
                "age": [10, 50, 90],
                "job": ["a", "b", "a"],
                "balance": [100.0, 500.0, 1000.0],
                "y": [True, False, True],
            }
        )
    }
    spec = SPEC.model_copy(update={"ranges": {"age": (0.2, 0.6)}})
    FeatureSpec.model_validate(spec.model_dump())  # a valid spec
    matrix = compute_features(tables, spec).features
    assert matrix[:, 0].tolist() == pytest.approx([0.0, 0.75, 1.0])  # clipped, then rescaled
    assert matrix[:, 3].tolist() == pytest.approx([0.1, 0.5, 1.0])  # no range: as declared
    with pytest.raises(ValidationError, match="'job' is not a scalar feature"):
        FeatureSpec.model_validate({**SPEC.model_dump(), "ranges": {"job": (0.0, 1.0)}})
    with pytest.raises(ValidationError, match="0 <= low < high <= 1"):
        FeatureSpec.model_validate({**SPEC.model_dump(), "ranges": {"age": (0.5, 0.5)}})
