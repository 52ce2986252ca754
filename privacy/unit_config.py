"""A business unit's configuration file, `bu.toml` (GDPR Art. 5, 25, 30; PIPL Art. 6, 28).

One file per BU, written and owned by the BU's data steward: the BU's name and home directory, its
data source, its jurisdictions, its schema (per table, each column's type, role, declared domain or
bounds and sensitive-category tag), its purposes (the columns each may use, and how) and its rules
for minors and data quality. It is validated once, when loaded; every error names the file, the key
and the fix, and nothing is read or written before it validates.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from privacy.errors import ConfigurationError, PolicyViolation
from privacy.pseudonyms import GENERALISATION_RULE_PATTERN
from privacy.quality import QualityRules
from privacy.schema import SiloSchema

UNIT_CONFIG_FILE = "bu.toml"
CONFIG_DOCS = "docs/bu-config.md"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Source(_Frozen):
    """Where the silo's tables are: a directory of CSV/Parquet files, each optionally AES-GCM
    encrypted (`<file>.enc`, decrypted with the BU's key ring)."""

    directory: Path = Path(".")
    encrypted: bool = False


class Minors(_Frozen):
    """Customers younger than `age` count only with a guardian's consent (GDPR Art. 8: 13 to 16 by
    member state; PIPL Art. 31: 14)."""

    age: int = Field(16, ge=13, le=21)
    adults_only: bool = Field(
        False,
        description="the steward attests that the silo holds no customer younger than `age`; "
        "needed when the silo has no customers.age column (otherwise the rule cannot be checked)",
    )


class PrivacyPolicy(_Frozen):
    """The BU's own privacy policy: budgets it will not exceed, and the weakest per-run guarantee
    it accepts. A job asking for more epsilon or delta than this is refused before any data is
    read (local noise holds without trusting the coordinator only if the BU checks)."""

    budget: float | None = Field(
        None, gt=0, description="epsilon for the BU as a whole, all purposes"
    )
    purpose_budgets: dict[str, float] = Field(default_factory=dict)
    max_epsilon_per_run: float | None = Field(None, gt=0)
    max_delta: float = Field(1e-5, gt=0, lt=1)


class Keys(_Frozen):
    """Key material from environment variables instead of files in the BU's home (base64)."""

    encryption_env: str | None = None
    pseudonym_env: str | None = None
    linkage_env: str | None = None


class UnitConfig(SiloSchema):
    home: Path | None = Field(None, description="the BU's state: consent registry, lineage, keys")
    source: Source = Source()
    minors: Minors = Minors()
    quality: QualityRules = QualityRules()
    privacy: PrivacyPolicy = PrivacyPolicy()
    keys: Keys = Keys()

    @model_validator(mode="after")
    def _generalisation_rules_are_valid(self) -> UnitConfig:
        for purpose, policy in self.purposes.items():
            for column, rule in policy.generalise.items():
                if not re.fullmatch(GENERALISATION_RULE_PATTERN, rule):
                    raise ValueError(
                        f"purposes.{purpose}.generalise: '{rule}' for '{column}' is not a rule; "
                        "use band:N, prefix:N, month or year"
                    )
        return self

    @classmethod
    def load(cls, path: Path) -> UnitConfig:
        """Read and validate a `bu.toml`; relative paths are taken from the file's directory."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigurationError(
                f"{path}: no BU configuration file; write one (`silofed data synth` writes examples; "
                f"see {CONFIG_DOCS})"
            ) from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigurationError(f"{path}: not valid TOML ({err}); fix the file.") from None
        try:
            config = cls.model_validate(data)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
                for e in err.errors()
            )
            raise ConfigurationError(
                f"{path}: invalid configuration: {problems} (see {CONFIG_DOCS})"
            ) from None
        except PolicyViolation as err:
            raise PolicyViolation(f"{path}: {err}") from None
        base = path.parent.resolve()
        return config.model_copy(
            update={
                "source": config.source.model_copy(
                    update={"directory": base / config.source.directory}
                ),
                "home": None if config.home is None else base / config.home,
            }
        )

    def dump(self) -> str:
        """TOML text for this configuration (paths as given)."""
        data = self.model_dump(mode="json", exclude_none=True)
        return tomli_w.dumps(data)
