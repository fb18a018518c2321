"""Argument checks shared by every constructor in l2o, one function per kind of check.

(Hyper-parameters of update rules have :func:`l2o.optim.base.check_hyperparameter`; the
``l2o-meta-train`` config is checked as a whole by :mod:`l2o.meta.configure`.)
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

__all__ = ["boolean", "log_uniform", "positive_int"]


def boolean(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False`` (not ``1``, ``"yes"`` or ``None``), else
    ``ValueError`` naming ``name``: a truthy string would silently switch a feature on."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def positive_int(name: str, value: Any) -> int:
    """``value`` as an ``int`` if it is a whole number >= 1 (``32`` or ``32.0``; not ``True``),
    else ``ValueError`` naming ``name``."""
    whole = isinstance(value, numbers.Integral) or (
        isinstance(value, float) and math.isfinite(value) and value == int(value)
    )
    if isinstance(value, bool) or not whole or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def log_uniform(
    generator: torch.Generator, lo: float, hi: float, n: int | None = None
) -> float | Tensor:
    """``exp(U(log lo, log hi))``: one Python float (``n=None``) or ``n`` float64 draws.

    The two forms are kept apart on purpose: the scalar one rounds through ``math.exp`` and the
    vector one through ``torch.exp``, and the task families and augmentations that draw from
    them must keep producing bit-identical tasks for a given seed.
    """
    if n is None:
        u = float(torch.rand((), generator=generator, device=generator.device, dtype=torch.float64))
        return math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
    u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)
    return torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
