"""Exact samplers for discrete noise: the discrete Laplace and the discrete Gaussian on the integers.

Implements Algorithms 1-3 of Canonne, Kamath & Steinke, "The Discrete Gaussian for Differential
Privacy" (NeurIPS 2020): Bernoulli(exp(-gamma)) for rational gamma (Algorithm 1), the discrete
Laplace with rational scale (Algorithm 2) and the discrete Gaussian N_Z(0, sigma^2) for rational
sigma^2 by rejection from the discrete Laplace (Algorithm 3).

The sampling path uses integer arithmetic and uniform random integers only, never floating point,
so each sample follows its distribution exactly. That is what closes the attack of Mironov
("On Significance of the Least Significant Bits for Differential Privacy", CCS 2012): textbook
floating-point Laplace or Gaussian noise leaves gaps and biases in the low-order bits of its output
that reveal the value it was added to. Exact rationals are the edge: a float parameter is turned into
`Fraction(value).limit_denominator(10**6)` once, before any sampling.

Randomness is injected (STYLE principle 4) as a `RandomSource`, anything with `randbelow(n)`.
Production noise comes from `SecureSource`, the operating system's CSPRNG, which refuses a seed;
`SeededSource` is reproducible and exists for simulations and tests only.
"""

from __future__ import annotations

import math
import random
import secrets
from collections.abc import Callable
from fractions import Fraction
from typing import Never, Protocol, runtime_checkable

import numpy as np

_FLOAT_DENOMINATOR_LIMIT = 10**6

# Beyond this sigma the pmf sum of the variance would take millions of terms for nothing: by Poisson
# summation Var(N_Z(0, sigma^2)) differs from sigma^2 by a relative amount of order
# sigma^2 exp(-2 pi^2 sigma^2), below double precision for every sigma above 3.
_VARIANCE_SUM_SIGMA_LIMIT = 1_000.0
_VARIANCE_TAIL_SIGMAS = 40  # exp(-40^2 / 2) is far below double precision next to the mode's mass


# --- randomness sources ---------------------------------------------------------------------------


@runtime_checkable
class RandomSource(Protocol):
    """Where the samplers take their randomness from: uniform integers, nothing else."""

    def randbelow(self, n: int) -> int:
        """A uniform integer in [0, n); ValueError if n <= 0."""
        ...


class SecureSource:
    """Uniform integers from the operating system's CSPRNG (`secrets.randbelow`): the source for
    production noise. It takes no seed, so its noise cannot be replayed by anyone who learns one."""

    def __init__(self, *args: Never, **kwargs: Never) -> None:
        if args or kwargs:
            raise TypeError(
                "SecureSource takes no seed or other argument: production noise must not be "
                "reproducible. Use SeededSource(seed) in simulations and tests."
            )

    def randbelow(self, n: int) -> int:
        return secrets.randbelow(n)

    def __repr__(self) -> str:
        return "SecureSource()"


class SeededSource:
    """Reproducible uniform integers from `random.Random(seed)`.

    NOT FOR PRODUCTION: anyone who knows or guesses the seed (or observes enough output of the
    Mersenne Twister) can replay the noise and subtract it, which voids every privacy guarantee.
    Use it for simulations and tests, where exact reproducibility is the point."""

    def __init__(self, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"SeededSource needs an int seed, got {seed!r}")
        self.seed = seed
        self._random = random.Random(seed)

    def randbelow(self, n: int) -> int:
        return self._random.randrange(n)

    def state(self) -> list:
        """Where the stream is, as JSON-ready lists (a resumed simulation goes on from here)."""
        version, internal, gauss = self._random.getstate()
        return [version, list(internal), gauss]

    def set_state(self, state: list) -> None:
        version, internal, gauss = state
        self._random.setstate((version, tuple(internal), gauss))

    def __repr__(self) -> str:
        return f"SeededSource(seed={self.seed})"


# --- public samplers ------------------------------------------------------------------------------


def discrete_laplace(scale: Fraction | int | float, size: int, source: RandomSource) -> np.ndarray:
    """`size` independent samples (int64) of the discrete Laplace with P(x) ∝ exp(-|x| / scale)
    over the integers, drawn exactly from `source` (Canonne, Kamath & Steinke 2020, Algorithm 2)."""
    exact_scale = _positive_fraction(scale, "scale")
    count = _sample_count(size)
    randbelow = source.randbelow
    # Algorithm 2 samples Lap_Z(t/s) for positive integers s and t.
    t, s = exact_scale.numerator, exact_scale.denominator
    return np.fromiter(
        (_discrete_laplace_one(s, t, randbelow) for _ in range(count)), dtype=np.int64, count=count
    )


def discrete_gaussian(sigma: Fraction | int | float, size: int, source: RandomSource) -> np.ndarray:
    """`size` independent samples (int64) of the discrete Gaussian N_Z(0, sigma^2), P(x) ∝
    exp(-x^2 / (2 sigma^2)) over the integers, drawn exactly from `source` (Canonne, Kamath &
    Steinke 2020, Algorithm 3). Its variance is `discrete_gaussian_variance(sigma)`, not sigma^2."""
    exact_sigma = _positive_fraction(sigma, "sigma")
    count = _sample_count(size)
    randbelow = source.randbelow
    variance = exact_sigma * exact_sigma
    a, b = variance.numerator, variance.denominator
    t = exact_sigma.numerator // exact_sigma.denominator + 1  # floor(sigma) + 1
    # The rejection step accepts y with probability exp(-(|y| - sigma^2/t)^2 / (2 sigma^2)). With
    # sigma^2 = a/b that exponent is (|y| b t - a)^2 / (2 a b t^2): one integer ratio whose
    # denominator is fixed for the whole call.
    bt = b * t
    denominator = 2 * a * b * t * t
    return np.fromiter(
        (_discrete_gaussian_one(t, a, bt, denominator, randbelow) for _ in range(count)),
        dtype=np.int64,
        count=count,
    )


def discrete_gaussian_variance(sigma: Fraction | int | float) -> float:
    """The exact variance of N_Z(0, sigma^2), by summing its pmf: below sigma^2 for small sigma
    (0.2150 for sigma = 0.5, 1 - 2.1e-7 for sigma = 1) and sigma^2 to double precision from
    sigma = 3 on. For tests and error bars; the sampling path never uses it."""
    sigma_value = float(_positive_fraction(sigma, "sigma"))
    if sigma_value > _VARIANCE_SUM_SIGMA_LIMIT:
        return sigma_value * sigma_value
    x = np.arange(1, math.ceil(_VARIANCE_TAIL_SIGMAS * sigma_value) + 2, dtype=np.float64)
    weights = np.exp(-(x * x) / (2.0 * sigma_value * sigma_value))
    # Symmetric about 0, whose weight is 1 and whose square is 0.
    return float(2.0 * np.sum(x * x * weights) / (1.0 + 2.0 * np.sum(weights)))


# --- validation at the edge -----------------------------------------------------------------------


def _positive_fraction(value: Fraction | int | float, name: str) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, Fraction | int | float):
        raise TypeError(f"{name} must be a Fraction, an int or a float, got {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        exact = Fraction(value).limit_denominator(_FLOAT_DENOMINATOR_LIMIT)
    else:
        exact = Fraction(value)
    if exact <= 0:
        raise ValueError(
            f"{name} must be > 0, got {value!r}"
            + (f" (exactly {exact} as a rational)" if exact != value else "")
        )
    return exact


def _sample_count(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int | np.integer):
        raise TypeError(f"size must be an int, got {size!r}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    return int(size)


# --- Algorithms 1-3 on integers -------------------------------------------------------------------
# `randbelow` is the bound method of the source, looked up once per call rather than per draw.


def _bernoulli_exp_minus_one(randbelow: Callable[[int], int]) -> bool:
    """Bernoulli(exp(-1)): Algorithm 1 with gamma = 1, whose first trial (probability 1/1) always
    succeeds and is skipped."""
    k = 2
    while randbelow(k) == 0:  # success with probability 1/k
        k += 1
    return k % 2 == 1


def _bernoulli_exp(numerator: int, denominator: int, randbelow: Callable[[int], int]) -> bool:
    """Bernoulli(exp(-gamma)) for gamma = numerator / denominator >= 0 (Algorithm 1)."""
    whole, numerator = divmod(numerator, denominator)
    # exp(-gamma) = exp(-1)^floor(gamma) * exp(-(gamma - floor(gamma))); stop at the first failure.
    for _ in range(whole):
        if not _bernoulli_exp_minus_one(randbelow):
            return False
    # For gamma in [0, 1]: count successive successes of Bernoulli(gamma / k); the count is odd with
    # probability exp(-gamma).
    k = 1
    while randbelow(denominator * k) < numerator:
        k += 1
    return k % 2 == 1


def _discrete_laplace_one(s: int, t: int, randbelow: Callable[[int], int]) -> int:
    """One sample of Lap_Z(t / s), P(x) ∝ exp(-|x| s / t) (Algorithm 2)."""
    while True:
        # X = U + t V with U | X ~ exp(-U/t) on [0, t) and V geometric: X is geometric, P(X) ∝
        # exp(-X/t).
        u = randbelow(t)
        if not _bernoulli_exp(u, t, randbelow):
            continue
        v = 0
        while _bernoulli_exp_minus_one(randbelow):
            v += 1
        y = (u + t * v) // s
        negative = randbelow(2)
        if negative and y == 0:
            continue  # otherwise 0 would be drawn twice as often as it should
        return -y if negative else y


def _discrete_gaussian_one(
    t: int, a: int, bt: int, denominator: int, randbelow: Callable[[int], int]
) -> int:
    """One sample of N_Z(0, a/b) by rejection from Lap_Z(t) (Algorithm 3); `bt` = b t and
    `denominator` = 2 a b t^2, precomputed by the caller."""
    while True:
        y = _discrete_laplace_one(1, t, randbelow)
        offset = abs(y) * bt - a
        if _bernoulli_exp(offset * offset, denominator, randbelow):
            return y
