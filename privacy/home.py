"""A business unit's home directory: the state the BU keeps between runs, never in a run directory.

    HOME/consent.sqlite   the consent registry (events, tombstones of erased customers)
    HOME/lineage.sqlite   which runs used which customers (HMAC digests, never ids)
    HOME/ledger.sqlite    the privacy ledger: every DP release, budgets, reservations
    HOME/audit.jsonl      the BU's audit log (privacy.audit), signed with keys/audit.key
    HOME/replies/         each run's replies, kept to be replayed if the run resumes (clients.replies)
    HOME/prepared/        the job in progress's prepared data, for the BU's processes (clients.prepared)
    HOME/consent-imported a simulated BU's: the digest of the consent export its node imported
    HOME/keys/            key material, files 0600 in a 0700 directory:
        pseudonym.key     HMAC key for pseudonyms, lineage and tombstones (held by the BU only)
        linkage.key       optional, shared by BUs for purposes that declare cross-BU linkage
        kek/              the key ring that wraps the data keys of encrypted silo files

Keys may instead come from environment variables named in `bu.toml` (`[keys]`).
"""

from __future__ import annotations

from pathlib import Path

from privacy.audit import AuditLog, load_or_create_signing_key
from privacy.encryption import KeyRing
from privacy.errors import ConfigurationError
from privacy.ledger import PrivacyLedger
from privacy.lineage import Lineage
from privacy.pseudonyms import key_from_environment, load_or_create_key
from privacy.registry import ConsentRegistry
from privacy.unit_config import UnitConfig


class UnitHome:
    def __init__(self, directory: Path, config: UnitConfig) -> None:
        self.directory = Path(directory)
        self.config = config

    @classmethod
    def of(cls, config: UnitConfig, directory: Path | None = None) -> UnitHome:
        """The home named by `directory`, else by the configuration's `home`."""
        chosen = directory or config.home
        if chosen is None:
            raise ConfigurationError(
                f"unit '{config.unit}' has no home directory: set `home = \"...\"` in its bu.toml "
                "or pass --home"
            )
        return cls(Path(chosen), config)

    @property
    def keys_directory(self) -> Path:
        return self.directory / "keys"

    def registry(self) -> ConsentRegistry:
        return ConsentRegistry.open(self.directory / "consent.sqlite", unit=self.config.unit)

    def lineage(self) -> Lineage:
        return Lineage.open(self.directory / "lineage.sqlite")

    def audit_log(self) -> AuditLog:
        """The BU's own audit log, signed with its audit key (made on first use, 0600)."""
        key = load_or_create_signing_key(self.keys_directory / "audit.key")
        return AuditLog(self.directory / "audit.jsonl", actor=f"bu:{self.config.unit}", key=key)

    def ledger(self) -> PrivacyLedger:
        return PrivacyLedger.open(self.directory / "ledger.sqlite", unit=self.config.unit)

    def pseudonym_key(self) -> bytes:
        if self.config.keys.pseudonym_env:
            return key_from_environment(self.config.keys.pseudonym_env)
        return load_or_create_key(self.keys_directory / "pseudonym.key")

    def linkage_key(self) -> bytes | None:
        if self.config.keys.linkage_env:
            return key_from_environment(self.config.keys.linkage_env)
        path = self.keys_directory / "linkage.key"
        return load_or_create_key(path) if path.exists() else None

    def keyring(self, *, create: bool = False) -> KeyRing:
        if self.config.keys.encryption_env:
            return KeyRing.from_environment(self.config.keys.encryption_env)
        directory = self.keys_directory / "kek"
        if create and not directory.exists():
            return KeyRing.create(directory)
        return KeyRing.open(directory)
