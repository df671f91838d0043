"""The one exception hierarchy of fedlora.

Every error a user can cause (bad config, bad data, bad model path, a spent
privacy budget, a malformed update) is a :class:`FedloraError`. The CLI maps
each subclass to an exit code and prints ``str(err)`` as one line, never a
traceback. Messages say what is wrong and what to do about it.

This module imports nothing heavy: ``privacy/`` uses it too.
"""

from __future__ import annotations


class FedloraError(Exception):
    """Base class of every user-facing fedlora error."""

    exit_code: int = 1


class ConfigError(FedloraError):
    """A configuration value, key or combination is invalid."""

    exit_code = 2


class DataError(FedloraError):
    """Training data is missing, unreadable or malformed."""

    exit_code = 3


class ModelError(FedloraError):
    """A model or adapter path is missing, unsupported or mismatched."""

    exit_code = 4


class PrivacyError(FedloraError):
    """A privacy ledger or configuration is invalid or tampered with."""

    exit_code = 5


class BudgetExhaustedError(PrivacyError):
    """Training would take a device past its privacy budget."""

    exit_code = 6


class UpdateError(FedloraError):
    """An adapter update is corrupt, non-finite or does not match the global adapter."""

    exit_code = 7


class ExportError(FedloraError):
    """Merging or quantizing the model failed, or the artefact failed its quality gate."""

    exit_code = 8
