"""Flower's SecAgg+ for silofed rounds (Bell et al., CCS 2020; Flower's `SecAggPlusWorkflow`).

Two workflows with public, data-independent parameters: one for training (the job's clipping and
quantisation ranges; uniform weights) and one for statistics releases (evaluation, queries, k-means),
on an integer grid of step 1 so that counts and grid sums are summed exactly. Shares and threshold follow the number of BUs: every BU shares
with every other (SecAgg+'s graph is complete at these sizes), and the threshold is the smallest
majority above two thirds, so that up to a third of the BUs may drop out and fewer than that many
colluding BUs (with the coordinator) learn nothing of another BU's reply.
"""

from __future__ import annotations

from flwr.server.workflow import SecAggPlusWorkflow

from federation.job import SecureAggregation
from federation.secagg import MODULUS_RANGE, shares_and_threshold, statistics_range
from federation.wire import Phase
from privacy.errors import ConfigurationError


def secure_workflows(units: int, config: SecureAggregation) -> dict[Phase, SecAggPlusWorkflow]:
    shares, threshold = shares_and_threshold(units)
    statistics = statistics_range(units)
    evaluation_grid = 2 * statistics  # step 1 over [-R, R]
    for phase, grid in (
        (Phase.TRAIN, config.quantization_range),
        (Phase.EVALUATE, evaluation_grid),
    ):
        if units * grid >= MODULUS_RANGE:  # the sum of quantised replies must not wrap around
            raise ConfigurationError(
                f"{units} BUs x a {phase} grid of {grid} overflow SecAgg+'s modulus 2^32; lower "
                "secure_aggregation.quantization_range"
            )
    common = dict(
        num_shares=shares,
        reconstruction_threshold=threshold,
        max_weight=1.0,
        modulus_range=MODULUS_RANGE,
        timeout=config.timeout,
    )
    releases = SecAggPlusWorkflow(
        clipping_range=float(statistics), quantization_range=evaluation_grid, **common
    )
    return {
        Phase.TRAIN: SecAggPlusWorkflow(
            clipping_range=config.clipping_range,
            quantization_range=config.quantization_range,
            **common,
        ),
        **dict.fromkeys((Phase.RANGES, Phase.EVALUATE, Phase.QUERY, Phase.SEGMENTS), releases),
    }
