"""One registry idiom for everything a user names: methods, benchmarks, scorers, instruments, families.

A :class:`Registry` maps a name to an entry, in registration order. An entry is either the object
itself or a lazy ``"module:attribute"`` target that is imported the first time the name is looked
up (so that listing names needs no torch). Looking up a name that is not there raises the
registry's own error, whose message lists the choices; registering a name twice is a
``ValueError``. The registry is a read-only :class:`~collections.abc.Mapping` (``name in reg``,
``reg[name]``, ``reg.values()``, ``sorted(reg)``), so code that read the former plain dicts reads it
unchanged.

>>> colours = Registry("colour", missing="unknown colour {name!r}; colours: {choices}")
>>> colours.register("red", (255, 0, 0))
(255, 0, 0)
>>> colours.register("cwd", target="os:getcwd") and list(colours)
['red', 'cwd']
>>> colours.lookup("blue")
Traceback (most recent call last):
...
KeyError: "unknown colour 'blue'; colours: cwd, red"
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")

__all__ = ["Registry", "import_target"]


def import_target(target: str) -> Any:
    """The attribute named by ``"package.module:attribute"`` (the module imported on demand)."""
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"a registry target is 'module:attribute', not {target!r}")
    return getattr(importlib.import_module(module), attr)


class _Lazy:
    """An entry not imported yet: its ``module:attribute`` target."""

    __slots__ = ("target",)

    def __init__(self, target: str):
        self.target = target

    def __repr__(self) -> str:
        return f"<lazy {self.target}>"


class Registry(Mapping[str, T], Generic[T]):
    """Name -> entry, in registration order, with lazy targets and a clear unknown-name error.

    ``kind`` names what is registered (``"method"``); ``missing`` is the message of an unknown name,
    formatted with ``name`` and ``choices`` (the sorted names, comma-separated, or ``none``);
    ``error`` is the exception it raises (``KeyError`` unless told); ``choices`` replaces the
    listed choices where they are not the names themselves (e.g. the families' human names).
    """

    def __init__(self, kind: str, *, missing: str = "", error: type[Exception] = KeyError,
                 choices: Callable[[], list[str]] | None = None):
        self.kind = kind
        self.missing = missing or ("unknown " + kind + " {name!r}; choose one of: {choices}")
        self.error = error
        self._choices = choices
        self._entries: dict[str, Any] = {}

    # ------------------------------------------------------------------ registering
    @overload
    def register(self, name: str, entry: T) -> T: ...

    @overload
    def register(self, name: str, *, target: str) -> None: ...

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    def register(self, name: str, entry: Any = None, *, target: str = "") -> Any:
        """Register ``entry`` (or the lazy ``target``) under ``name``; with neither, a decorator
        that registers what it decorates. A name registered twice is a ``ValueError``."""
        if entry is None and not target:
            def decorate(obj: T) -> T:
                self.register(name, obj)
                return obj

            return decorate
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._entries[name] = _Lazy(target) if target else entry
        return None if target else entry

    def __setitem__(self, name: str, entry: T) -> None:
        """``reg[name] = entry``: :meth:`register` (a name taken is a ``ValueError``)."""
        self.register(name, entry)

    def copy(self, *, entries: bool = True) -> Registry[T]:
        """A registry of the same kind and messages, with this one's entries (or none): for tests
        that register throw-away entries without touching the real one."""
        new: Registry[T] = Registry(self.kind, missing=self.missing, error=self.error, choices=self._choices)
        if entries:
            new._entries = dict(self._entries)
        return new

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests that register a throw-away entry)."""
        del self._entries[name]

    # ------------------------------------------------------------------ looking up
    def lookup(self, name: str) -> T:
        """The entry ``name`` (imported if lazy); the registry's error listing the choices when it
        is unknown. (``get`` is the Mapping's: None for an unknown name.)"""
        if name not in self._entries:
            raise self.unknown(name)
        return self[name]

    def unknown(self, name: str) -> Exception:
        """The error for an unknown ``name``, listing the choices."""
        choices = self._choices() if self._choices is not None else sorted(self._entries)
        return self.error(self.missing.format(name=name, choices=", ".join(choices) or "none"))

    def __getitem__(self, name: str) -> T:
        entry = self._entries[name]  # KeyError(name), as a dict: lookup() is the friendly one
        if isinstance(entry, _Lazy):
            entry = self._entries[name] = import_target(entry.target)
        return entry

    def is_loaded(self, name: str) -> bool:
        """Whether ``name``'s entry is imported already (False for a lazy target not yet used)."""
        return not isinstance(self._entries[name], _Lazy)

    def target(self, name: str) -> str | None:
        """The ``module:attribute`` of a lazy entry not imported yet, else None."""
        entry = self._entries[name]
        return entry.target if isinstance(entry, _Lazy) else None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"
