"""Discrete Gaussian releases: calibration, noise per placement, exact quantiles of the noise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from federation.release import Part, layout_of
from privacy.accounting import composed_epsilon
from privacy.errors import ConfigurationError
from privacy.mechanisms import (
    NoiseInSum,
    Placement,
    add_noise,
    gaussian_event_of,
    noise_multiplier,
    part_sigmas,
    ratio_interval,
    unit_sigma,
)
from privacy.samplers import SeededSource


def test_noise_multiplier_spends_at_most_the_target():
    for epsilon, releases in ((1.0, 1), (3.0, 5), (0.5, 1)):
        z = noise_multiplier(epsilon, 1e-6, releases=releases)
        spent = composed_epsilon([gaussian_event_of(z).as_dp_sgd()] * releases, 1e-6)
        assert 0.95 * epsilon <= spent <= epsilon


def test_parts_share_one_gaussian_budget():
    # Two parts of sensitivities 1 and 10 at multiplier z: sum of (Delta_a / sigma_a)^2 = 1 / z^2.
    z = 4.0
    sigmas = part_sigmas(z, [1.0, 10.0])
    assert sum((s / sigma) ** 2 for s, sigma in zip([1.0, 10.0], sigmas, strict=True)) == (
        pytest.approx(1 / z**2)
    )
    with pytest.raises(ConfigurationError, match="positive sensitivity"):
        part_sigmas(z, [1.0, 0.0])


def test_placements_split_the_noise():
    assert unit_sigma(8.0, Placement.LOCAL) == 8.0
    assert unit_sigma(8.0, Placement.CENTRAL) == 0.0
    # 4 honest shares of sigma/2 sum to variance sigma^2
    assert unit_sigma(8.0, Placement.DISTRIBUTED, threshold=5, colluding=1) == 4.0
    with pytest.raises(ConfigurationError, match="fewer than the reconstruction threshold"):
        unit_sigma(8.0, Placement.DISTRIBUTED, threshold=3, colluding=3)
    with pytest.raises(ConfigurationError, match=r"below 1\.0"):
        unit_sigma(1.5, Placement.DISTRIBUTED, threshold=9)
    assert NoiseInSum.of(3.0, Placement.LOCAL, contributors=4).sigmas == (3.0,) * 4
    assert NoiseInSum.of(3.0, Placement.CENTRAL, contributors=4).sigmas == (3.0,)


def test_noise_is_integer_and_only_on_integer_vectors():
    out = add_noise(np.arange(1000, dtype=np.int64), 5.0, SeededSource(1))
    assert out.dtype == np.int64
    assert 4.5 < np.std(out - np.arange(1000)) < 5.5
    assert np.array_equal(add_noise(np.arange(3), 0.0, SeededSource(1)), np.arange(3))
    with pytest.raises(TypeError, match="integer vectors"):
        add_noise(np.zeros(3), 1.0, SeededSource(1))


def test_quantile_is_exact_for_one_part():
    # P(|X| <= q) for N_Z(0, 1): mass at 0, 1, 2 by direct summation.
    weights = np.exp(-(np.arange(-40, 41) ** 2) / 2.0)
    pmf = weights / weights.sum()
    inside = [pmf[40 - q : 41 + q].sum() for q in range(5)]
    q = NoiseInSum((1.0,)).quantile(0.95)
    assert inside[q] >= 0.95 > inside[q - 1]
    assert NoiseInSum(()).quantile() == 0


def test_quantile_covers_the_sum_of_parts():
    noise = NoiseInSum((2.0, 3.0, 5.0))
    q = noise.quantile(0.95)
    draws = sum(
        add_noise(np.zeros(40_000, dtype=np.int64), s, SeededSource(i))
        for i, s in enumerate(noise.sigmas)
    )
    covered = np.mean(np.abs(draws) <= q)
    assert 0.945 <= covered <= 0.965
    assert noise.variance == pytest.approx(4 + 9 + 25, rel=1e-3)
    # a huge support falls back to the normal quantile, which agrees to a grid step
    big = NoiseInSum((2e6,))
    assert abs(big.quantile() - 1.959964 * 2e6) <= 2


def test_ratio_interval_widens_with_denominator_noise():
    quiet = ratio_interval(500.0, 1000.0, NoiseInSum((10.0,)), NoiseInSum(()))
    loud = ratio_interval(500.0, 1000.0, NoiseInSum((10.0,)), NoiseInSum((10.0,)))
    assert quiet[0] == pytest.approx(0.5 - 1.959964 * 0.01, rel=1e-5)
    assert loud[1] - loud[0] > quiet[1] - quiet[0]
    assert ratio_interval(1.0, -3.0, NoiseInSum(()), NoiseInSum(())) == (-math.inf, math.inf)


def test_layout_adds_per_part_noise_and_reports_it():
    layout = layout_of([Part("counts", 3, 1.0), Part("sums", 2, 100.0)])
    assert layout.size == 5
    assert layout.slices() == {"counts": slice(0, 3), "sums": slice(3, 5)}
    z = 2.0
    sigmas = layout.sigmas(z)
    exact = np.array([10, 20, 30, 4000, 5000])
    draws = np.stack(
        [layout.noisy(exact, z, Placement.LOCAL, SeededSource(i)) - exact for i in range(3000)]
    )
    assert np.std(draws[:, :3]) == pytest.approx(sigmas[0], rel=0.05)
    assert np.std(draws[:, 3:]) == pytest.approx(sigmas[1], rel=0.05)
    assert np.array_equal(layout.noisy(exact, None, Placement.LOCAL, SeededSource(0)), exact)
    noise = layout.noise_in_sum(z, Placement.LOCAL, contributors=4)
    assert noise["sums"].sigmas == (sigmas[1],) * 4
    with pytest.raises(ValueError, match="5 integers"):
        layout.noisy(np.zeros(5), z, Placement.LOCAL, SeededSource(0))
    with pytest.raises(ValueError, match="unique"):
        layout_of([Part("a", 1, 1.0), Part("a", 1, 1.0)])
