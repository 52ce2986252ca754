"""Differential-privacy accounting for DP-SGD (Abadi et al. 2016; Mironov 2017, RDP).

Privacy spending is a sequence of immutable events; the epsilon of a sequence at a given delta is
computed by Opacus's RDP accountant (never by a home-made one), so the figure a report shows is the
figure Opacus would show for the same noise multiplier, sample rate and steps. Calibration searches the
noise multiplier that spends a target epsilon over a planned number of steps, never exceeding it.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from privacy.errors import ConfigurationError


@dataclass(frozen=True)
class DpSgdEvent:
    """`steps` DP-SGD steps with Poisson sampling at `sample_rate` and Gaussian noise of
    standard deviation `noise_multiplier` x clipping norm."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and 0 < self.sample_rate <= 1 and self.steps >= 0):
            raise ValueError(f"invalid DP-SGD event {self}")


@dataclass(frozen=True)
class LaplaceEvent:
    """One release of the Laplace mechanism: noise of scale `scale` on a value of L1 sensitivity
    `sensitivity`, that is pure epsilon = sensitivity / scale."""

    scale: float
    sensitivity: float

    def __post_init__(self) -> None:
        if not (self.scale > 0 and self.sensitivity > 0):
            raise ValueError(f"invalid Laplace event {self}")

    @property
    def pure_epsilon(self) -> float:
        return self.sensitivity / self.scale


ORDERS = RDPAccountant.DEFAULT_ALPHAS  # the RDP orders of Opacus's accountant


def laplace_rdp(pure_epsilon: float, orders: Sequence[float] = ORDERS) -> np.ndarray:
    """The RDP curve of the Laplace mechanism (Mironov 2017, Prop. 6; tight), at orders > 1."""
    a = np.asarray(orders, dtype=np.float64)
    return np.logaddexp(
        np.log(a / (2 * a - 1)) + (a - 1) * pure_epsilon,
        np.log((a - 1) / (2 * a - 1)) - a * pure_epsilon,
    ) / (a - 1)


ALL = "all"  # a release that may touch any customer
TRAIN = "train"  # touches training customers only
HOLDOUT = "holdout"  # touches held-out customers only (the keyed-hash split of the run)
PARTS = (ALL, TRAIN, HOLDOUT)

Composable = DpSgdEvent | LaplaceEvent


@functools.lru_cache(maxsize=65536)
def _step_curve(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """Opacus's RDP curve of one DP-SGD step, memoised: its series for fractional orders is pure
    Python and costs about 50 ms, and calibration, ledgers and reports ask for the same few
    (sample rate, noise multiplier) pairs again and again. `compute_rdp` multiplies the one-step
    curve by the number of steps, so `steps * _step_curve(...)` is its result bit for bit."""
    curve = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=ORDERS)
    curve.setflags(write=False)
    return curve


def _curve(events: Sequence[Composable]) -> np.ndarray:
    curves = [
        _step_curve(e.sample_rate, e.noise_multiplier) * e.steps
        for e in events
        if isinstance(e, DpSgdEvent) and e.steps
    ] + [laplace_rdp(e.pure_epsilon) for e in events if isinstance(e, LaplaceEvent)]
    return np.sum(curves, axis=0) if curves else np.zeros(len(ORDERS))


def _pure(events: Sequence[Composable]) -> float:
    return sum(e.pure_epsilon for e in events if isinstance(e, LaplaceEvent))


def partitioned_epsilon(runs: Sequence[Mapping[str, Sequence[Composable]]], delta: float) -> float:
    """Epsilon at `delta` of several runs, each a map from part (`ALL`, `TRAIN`, `HOLDOUT`) to its
    events. Within a run, the training and the held-out customers are disjoint (a keyed hash of the
    customer id splits them, whatever the data): a customer added or removed changes the releases
    of its own part only, so a run's RDP curve is that of its `ALL` events plus the larger of its
    two parts' curves (parallel composition, pointwise in the order). Runs compose by adding their
    curves; Opacus's `get_privacy_spent` converts the sum."""
    total = np.zeros(len(ORDERS))
    pure_total, all_pure, any_event = 0.0, True, False
    for run in runs:
        unknown = set(run) - set(PARTS)
        if unknown:
            raise ValueError(f"unknown parts {sorted(unknown)}; a part is one of {PARTS}")
        events = [e for part in run.values() for e in part]
        any_event = any_event or any(isinstance(e, LaplaceEvent) or e.steps for e in events)
        all_pure = all_pure and all(isinstance(e, LaplaceEvent) for e in events)
        total += _curve(run.get(ALL, ())) + np.maximum(
            _curve(run.get(TRAIN, ())), _curve(run.get(HOLDOUT, ()))
        )
        pure_total += _pure(run.get(ALL, ())) + max(
            _pure(run.get(TRAIN, ())), _pure(run.get(HOLDOUT, ()))
        )
    if not any_event:
        return 0.0
    with warnings.catch_warnings():
        # Opacus notes when the best order is its largest; for pure-DP curves that is expected,
        # and the pure bound below is then the tighter one.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        epsilon, _ = get_privacy_spent(orders=ORDERS, rdp=total, delta=delta)
    if all_pure:
        # Pure-DP releases alone also compose by adding their epsilons (basic composition).
        epsilon = min(float(epsilon), pure_total)
    return float(epsilon)


def composed_epsilon(events: Sequence[Composable], delta: float) -> float:
    """Epsilon at `delta` of `events` composed in RDP at Opacus's orders: DP-SGD curves by Opacus's
    `compute_rdp`, Laplace curves by `laplace_rdp`, converted by Opacus's `get_privacy_spent`. For
    DP-SGD events alone this is exactly what Opacus's RDPAccountant computes."""
    return partitioned_epsilon([{ALL: list(events)}], delta)


def dp_sgd_epsilon(events: Sequence[DpSgdEvent], delta: float) -> float:
    """Epsilon at `delta` of all `events` composed, by Opacus's RDP accountant."""
    return composed_epsilon(events, delta)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    *,
    relative_tolerance: float = 0.05,
    spent: Sequence[DpSgdEvent] = (),
    holdout: Sequence[DpSgdEvent] = (),
) -> float:
    """The noise multiplier whose `steps` steps at `sample_rate`, composed after `spent`, reach an
    epsilon in [(1 - relative_tolerance) x target, target] at `delta`. Never above the target.
    `holdout`: releases of the same run on the held-out customers only, which compose with these
    steps in parallel (`partitioned_epsilon`). Memoised: a BU's every exchange, the coordinator
    and the reports ask for the same calibration, and each costs a search of a few milliseconds
    (far more while the RDP curves it visits are new)."""
    return _calibrated(
        target_epsilon,
        delta,
        sample_rate,
        steps,
        relative_tolerance,
        tuple(spent),
        tuple(holdout),
    )


@functools.lru_cache(maxsize=4096)
def _calibrated(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    relative_tolerance: float,
    spent: tuple[DpSgdEvent, ...],
    holdout: tuple[DpSgdEvent, ...],
) -> float:
    if (
        not (math.isfinite(target_epsilon) and target_epsilon > 0 and 0 < delta < 1 and steps > 0)
        or not 0 < sample_rate <= 1
    ):
        raise ConfigurationError(
            f"cannot calibrate noise for epsilon={target_epsilon}, delta={delta}, "
            f"sample_rate={sample_rate}, steps={steps}: all must be positive (delta and the "
            "sample rate below 1)."
        )

    def epsilon(sigma: float) -> float:
        return dp_sgd_epsilon([*spent, DpSgdEvent(sigma, sample_rate, steps)], delta)

    def with_holdout(sigma: float) -> float:
        steps_taken = [*spent, DpSgdEvent(sigma, sample_rate, steps)]
        return partitioned_epsilon([{TRAIN: steps_taken, HOLDOUT: list(holdout)}], delta)

    low, high = 0.0, 1.0
    while epsilon(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise ConfigurationError(
                f"no noise multiplier reaches epsilon {target_epsilon} at delta {delta} with {steps} "
                f"steps at sample rate {sample_rate}: the RDP accountant cannot certify an epsilon "
                "this small at this delta; raise epsilon or delta."
            )
    for _ in range(200):
        if epsilon(high) >= (1 - relative_tolerance) * target_epsilon:
            break
        mid = (low + high) / 2
        if epsilon(mid) <= target_epsilon:
            high = mid
        else:
            low = mid
        if math.isclose(low, high, rel_tol=1e-12):
            break
    if not holdout or with_holdout(high) <= target_epsilon:
        return high
    # The run's curve is the larger of the two sides' at each order; where the held-out side's
    # curve makes it pass the target, the least extra noise that brings it back is searched.
    low, high = high, high * 2
    while with_holdout(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise ConfigurationError(
                f"the held-out releases alone reach epsilon {target_epsilon} at delta {delta}; "
                "lower evaluation.epsilon"
            )
    while not math.isclose(low, high, rel_tol=1e-4):
        mid = (low + high) / 2
        if with_holdout(mid) <= target_epsilon:
            high = mid
        else:
            low = mid
    return high


def central_noise_multiplier(
    target_epsilon: float,
    delta: float,
    rounds: int,
    *,
    spent: Sequence[DpSgdEvent] = (),
    holdout: Sequence[DpSgdEvent] = (),
) -> float:
    """Central placement: the multiplier z of the Gaussian noise (std z x sensitivity) the
    coordinator adds to each round's sum so that `rounds` rounds, every BU taking part in each
    (no sampling), after the run's releases `spent` on the same customers, spend at most
    `target_epsilon` at `delta` (with the run's `holdout` releases in parallel)."""
    return calibrate_noise_multiplier(
        target_epsilon, delta, 1.0, rounds, spent=spent, holdout=holdout
    )


def central_noise_std(noise_multiplier: float, clip_norm: float) -> float:
    """Central placement: standard deviation of the noise on a round's sum, z x sensitivity with
    sensitivity 2C (a customer added or removed moves one BU's clipped update anywhere in its
    C-ball)."""
    return noise_multiplier * 2 * clip_norm


@dataclass(frozen=True)
class DistributedPlan:
    """The distributed discrete Gaussian of one job (Kairouz, Liu & Steinke, ICML 2021), in grid
    units (one grid step = 1 / `scale` in parameter units)."""

    scale: float  # grid steps per parameter unit: SecAgg+'s quantisation grid
    l2_bound: float  # bound on the L2 norm of a BU's rounded, clipped update
    noise_multiplier: float  # z: total noise std / customer-level sensitivity (2 x l2_bound)
    total_std: float  # what the shares of (threshold - colluding) honest BUs sum to, at least
    share_std: float  # each BU's share

    @property
    def sensitivity(self) -> float:
        return 2 * self.l2_bound


def distributed_plan(
    target_epsilon: float,
    delta: float,
    rounds: int,
    *,
    clip_norm: float,
    dimension: int,
    scale: float,
    threshold: int,
    colluding: int,
    spent: Sequence[DpSgdEvent] = (),
    holdout: Sequence[DpSgdEvent] = (),
) -> DistributedPlan:
    """Shares calibrated from the start for the reconstruction threshold t: any sum of at least t
    BUs' replies, of which at most `colluding` BUs reveal their own shares to the coordinator,
    carries noise of at least `total_std`, so every run that SecAgg+ completes meets the target.

    The rounded update's norm bound is that of conditional randomized rounding (KLS 2021, Sec. 4,
    with beta = exp(-1/2)); the total noise is accounted as a Gaussian of that std per round.
    The distance between the sum of t discrete Gaussians and one discrete Gaussian (their tau,
    below 10 x sum_k exp(-2 pi^2 sigma^2 k/(k+1))) vanishes for the share stds used here (>= 4
    grid steps, refused below), and is not added."""
    if not 0 <= colluding < threshold:
        raise ConfigurationError(
            f"colluding BUs ({colluding}) must be fewer than the reconstruction threshold ({threshold})"
        )
    c = scale * clip_norm
    beta = math.exp(-0.5)
    l2_bound = math.sqrt(
        c * c + dimension / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(dimension) / 2)
    )
    z = central_noise_multiplier(target_epsilon, delta, rounds, spent=spent, holdout=holdout)
    total = z * 2 * l2_bound
    share = total / math.sqrt(threshold - colluding)
    if share < 4:
        raise ConfigurationError(
            f"each BU's noise share would be {share:.3g} grid steps; refine the grid "
            "(secure_aggregation.quantization_range) so that shares are at least 4 steps"
        )
    return DistributedPlan(scale, l2_bound, z, total, share)
