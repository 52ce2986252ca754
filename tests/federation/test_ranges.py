"""Feature ranges from DP statistics (`federation.ranges`): the histograms a BU would release, the
windows the coordinator reads off their noisy sums, and their use in the feature matrix."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from clients.features import compute_features
from federation.features import Categorical, FeatureSpec, Numeric
from federation.ranges import (
    RANGE_BINS,
    histogram_vector,
    sensitivity,
    widened,
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
    windowed = histogram_vector(features, SPEC, {"balance": (0.9, 1.0)}, bins=2)
    assert windowed.tolist() == [1, 2, 1, 2]  # 0.2 is clipped into the window's first bin


def _two_passes(values: np.ndarray, units: int, noise_std: float, seed: int):
    """The coordinator's two passes over the histograms of `units` BUs, each adding Gaussian
    noise of `noise_std` per bin."""
    rng = np.random.default_rng(seed)
    features = np.zeros((len(values), 4))
    features[:, 0] = values
    features[:, 3] = values
    parts = np.array_split(features, units)

    def summed(windows):
        return sum(
            histogram_vector(p, SPEC, windows) + rng.normal(0, noise_std, 2 * RANGE_BINS)
            for p in parts
        )

    total_std = noise_std * math.sqrt(units)
    first = windows_from_histograms(summed(None), SPEC, total_std)
    second_input = widened(first)
    return windows_from_histograms(summed(second_input), SPEC, total_std, second_input)


def test_two_passes_find_a_narrow_feature() -> None:
    """36,000 customers in 12 BUs, values in a sliver of the unit interval (a balance scaled by
    wide declared bounds), noise as for epsilon 0.15 per pass: whatever the noise draw, the
    window holds the central 90% of the customers and is at most 10 standard deviations wide (a
    robust window, not exact quantiles), instead of the whole unit interval."""
    rng = np.random.default_rng(3)
    values = np.clip(rng.normal(0.8, 0.018, 36_000), 0, 1)
    q05, q95 = np.quantile(values, [0.05, 0.95])
    for seed in range(20):
        low, high = _two_passes(values, units=12, noise_std=86.0, seed=seed)["balance"]
        assert low <= q05 and high >= q95 and high - low <= 10 * 0.018, (seed, low, high)


def test_noise_alone_leaves_the_window_as_it_was() -> None:
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 50.0, 2 * RANGE_BINS)  # no customer at all, only noise
    assert windows_from_histograms(noise, SPEC, 50.0) == {"age": (0.0, 1.0), "balance": (0.0, 1.0)}
    with pytest.raises(ValueError, match="need 64"):
        windows_from_histograms(noise[:10], SPEC, 50.0)


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
