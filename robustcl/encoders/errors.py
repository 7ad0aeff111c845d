"""The one error of reading an encoder, shared by every reader in this package."""
from __future__ import annotations

from robustcl.config import ConfigError


class EncoderError(ConfigError):
    """An encoder robustcl cannot load or use: the message says what and how to fix it."""


__all__ = ["EncoderError"]
