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
