"""No loader of silofed unpickles (issue #9, safe inputs).

A pickle payload whose `__reduce__` would create a marker file is handed to every loader that reads
a file or a message from outside the process: the model file, a silo table, a consent file, a job
file, `bu.toml`, an audit log and its public key, and the coordinator's instruction. Each refuses it
with silofed's own error naming the input, and the marker never appears: nothing was executed.
"""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from privacy.errors import SilofedError


class Payload:
    """Unpickling this creates `marker`: the side effect that must never happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "executed"


@pytest.fixture
def payload(marker: Path) -> bytes:
    data = pickle.dumps(Payload(marker))
    pickle.loads(data)  # the payload works: unpickled, it creates the marker
    assert marker.exists()
    marker.unlink()
    return data


@pytest.fixture(scope="module")
def silos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from simulations.synthetic import synthesize

    out = tmp_path_factory.mktemp("safe-silos") / "silos"
    synthesize(out, units=1, customers=200, seed=3)
    return out


def _refused(load: Callable[[], object], marker: Path, *names: str) -> None:
    with pytest.raises(SilofedError) as raised:
        load()
    assert not marker.exists(), "the payload was executed"
    for name in names:
        assert name in str(raised.value), str(raised.value)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch, on the raw pickle
def test_a_model_file_holding_a_pickled_object_is_refused(tmp_path, marker, payload) -> None:
    from federation.saved import load_model

    raw = tmp_path / "raw.pt"
    raw.write_bytes(payload)
    _refused(lambda: load_model(raw), marker, "raw.pt", "weights_only")
    # a genuine torch archive around the object: torch.load's own pickle, weights only
    archive = tmp_path / "model.pt"
    torch.save({"format": "silofed.model/1", "model": Payload(marker)}, archive)
    assert not marker.exists()
    _refused(lambda: load_model(archive), marker, "model.pt")


def test_a_silo_table_holding_a_pickle_is_refused(silos, tmp_path, marker, payload) -> None:
    from clients.silo import load_silo
    from privacy.unit_config import UnitConfig

    copy = tmp_path / "silos"
    shutil.copytree(silos, copy)
    (bu_config,) = copy.glob("*/bu.toml")
    (customers,) = bu_config.parent.glob("customers.*")
    customers.write_bytes(payload)
    _refused(lambda: load_silo(UnitConfig.load(bu_config)), marker, customers.name)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_consent_file_holding_a_pickle_is_refused(tmp_path, marker, payload, suffix) -> None:
    from privacy.registry import ConsentRegistry

    consent = tmp_path / f"consent{suffix}"
    consent.write_bytes(payload)
    with ConsentRegistry.open(tmp_path / "consent.sqlite", unit="u") as registry:
        _refused(
            lambda: registry.import_file(consent, tombstone_key=b"k" * 32),
            marker,
            consent.name,
        )


def test_configuration_files_holding_a_pickle_are_refused(tmp_path, marker, payload) -> None:
    from federation.job import load_job_file
    from privacy.unit_config import UnitConfig

    job = tmp_path / "job.toml"
    job.write_bytes(payload)
    _refused(lambda: load_job_file(job), marker, "job.toml")
    bu = tmp_path / "bu.toml"
    bu.write_bytes(payload)
    _refused(lambda: UnitConfig.load(bu), marker, "bu.toml")


def test_an_audit_log_and_a_key_holding_a_pickle_are_refused(tmp_path, marker, payload) -> None:
    from privacy.audit import load_public_key, verify_home

    _refused(lambda: load_public_key(payload.decode("latin-1")), marker, "public key")
    home = tmp_path / "home"
    home.mkdir()
    (home / "audit.jsonl").write_bytes(payload)
    try:
        result = verify_home(home)
    except SilofedError:
        pass
    else:
        assert not result.ok
    assert not marker.exists()


def test_an_instruction_holding_a_pickle_is_refused(marker, payload) -> None:
    from federation.wire import Instruction, UnitReport

    config = {
        "silofed.phase": "train",
        "silofed.round": 1,
        "silofed.run_id": "r",
        "silofed.started_at": "2026-01-01T00:00:00+00:00",
        "silofed.job": payload.decode("latin-1"),
        "silofed.seed": -1,
    }
    _refused(lambda: Instruction.from_config(config), marker, "not a silofed instruction")
    _refused(
        lambda: UnitReport.from_metrics({UnitReport.KEY: payload.decode("latin-1")}),
        marker,
        "no valid silofed report",
    )


PACKAGES = ("federation", "clients", "server", "privacy", "simulations", "bench")
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}
UNSAFE_CALLS = {"read_pickle", "to_pickle"}


def _unsafe_uses(source: str, where: str) -> list[str]:
    """What in `source` could unpickle: an import of a pickling module, a pandas pickle call,
    `allow_pickle=True`, a `torch.load` without `weights_only=True`."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source, filename=where)):
        if isinstance(node, ast.Import):
            names = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names = {(node.module or "").split(".")[0]}
        else:
            names = set()
        found += [f"{where}:{node.lineno} imports {n}" for n in sorted(names & UNSAFE_MODULES)]
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "attr", getattr(node.func, "id", ""))
        keywords = {k.arg: k.value for k in node.keywords}
        if name in UNSAFE_CALLS:
            found.append(f"{where}:{node.lineno} calls {name}")
        allow = keywords.get("allow_pickle")
        if isinstance(allow, ast.Constant) and allow.value is True:
            found.append(f"{where}:{node.lineno} passes allow_pickle=True")
        owner = getattr(node.func, "value", None)
        if name == "load" and getattr(owner, "id", None) == "torch":
            weights = keywords.get("weights_only")
            if not (isinstance(weights, ast.Constant) and weights.value is True):
                found.append(f"{where}:{node.lineno} calls torch.load without weights_only")
    return found


def test_the_unpickling_check_finds_each_kind() -> None:
    source = (
        "import pickle\nfrom dill import loads\nimport torch\nm = torch.load(p)\n"
        "a = np.load(p, allow_pickle=True)\nf = pd.read_pickle(p)\n"
        "ok = torch.load(p, weights_only=True)\n"
    )
    assert _unsafe_uses(source, "x.py") == [
        "x.py:1 imports pickle",
        "x.py:2 imports dill",
        "x.py:4 calls torch.load without weights_only",
        "x.py:5 passes allow_pickle=True",
        "x.py:6 calls read_pickle",
    ]


def test_no_package_module_can_unpickle() -> None:
    """Every module of silofed's packages, parsed: nothing that could unpickle."""
    root = Path(__file__).resolve().parents[1]
    files = [f for package in PACKAGES for f in sorted((root / package).rglob("*.py"))]
    assert len(files) > 50
    found = [
        use
        for path in files
        for use in _unsafe_uses(path.read_text(encoding="utf-8"), str(path.relative_to(root)))
    ]
    assert not found, found
