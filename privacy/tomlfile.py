"""Reading a TOML file someone else wrote (a job, a `bu.toml`, a deployment's files) safely.

The file is refused before it is parsed when it is larger than `MAX_TOML_BYTES`, and every way it
can fail to be a TOML table becomes a `ConfigurationError` naming the file: missing, not UTF-8,
not TOML, or nested so deeply that the parser would exhaust Python's stack (`tomllib` recurses
once per level: `a = [[[...]]]` ten thousand deep is a short file).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from privacy.errors import ConfigurationError

MAX_TOML_BYTES = 1_000_000  # the largest real configuration is a few kilobytes


def read_toml(path: Path, *, what: str, missing: str) -> dict[str, Any]:
    """The TOML table in `path` (a `what`, for the messages); `missing` says what to do when the
    file does not exist."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ConfigurationError(f"{path}: {missing}") from None
    if size > MAX_TOML_BYTES:
        raise ConfigurationError(
            f"{path}: a {what} is at most {MAX_TOML_BYTES:,} bytes; this one has {size:,}"
        )
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigurationError(f"{path}: a {what} is UTF-8 text (TOML); fix the file.") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigurationError(f"{path}: not valid TOML ({err}); fix the file.") from None
    except RecursionError:
        raise ConfigurationError(
            f"{path}: the {what} nests arrays or tables too deeply to be a configuration"
        ) from None
