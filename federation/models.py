"""Model parameters shared by the coordinator (initialisation, saving, scoring) and the BUs
(training). Parameters travel as a list of numpy arrays in `state_dict` order. The models themselves
belong to the tasks (`federation.tasks`)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from federation.job import Task
from federation.tasks import adapter


def build_model(task: Task, input_dim: int) -> nn.Module:
    """A fresh model for `task` (see `federation.tasks`)."""
    return adapter(task).build_model(input_dim)


def initial_parameters(task: Task, input_dim: int) -> list[np.ndarray]:
    """Public, data-independent starting point: all zeros (a convex problem needs no symmetry
    breaking, and zeros make every run start from the same model)."""
    model = build_model(task, input_dim)
    return [np.zeros(t.shape, dtype=np.float32) for t in model.state_dict().values()]


def get_parameters(model: nn.Module) -> list[np.ndarray]:
    return [t.detach().cpu().numpy().copy() for t in model.state_dict().values()]


def set_parameters(model: nn.Module, parameters: list[np.ndarray]) -> None:
    state = model.state_dict()
    if len(parameters) != len(state):
        raise ValueError(f"expected {len(state)} parameter arrays, got {len(parameters)}")
    new_state = {}
    for (name, current), array in zip(state.items(), parameters, strict=True):
        if tuple(array.shape) != tuple(current.shape):
            raise ValueError(
                f"parameter {name}: expected shape {tuple(current.shape)}, got {array.shape}"
            )
        new_state[name] = torch.as_tensor(np.asarray(array, dtype=np.float32))
    model.load_state_dict(new_state, strict=True)


def predict_proba(model: nn.Module, features: np.ndarray) -> np.ndarray:
    """A binary task's probabilities (every binary task's model is the same)."""
    return adapter(Task.CHURN).predict(model, features)
