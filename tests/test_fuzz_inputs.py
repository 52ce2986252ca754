"""Configuration parsers under arbitrary input (issue #9, safe inputs): a job file, a `bu.toml`
and a job's fields either parse or fail with silofed's `ConfigurationError` naming the file; never
another exception, never a hang. Oversized and deeply nested files are refused before or while
parsing, within a fixed bound on size."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from federation.job import Job, load_job_file
from privacy import tomlfile
from privacy.errors import ConfigurationError
from privacy.tomlfile import MAX_TOML_BYTES
from privacy.unit_config import UnitConfig
from tests.strategies import nested_values

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# Values a TOML document may hold, nested a little: what a job or bu.toml section could contain.
scalars, values = nested_values(integer_bits=64)
JOB_KEYS = [*Job.model_fields, "seed", "unknown"]


@FUZZ
@given(st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_any_bytes_as_a_job_file_or_a_bu_toml_give_a_clean_error(tmp_path_factory, data) -> None:
    directory = tmp_path_factory.mktemp("fuzz")
    for name, load in (("job.toml", load_job_file), ("bu.toml", UnitConfig.load)):
        path = directory / name
        path.write_bytes(data)
        try:
            loaded = load(path)
        except ConfigurationError as err:
            assert str(path) in str(err)
        else:
            assert isinstance(loaded, dict | UnitConfig)


@FUZZ
@given(st.dictionaries(st.sampled_from(JOB_KEYS), values, max_size=6))
def test_any_fields_of_a_job_give_a_job_or_a_clean_error(data) -> None:
    try:
        job = Job.parse(data, source="fuzz.toml")
    except ConfigurationError as err:
        assert "fuzz.toml" in str(err)
    else:
        assert isinstance(job, Job)


@pytest.mark.parametrize("loader", [load_job_file, UnitConfig.load])
def test_deep_nesting_and_oversize_are_refused(tmp_path: Path, loader, monkeypatch) -> None:
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 50_000 + "]" * 50_000)
    inline = tmp_path / "inline.toml"
    inline.write_text("a = " + "{b = " * 20_000 + "1" + "}" * 20_000)
    large = tmp_path / "large.toml"
    large.write_text("# padding\n" * (MAX_TOML_BYTES // 10 + 1))
    for path, words in ((deep, "too deeply"), (inline, "too deeply")):
        with pytest.raises(ConfigurationError, match=words) as raised:
            loader(path)
        assert str(path) in str(raised.value)

    def never(text: str) -> dict:
        raise AssertionError("an oversized file reached the parser")

    monkeypatch.setattr(tomlfile.tomllib, "loads", never)
    with pytest.raises(ConfigurationError, match="at most 1,000,000 bytes") as raised:
        loader(large)  # refused on its size alone: the work is bounded before any parsing
    assert str(large) in str(raised.value)
