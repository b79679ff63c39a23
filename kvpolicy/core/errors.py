"""Errors raised by kvpolicy.

Every error names what went wrong *and* the fix, because the usual caller is someone
passing a cache object to ``generate`` who never reads our source.
"""

from __future__ import annotations


class KVPolicyError(Exception):
    """Base class of every error kvpolicy raises on purpose."""


class UnknownPolicyError(KVPolicyError, KeyError):
    def __init__(self, name: str, available: list[str]):
        self.name = name
        self.available = available
        super().__init__(
            f"unknown policy {name!r}; available policies: {', '.join(sorted(available)) or '(none)'}. "
            "Pick one of those, or register yours under the 'kvpolicy.policies' entry-point group."
        )

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return self.args[0]


class ConfigError(KVPolicyError, ValueError):
    """A policy setting is out of range, unknown, or a preset cannot be found/read."""


class UnsupportedModelError(KVPolicyError):
    """The model type or attention implementation cannot be served correctly."""


class CacheMisuseError(KVPolicyError):
    """The cache was used in a way that would give silently wrong results, or fail deep inside
    transformers with an error that does not say why: reused for another model, batch or prompt
    without ``cache.reset()``, given an empty prompt, or asked to do what its policy cannot undo."""
