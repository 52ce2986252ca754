"""A simulated BU's node imports the consent export beside its silo at its first exchange, as its
steward would have before the run (`Node.consent_export`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import clients.app
from clients.app import CONSENT_IMPORTED, BusinessUnitClient, Node
from clients.steward import consent_export
from federation.features import resolve_feature_spec
from federation.job import Job
from federation.models import initial_parameters
from federation.wire import Phase
from privacy.errors import ConfigurationError
from simulations.synthetic import unit_schema
from tests.clients.test_training import _instruction, _node

JOB = Job(rounds=2, features=resolve_feature_spec("churn", [unit_schema("x")]))


def _counting_imports(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    imports: list[Path] = []
    real = clients.app.import_consent

    def counted(home, path):
        imports.append(path)
        return real(home, path)

    monkeypatch.setattr(clients.app, "import_consent", counted)
    return imports


def _fit(node: Node, server_round: int, params):
    clients.app._PREPARED.clear()  # each exchange as a fresh worker would serve it
    return BusinessUnitClient(node).fit(params, _instruction(Phase.TRAIN, server_round, JOB))


def test_the_node_imports_once_and_answers_as_a_home_prepared_before_the_run(
    small_silos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    imports = _counting_imports(monkeypatch)
    silo = small_silos / "ecommerce"
    node = Node(silo / "bu.toml", tmp_path / "own", True, consent_export=consent_export(silo))
    prepared = _node(small_silos, tmp_path)  # the steward imported before the run
    params = initial_parameters(JOB.task, JOB.feature_spec.dim)
    for server_round in (1, 2):
        mine, n, _m = _fit(node, server_round, params)
        theirs, m, _m = _fit(prepared, server_round, params)
        assert n == m
        for a, b in zip(mine, theirs, strict=True):
            np.testing.assert_array_equal(a, b)
        params = mine
    assert imports == [consent_export(silo)]  # the first exchange only
    assert (node.home / CONSENT_IMPORTED).exists()


def test_a_changed_export_is_imported_again(
    small_silos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    silo = tmp_path / "silos" / "ecommerce"
    shutil.copytree(small_silos / "ecommerce", silo)
    imports = _counting_imports(monkeypatch)
    export = consent_export(silo)
    node = Node(silo / "bu.toml", tmp_path / "home", True, consent_export=export)
    params = initial_parameters(JOB.task, JOB.feature_spec.dim)
    _fit(node, 1, params)
    export.write_bytes(export.read_bytes())  # rewritten, same bytes: nothing to import
    _fit(node, 2, params)
    assert len(imports) == 1
    shutil.rmtree(node.home)
    _fit(node, 1, params)  # the home was wiped: a fresh import, marker and all
    assert len(imports) == 2


def test_a_malformed_export_stops_the_node_naming_the_file(
    small_silos: Path, tmp_path: Path
) -> None:
    silo = tmp_path / "silos" / "ecommerce"
    shutil.copytree(small_silos / "ecommerce", silo)
    for old in silo.glob("consent.*"):
        old.unlink()
    bad = silo / "consent.csv"
    bad.write_text("customer_id,purpose,granted,timestamp\nc1,churn_model,maybe,2024-01-01\n")
    node = Node(silo / "bu.toml", tmp_path / "home", True, consent_export=bad)
    params = initial_parameters(JOB.task, JOB.feature_spec.dim)
    with pytest.raises(ConfigurationError, match=r"consent\.csv: column 'granted', row 1"):
        _fit(node, 1, params)
    assert not (node.home / CONSENT_IMPORTED).exists()  # tried again at the next exchange
