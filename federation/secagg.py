"""The public parameters of Flower's SecAgg+ that both sides derive from the job and the number of
BUs: shares and reconstruction threshold, and the quantisation grid. A BU calibrates its noise share
from these (distributed placement) without asking the coordinator for anything else."""

from __future__ import annotations

from federation.job import SecureAggregation
from privacy.errors import ConfigurationError


def shares_and_threshold(units: int) -> tuple[int, int]:
    """Every BU shares with every other (SecAgg+'s graph is complete at these sizes); the threshold
    is the smallest majority above two thirds, at most units - 1."""
    if units < 3:
        raise ConfigurationError(
            f"secure aggregation needs at least 3 BUs (this job has {units}): with two, each BU "
            "could subtract its own reply from the sum and learn the other's"
        )
    return units, min(units - 1, (2 * units) // 3 + 1)


def grid_scale(config: SecureAggregation) -> float:
    """Grid steps per parameter unit of Flower's quantisation: q / (2 x clipping range)."""
    return config.quantization_range / (2 * config.clipping_range)


MODULUS_RANGE = 2**32  # SecAgg+'s modulus: the sum of quantised replies must stay below it
STATISTICS_RANGE_LIMIT = 2**24


def statistics_range(units: int) -> int:
    """The public range +-R of a statistics release under SecAgg+ (an integer grid of step 1 over
    [-R, R]): the largest power of two up to 2^24 whose grid, summed over `units` BUs, stays below
    the modulus. A BU whose counts or sums leave it refuses to send rather than be clipped."""
    bound = STATISTICS_RANGE_LIMIT
    while bound > 1 and units * 2 * bound >= MODULUS_RANGE:
        bound //= 2
    return bound
