"""Typed errors that the CLI turns into one red line and exit code 2.

Every message says what is wrong, where (file, field, sample), and how to fix it.
"""

from __future__ import annotations


class DsvlError(Exception):
    """Base class for errors caused by user input (config, data, checkpoints)."""

    exit_code: int = 2


class ConfigError(DsvlError):
    """A recipe or override is invalid."""


class DataError(DsvlError):
    """A dataset, prepared file, image or sample is missing or malformed."""


class CheckpointError(DsvlError):
    """A model folder or checkpoint is missing, incomplete, or of the wrong kind."""
