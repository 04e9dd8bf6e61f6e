"""User-facing errors: one message that names the problem and the fix, never a traceback."""

from __future__ import annotations


class GlmlabError(Exception):
    """A mistake the user can fix (bad input, bad config, missing file).

    The CLI prints ``str(error)`` and exits non-zero; library callers can catch it.
    """

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")


class ConfigError(GlmlabError):
    """An unknown key, a wrong type or an out-of-range value in a config."""


class DataError(GlmlabError):
    """Unreadable, empty, binary or mis-encoded input text, or a bad data directory."""


class RunDirError(GlmlabError):
    """A run directory that is missing, incomplete or corrupted."""


class EncodingError(GlmlabError):
    """Text (usually a prompt) that the tokenizer cannot represent."""
