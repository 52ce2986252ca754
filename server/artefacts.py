"""Writing run artefacts so that nothing is ever half written: files go to a temporary name and are
renamed into place; a run directory is assembled under a staging name and renamed at the end."""

from __future__ import annotations

import secrets
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from privacy.errors import ConfigurationError


def new_run_id(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def check_target(final: Path, *, overwrite: bool) -> None:
    if final.exists() and not overwrite:
        raise ConfigurationError(
            f"{final} already exists; choose another --out or pass --overwrite"
        )


def staging_dir(final: Path) -> Path:
    """A fresh, empty directory beside `final`, to be published with `publish`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))


def publish(staging: Path, final: Path, *, overwrite: bool) -> None:
    """Move a complete staging directory to `final` (replacing it only when `overwrite`)."""
    check_target(final, overwrite=overwrite)
    if final.exists():
        retired = final.with_name(f".{final.name}.retired-{secrets.token_hex(3)}")
        final.rename(retired)
        staging.rename(final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(final)
