"""Local DP-SGD inside a BU, with Opacus (Abadi et al. 2016).

Poisson sampling (Opacus's `DPDataLoader`, the sampler its RDP accountant models), per-customer
gradient clipping and Gaussian noise. The accountant's history is handed in and handed back, so the
epsilon a BU reports is cumulative over every round of the run, never per round: Flower re-creates the
client each round, and the history lives in the node's state between rounds.

Every task's model is one `nn.Linear`, whose per-customer gradients have a closed form:
`private_linear_gradient` clips and noises them exactly as Opacus's hooks and `DPOptimizer` do
(the same clip factor, noise draws from the same generator, the same division), at a fraction of
their per-step cost. Other models go through Opacus's hooks. Both paths take Poisson batches
drawn as Opacus's `DPDataLoader` samples them (`poisson_batches`) and count every step, empty or
not, in Opacus's RDP accountant.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.linalg import vector_norm
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from federation.job import Training
from federation.models import get_parameters, set_parameters
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
    assert abs(1.0 / len(loader) - plan.sample_rate) < 1e-12
    optimizer = torch.optim.SGD(
        model.parameters(), lr=training.learning_rate, momentum=training.momentum
    )
    accountant = RDPAccountant()
    accountant.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in history]
    step = GaussianStep(
        clip_norm=training.clip_norm,
        noise_multiplier=noise_multiplier,
        # as `PrivacyEngine.make_private` derives it, so that both paths divide by the same number
        expected_batch_size=int(len(dataset) * (1 / len(loader))),
    )
    run = _linear_epochs if has_closed_form(model) else _opacus_epochs
    steps = run(
        model, optimizer, loader, generator, accountant, step, criterion, training.local_epochs
    )
    return LocalUpdate(
        parameters=get_parameters(model),
        history=tuple(DpSgdEvent(nm, q, n) for nm, q, n in accountant.history),
        steps=steps,
    )


@dataclass(frozen=True)
class GaussianStep:
    """The mechanism of one DP-SGD step, as Opacus's `DPOptimizer` applies it (flat clipping, loss
    reduction "mean"): each customer's gradient clipped to L2 norm `clip_norm`, the sum plus
    Gaussian noise of std `noise_multiplier * clip_norm`, divided by `expected_batch_size`."""

    clip_norm: float
    noise_multiplier: float
    expected_batch_size: int


def has_closed_form(model: nn.Module) -> bool:
    """Whether `model` is a single `nn.Linear` (every `federation.tasks` model is), whose
    per-customer gradients `private_linear_gradient` computes in closed form."""
    return type(model) is nn.Linear and all(p.requires_grad for p in model.parameters())


def private_linear_gradient(
    layer: nn.Linear,
    criterion: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    step: GaussianStep,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """The clipped, noised gradient Opacus's hooks and `DPOptimizer` give for one batch through one
    linear layer, one tensor per parameter in `layer.parameters()` order, without their per-step
    machinery (which made a step of DP-SGD cost about 3.5 steps of plain SGD on these models).

    Customer i's gradient is g_i x_i^T for the weight and g_i for the bias, where g_i is the
    gradient of its loss with respect to its output (`output_gradients`: closed form for the
    tasks' loss, autograd for any other per-customer loss): the outer product of g_i and
    [x_i, 1], of L2 norm ||g_i|| ||[x_i, 1]||.
    The clip factor, the order of the noise draws from `generator` (one per parameter, weight
    first) and the division are Opacus's own, so the result equals Opacus's on the same batch and
    generator state (tests/clients/test_training.py). An empty batch gives the noise alone."""
    with torch.no_grad():
        outputs = layer(features)
    gradients = output_gradients(criterion, outputs, labels)
    with torch.no_grad():
        # [x_i, 1] with a bias: one product then gives the weight's and the bias's sums together
        inputs = features if layer.bias is None else F.pad(features, (0, 1), value=1.0)
        norms = vector_norm(gradients, dim=1) * vector_norm(inputs, dim=1)
        factors = (step.clip_norm / (norms + 1e-6)).clamp(max=1.0)  # Opacus's clip factor
        total = (gradients * factors[:, None]).T @ inputs
        sums = [total] if layer.bias is None else [total[:, :-1], total[:, -1]]
        std = step.noise_multiplier * step.clip_norm
        if std > 0:  # Opacus draws no noise at std 0
            sums = [s + torch.normal(0.0, std, size=s.shape, generator=generator) for s in sums]
        return [s / step.expected_batch_size for s in sums]


def output_gradients(
    criterion: nn.Module, outputs: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Each customer's gradient of its loss with respect to its output, shaped as `outputs`.
    Binary cross-entropy on logits (every task's loss) has it in closed form, sigmoid(z) - y,
    the very expression of PyTorch's own backward for that loss (so the two agree bit for bit);
    any other per-customer loss goes through autograd."""
    if (
        type(criterion) is nn.BCEWithLogitsLoss
        and criterion.reduction == "none"
        and criterion.weight is None
        and criterion.pos_weight is None
        and outputs.shape[-1:] == (1,)
        and labels.shape == outputs.shape[:-1]
    ):
        return (torch.sigmoid(outputs.squeeze(-1)) - labels).unsqueeze(-1)
    outputs.requires_grad_(True)
    losses = criterion(outputs.squeeze(-1), labels)
    if losses.shape != labels.shape:
        raise ValueError(
            f"the loss returned shape {tuple(losses.shape)} for {len(labels)} customers; DP-SGD "
            "clips each customer's gradient, so the task's loss must use reduction=\"none\""
        )
    (gradients,) = torch.autograd.grad(losses.sum(), outputs)
    return gradients


def poisson_batches(loader: DPDataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of one epoch, drawn as the loader's Poisson sampler (Opacus's
    `UniformWithReplacementSampler`, the sampler the accountant models) draws them: per step one
    uniform number per customer from its generator, a customer taken when it falls below the
    sample rate. The rows are taken from the tensors in one indexing operation, rather than
    fetched one by one and collated, and without the sampler's detour through a Python list of
    indices (together a third of a step's time)."""
    sampler = loader.batch_sampler
    if type(sampler) is not UniformWithReplacementSampler:
        raise TypeError(f"DP-SGD batches come from Poisson sampling, not {type(sampler).__name__}")
    features, labels = loader.dataset.tensors
    for _ in range(sampler.steps):
        taken = torch.rand(sampler.num_samples, generator=sampler.generator) < sampler.sample_rate
        rows = taken.nonzero().reshape(-1)
        yield features.index_select(0, rows), labels.index_select(0, rows)


def _linear_epochs(model, optimizer, loader, generator, accountant, step, criterion, epochs) -> int:
    """DP-SGD on a single linear layer, with `private_linear_gradient`; every step, empty or not,
    is noised and counted, as Opacus's accountant hook counts it."""
    sample_rate = 1 / len(loader)
    steps = 0
    model.train()
    for _ in range(epochs):
        for batch_features, batch_labels in poisson_batches(loader):
            gradients = private_linear_gradient(
                model, criterion, batch_features, batch_labels, step, generator
            )
            for parameter, gradient in zip(model.parameters(), gradients, strict=True):
                parameter.grad = gradient
            accountant.step(noise_multiplier=step.noise_multiplier, sample_rate=sample_rate)
            optimizer.step()
            steps += 1
    return steps


def _opacus_epochs(model, optimizer, loader, generator, accountant, step, criterion, epochs) -> int:
    """DP-SGD through Opacus's hooks and `DPOptimizer`, for models without a closed form."""
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant = accountant  # the run's history, extended by Opacus's step hook
    private_model, private_optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=step.noise_multiplier,
        max_grad_norm=step.clip_norm,
        poisson_sampling=False,  # the loader already samples by Poisson, with our generator
        noise_generator=generator,
    )
    assert private_loader is loader
    assert private_optimizer.expected_batch_size == step.expected_batch_size
    private_model.train()
    steps = 0
    for _ in range(epochs):
        for batch_features, batch_labels in poisson_batches(loader):
            private_optimizer.zero_grad(set_to_none=True)
            outputs = private_model(batch_features).squeeze(-1)
            # mean over the batch, and a zero loss (but still a noisy, accounted step) when Poisson
            # sampling drew nobody: Opacus still adds the noise and the accountant counts the step
            loss = criterion(outputs, batch_labels).sum() / max(len(batch_labels), 1)
            loss.backward()
            private_optimizer.step()
            steps += 1
    private_model.cleanup()  # detach Opacus's hooks from the caller's model
    return steps


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
