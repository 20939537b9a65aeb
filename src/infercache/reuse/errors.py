"""Errors raised by ``infercache.reuse``."""

from __future__ import annotations


class ReuseError(Exception):
    """Base class for errors raised by the reuse modes."""


class UnsupportedModelError(ReuseError, ValueError):
    """The model cannot be used with the requested reuse mode (the message says why and what to use instead)."""


class UnsupportedRopeError(UnsupportedModelError):
    """The model's positional encoding cannot be re-rotated (RoPE scaling type, partial rotary, no RoPE)."""
