"""Optimizers by name: ``get("adam", lr=1e-3)`` gives the rule, ``get_class("adam")`` the
``torch.optim`` class. Configs in ``configs/optim/`` instantiate the rule classes directly.

A name is a rule class, its ``torch.optim`` class and optional defaults that differ from the
rule's own (``momentum`` is SGD with ``momentum=0.9``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from l2o.optim import muon, optimizers, rules
from l2o.optim.base import UpdateRule
from l2o.registry import Registry

__all__ = ["get", "get_class", "names", "register"]


@dataclass(frozen=True)
class _Entry:
    rule_cls: type[UpdateRule]
    optimizer_cls: type[torch.optim.Optimizer]
    defaults: dict[str, Any] = field(default_factory=dict)


_REGISTRY: Registry[_Entry] = Registry("optimizer")


def register(
    name: str,
    rule_cls: type[UpdateRule],
    optimizer_cls: type[torch.optim.Optimizer],
    **defaults: Any,
) -> None:
    """Make ``name`` known to :func:`get` and :func:`get_class`.

    ``defaults`` override the rule's field defaults under this name; the class that
    :func:`get_class` returns then uses them as well.
    """
    unknown = set(defaults) - set(rule_cls.hyperparameter_names())
    if unknown:
        raise ValueError(f"{rule_cls.__name__} has no hyper-parameter(s) {sorted(unknown)}")
    if defaults:
        optimizer_cls = _with_defaults(optimizer_cls, name, defaults)
    _REGISTRY.register(name, _Entry(rule_cls, optimizer_cls, dict(defaults)))


def names() -> list[str]:
    """The registered names, sorted."""
    return list(_REGISTRY.names())


def get(name: str, **hparams: Any) -> UpdateRule:
    """The update rule registered as ``name``, with ``hparams`` replacing its defaults."""
    entry = _entry(name)
    return entry.rule_cls(**{**entry.defaults, **hparams})


def get_class(name: str) -> type[torch.optim.Optimizer]:
    """The ``torch.optim.Optimizer`` class registered as ``name``."""
    return _entry(name).optimizer_cls


def _entry(name: str) -> _Entry:
    return _REGISTRY[name]


def _with_defaults(
    optimizer_cls: type[torch.optim.Optimizer], name: str, defaults: dict[str, Any]
) -> type[torch.optim.Optimizer]:
    """A subclass of ``optimizer_cls`` whose keyword defaults are ``defaults``."""

    def __init__(self, params, **hparams):
        optimizer_cls.__init__(self, params, **{**defaults, **hparams})

    settings = ", ".join(f"{k}={v!r}" for k, v in defaults.items())
    return type(
        f"{optimizer_cls.__name__}_{name}",
        (optimizer_cls,),
        {
            "__init__": __init__,
            "__module__": __name__,
            "__doc__": f"``{optimizer_cls.__name__}`` with {settings} (registered as {name!r}).",
        },
    )


register("sgd", rules.SGD, optimizers.SGD)
register("momentum", rules.SGD, optimizers.SGD, momentum=0.9)
register("nesterov", rules.SGD, optimizers.SGD, momentum=0.9, nesterov=True)
register("adagrad", rules.Adagrad, optimizers.Adagrad)
register("adadelta", rules.Adadelta, optimizers.Adadelta)
register("rmsprop", rules.RMSprop, optimizers.RMSprop)
register("adam", rules.Adam, optimizers.Adam)
register("adamw", rules.AdamW, optimizers.AdamW)
register("amsgrad", rules.AMSGrad, optimizers.AMSGrad)
register("adamax", rules.Adamax, optimizers.Adamax)
register("nadam", rules.NAdam, optimizers.NAdam)
register("muon", muon.Muon, optimizers.Muon)
