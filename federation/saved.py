"""What a run directory's `model.pt` holds, and how it is read back.

Tensors and JSON text only, so that `torch.load(..., weights_only=True)` reads it and no file can
make silofed execute code. A model job saves its task's model with the feature spec that builds its
inputs; a segments job saves its centroids with the feature spec that places a customer. The job
itself is saved too, so scoring inside a BU uses the run's purpose and hold-out split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from federation.features import FeatureSpec
from federation.job import Job, JobKind, Task
from federation.models import set_parameters
from federation.tasks import adapter
from privacy.errors import ConfigurationError

MODEL_FORMAT = "silofed.model/1"
SEGMENTS_FORMAT = "silofed.segments/1"


def saved_model(job: Job, parameters: list) -> dict:
    """What `model.pt` holds: tensors and JSON text only, so `torch.load(weights_only=True)`
    reads it. A k-means run saves its centroids with the feature spec that places a customer."""
    if job.kind is JobKind.SEGMENTS:
        (centroids,) = parameters
        return {
            "format": SEGMENTS_FORMAT,
            "task": "segments",
            "centroids": torch.as_tensor(np.asarray(centroids, dtype=np.float64)),
            "feature_spec": job.feature_spec.model_dump_json(),
            "job": job.model_dump_json(),
        }
    model = adapter(job.task).build_model(job.feature_spec.dim)
    set_parameters(model, parameters)
    return {
        "format": MODEL_FORMAT,
        "task": job.task.value,
        "state_dict": model.state_dict(),
        "feature_spec": job.feature_spec.model_dump_json(),
        "job": job.model_dump_json(),
    }


def load_model(path: Path):
    """The model and feature spec of a run directory's `model.pt` (loaded with weights_only)."""
    saved = _load_saved(path)
    if saved.get("format") != MODEL_FORMAT:
        raise ConfigurationError(f"{path}: not a silofed model file (a model job's model.pt)")
    spec = FeatureSpec.model_validate_json(saved["feature_spec"])
    model = adapter(Task(saved["task"])).build_model(spec.dim)
    model.load_state_dict(saved["state_dict"])
    return model, spec


@dataclass(frozen=True)
class SavedRun:
    job: Job
    spec: FeatureSpec
    model: nn.Module | None  # a model job's model
    centroids: np.ndarray | None  # (k, dim) of a segments job


def load_run_model(run: Path) -> SavedRun:
    """A run directory's job and what it learnt (a model, or k-means centroids)."""
    path = Path(run) / "model.pt"
    if not path.exists():
        raise ConfigurationError(
            f"{run}: no model.pt; `silofed score` needs the run directory of a model or segments "
            "job (a query run has no model)"
        )
    saved = _load_saved(path)
    spec = FeatureSpec.model_validate_json(saved["feature_spec"])
    if "job" in saved:
        job = Job.model_validate_json(saved["job"])
    else:
        job = Job.model_validate_json((Path(run) / "job.json").read_text())
    if saved.get("format") == SEGMENTS_FORMAT:
        return SavedRun(job=job, spec=spec, model=None, centroids=saved["centroids"].numpy())
    model, _ = load_model(path)
    return SavedRun(job=job, spec=spec, model=model, centroids=None)


def _load_saved(path: Path) -> dict:
    try:
        saved = torch.load(path, weights_only=True)
    except Exception as err:  # torch raises several kinds for a file that is not its format
        raise ConfigurationError(
            f"{path}: not a silofed model file, or one that needs code to load ({err}); silofed "
            "loads model files with weights_only=True and never unpickles objects"
        ) from None
    if not isinstance(saved, dict):
        raise ConfigurationError(f"{path}: not a silofed model file")
    return saved
