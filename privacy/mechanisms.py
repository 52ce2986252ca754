"""Discrete Gaussian releases of integer vectors: counts, bounded sums, histograms, score statistics.

Every statistic a BU releases outside DP-SGD is an integer vector on a public grid (a count is a
number of customers; a bounded sum is a number of grid steps of its declared granularity). Noise is
the discrete Gaussian N_Z(0, sigma^2), drawn by the exact sampler of `privacy.samplers` (Canonne,
Kamath & Steinke 2020), so the released numbers are integers again: no floating-point noise, no
least-significant-bit leak (Mironov 2012), and every released value is a multiple of its grid step.

Accounting: a vector whose L2 sensitivity is Delta (in grid units) released with N_Z(0, sigma^2) on
every coordinate is (Delta^2 / (2 sigma^2))-zCDP, exactly the bound of the continuous Gaussian
(Canonne et al., Thm. 4 and 14), so the ledger records it as a `GaussianEvent(sigma, Delta)` and
composes it with DP-SGD in RDP. A release with parts of different sensitivities (a count and a sum)
gives part a the noise z x Delta_a x sqrt(parts): the whole vector then has the privacy loss of one
Gaussian of multiplier z on a unit-sensitivity value.

Error bars come from the noise actually in the released sum (`NoiseInSum`): a list of independent
discrete Gaussian parts (one per BU under the local placement, one from the coordinator under the
central one, one share per surviving BU under the distributed one). Its quantiles are computed from
the exact probability mass function, convolved, not from a normal approximation (used only when the
support would pass a few million points, where the two agree to far below one grid step). Identical
parts, one per BU, convolve as a power of their Fourier transform, so a thousand parts cost one FFT.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from privacy.accounting import DpSgdEvent, calibrate_noise_multiplier
from privacy.errors import ConfigurationError
from privacy.ledger import GaussianEvent
from privacy.samplers import RandomSource, discrete_gaussian, discrete_gaussian_variance

_TAIL_SIGMAS = 14  # the pmf beyond 14 sigma is below 1e-42 of its mode: nothing at 95% or 99%
_EXACT_SUPPORT_LIMIT = 4_000_000
MIN_SHARE_SIGMA = 1.0  # below one grid step the sum of shares is no longer close to one N_Z


class Placement(StrEnum):
    """Where the noise of a release is added (the job's `noise`, DESIGN.md Guarantees 3)."""

    LOCAL = "local"
    CENTRAL = "central"
    DISTRIBUTED = "distributed"


def noise_multiplier(epsilon: float, delta: float, *, releases: int = 1, spent=()) -> float:
    """z such that `releases` Gaussian releases of multiplier z on unit-sensitivity values, after
    the events `spent`, reach at most `epsilon` at `delta` (Opacus's RDP accountant)."""
    return calibrate_noise_multiplier(epsilon, delta, 1.0, releases, spent=tuple(spent))


def part_sigmas(z: float, sensitivities: Sequence[float]) -> list[float]:
    """The noise of each part of a release whose parts have L2 `sensitivities` (grid units), so
    that the whole vector spends what one Gaussian release of multiplier `z` spends."""
    if not sensitivities or any(not s > 0 for s in sensitivities):
        raise ConfigurationError(
            f"every part of a release needs a positive sensitivity: {sensitivities}"
        )
    spread = math.sqrt(len(sensitivities))
    return [z * s * spread for s in sensitivities]


def gaussian_event_of(z: float) -> GaussianEvent:
    """The ledger event of one release at multiplier z (unit sensitivity)."""
    return GaussianEvent(sigma=z, sensitivity=1.0)


def release_as_dp_sgd(z: float) -> DpSgdEvent:
    return DpSgdEvent(z, 1.0, 1)


def unit_sigma(
    sigma: float, placement: Placement, *, threshold: int = 1, colluding: int = 0
) -> float:
    """The noise one BU adds to its own vector for a release whose sum must carry `sigma`:
    all of it (local: the BU's release is private on its own), none (central: the coordinator
    adds it to the secure sum), or a share (distributed: any `threshold - colluding` honest
    shares sum to at least sigma^2 of variance)."""
    if placement is Placement.LOCAL:
        return sigma
    if placement is Placement.CENTRAL:
        return 0.0
    honest = threshold - colluding
    if honest < 1:
        raise ConfigurationError(
            f"colluding BUs ({colluding}) must be fewer than the reconstruction threshold ({threshold})"
        )
    share = sigma / math.sqrt(honest)
    if share < MIN_SHARE_SIGMA:
        raise ConfigurationError(
            f"each BU's noise share would be {share:.3g} grid steps, below {MIN_SHARE_SIGMA}; "
            "the sum of shares is then not close to one discrete Gaussian. Use a finer grid or "
            "the local or central placement"
        )
    return share


def add_noise(vector: np.ndarray, sigma: float, source: RandomSource) -> np.ndarray:
    """`vector` (integers) plus independent N_Z(0, sigma^2) per coordinate; `sigma` 0 adds none."""
    values = np.asarray(vector)
    if not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"discrete noise goes on integer vectors, got dtype {values.dtype}")
    if sigma == 0:
        return values.astype(np.int64)
    return values.astype(np.int64) + discrete_gaussian(float(sigma), values.size, source).reshape(
        values.shape
    )


@dataclass(frozen=True)
class NoiseInSum:
    """The noise in a released sum, in grid units: independent N_Z(0, s^2) parts, s in `sigmas`."""

    sigmas: tuple[float, ...]

    @classmethod
    def of(
        cls,
        sigma: float,
        placement: Placement,
        *,
        contributors: int,
        threshold: int = 1,
        colluding: int = 0,
    ) -> NoiseInSum:
        """The noise in the sum of `contributors` BUs' replies for a release calibrated to `sigma`."""
        if placement is Placement.LOCAL:
            return cls((sigma,) * contributors)
        if placement is Placement.CENTRAL:
            return cls((sigma,))
        share = unit_sigma(sigma, placement, threshold=threshold, colluding=colluding)
        return cls((share,) * contributors)

    def scaled(self, factor: float) -> NoiseInSum:
        """The same noise for a part whose sensitivity is `factor` times larger."""
        return NoiseInSum(tuple(s * factor for s in self.sigmas))

    @property
    def variance(self) -> float:
        return float(sum(_variance(s) for s in self.sigmas if s > 0))

    @property
    def std(self) -> float:
        return math.sqrt(self.variance)

    def quantile(self, level: float = 0.95) -> int:
        """The smallest integer q with P(|noise| <= q) >= level, from the exact pmf."""
        if not 0 < level < 1:
            raise ValueError(f"level must lie in (0, 1), got {level}")
        parts = [s for s in self.sigmas if s > 0]
        if not parts:
            return 0
        reach = sum(math.ceil(_TAIL_SIGMAS * s) + 1 for s in parts)
        if 2 * reach + 1 > _EXACT_SUPPORT_LIMIT:
            from statistics import NormalDist

            return math.ceil(NormalDist().inv_cdf(0.5 + level / 2) * self.std)
        # Identical parts (one per BU) convolve as a power of their Fourier transform.
        groups = Counter(parts)
        size = 2 * reach + 1
        n = 1 << (size - 1).bit_length()
        spectrum = np.ones(n // 2 + 1, dtype=np.complex128)
        for sigma, count in groups.items():
            spectrum *= np.fft.rfft(_pmf(sigma), n) ** count
        pmf = np.clip(np.fft.irfft(spectrum, n)[:size], 0.0, None)
        pmf /= pmf.sum()
        centre = (len(pmf) - 1) // 2
        # P(|X| <= q) = pmf[centre] + 2 * sum_{k=1..q} pmf[centre + k] (the pmf is symmetric).
        inside = pmf[centre] + 2 * np.cumsum(pmf[centre + 1 :])
        inside = np.concatenate([[pmf[centre]], inside])
        return int(np.searchsorted(inside, level - 1e-12))


@functools.lru_cache(maxsize=4096)
def _variance(sigma: float) -> float:
    return discrete_gaussian_variance(sigma)


def _pmf(sigma: float) -> np.ndarray:
    reach = math.ceil(_TAIL_SIGMAS * sigma) + 1
    x = np.arange(-reach, reach + 1, dtype=np.float64)
    weights = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return weights / weights.sum()


def ratio_interval(
    numerator: float,
    denominator: float,
    numerator_noise: NoiseInSum,
    denominator_noise: NoiseInSum,
    *,
    level: float = 0.95,
) -> tuple[float, float]:
    """An interval for numerator / denominator when both carry independent noise, by the delta
    method: Var(N/D) ~ (Var N + r^2 Var D) / D^2. Used for means (sum / count) and rates."""
    from statistics import NormalDist

    if not denominator > 0:
        return (-math.inf, math.inf)
    ratio = numerator / denominator
    variance = (numerator_noise.variance + ratio * ratio * denominator_noise.variance) / (
        denominator * denominator
    )
    half = NormalDist().inv_cdf(0.5 + level / 2) * math.sqrt(variance)
    return (ratio - half, ratio + half)
