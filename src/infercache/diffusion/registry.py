"""The policy registry: ``register_policy`` adds a class, ``policies()`` lists names, ``get_policy`` looks one up."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .policies.base import CachePolicy

_POLICIES: dict[str, type[CachePolicy]] = {}
P = TypeVar("P", bound=type)


def register_policy(name: str) -> Callable[[P], P]:
    """Class decorator: register a :class:`~infercache.diffusion.policies.base.CachePolicy` under ``name``."""

    def deco(cls: P) -> P:
        if name in _POLICIES and _POLICIES[name] is not cls:
            raise ValueError(f"a diffusion cache policy named {name!r} is already registered")
        cls.name = name
        _POLICIES[name] = cls
        return cls

    return deco


def policies() -> list[str]:
    """Names of the registered diffusion caching policies."""
    from . import policies as _builtin  # noqa: F401  (registers the built-in policies)

    return sorted(_POLICIES)


def get_policy(name: str) -> type[CachePolicy]:
    """The policy class registered under ``name``; a ``ValueError`` lists the known names otherwise."""
    names = policies()
    if name not in _POLICIES:
        raise ValueError(f"unknown diffusion cache policy {name!r}; known policies: {', '.join(names)}")
    return _POLICIES[name]
