"""Local DP-SGD inside a BU, with Opacus (Abadi et al. 2016).

Poisson sampling (Opacus's `DPDataLoader`, the sampler its RDP accountant models), per-customer
gradient clipping and Gaussian noise. The accountant's history is handed in and handed back, so the
epsilon a BU reports is cumulative over every round of the run, never per round: Flower re-creates the
client each round, and the history lives in the node's state between rounds.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from federation.job import Training
from federation.models import set_parameters
from privacy.accounting import DpSgdEvent


@dataclass(frozen=True)
class LocalPlan:
    """The DP-SGD plan of one BU for a run: derived from its size and the public job alone."""

    records: int
    sample_rate: float
    steps_per_round: int


def local_plan(records: int, training: Training) -> LocalPlan:
    batches = max(1, -(-records // training.expected_batch_size))  # ceil
    return LocalPlan(records, 1.0 / batches, batches * training.local_epochs)


@dataclass(frozen=True)
class LocalUpdate:
    parameters: list[np.ndarray]
    history: tuple[DpSgdEvent, ...]
    steps: int


def entropy_generator(seed: int | None) -> torch.Generator:
    """The generator for Poisson sampling and noise: seeded only in simulation; otherwise from the
    operating system's entropy (Opacus's secure_mode needs torchcsprng, which is unavailable)."""
    return torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)


def train_dp_sgd(
    model: nn.Module,
    parameters: list[np.ndarray],
    features: np.ndarray,
    labels: np.ndarray,
    training: Training,
    noise_multiplier: float,
    history: Sequence[DpSgdEvent],
    generator: torch.Generator,
    *,
    loss: nn.Module | None = None,
) -> LocalUpdate:
    """One round of local DP-SGD from `parameters`; returns the new parameters and the accountant's
    history extended by this round's steps. `loss` is the task's per-customer loss
    (`TaskAdapter.loss()`); binary cross-entropy when not given."""
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off: known and stated in every report (torchcsprng is
        # unavailable); `generator` is seeded from OS entropy outside simulation.
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")
        return _train(
            model,
            parameters,
            features,
            labels,
            training,
            noise_multiplier,
            history,
            generator,
            loss if loss is not None else _binary_cross_entropy(),
        )


def _binary_cross_entropy() -> nn.Module:
    return nn.BCEWithLogitsLoss(reduction="none")


def _train(
    model, parameters, features, labels, training, noise_multiplier, history, generator, criterion
):
    set_parameters(model, parameters)
    dataset = TensorDataset(torch.as_tensor(features), torch.as_tensor(labels))
    plan = local_plan(len(dataset), training)
    loader = DPDataLoader.from_data_loader(
        DataLoader(dataset, batch_size=training.expected_batch_size), generator=generator
    )
    optimizer = torch.optim.SGD(
        model.parameters(), lr=training.learning_rate, momentum=training.momentum
    )
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in history]
    private_model, private_optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=training.clip_norm,
        poisson_sampling=False,  # the loader above already samples by Poisson, with our generator
        noise_generator=generator,
    )
    assert isinstance(private_loader, DPDataLoader)
    assert abs(1.0 / len(private_loader) - plan.sample_rate) < 1e-12
    private_model.train()
    steps = 0
    for _ in range(training.local_epochs):
        # The loader's own Poisson sampler draws each batch (the sampler the accountant models, with
        # our generator); the rows are then taken from the tensors in one indexing operation rather
        # than fetched one by one and collated, which cost more than the DP-SGD step itself.
        for indices in private_loader.batch_sampler:
            batch_features, batch_labels = dataset.tensors[0][indices], dataset.tensors[1][indices]
            private_optimizer.zero_grad(set_to_none=True)
            outputs = private_model(batch_features).squeeze(-1)
            # mean over the batch, and a zero loss (but still a noisy, accounted step) when Poisson
            # sampling drew nobody: Opacus still adds the noise and the accountant counts the step
            loss = criterion(outputs, batch_labels).sum() / max(len(batch_labels), 1)
            loss.backward()
            private_optimizer.step()
            steps += 1
    new_history = tuple(DpSgdEvent(nm, q, n) for nm, q, n in engine.accountant.history)
    parameters_out = [t.detach().cpu().numpy().copy() for t in model.state_dict().values()]
    private_model.cleanup()  # detach Opacus's hooks from the caller's model
    return LocalUpdate(parameters=parameters_out, history=new_history, steps=steps)


def train_clipped_update(
    model: nn.Module,
    parameters: list[np.ndarray],
    features: np.ndarray,
    labels: np.ndarray,
    training: Training,
    generator: torch.Generator,
    *,
    loss: nn.Module | None = None,
) -> tuple[list[np.ndarray], int]:
    """Central placement: local SGD without noise, and the update (new - received parameters)
    clipped to L2 norm `training.clip_norm` over all parameters. Returns the clipped update and
    the number of steps. The update alone is not private: it may only leave the BU inside a
    SecAgg+ sum, to which the coordinator adds the noise. `loss` as for `train_dp_sgd`."""
    criterion = loss if loss is not None else _binary_cross_entropy()
    set_parameters(model, parameters)
    dataset = TensorDataset(torch.as_tensor(features), torch.as_tensor(labels))
    loader = DataLoader(
        dataset, batch_size=training.expected_batch_size, shuffle=True, generator=generator
    )
    optimizer = torch.optim.SGD(
        model.parameters(), lr=training.learning_rate, momentum=training.momentum
    )
    steps = 0
    model.train()
    for _ in range(training.local_epochs):
        for batch_features, batch_labels in loader:
            optimizer.zero_grad(set_to_none=True)
            value = criterion(model(batch_features).squeeze(-1), batch_labels).mean()
            value.backward()
            optimizer.step()
            steps += 1
    new = [t.detach().cpu().numpy().astype(np.float64) for t in model.state_dict().values()]
    update = [n - np.asarray(p, dtype=np.float64) for n, p in zip(new, parameters, strict=True)]
    return clip_update(update, training.clip_norm), steps


def clip_update(update: list[np.ndarray], clip_norm: float) -> list[np.ndarray]:
    """The update scaled down to L2 norm `clip_norm` (over all arrays) when it is longer."""
    norm = float(np.sqrt(sum(float(np.sum(u * u)) for u in update)))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return [(u * scale).astype(np.float32) for u in update]


def conditional_round(values: np.ndarray, bound: float, rng: np.random.Generator) -> np.ndarray:
    """Randomized rounding of `values` (grid units) to integers, repeated until the result's L2
    norm is within `bound` (Kairouz, Liu & Steinke 2021, conditional randomized rounding): unbiased
    before the condition, and the norm bound the noise is calibrated for always holds."""
    floor = np.floor(values)
    fraction = values - floor
    for _ in range(1000):
        rounded = floor + (rng.random(values.shape) < fraction)
        if float(np.sqrt(np.sum(rounded * rounded))) <= bound:
            return rounded.astype(np.int64)
    raise RuntimeError("conditional rounding did not meet its norm bound in 1,000 tries")
