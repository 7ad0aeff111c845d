"""ConfigError: a bad configuration or input file, one line naming the key (or file) and the fix.

Its own module, the lowest of `robustcl.config`, so that the bounded reader (`inputs`) and the engine
both raise it without importing each other.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration: the message is one line naming the key and the fix."""
