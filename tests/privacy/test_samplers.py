"""Exact discrete noise (privacy/samplers.py): the samples follow the discrete Laplace and discrete
Gaussian pmfs within statistical bounds, the sampling path draws integers only, the secure source
refuses a seed, and a seeded source replays its samples exactly.

Statistical tests draw from `SeededSource`, so each is one fixed, reproducible experiment; their
bounds are 5 standard errors or wider, so they do not depend on a lucky seed."""

from __future__ import annotations

import math
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest

from privacy.samplers import (
    RandomSource,
    SecureSource,
    SeededSource,
    discrete_gaussian,
    discrete_gaussian_variance,
    discrete_laplace,
)

DRAWS = 100_000


# --- reference pmfs, computed here independently of the module -------------------------------------


def _gaussian_pmf(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    support = np.arange(-math.ceil(40 * sigma) - 1, math.ceil(40 * sigma) + 2)
    weights = np.exp(-(support.astype(float) ** 2) / (2 * sigma * sigma))
    return support, weights / weights.sum()


def _laplace_pmf(scale: float) -> tuple[np.ndarray, np.ndarray]:
    # P(x) = (1 - p) / (1 + p) p^|x| with p = exp(-1 / scale)
    p = math.exp(-1 / scale)
    support = np.arange(-math.ceil(80 * scale), math.ceil(80 * scale) + 1)
    return support, (1 - p) / (1 + p) * p ** np.abs(support).astype(float)


def _central_moment(support: np.ndarray, pmf: np.ndarray, order: int) -> float:
    return float(np.sum(pmf * support.astype(float) ** order))  # the pmfs here have mean 0


SAMPLERS: dict[str, tuple[Callable[[int, RandomSource], np.ndarray], Callable[[], tuple]]] = {
    "gaussian sigma=1.5": (lambda n, s: discrete_gaussian(1.5, n, s), lambda: _gaussian_pmf(1.5)),
    "gaussian sigma=10": (lambda n, s: discrete_gaussian(10, n, s), lambda: _gaussian_pmf(10)),
    "laplace scale=3": (lambda n, s: discrete_laplace(3, n, s), lambda: _laplace_pmf(3)),
}


@pytest.fixture(scope="module")
def seeded_draws() -> dict[str, np.ndarray]:
    """DRAWS samples of each distribution under test, drawn once for the module."""
    return {
        name: sample(DRAWS, SeededSource(20240601 + index))
        for index, (name, (sample, _)) in enumerate(SAMPLERS.items())
    }


# --- the RandomSource contract, shared by both sources ----------------------------------------------

SOURCES = {"secure": SecureSource, "seeded": lambda: SeededSource(7)}


@pytest.mark.parametrize("make_source", SOURCES.values(), ids=list(SOURCES))
def test_source_is_a_random_source(make_source: Callable[[], RandomSource]) -> None:
    assert isinstance(make_source(), RandomSource)


@pytest.mark.parametrize("make_source", SOURCES.values(), ids=list(SOURCES))
def test_source_draws_every_integer_below_the_bound_and_nothing_else(
    make_source: Callable[[], RandomSource],
) -> None:
    source = make_source()

    drawn = {source.randbelow(5) for _ in range(1_000)}

    assert drawn == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("make_source", SOURCES.values(), ids=list(SOURCES))
@pytest.mark.parametrize("bound", [0, -3])
def test_source_refuses_an_empty_range(make_source: Callable[[], RandomSource], bound: int) -> None:
    with pytest.raises(ValueError):
        make_source().randbelow(bound)


# --- the two sources ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "construct",
    [lambda: SecureSource(seed=1), lambda: SecureSource(1)],
    ids=["keyword", "positional"],
)
def test_secure_source_refuses_a_seed(construct: Callable[[], SecureSource]) -> None:
    with pytest.raises(TypeError, match=r"takes no seed.*SeededSource"):
        construct()


def test_secure_source_draws_differ_between_calls() -> None:
    source = SecureSource()

    first = discrete_gaussian(10, 200, source)
    second = discrete_gaussian(10, 200, source)
    fresh = discrete_gaussian(10, 200, SecureSource())

    # Equal arrays would take a chance far below 2^-200: each sample carries several bits.
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, fresh)


@pytest.mark.parametrize("sample", [discrete_gaussian, discrete_laplace])
def test_same_seed_gives_the_same_samples(sample: Callable[..., np.ndarray]) -> None:
    first = sample(Fraction(7, 2), 1_000, SeededSource(42))
    again = sample(Fraction(7, 2), 1_000, SeededSource(42))
    other_seed = sample(Fraction(7, 2), 1_000, SeededSource(43))

    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other_seed)


@pytest.mark.parametrize("seed", [1.5, "42", None, True])
def test_seeded_source_needs_an_int_seed(seed: object) -> None:
    with pytest.raises(TypeError, match="int seed"):
        SeededSource(seed)  # type: ignore[arg-type]


# --- exact rational parameters ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("as_float", "as_fraction"),
    [
        (1.5, Fraction(3, 2)),
        (0.1, Fraction(1, 10)),
        (10.0, 10),
        (math.pi, Fraction(3126535, 995207)),
    ],
)
@pytest.mark.parametrize("sample", [discrete_gaussian, discrete_laplace])
def test_float_parameter_is_the_nearest_fraction_with_denominator_at_most_a_million(
    sample: Callable[..., np.ndarray], as_float: float, as_fraction: Fraction | int
) -> None:
    from_float = sample(as_float, 500, SeededSource(5))
    from_fraction = sample(as_fraction, 500, SeededSource(5))

    np.testing.assert_array_equal(from_float, from_fraction)


class _IntegersOnlySource:
    """A seeded source that fails the test if a sampler asks it for anything but an int bound."""

    def __init__(self) -> None:
        self._inner = SeededSource(11)
        self.bounds: set[type] = set()

    def randbelow(self, n: int) -> int:
        self.bounds.add(type(n))
        return self._inner.randbelow(n)


@pytest.mark.parametrize("parameter", [0.3, 1.5, math.pi, Fraction(22, 7), 12])
@pytest.mark.parametrize("sample", [discrete_gaussian, discrete_laplace])
def test_sampling_path_draws_uniform_integers_with_int_bounds_only(
    sample: Callable[..., np.ndarray], parameter: float | Fraction | int
) -> None:
    source = _IntegersOnlySource()

    sample(parameter, 2_000, source)

    assert source.bounds == {int}


# --- output shape and refused arguments ---------------------------------------------------------


@pytest.mark.parametrize("sample", [discrete_gaussian, discrete_laplace])
@pytest.mark.parametrize("size", [0, 1, 257])
def test_samples_are_an_int64_array_of_the_requested_size(
    sample: Callable[..., np.ndarray], size: int
) -> None:
    drawn = sample(2, size, SeededSource(3))

    assert drawn.dtype == np.int64
    assert drawn.shape == (size,)


NOT_POSITIVE = [0, -1, 0.0, -2.5, Fraction(-3, 2), Fraction(0), 1e-9, math.nan, math.inf]


@pytest.mark.parametrize("sigma", NOT_POSITIVE)
def test_gaussian_refuses_a_sigma_that_is_not_positive_and_finite(sigma: float) -> None:
    with pytest.raises(ValueError, match="sigma"):
        discrete_gaussian(sigma, 10, SeededSource(0))
    with pytest.raises(ValueError, match="sigma"):
        discrete_gaussian_variance(sigma)


@pytest.mark.parametrize("scale", NOT_POSITIVE)
def test_laplace_refuses_a_scale_that_is_not_positive_and_finite(scale: float) -> None:
    with pytest.raises(ValueError, match="scale"):
        discrete_laplace(scale, 10, SeededSource(0))


@pytest.mark.parametrize("sample", [discrete_gaussian, discrete_laplace])
def test_negative_size_is_refused(sample: Callable[..., np.ndarray]) -> None:
    with pytest.raises(ValueError, match="size"):
        sample(1, -1, SeededSource(0))


@pytest.mark.parametrize("sample", [discrete_gaussian, discrete_laplace])
@pytest.mark.parametrize("parameter", ["2", None, True, Decimal("2"), b"2"])
def test_parameter_of_another_type_is_refused(
    sample: Callable[..., np.ndarray], parameter: object
) -> None:
    with pytest.raises(TypeError, match="must be a Fraction, an int or a float"):
        sample(parameter, 10, SeededSource(0))


# --- exact variance -------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.2, 0.5, 1, 1.5, Fraction(7, 3), 10, 250.5])
def test_variance_equals_the_pmf_sum(sigma: float | Fraction) -> None:
    support, pmf = _gaussian_pmf(float(sigma))

    assert discrete_gaussian_variance(sigma) == pytest.approx(
        _central_moment(support, pmf, 2), rel=1e-12
    )


def test_variance_is_below_sigma_squared_for_small_sigma_and_equal_from_sigma_three() -> None:
    # For sigma = 0.2 only 0 and +-1 carry mass above 1e-21: Var = 2w / (1 + 2w), w = exp(-12.5).
    w = math.exp(-12.5)
    assert discrete_gaussian_variance(0.2) == pytest.approx(2 * w / (1 + 2 * w), rel=1e-12)
    assert discrete_gaussian_variance(0.5) == pytest.approx(0.215013, abs=1e-6)
    assert 1 - 1e-6 < discrete_gaussian_variance(1) < 1
    for sigma in (3, 10, 123.25, 5_000):
        assert discrete_gaussian_variance(sigma) == pytest.approx(sigma * sigma, rel=1e-14)


# --- the samples follow the exact pmf ---------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLERS)
def test_mean_is_zero_within_five_standard_errors(
    name: str, seeded_draws: dict[str, np.ndarray]
) -> None:
    support, pmf = SAMPLERS[name][1]()
    std = math.sqrt(_central_moment(support, pmf, 2))

    assert abs(seeded_draws[name].mean()) < 5 * std / math.sqrt(DRAWS)


@pytest.mark.parametrize("name", SAMPLERS)
def test_standard_deviation_matches_the_exact_one(
    name: str, seeded_draws: dict[str, np.ndarray]
) -> None:
    support, pmf = SAMPLERS[name][1]()
    variance = _central_moment(support, pmf, 2)
    fourth_moment = _central_moment(support, pmf, 4)
    draws = seeded_draws[name].astype(float)

    empirical_variance = float(np.mean(draws * draws))  # about the known mean 0
    standard_error = math.sqrt((fourth_moment - variance * variance) / DRAWS)

    assert math.sqrt(empirical_variance) == pytest.approx(math.sqrt(variance), rel=0.03)
    assert abs(empirical_variance - variance) < 5 * standard_error


def test_gaussian_standard_deviation_matches_discrete_gaussian_variance(
    seeded_draws: dict[str, np.ndarray],
) -> None:
    for sigma in (1.5, 10):
        draws = seeded_draws[f"gaussian sigma={sigma:g}"]

        assert draws.std() == pytest.approx(math.sqrt(discrete_gaussian_variance(sigma)), rel=0.03)


@pytest.mark.parametrize("name", ["gaussian sigma=1.5", "laplace scale=3"])
def test_frequencies_of_small_values_match_the_exact_pmf(
    name: str, seeded_draws: dict[str, np.ndarray]
) -> None:
    support, pmf = SAMPLERS[name][1]()
    values, counts = np.unique(seeded_draws[name], return_counts=True)
    observed = dict(zip(values.tolist(), counts.tolist(), strict=True))

    for x in range(-6, 7):
        p = float(pmf[support == x][0])
        bound = 5 * math.sqrt(DRAWS * p * (1 - p))
        assert abs(observed.get(x, 0) - DRAWS * p) <= bound, (x, observed.get(x, 0), DRAWS * p)


def test_gaussian_is_symmetric_and_has_no_mass_beyond_its_tail(
    seeded_draws: dict[str, np.ndarray],
) -> None:
    draws = seeded_draws["gaussian sigma=1.5"]

    # P(|X| >= 12) for sigma = 1.5 is about 1e-14: none of 1e5 draws lands there.
    assert np.abs(draws).max() < 12
    positive, negative = int(np.sum(draws > 0)), int(np.sum(draws < 0))
    assert abs(positive - negative) < 5 * math.sqrt(positive + negative)
