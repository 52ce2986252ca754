"""A business unit's configuration file, `bu.toml` (GDPR Art. 5, 25, 30; PIPL Art. 6, 28).

One file per BU, written and owned by the BU's data steward: the BU's name and home directory, its
data source (files, or a SQL database whose password stays out of the file), its jurisdictions, its
schema (per table, each column's type, role, declared domain or bounds and sensitive-category tag),
its purposes (the columns each may use, and how) and its rules for minors and data quality. It is
validated once, when loaded; every error names the file, the key and the fix, and nothing is read or
written before it validates.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from privacy.errors import ConfigurationError, PolicyViolation
from privacy.pseudonyms import GENERALISATION_RULE_PATTERN
from privacy.quality import QualityRules
from privacy.schema import SiloSchema
from privacy.tomlfile import read_toml

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

UNIT_CONFIG_FILE = "bu.toml"
CONFIG_DOCS = "docs/bu-config.md"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# The databases a SQL source may name: those whose read-only reading clients/sql.py implements
# and the tests check (SQLite opened read-only, PostgreSQL in a READ ONLY transaction).
SQL_BACKENDS = ("sqlite", "postgresql")
DEFAULT_STATEMENT_TIMEOUT = 300.0  # seconds
# Query parameters of a database URL that carry a secret (libpq's password, ODBC's PWD, a token).
SECRET_URL_PARAMETER = re.compile(r"pass|pwd|secret|token", re.IGNORECASE)
# What may stand before a query's first keyword: blanks, `--` and `/* */` comments, parentheses.
_QUERY_PREAMBLE = re.compile(r"(?:\s+|--[^\n]*|/\*(?:(?!/\*).)*?\*/|\()*", re.DOTALL)


def database_url(text: str) -> URL:
    """A SQL source's URL, parsed; a ValueError (which does not repeat the URL: it may hold a
    password) for anything but a SQLite or PostgreSQL URL."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(text)
    except (ArgumentError, ValueError):
        raise ValueError(
            "not a database URL; write it as dialect[+driver]://user@host:port/database, e.g. "
            "postgresql://silo_reader@db.example:5432/crm or sqlite:///silo.db"
        ) from None
    if url.get_backend_name() not in SQL_BACKENDS:
        raise ValueError(
            f"silofed reads {' and '.join(SQL_BACKENDS)} databases read-only, not "
            f"'{url.get_backend_name()}'; export the tables to one of them, or to files"
        )
    if url.get_backend_name() == "sqlite":
        # clients/sql.py opens the file itself, read-only: options and other drivers have no say
        if url.get_driver_name() != "pysqlite" or url.query:
            raise ValueError(
                "a SQLite URL is sqlite:///path/to/silo.db, without a driver or options; silofed "
                "opens the file read-only itself"
            )
        if url.database in (None, "", ":memory:"):
            raise ValueError("the SQLite URL names no database file; write sqlite:///path/silo.db")
    return url


def url_secrets(url: URL) -> list[str]:
    """Where `url` carries a secret: its password, and query parameters named like one."""
    found = ["password"] if url.password is not None else []
    found += [f"?{name}=" for name in url.query if SECRET_URL_PARAMETER.search(name)]
    return found


def statement_problem(query: str) -> str | None:
    """Why `query` is not one read-only statement (a SELECT, or WITH ... SELECT), or None.

    Any ';' is refused, wherever it stands: telling a separator from a ';' inside a string or a
    comment depends on the dialect's quoting rules, and a mistake would let a second statement
    through. The reading transaction is read-only as well (clients/sql.py); this check makes a
    wrong query fail when bu.toml is loaded, with the fix, rather than in the database."""
    if ";" in query:
        return (
            "holds ';'; a table is read by one statement: remove the ';' (a trailing one too) and "
            "any further statement"
        )
    preamble = _QUERY_PREAMBLE.match(query)  # matches always, at worst the empty string
    first = re.match(r"[A-Za-z]+", query[preamble.end() if preamble else 0 :])
    if first is None or first.group().upper() not in ("SELECT", "WITH"):
        return (
            "is not a SELECT; a silo is only read: write one SELECT (or WITH ... SELECT) "
            "statement that returns the table's declared columns"
        )
    return None


class Source(_Frozen):
    """Where the silo's tables are.

    `kind = "files"` (the default): CSV/Parquet files in `directory`, each optionally AES-GCM
    encrypted (`<file>.enc`, decrypted with the BU's key ring). `kind = "sql"`: a SQLite or
    PostgreSQL database read through SQLAlchemy, read-only, at `url`, or at the URL held by the
    environment variable `url_env` so that a password never sits in the file; each table is the
    result of its `query`. A relative SQLite path is taken from `directory`, as files are.
    """

    kind: Literal["files", "sql"] = "files"
    directory: Path = Path(".")
    encrypted: bool = False
    url: str | None = Field(None, min_length=1)
    url_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    statement_timeout: float | None = Field(
        None,
        gt=0,
        description=f"seconds one query may run (SQL sources; default {DEFAULT_STATEMENT_TIMEOUT})",
    )

    @model_validator(mode="after")
    def _fits_kind(self) -> Source:
        if self.kind == "files":
            sql_only = {
                "url": self.url,
                "url_env": self.url_env,
                "statement_timeout": self.statement_timeout,
            }
            given = [key for key, value in sql_only.items() if value is not None]
            if given:
                raise ValueError(
                    f'{", ".join(given)} belong(s) to a SQL source; set kind = "sql", or remove '
                    f"{', '.join(given)}"
                )
            return self
        if self.encrypted:
            raise ValueError(
                "encrypted = true is for files sources: silofed encrypts the files it reads, and "
                "encryption at rest of a database is the database's business (its own encryption, "
                "an encrypted volume); remove encrypted, or set it to false"
            )
        if (self.url is None) == (self.url_env is None):
            raise ValueError(
                "a SQL source needs url, or url_env (the name of an environment variable holding "
                "the URL), exactly one of them"
            )
        if self.url is not None:
            try:
                url = database_url(self.url)
            except ValueError as err:
                raise ValueError(f"url: {err}") from None
            if secrets := url_secrets(url):
                raise ValueError(
                    f"url holds a secret ({', '.join(secrets)}) in the file; remove it and put the "
                    "whole URL in an environment variable named by url_env instead (url_env = "
                    '"SILOFED_DB_URL_<UNIT>"), so that no password is written in bu.toml'
                )
        return self

    @property
    def timeout(self) -> float:
        """Seconds one query of a SQL source may run."""
        return self.statement_timeout or DEFAULT_STATEMENT_TIMEOUT


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
    def _tables_fit_source(self) -> UnitConfig:
        for name, table in self.tables.items():
            if table.query is not None and self.source.kind == "files":
                raise ValueError(
                    f"tables.{name}.query: a query reads a table from a SQL source, and [source] "
                    f'kind is "files"; set [source] kind = "sql" with url or url_env, or declare '
                    "the table's file instead of its query"
                )
            if table.file is not None and self.source.kind == "sql":
                raise ValueError(
                    f'tables.{name}.file: a [source] of kind = "sql" reads every table with a '
                    f'query; replace file with query = "SELECT ... FROM ...", or set kind = '
                    '"files"'
                )
            if table.query is not None and (problem := statement_problem(table.query)):
                raise ValueError(f"tables.{name}.query {problem}")
        return self

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
        data = read_toml(
            path,
            what="bu.toml",
            missing="no BU configuration file; write one (`silofed data synth` writes examples; "
            f"see {CONFIG_DOCS})",
        )
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
