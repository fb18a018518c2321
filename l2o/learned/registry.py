"""Learned-optimizer architectures by name.

Checkpoints rebuild their learned optimizer only through this registry (``get_lopt(card name,
**card config)``), never by importing a path written in a file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from l2o.learned.base import LOpt
from l2o.learned.lstm_lopt import LSTMLOpt
from l2o.learned.mlp_lopt import MLPLOpt
from l2o.learned.ortho_lopt import OrthoMLPLOpt
from l2o.registry import Registry

LOptFactory = Callable[..., LOpt]
F = TypeVar("F", bound=LOptFactory)

_REGISTRY: Registry[LOptFactory] = Registry("learned optimizer")


def register_lopt(name: str, factory: F | None = None, *, overwrite: bool = False):
    """Register ``factory(**config) -> LOpt`` under ``name``.

    Use directly (``register_lopt("mine", MyLOpt)``) or as a class decorator
    (``@register_lopt("mine")``). The factory's ``name`` attribute, when it has one, must match,
    because checkpoint cards record ``lopt.name`` and are loaded back by it.
    """

    def add(factory: F) -> F:
        declared = getattr(factory, "name", name)
        if declared != name:
            raise ValueError(
                f"cannot register {factory!r} as {name!r}: its name attribute is {declared!r}; "
                "checkpoints are reloaded by that name, so the two must agree"
            )
        return _REGISTRY.register(name, factory, overwrite=overwrite)

    return add if factory is None else add(factory)


def lopt_names() -> tuple[str, ...]:
    """Registered learned-optimizer names, sorted."""
    return _REGISTRY.names()


def get_lopt(name: str, **kwargs) -> LOpt:
    """The learned optimizer registered as ``name``, built with ``kwargs``."""
    return _REGISTRY[name](**kwargs)


register_lopt(MLPLOpt.name, MLPLOpt)
register_lopt(LSTMLOpt.name, LSTMLOpt)
register_lopt(OrthoMLPLOpt.name, OrthoMLPLOpt)
