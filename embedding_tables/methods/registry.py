"""The methods embtab knows, by name: the built-in ones register here, and so may a plug-in."""

from __future__ import annotations

from embedding_tables.errors import ConfigError
from embedding_tables.methods.base import Method

_METHODS: dict[str, type[Method]] = {}


def register(method: type[Method]) -> type[Method]:
    """Make `method` known by its name (a class decorator); a name may be registered once."""
    if not method.name:
        raise ConfigError(f"{method.__name__} has no name; set the class variable `name`")
    known = _METHODS.get(method.name)
    if known is not None and known is not method:
        raise ConfigError(
            f"method name {method.name!r} is already registered by {known.__module__}."
            f"{known.__qualname__}"
        )
    _METHODS[method.name] = method
    return method


def method_class(name: str) -> type[Method]:
    """The registered method called `name`; ConfigError listing the known ones otherwise."""
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; accepted: {', '.join(_METHODS)}")
    return _METHODS[name]


def method_names() -> tuple[str, ...]:
    """Every registered method's name, in registration order."""
    return tuple(_METHODS)
