"""How the coordinator combines model updates: the job's rule on Flower's strategies, and the
checks every reply passes before it is combined.

Flower's strategies average whatever comes back: a NaN, a reply of the wrong shape, or a
`num_examples` of 10^12 that makes one BU the whole model. silofed validates each reply first
(`check_update`, `check_vector`) and keeps a rejected one out, with its reason, in the audit log and
the report. The robust rules are Flower's own (`FedTrimmedAvg`, `FedMedian`, `Krum`); a rule is
refused when there are too few BUs for it to bound anything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from flwr.server.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum, Strategy

from federation.job import Aggregation, AggregationRule
from privacy.errors import ConfigurationError
from privacy.schema import SiloSchema

# The largest weight a BU that declares no size may claim: no silo holds a billion customers, and a
# larger weight is not a customer count but an attempt to outweigh the others.
UNDECLARED_MAX_CUSTOMERS = 10**9


def declared_sizes(schemas: Sequence[SiloSchema]) -> dict[str, int]:
    """BU -> the size bound its schema declares (`max_customers`), for the BUs that declare one."""
    return {s.unit: s.max_customers for s in schemas if s.max_customers is not None}


def minimum_units(aggregation: Aggregation) -> int:
    """The fewest BUs for which the rule bounds a hostile update: trimmed mean cuts at least one
    value at each end, a median needs a majority of honest values, and Krum needs n >= 2f + 3
    (Blanchard et al. 2017, Prop. 1)."""
    match aggregation.rule:
        case AggregationRule.MEAN:
            return 1
        case AggregationRule.TRIMMED_MEAN:
            return math.ceil(1 / aggregation.trim - 1e-9)
        case AggregationRule.MEDIAN:
            return 3
        case AggregationRule.KRUM:
            return 2 * aggregation.byzantine + 3
    raise AssertionError(aggregation.rule)


def quorum(aggregation: Aggregation, taking_part: int) -> int:
    """How many valid replies an exchange needs: the job's share of the BUs taking part, and never
    fewer than the rule needs."""
    share = math.ceil(aggregation.quorum * taking_part - 1e-9)
    return max(1, share, minimum_units(aggregation))


def model_strategy(aggregation: Aggregation, units: int, **common) -> Strategy:
    """The Flower strategy that combines model updates under `aggregation`, for a run of `units`
    BUs; `common`: the arguments every Flower strategy takes (fractions, minimum clients ...)."""
    needed = minimum_units(aggregation)
    if units < needed:
        raise ConfigurationError(
            f"aggregation.rule = '{aggregation.rule}' needs at least {needed} BUs "
            f"({_bound(aggregation)}); this run has {units}. Use more BUs or rule = 'mean'"
        )
    match aggregation.rule:
        case AggregationRule.MEAN:
            return FedAvg(**common)
        case AggregationRule.TRIMMED_MEAN:
            return FedTrimmedAvg(beta=aggregation.trim, **common)
        case AggregationRule.MEDIAN:
            return FedMedian(**common)
        case AggregationRule.KRUM:
            return Krum(
                num_malicious_clients=aggregation.byzantine, num_clients_to_keep=0, **common
            )
    raise AssertionError(aggregation.rule)


def _bound(aggregation: Aggregation) -> str:
    match aggregation.rule:
        case AggregationRule.TRIMMED_MEAN:
            return f"trim {aggregation.trim} cuts nothing below 1/trim BUs"
        case AggregationRule.MEDIAN:
            return "a median bounds one hostile value among three"
        case AggregationRule.KRUM:
            return f"Krum tolerates f = {aggregation.byzantine} hostile BUs only among 2f + 3"
    return ""


def check_update(
    arrays: list[np.ndarray],
    expected: list[np.ndarray],
    weight: object,
    *,
    max_weight: int | None,
    records_used: int | None,
) -> str | None:
    """Why a model update may not be combined, or None: the arrays must be the model's (count,
    shapes, dtypes) and finite, and the weight a whole number of customers from 1 to the BU's
    declared size, equal to the training customers its report discloses."""
    if len(arrays) != len(expected):
        return f"{len(arrays)} arrays where the model has {len(expected)}"
    for index, (got, want) in enumerate(zip(arrays, expected, strict=True)):
        if got.shape != want.shape:
            return f"array {index} has shape {got.shape}, the model's is {want.shape}"
        if got.dtype != want.dtype:
            return f"array {index} has dtype {got.dtype}, the model's is {want.dtype}"
        if not np.all(np.isfinite(got)):
            return f"array {index} holds {int(np.sum(~np.isfinite(got)))} non-finite values"
    return check_weight(weight, max_weight=max_weight, records_used=records_used)


def check_weight(weight: object, *, max_weight: int | None, records_used: int | None) -> str | None:
    """`max_weight`: the BU's declared size (None: it declares none)."""
    if isinstance(weight, bool) or not isinstance(weight, int | np.integer):
        return f"weight {weight!r} is not a whole number of customers"
    if max_weight is None:
        if not 1 <= weight <= UNDECLARED_MAX_CUSTOMERS:
            return (
                f"weight {weight} is outside 1..{UNDECLARED_MAX_CUSTOMERS}, the most a BU "
                "without a declared max_customers may claim"
            )
    elif not 1 <= weight <= max_weight:
        return f"weight {weight} is outside 1..{max_weight}, the BU's declared size"
    if records_used is not None and weight != records_used:
        return f"weight {weight} differs from the {records_used} training customers it reports"
    return None


def check_vector(arrays: list[np.ndarray], size: int) -> str | None:
    """Why a statistics reply may not be summed, or None: one vector of `size` integers."""
    if len(arrays) != 1 or arrays[0].shape != (size,):
        shapes = [a.shape for a in arrays]
        return f"arrays of shapes {shapes} where the release is one vector of {size} values"
    (vector,) = arrays
    if not np.all(np.isfinite(vector)):
        return f"{int(np.sum(~np.isfinite(vector)))} non-finite values"
    if np.max(np.abs(vector - np.rint(vector)), initial=0) > 1e-6:
        return "values off the release's integer grid"
    return None
