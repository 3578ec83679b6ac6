"""The errors a stage reports to its user before any compute: a bad key, a damaged input."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that the pipeline cannot run with."""
