"""Model updates applied to the global model, and the coordinator's noise for the `central` placement
(DESIGN.md, Guarantees 3).

Under `central` and `distributed` placements the BUs send clipped model *updates*; `AppliedUpdates`
adds the aggregated update to the global model. `CentralGaussianNoise` also adds the noise:

A strategy wrapper in the spirit of Flower's `DifferentialPrivacyClientSideFixedClipping`: the BUs
clip their model updates to L2 norm C and send them under SecAgg+; the wrapped strategy averages the
sum (uniform weights); this wrapper turns the average back into the sum, adds Gaussian noise of
standard deviation z x 2C (one customer can move a BU's clipped update by up to 2C) and applies the
noisy average update to the global model. Unlike Flower's wrapper, the noise comes from an exact
discrete Gaussian sampler (Canonne, Kamath & Steinke 2020) over the operating system's secure
randomness, on a grid of std / 1024, never from `np.random`; and it is added whatever the number of
surviving BUs, so dropouts never leave the sum under-noised.

The coordinator sees the exact sum before adding the noise: the report says so.
"""

from __future__ import annotations

import numpy as np
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from privacy.accounting import central_noise_std
from privacy.samplers import RandomSource, discrete_gaussian

GRID_STEPS_PER_STD = 1024


class AppliedUpdates(Strategy):
    """The replies are model updates; the wrapped strategy averages them (uniform weights under
    SecAgg+); the result is the global model plus (the sum of the updates + `noise_on_sum`) / the
    number of BUs. Under `distributed` the BUs' noise shares are already inside the sum."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        self._global: list[np.ndarray] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"

    def noise_on_sum(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape)

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self._global = parameters_to_ndarrays(parameters)
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict]:
        if not results or self._global is None:
            return None, {}
        mean, metrics = self.inner.aggregate_fit(server_round, results, failures)
        if mean is None:
            return None, metrics
        units = len(results)
        noisy_sums = [
            m.astype(np.float64) * units + self.noise_on_sum(m.shape)
            for m in parameters_to_ndarrays(mean)
        ]
        updated = [
            (g.astype(np.float64) + s / units).astype(np.float32)
            for g, s in zip(self._global, noisy_sums, strict=True)
        ]
        return ndarrays_to_parameters(updated), metrics

    def configure_evaluate(self, server_round, parameters, client_manager):
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round, results, failures):
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round, parameters):
        return self.inner.evaluate(server_round, parameters)


class CentralGaussianNoise(AppliedUpdates):
    def __init__(
        self, inner: Strategy, *, clip_norm: float, noise_multiplier: float, source: RandomSource
    ) -> None:
        super().__init__(inner)
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.source = source

    def __repr__(self) -> str:
        return f"CentralGaussianNoise({self.inner!r}, z={self.noise_multiplier:.4f}, C={self.clip_norm})"

    def noise_on_sum(self, shape: tuple[int, ...]) -> np.ndarray:
        std = central_noise_std(self.noise_multiplier, self.clip_norm)
        grid = std / GRID_STEPS_PER_STD
        size = int(np.prod(shape))
        draws = discrete_gaussian(GRID_STEPS_PER_STD, size, self.source)
        return (draws.astype(np.float64) * grid).reshape(shape)
