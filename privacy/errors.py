"""The error hierarchy of silofed.

Every error says what is wrong and what to do about it, and carries the process exit code the
`silofed` command uses for it: 1 run failed, 2 bad usage or configuration, 3 refused by a BU.
"""

from __future__ import annotations


class SilofedError(Exception):
    """Base class of every error silofed raises on purpose."""

    exit_code = 1


class RunFailed(SilofedError):
    """The federated run started but could not finish (a BU failed, too few replies, ...)."""

    exit_code = 1


class ConfigurationError(SilofedError):
    """A job, a schema, a policy or a command line is wrong; nothing was computed."""

    exit_code = 2


class SiloError(ConfigurationError):
    """A silo's files do not match its declared schema (missing column, wrong type, empty file)."""


class PolicyViolation(ConfigurationError):
    """A column policy asks for something no policy may allow (a special category, an undeclared
    column). Privacy-relevant deviations are errors, never warnings."""


class RefusedByUnit(SilofedError):
    """A business unit refused the job (consent or budget); it touched no data for it."""

    exit_code = 3


class ConsentMissing(RefusedByUnit):
    """The BU holds no consent records for the job's purpose."""
