"""Errors raised by the streaming pillar (all carry a message that says what to do)."""

from __future__ import annotations


class StreamError(Exception):
    """Base class of the stream errors."""


class UnknownStreamPolicyError(StreamError, ValueError):
    """``infercache.stream.open(policy=...)`` got a name that is not a stream policy."""


class StreamBudgetError(StreamError, ValueError):
    """The budget cannot hold what the policy needs (e.g. fewer entries than sink tokens)."""


class StreamClosedError(StreamError, RuntimeError):
    """``feed``/``ask`` on a stream after ``close()``."""


class StreamInputError(StreamError, ValueError):
    """``feed``/``ask`` got input it cannot use (both text and embeds, a wrong shape, an empty question...)."""
