"""The central noise placement: the wrapper really adds the configured noise, from the exact
sampler, whatever the number of surviving BUs; the BUs clip and account."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy import FedAvg

from clients.training import clip_update
from federation.job import Job, NoisePlacement, SecureAggregation
from privacy.accounting import (
    DpSgdEvent,
    central_noise_multiplier,
    central_noise_std,
    dp_sgd_epsilon,
)
from privacy.ledger import GaussianEvent
from privacy.samplers import SeededSource
from server.noise import CentralGaussianNoise
from tests.server.test_strategy import Proxy, SumPlusOne


def _replies(arrays: list[list[np.ndarray]]):
    return [
        (Proxy(i), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(a), 1, {}))
        for i, a in enumerate(arrays)
    ]


def _manager() -> SimpleClientManager:
    manager = SimpleClientManager()
    manager.register(Proxy(1))
    return manager


def test_zero_updates_come_back_with_exactly_the_configured_noise() -> None:
    wrapper = CentralGaussianNoise(
        FedAvg(min_fit_clients=1, min_available_clients=1),
        clip_norm=0.5,
        noise_multiplier=1.3,
        source=SeededSource(7),
    )
    wrapper.configure_fit(
        1, ndarrays_to_parameters([np.zeros(100_000, dtype=np.float32)]), _manager()
    )
    units = 4
    zeros = [[np.zeros(100_000, dtype=np.float32)] for _ in range(units)]
    parameters, _ = wrapper.aggregate_fit(1, _replies(zeros), [])
    (new,) = parameters_to_ndarrays(parameters)
    # The global model moves by the noisy sum / units: std of the noise on the sum is z x 2C.
    expected = central_noise_std(1.3, 0.5) / units
    assert central_noise_std(1.3, 0.5) == pytest.approx(1.3)
    assert abs(new.std() / expected - 1) < 0.03
    assert abs(new.mean()) < 5 * expected / np.sqrt(new.size)


def test_the_wrapper_is_really_applied_around_the_inner_strategy() -> None:
    inner = SumPlusOne()
    wrapper = CentralGaussianNoise(
        inner, clip_norm=0.5, noise_multiplier=1e-9, source=SeededSource(1)
    )
    wrapper.configure_fit(
        1, ndarrays_to_parameters([np.full(3, 10.0, dtype=np.float32)]), _manager()
    )
    parameters, _ = wrapper.aggregate_fit(1, _replies([[np.ones(3)], [np.ones(3)]]), [])
    # inner: 1 + 1 + 1 = 3 ("mean"); wrapper: global 10 + (3 x 2 units + ~0 noise) / 2 units = 13
    np.testing.assert_allclose(parameters_to_ndarrays(parameters)[0], 13.0, atol=1e-6)
    assert inner.calls == 1


def test_updates_are_clipped_to_the_norm_before_they_leave() -> None:
    update = clip_update([np.array([3.0, 4.0]), np.array([12.0])], clip_norm=1.3)
    assert np.sqrt(sum(float(np.sum(u * u)) for u in update)) == pytest.approx(1.3, rel=1e-6)
    short = clip_update([np.array([0.3, 0.4])], clip_norm=1.0)
    np.testing.assert_allclose(short[0], [0.3, 0.4], rtol=1e-6)


def test_central_accounting_is_a_gaussian_per_round_at_the_calibrated_multiplier() -> None:
    z = central_noise_multiplier(3.0, 1e-6, 5)
    event = GaussianEvent(sigma=central_noise_std(z, 1.0), sensitivity=2.0)
    assert event.as_dp_sgd() == DpSgdEvent(z, 1.0, 1)
    spent = dp_sgd_epsilon([event.as_dp_sgd()] * 5, 1e-6)
    assert 0.95 * 3.0 <= spent <= 3.0


def test_central_noise_needs_secure_aggregation() -> None:
    with pytest.raises(ValueError, match="needs secure_aggregation"):
        Job(noise=NoisePlacement.CENTRAL)
    Job(noise=NoisePlacement.CENTRAL, secure_aggregation=SecureAggregation(enabled=True))
