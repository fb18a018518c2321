"""The learned-optimizer contract: a family of update rules indexed by meta-parameters.

    meta_params = lopt.init_meta(generator)     # dict of tensors, meta-trained
    rule        = lopt.rule(meta_params)        # an l2o.optim UpdateRule

Meta-gradients flow to ``meta_params`` through ``rule.update`` inside an unroll, so ``rule``
must close over ``meta_params`` without copying or detaching them.
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from l2o.optim.base import Params, UpdateRule, check_hyperparameter


class LOpt(ABC):
    """Base class of learned-optimizer architectures (``configs/lopt/``)."""

    #: Registry name, also written into checkpoint cards.
    name: str = "lopt"

    @abstractmethod
    def init_meta(self, generator: torch.Generator) -> Params:
        """Initial meta-parameters."""

    @abstractmethod
    def rule(self, meta_params: Params) -> UpdateRule:
        """The update rule defined by ``meta_params``."""

    @abstractmethod
    def config(self) -> dict:
        """Constructor keyword arguments, JSON-serialisable, so a checkpoint rebuilds the lopt."""


def check_decays(name: str, decays: Sequence[float]) -> tuple[float, ...]:
    """``decays`` as floats, each strictly between 0 and 1, at least one (else ``ValueError``
    naming ``name``)."""
    decays = tuple(float(d) for d in decays)
    if not decays:
        raise ValueError(f"{name} must list at least one decay")
    for d in decays:
        check_hyperparameter(name, d, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    return decays


def check_timescales(timescales: Sequence[float]) -> tuple[float, ...]:
    """Step-embedding timescales as floats, each positive (else ``ValueError``)."""
    checked = tuple(float(t) for t in timescales)
    if any(not t > 0 for t in checked):
        raise ValueError(f"step_timescales must be positive, got {list(timescales)}")
    return checked


def init_mlp(sizes: Sequence[int], generator: torch.Generator, output_init_scale: float) -> Params:
    """Weights ``w{i}`` (``[fan_in, fan_out]``, a normal clipped at 2 std, std
    ``1/sqrt(fan_in)``, the output layer's times ``output_init_scale``) and zero biases
    ``b{i}`` of an MLP with layer widths ``sizes`` (inputs first, outputs last)."""
    meta: Params = {}
    last = len(sizes) - 2
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        noise = torch.randn(fan_in, fan_out, generator=generator, device=generator.device)
        scale = (output_init_scale if i == last else 1.0) / math.sqrt(fan_in)
        meta[f"w{i}"] = noise.clamp(-2.0, 2.0) * scale
        meta[f"b{i}"] = torch.zeros(fan_out, device=generator.device)
    return meta
