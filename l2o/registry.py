"""Named collections: one :class:`Registry` behind every ``get_*(name)`` in l2o.

    OPTIMIZERS = Registry("optimizer")
    OPTIMIZERS.register("adam", entry)
    OPTIMIZERS["adam"]              # entry
    OPTIMIZERS["adamm"]             # ValueError: unknown optimizer 'adamm' (did you mean
                                    # 'adam'?); known optimizers: adagrad, adam, ...

A registry is a read-only mapping from name to object (a class, a factory, a value), so
``name in REG``, ``sorted(REG)`` and ``REG[name]`` work as for a dict; lookups of unknown names
raise ``ValueError`` naming the closest known one. Aliases resolve to another name.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry", "did_you_mean"]


def did_you_mean(name: object, known: Iterable[object]) -> str:
    """``" (did you mean 'x'?)"`` for the known name closest to ``name``, or ``""``."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_keyword(fn: object, kwargs: Iterable[str], skip: Iterable[str] = ()) -> str | None:
    """An error message for the first of ``kwargs`` that callable ``fn`` does not accept (None
    if it takes them all, or any ``**kwargs``): ``"no argument 'x' (did you mean 'y'?);
    accepted: a, b"``. ``skip``: parameters that are not the caller's to set."""
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    accepted = [n for n in params if n not in (*skip, "self")]
    for key in kwargs:
        if key not in params:
            return (
                f"no argument {key!r}{did_you_mean(key, accepted)}; accepted: {', '.join(accepted)}"
            )
    return None


class Registry(Mapping[str, T], Generic[T]):
    """Objects by name, for one ``kind`` of thing ("optimizer", "task family", ...).

    Args:
        kind: what the names name, used in error messages.
        plural: its plural (default ``kind + "s"``).
    """

    def __init__(self, kind: str, plural: str | None = None) -> None:
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, obj: T, *, overwrite: bool = False) -> T:
        """Add ``obj`` under ``name``; registering the same object again is a no-op, taking a
        name of another object needs ``overwrite=True``. Returns ``obj`` (usable in
        decorators)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._aliases:
            raise ValueError(f"{self.kind} name {name!r} is an alias of {self._aliases[name]!r}")
        if name in self._items and self._items[name] is not obj and not overwrite:
            raise ValueError(
                f"{self.kind} name {name!r} is already registered ({self._items[name]!r}); pick "
                "another name or pass overwrite=True"
            )
        self._items[name] = obj
        return obj

    def unregister(self, name: str) -> None:
        """Remove ``name`` (and the aliases of it), if registered (plugins, tests)."""
        self._items.pop(name, None)
        self._aliases = {a: n for a, n in self._aliases.items() if n != name and a != name}

    def copy(self) -> Registry[T]:
        """An independent registry with the same entries."""
        other: Registry[T] = Registry(self.kind, self.plural)
        other._items, other._aliases = dict(self._items), dict(self._aliases)
        return other

    def alias(self, alias: str, name: str) -> None:
        """Make ``alias`` another name of the registered ``name``."""
        if name not in self._items:
            raise ValueError(f"cannot alias {alias!r} to unknown {self.kind} {name!r}")
        self._aliases[alias] = name

    def resolve(self, name: str) -> str:
        """The registered name ``name`` stands for (itself, or what it aliases)."""
        return self._aliases.get(name, name) if isinstance(name, str) else name

    def names(self, *, aliases: bool = False) -> tuple[str, ...]:
        """Registered names, sorted (with ``aliases``, theirs too)."""
        return tuple(sorted((*self._items, *(self._aliases if aliases else ()))))

    def unknown(self, name: object) -> ValueError:
        """The error for an unknown ``name``: the closest known name and all of them."""
        known = self.names(aliases=True)
        return ValueError(
            f"unknown {self.kind} {name!r}{did_you_mean(name, known)}; known {self.plural}: "
            f"{', '.join(known)}"
        )

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[self.resolve(name)]
        except (KeyError, TypeError):
            raise self.unknown(name) from None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.resolve(name) in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"
