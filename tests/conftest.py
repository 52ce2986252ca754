"""Shared fixtures: small synthetic silos, written once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from simulations.synthetic import synthesize


@pytest.fixture(scope="session", autouse=True)
def _private_homes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test writes to the user's home: silofed's and Flower's homes are temporary. Subprocesses
    inherit the environment."""
    home = tmp_path_factory.mktemp("silofed-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SILOFED_HOME", str(home))
        patch.setenv("FLWR_HOME", str(home / "flwr"))
        patch.setenv("FLWR_TELEMETRY_ENABLED", "0")
        yield


@pytest.fixture(scope="session")
def small_silos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic BUs of about 400 customers each (Parquet), seed 7."""
    out = tmp_path_factory.mktemp("silos") / "silos"
    synthesize(out, units=3, customers=400, seed=7)
    return out
